"""Missed calls: which inbound calls nobody answered, decided once per call. Pure: no I/O, time is a parameter.

The rule (from the issue): an inbound call to a number owned by an account, that no leg answered
(a ring group where someone answered is not missed) and that did not end in voicemail, is mailed
once: caller, number called, start time, how long it rang.

What a call looks like (Asterisk 22 recordings, ``tests/fixtures/ami``). A call is the group of its
CDRs with one Linkedid; Local channels give 3-4 CDRs per call, one per channel segment:

* ``missed_call`` (Linkedid ``1795882897.4``): ``Wait`` FAILED (the phone's half, context
  ``lab-phones``), ``Dial`` NO ANSWER (``lab-inbound``, destination ``100``, Duration 4 = the ring
  time: Dial(…,4) timed out; the CDR engine closes it when the Dial ends and opens a separate
  ``Hangup`` CDR for what the channel did afterwards), ``Hangup`` NO ANSWER (Duration 0),
  ``AppDial2`` NO ANSWER (the Originate's own half, the root: Uniqueid = Linkedid, Duration 4).
  Every CDR carries ``acct1001``: the lab dialplan sets ``CHANNEL(accountcode)`` on inbound *and*
  outbound calls, so the account code alone does not tell the direction (see ``owner_of``).
* ``voicemail``: the same ring (``Dial`` NO ANSWER, Duration 4, destination ``vm100``), then a
  ``VoiceMail`` ANSWERED CDR (LastData ``100@default,u``) and a ``MessageWaiting`` with the same
  Linkedid. The caller's half has a ``Hangup`` ANSWERED CDR: answered by voicemail, not a person.
  The phone's ``Wait`` CDR is sent when the phone stops ringing, the others ~27 s later when the
  call ends: a channel's CDRs are dispatched when *that channel* hangs up.

Decision (:func:`decide`, one call's CDRs):

* **inbound-owned**: the caller of the tracker names the owner (``owner_of``); ``None`` → not missed.
* **answered by a party** (→ not missed): an ANSWERED CDR that names who answered: a dialling
  application (:data:`DIAL_APPS`) with a ``DestinationChannel``, or the dialled leg's own CDR
  (:data:`ANSWERED_LEG_APPS`). Any other ANSWERED CDR (VoiceMail, Playback, ReceiveFAX, Queue
  alone, the caller's ``Hangup``/``Wait`` half) was answered by the PBX, not by a person: a
  ``Queue`` answers the caller itself before any agent rings, so only a Queue CDR with a
  destination channel counts. (No transcript covers Queue or FollowMe: that part is unverified.)
* **ended in voicemail** (→ not missed): a ``VoiceMail`` CDR ANSWERED, or the tracker saw a
  ``MessageWaiting``/``ClickPhoneVoicemail`` event with the call's Linkedid. The CDR alone
  suffices on purpose: it also reaches us through the Master.csv reconciliation, events do not, so
  a call recovered after an AMI gap is decided the same way. A caller who hangs up during the
  greeting therefore gets no missed-call mail either.
* **rang**: at least one ringing CDR (:data:`DIAL_APPS`, not answered by a party: NO ANSWER,
  BUSY, FAILED, CONGESTION). A call that never tried to reach anyone (an IVR the caller left, a
  fax) was not missed.

Fields: ``rang_seconds`` is the ringing CDRs' ``Duration`` (never StartTime/EndTime, which are
whole seconds); several ringing CDRs (forks, a sequential hunt) give the span from the first one's
start to the end of the one that ends last, ``start`` offsets in whole seconds (real ones, in UTC:
a hunt across a DST change; an ambiguous wall time of the repeated autumn hour read the way that
puts it nearest the call's other ringing CDRs, see :func:`_seconds_between`) plus ``Duration``.
It includes dialplan time spent before the Dial in the same CDR (nothing in the lab).
``called``/``caller_*`` come from the first ringing CDR (caller number falls back to ``Source``),
``started_at`` is the earliest CDR start (an aware time in Asterisk's zone; the mail shows it in
the subscriber's). ``DialOutcome`` is accepted and ignored: it has no time, and the CDRs already
say who answered.

When (:class:`MissedCallTracker`): a call is decided ``grace`` after its *last* CDR arrived, but
only once the root channel's CDR (Uniqueid = Linkedid: the caller's own channel) is in, because
the ringing legs' CDRs can come long before the rest of the call (the voicemail case above; a
ring-group fork that gave up while another fork talks). Without a root CDR the call is decided
``max_wait`` after its last CDR with what is there.

A call is decided once. Its CDRs come again (the Master.csv twin of every AMI CDR, a replay after a
restart) *without* the events that may have decided it: a voicemail call whose ``VoiceMail`` CDR
a hangup handler renamed (the shipped ``clickphone-vm-result`` does) is told from a missed call
only by its ``MessageWaiting``. So a decided call's Linkedid is remembered (the last ``max_calls``
of them) and its later events are ignored (counted in ``late``); and every decision of an owned
call, missed or not, is a :class:`Decision` whose :attr:`~Decision.key` the caller claims, so that a
re-decision after a restart (memory lost) finds the key taken and mails nothing. A voicemail event
settles that key itself when it is committed (``effects.plan``): a crash before the decision
loses the event from memory, not the fact that the call ended in voicemail.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from clickphone_agi.domain.events import (
    CallEnded,
    Disposition,
    DomainEvent,
    EventSource,
    VoicemailRecorded,
    VoicemailWaiting,
)

__all__ = [
    "ANSWERED_LEG_APPS",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_CALLS",
    "DEFAULT_MAX_WAIT",
    "DIAL_APPS",
    "VOICEMAIL_APPS",
    "Decision",
    "MissedCall",
    "MissedCallTracker",
    "OwnerOf",
    "answered_by_party",
    "call_owner",
    "decide",
    "ended_in_voicemail",
    "missed_key",
    "rings",
]

DIAL_APPS: Final[frozenset[str]] = frozenset({"Dial", "Queue", "FollowMe"})
"""LastApplication of a CDR in which the channel was ringing someone (``DestinationChannel``)."""
ANSWERED_LEG_APPS: Final[frozenset[str]] = frozenset({"AppDial", "AppDial2", "AppQueue"})
"""LastApplication of a dialled leg's own CDR (it ran no application): ANSWERED = that leg answered."""
VOICEMAIL_APPS: Final[frozenset[str]] = frozenset({"VoiceMail"})

DEFAULT_GRACE: Final = timedelta(seconds=30)
DEFAULT_MAX_WAIT: Final = timedelta(hours=4)
DEFAULT_MAX_CALLS: Final = 10_000

OwnerOf = Callable[[CallEnded], str | None]
"""Account code owning the number a CDR called, ``None`` when the CDR is not an inbound call to
an account (an outbound call, an internal leg). Must be pure. Accountcode alone is not enough: the
lab sets ``acct1001`` on outbound calls too. Lab: inbound CDRs have DestinationContext
``lab-inbound``, destination ``100`` (``vm100`` for the voicemail scenario)."""


@dataclass(frozen=True)
class MissedCall:
    """One missed call, to be mailed once (``key`` is its idempotency key)."""

    key: str
    account: str
    linked_id: str
    caller_num: str
    caller_name: str
    called: str
    started_at: datetime
    rang_seconds: int


@dataclass(frozen=True)
class Decision:
    """One owned inbound call decided: ``missed`` to mail, or ``None`` (answered, voicemail, …).

    Final either way: the caller claims ``key`` with the mail, or alone when not missed, so no
    later read of the call's CDRs decides it again (see the module doc).
    """

    key: str
    linked_id: str
    missed: MissedCall | None


def missed_key(system: str, linked_id: str) -> str:
    """``missed:<system>:<linkedid>``: no time in it, so every replay of the call derives it again."""
    return f"missed:{_key_part(system)}:{_key_part(linked_id)}"


def answered_by_party(cdr: CallEnded) -> bool:
    """Did this CDR's dialled party (a person, a phone, a forwarded number) answer?"""
    if cdr.disposition is not Disposition.ANSWERED:
        return False
    if cdr.last_application in DIAL_APPS:
        return bool(cdr.destination_channel)
    return cdr.last_application in ANSWERED_LEG_APPS


def rings(cdr: CallEnded) -> bool:
    """A ringing attempt that no party answered (NO ANSWER, BUSY, FAILED, … or a Queue's wait)."""
    return cdr.last_application in DIAL_APPS and not answered_by_party(cdr)


def ended_in_voicemail(cdrs: Iterable[CallEnded]) -> bool:
    """A voicemail application answered the call (whether or not a message was left)."""
    return any(c.last_application in VOICEMAIL_APPS and c.disposition is Disposition.ANSWERED for c in cdrs)


def decide(cdrs: Sequence[CallEnded], *, voicemail: bool, owner: str | None, system: str) -> MissedCall | None:
    """The missed call that ``cdrs`` (one call: one Linkedid) make, or ``None`` (see module doc).

    ``voicemail``: a voicemail event was seen for this call; ``owner``: the account that owns the
    called number (``None``: not an inbound call to an account). The result does not depend on the
    order of ``cdrs``; duplicates (same key) count once. Raises :class:`ValueError` when the CDRs
    lack a Linkedid or belong to different calls.
    """
    if not cdrs:
        return None
    linked_ids = {c.linked_id for c in cdrs}
    if len(linked_ids) != 1 or None in linked_ids:
        raise ValueError(f"decide() takes one call's CDRs, all with one Linkedid; got {sorted(map(str, linked_ids))}")
    if owner is None or voicemail:
        return None
    group = _canonical(cdrs)
    if ended_in_voicemail(group) or any(answered_by_party(c) for c in group):
        return None
    ringing = [c for c in group if rings(c)]
    if not ringing:
        return None
    first = ringing[0]
    offsets = [_seconds_between(first.start, c.start) for c in ringing]
    rang = max(offset + c.duration for offset, c in zip(offsets, ringing, strict=True)) - min(offsets)
    linked_id = first.linked_id or ""
    return MissedCall(
        key=missed_key(system, linked_id),
        account=owner,
        linked_id=linked_id,
        caller_num=first.caller_id_num or first.source or next((c.caller_id_num for c in group if c.caller_id_num), ""),
        caller_name=first.caller_id_name or next((c.caller_id_name for c in group if c.caller_id_name), ""),
        called=first.destination,
        started_at=min((c.start for c in group), key=_utc),
        rang_seconds=rang,
    )


def call_owner(cdrs: Iterable[CallEnded], owner_of: OwnerOf) -> str | None:
    """The call's owner: that of its first owned ringing CDR, else of its first owned CDR (canonical order)."""
    group = _canonical(cdrs)
    for candidates in ([c for c in group if rings(c)], group):
        for cdr in candidates:
            owner = owner_of(cdr)
            if owner is not None:
                return owner
    return None


@dataclass
class _Call:
    touched: datetime
    """When the last CDR (or, without any, the first event) of the call was observed."""
    cdrs: dict[str, CallEnded] = field(default_factory=dict)
    voicemail: bool = False
    root_seen: bool = False


class MissedCallTracker:
    """Groups a call's events by Linkedid and decides it once it is over (see module doc).

    Feed :meth:`observe` every ``CallEnded``/``DialOutcome``/``VoicemailWaiting``/
    ``VoicemailRecorded`` in stream order (other events are ignored), then call :meth:`due`
    periodically. ``now`` is the observation time (the daemon's clock, not the CDR's times), and
    must not go backwards much: the pending calls are kept in order of their last CDR.

    Memory is bounded: at most ``max_calls`` undecided calls; beyond that the one whose last CDR
    is oldest is dropped undecided and counted in ``evictions``; and the Linkedids of the last
    ``max_calls`` decided calls, whose later events are ignored and counted in ``late``. CDRs
    without a Linkedid cannot be grouped and are counted in ``unlinked``.
    """

    def __init__(
        self,
        grace: timedelta = DEFAULT_GRACE,
        *,
        owner_of: OwnerOf,
        max_calls: int = DEFAULT_MAX_CALLS,
        max_wait: timedelta = DEFAULT_MAX_WAIT,
    ) -> None:
        if grace < timedelta(0):
            raise ValueError(f"grace must not be negative, got {grace}")
        if max_wait < grace:
            raise ValueError(f"max_wait ({max_wait}) must be at least grace ({grace})")
        if max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {max_calls}")
        self._grace = grace
        self._max_wait = max_wait
        self._max_calls = max_calls
        self._owner_of = owner_of
        self._calls: OrderedDict[str, _Call] = OrderedDict()
        self._decided: OrderedDict[str, None] = OrderedDict()  # Linkedids, oldest decision first
        self.evictions = 0
        self.late = 0
        self.unlinked = 0
        self.decided = 0

    @property
    def grace(self) -> timedelta:
        return self._grace

    @grace.setter
    def grace(self, grace: timedelta) -> None:
        """A reload: calls still pending are decided with the new grace from their last CDR."""
        if grace < timedelta(0) or grace > self._max_wait:
            raise ValueError(f"grace must be between 0 and max_wait ({self._max_wait}), got {grace}")
        self._grace = grace

    def __len__(self) -> int:
        """Calls observed and not decided yet."""
        return len(self._calls)

    def undecided(self, linked_id: str) -> bool:
        """Whether the call with this Linkedid was observed and is not decided yet."""
        return linked_id in self._calls

    def observe(self, event: DomainEvent, now: datetime) -> None:
        """Take one event into account (see the class doc); ``DialOutcome`` and others are ignored."""
        if isinstance(event, CallEnded | VoicemailWaiting | VoicemailRecorded) and event.linked_id in self._decided:
            self.late += 1  # a Master.csv twin, a replay: the call was decided without it, once
        elif isinstance(event, CallEnded):
            self._observe_cdr(event, now)
        elif isinstance(event, VoicemailWaiting | VoicemailRecorded) and event.linked_id:
            call = self._calls.get(event.linked_id)
            if call is None:
                call = self._add(event.linked_id, now)
            call.voicemail = True
        # DialOutcome (no time; the CDRs already say who answered) and anything else: ignored

    def due(self, now: datetime) -> list[MissedCall]:
        """The missed calls among :meth:`decisions`, oldest first."""
        return [d.missed for d in self.decisions(now) if d.missed is not None]

    def decisions(self, now: datetime) -> list[Decision]:
        """Decide every call that is over (its grace since its last CDR has passed), oldest first.

        Returns a :class:`Decision` per owned call; the others are not anybody's to mail. A decided
        call's Linkedid is remembered, its CDRs forgotten.
        """
        out: list[Decision] = []
        for linked_id, call in list(self._calls.items()):
            waited = now - call.touched
            if waited < self._grace:
                break  # kept in order of `touched`: every later call waited even less
            if call.cdrs and not call.root_seen and waited < self._max_wait:
                continue
            del self._calls[linked_id]
            self.decided += 1
            decision = self._decide(linked_id, call)
            if decision is not None:
                out.append(decision)
            if call.cdrs:  # a voicemail event alone decided nothing: the call's CDRs may follow
                self._decided[linked_id] = None
                while len(self._decided) > self._max_calls:
                    self._decided.popitem(last=False)
        return out

    def _observe_cdr(self, cdr: CallEnded, now: datetime) -> None:
        linked_id = cdr.linked_id
        if not linked_id:
            self.unlinked += 1
            return
        call = self._calls.get(linked_id)
        if call is None:
            call = self._add(linked_id, now)
        elif cdr.key in call.cdrs:
            return  # a duplicate (reconnect, Master.csv replay) neither counts nor delays
        else:
            call.touched = now
            self._calls.move_to_end(linked_id)
        call.cdrs[cdr.key] = cdr
        if cdr.unique_id == linked_id:
            call.root_seen = True

    def _add(self, linked_id: str, now: datetime) -> _Call:
        call = _Call(touched=now)
        self._calls[linked_id] = call
        while len(self._calls) > self._max_calls:
            self._calls.popitem(last=False)
            self.evictions += 1
        return call

    def _decide(self, linked_id: str, call: _Call) -> Decision | None:
        if not call.cdrs:
            return None
        cdrs = list(call.cdrs.values())
        owner = call_owner(cdrs, self._owner_of)
        if owner is None:
            return None
        system = _canonical(cdrs)[0].system_name
        missed = decide(cdrs, voicemail=call.voicemail, owner=owner, system=system)
        return Decision(missed_key(system, linked_id), linked_id, missed)


def _canonical(cdrs: Iterable[CallEnded]) -> list[CallEnded]:
    """Deduplicated by key (an AMI copy preferred to a Master.csv one) in a fixed order: start,
    Uniqueid (creation order), key. Every choice made from "the first" CDR is therefore independent of arrival order."""
    ordered = sorted(
        cdrs, key=lambda c: (_utc(c.start), *_creation_order(c.unique_id), c.key, c.origin is not EventSource.AMI)
    )
    seen: set[str] = set()
    out: list[CallEnded] = []
    for cdr in ordered:
        if cdr.key not in seen:
            seen.add(cdr.key)
            out.append(cdr)
    return out


def _creation_order(unique_id: str) -> tuple[str, int, str]:
    """Asterisk's Uniqueid is ``[systemname-]<epoch>.<counter>``: a longer counter is a later
    channel (``.10`` after ``.9``), which plain text order gets wrong once the counter gains a digit."""
    head, _, counter = unique_id.rpartition(".")
    return head, len(counter), counter


def _seconds_between(earlier: datetime, later: datetime) -> int:
    """Real seconds from one CDR start of a call to another's (negative if ``later`` is earlier).

    Subtracted in UTC: aware datetimes that share a tzinfo subtract as wall clocks, an hour off
    across a DST change. And a CDR time is a wall time without an offset (AMI ``StartTime``,
    Master.csv ``start``): in the hour repeated when summer time ends (Europe/Bucharest: the last
    Sunday of October, 03:00-04:00 twice) it was read with ``fold=0``, the first occurrence, so
    one of a call's CDRs in the second occurrence is an hour off its neighbours. Each ambiguous
    time is therefore read both ways and the reading closest to zero is taken: the ringing CDRs
    of one call are seconds or minutes apart, never near an hour. (The CDRs' own ``Duration``
    still gives each attempt's length; only the gaps between attempts come from the times.)
    """
    readings = {int((_utc(b) - _utc(a)).total_seconds()) for a in _folds(earlier) for b in _folds(later)}
    return min(readings, key=lambda seconds: (abs(seconds), seconds))


def _folds(moment: datetime) -> tuple[datetime, ...]:
    """``moment`` as read (``fold=0``) and, if its wall time happens twice, as the second occurrence."""
    other = moment.replace(fold=1 - moment.fold)
    return (moment,) if other.utcoffset() == moment.utcoffset() else (moment, other)


def _utc(moment: datetime) -> datetime:
    """``moment`` in UTC, for arithmetic and order that real time, not the wall clock, decides."""
    return moment.astimezone(UTC)


def _key_part(s: str) -> str:
    # the rule of keys._clean: a value can never add a ':' to a key
    return "".join(c for c in s if c.isprintable() and c != ":")[:120]
