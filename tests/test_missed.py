"""Missed calls: the rule over the real Asterisk 22 recordings, ring groups, timing and memory.

The transcripts are parsed with the real ``FrameParser``; each event goes through a
``LinkedIdCorrelator`` (observe first) and ``translate``, as the daemon does (see
``test_ami_translate.py``), and the resulting domain events feed a ``MissedCallTracker``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser
from clickphone_agi.domain.accounts import Account, Mailbox
from clickphone_agi.domain.ami_translate import TranslateContext, translate
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import (
    CallEnded,
    DialOutcome,
    Disposition,
    DomainEvent,
    EventSource,
    VoicemailRecorded,
    VoicemailWaiting,
)
from clickphone_agi.domain.keys import cdr_key
from clickphone_agi.domain.missed import (
    DEFAULT_MAX_WAIT,
    Decision,
    MissedCall,
    MissedCallTracker,
    answered_by_party,
    call_owner,
    decide,
    missed_key,
    rings,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ami"
SCENARIOS = sorted(p.stem for p in FIXTURES.glob("*.ami"))
ZONE = ZoneInfo("Europe/Bucharest")
CTX = TranslateContext(system_name="lab", timezone=ZONE)
T0 = datetime(2026, 11, 28, 14, 21, 41, tzinfo=UTC)  # the daemon's clock when the events arrive
GRACE = timedelta(seconds=30)
SECOND = timedelta(seconds=1)


def run(scenario: str) -> list[DomainEvent]:
    """The daemon's order: observe every event, then translate it; ``None`` results dropped."""
    correlator = LinkedIdCorrelator()
    out: list[DomainEvent] = []
    for message in FrameParser().feed((FIXTURES / f"{scenario}.ami").read_bytes()):
        if isinstance(message, AmiMessage) and message.is_event:
            correlator.observe(message.headers)
            event = translate(message.headers, CTX, correlator.linked_id_for)
            if event is not None:
                out.append(event)
    return out


def cdrs_of(scenario: str) -> list[CallEnded]:
    return [e for e in run(scenario) if isinstance(e, CallEnded)]


# --- who owns an inbound call -------------------------------------------------------------------
#
# The lab dialplan sets CHANNEL(accountcode)=acct1001 on every call, outbound (lab-outbound) and
# inbound (lab-inbound) alike, so the account code does not tell the direction. A realistic owner_of
# looks at where the call came in: only CDRs whose DestinationContext is an inbound context (what
# the trunk/DID routes land in), and the dialled number must be one of the account's DIDs or
# extensions (a mailbox "100@default" → extension 100). The lab's voicemail scenario enters
# lab-inbound at exten "vm100" (a second route to extension 100), hence the alias.

ACCOUNT = Account(
    code="acct1001",
    name="Ion Popescu",
    email="ion.popescu@example.ro",
    dids=("40212345679",),
    mailboxes=(Mailbox("100@default"),),
)
INBOUND_CONTEXTS = frozenset({"lab-inbound"})
LAB_ALIASES = {"vm100": "100"}


def numbers_of(accounts: Sequence[Account]) -> dict[str, str]:
    numbers: dict[str, str] = {}
    for account in accounts:
        for did in account.dids:
            numbers[did] = account.code
        for mailbox in account.mailboxes:
            numbers[mailbox.box.partition("@")[0]] = account.code
    return numbers


NUMBERS = numbers_of([ACCOUNT])


def lab_owner(call: CallEnded) -> str | None:
    """DID/extension owner, for calls that came in through an inbound context."""
    if call.destination_context not in INBOUND_CONTEXTS:
        return None
    return NUMBERS.get(LAB_ALIASES.get(call.destination, call.destination))


def context_owner(call: CallEnded) -> str | None:
    """Accountcode, but only on inbound contexts (what services/notices.py does when configured)."""
    return call.account or None if call.destination_context in INBOUND_CONTEXTS else None


def accountcode_owner(call: CallEnded) -> str | None:
    """Accountcode alone: wrong, shown below."""
    return call.account or None


OwnerFn = Callable[[CallEnded], str | None]


def replay(
    events: Sequence[DomainEvent], owner_of: OwnerFn = lab_owner, *, at: datetime = T0
) -> tuple[MissedCallTracker, list[MissedCall]]:
    """Observe every event at ``at`` and return what is due a grace later."""
    tracker = MissedCallTracker(GRACE, owner_of=owner_of)
    for event in events:
        tracker.observe(event, at)
    return tracker, tracker.due(at + GRACE)


MISSED = MissedCall(
    key="missed:lab:1795882897.4",
    account="acct1001",
    linked_id="1795882897.4",
    caller_num="0744123456",
    caller_name="Vasile Ionescu",
    called="100",
    started_at=datetime(2026, 11, 28, 16, 21, 37, tzinfo=ZONE),
    rang_seconds=4,
)


# --- the recordings -------------------------------------------------------------------------------


def test_missed_call_transcript_gives_exactly_one_missed_call_with_the_cdr_fields() -> None:
    tracker, due = replay(run("missed_call"))
    assert due == [MISSED]
    assert len(tracker) == 0
    assert tracker.decided == 1


def test_missed_call_ring_time_is_the_no_answer_dial_cdrs_duration() -> None:
    cdrs = cdrs_of("missed_call")
    (dial,) = [c for c in cdrs if c.last_application == "Dial"]
    assert (dial.disposition, dial.duration, dial.billable_seconds, dial.answer) == (Disposition.NO_ANSWER, 4, 0, None)
    assert (dial.destination, dial.destination_context, dial.last_data) == (
        "100",
        "lab-inbound",
        "Local/100@lab-phones/n,4",
    )
    assert [c.last_application for c in cdrs if rings(c)] == ["Dial"]  # the only ringing CDR
    # inbound legs carry the subscriber's accountcode (the dialplan sets it) and land in lab-inbound
    assert {(c.last_application, c.account, c.destination_context) for c in cdrs} == {
        ("Wait", "acct1001", "lab-phones"),  # extension 100's phone: rings, never answers
        ("Dial", "acct1001", "lab-inbound"),
        ("Hangup", "acct1001", "lab-inbound"),  # after the Dial: Duration 0
        ("AppDial2", "acct1001", "lab-inbound"),  # the root (Uniqueid = Linkedid)
    }
    assert [c.last_application for c in cdrs if c.unique_id == c.linked_id] == ["AppDial2"]
    assert decide(cdrs, voicemail=False, owner="acct1001", system="lab") == MISSED


def test_voicemail_transcript_is_not_missed_and_each_voicemail_signal_suffices() -> None:
    events = run("voicemail")
    cdrs = [e for e in events if isinstance(e, CallEnded)]
    assert call_owner(cdrs, lab_owner) == "acct1001"  # owned: it is voicemail that decides
    assert replay(events)[1] == []
    assert replay(events, context_owner)[1] == []
    (mwi,) = [e for e in events if isinstance(e, VoicemailWaiting)]
    assert mwi.linked_id == cdrs[0].linked_id == "1795882906.12"
    # the VoiceMail CDR alone (as after a Master.csv recovery: no MWI event)
    assert decide(cdrs, voicemail=False, owner="acct1001", system="lab") is None
    # the voicemail event alone
    without_vm_cdr = [c for c in cdrs if c.last_application != "VoiceMail"]
    assert decide(without_vm_cdr, voicemail=True, owner="acct1001", system="lab") is None
    # neither: the same ring is a missed call to vm100
    missed = decide(without_vm_cdr, voicemail=False, owner="acct1001", system="lab")
    assert missed is not None
    assert (missed.called, missed.rang_seconds, missed.caller_num) == ("vm100", 4, "0744123456")
    # answered by the PBX (VoiceMail, the caller half's Hangup), never by a party
    assert not any(answered_by_party(c) for c in cdrs)
    assert {(c.last_application, c.disposition) for c in cdrs if c.disposition is Disposition.ANSWERED} == {
        ("VoiceMail", Disposition.ANSWERED),
        ("Hangup", Disposition.ANSWERED),
    }


@pytest.mark.parametrize("owner_of", [lab_owner, context_owner], ids=["did-or-extension", "inbound-context"])
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "missed_call"])
def test_no_other_transcript_is_a_missed_call(scenario: str, owner_of: OwnerFn) -> None:
    assert replay(run(scenario), owner_of)[1] == []


@pytest.mark.parametrize("scenario", ["answered_call", "busy_call", "long_call", "full_noise", "fax", "fax_failed"])
def test_outbound_and_fax_calls_are_not_inbound_owned(scenario: str) -> None:
    cdrs = cdrs_of(scenario)
    assert cdrs
    assert [lab_owner(c) for c in cdrs] == [None] * len(cdrs)
    assert [context_owner(c) for c in cdrs] == [None] * len(cdrs)


def test_answered_outbound_call_is_answered_by_a_party() -> None:
    (dial,) = [c for c in cdrs_of("answered_call") if c.last_application == "Dial"]
    assert answered_by_party(dial)
    assert decide(cdrs_of("answered_call"), voicemail=False, owner="acct1001", system="lab") is None


def test_fax_rang_nobody_so_it_is_not_missed_even_if_owned() -> None:
    assert decide(cdrs_of("fax"), voicemail=False, owner="acct1001", system="lab") is None


def test_accountcode_alone_cannot_tell_direction() -> None:
    """Every lab CDR carries acct1001: owning by accountcode mails a 'missed call' for an outbound busy call."""
    assert {c.account for s in SCENARIOS for c in cdrs_of(s)} == {"acct1001"}
    missed = replay(run("busy_call"), accountcode_owner)[1]
    assert [(m.called, m.rang_seconds) for m in missed] == [("0040219999999", 0)]


# --- when a call is decided -------------------------------------------------------------------------


def test_not_due_before_the_grace_period_due_after_it() -> None:
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    for event in run("missed_call"):
        tracker.observe(event, T0)
    assert tracker.due(T0) == []
    assert tracker.due(T0 + GRACE - timedelta(microseconds=1)) == []
    assert len(tracker) == 1
    assert tracker.due(T0 + GRACE) == [MISSED]
    assert len(tracker) == 0
    assert tracker.due(T0 + 10 * GRACE) == []  # decided once, then forgotten


def test_grace_counts_from_the_last_cdr_of_the_call() -> None:
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    cdrs = cdrs_of("missed_call")
    for cdr in cdrs[:-1]:
        tracker.observe(cdr, T0)
    tracker.observe(cdrs[-1], T0 + 20 * SECOND)
    assert tracker.due(T0 + GRACE + 5 * SECOND) == []
    assert tracker.due(T0 + 20 * SECOND + GRACE) == [MISSED]


def test_a_call_is_not_decided_before_its_root_cdr_arrives() -> None:
    """A ring-group fork that gave up sends its CDR while another fork talks: no early 'missed'."""
    cdrs = cdrs_of("missed_call")
    (dial,) = [c for c in cdrs if c.last_application == "Dial"]
    (root,) = [c for c in cdrs if c.unique_id == c.linked_id]
    gave_up = fork(dial, "Local/101@lab-phones-00000010;1")
    answered = fork(dial, "Local/102@lab-phones-00000011;1", answered_after=6, talked=300)
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    tracker.observe(gave_up, T0)
    assert tracker.due(T0 + 10 * GRACE) == []  # owned, rang, unanswered so far: still waiting
    later = T0 + 306 * SECOND
    tracker.observe(answered, later)
    tracker.observe(dataclasses.replace(root, disposition=Disposition.ANSWERED, last_application="Wait"), later)
    assert tracker.due(later + GRACE) == []
    assert len(tracker) == 0


def test_without_a_root_cdr_the_call_is_decided_after_max_wait() -> None:
    non_root = [c for c in cdrs_of("missed_call") if c.unique_id != c.linked_id]
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    for cdr in non_root:
        tracker.observe(cdr, T0)
    assert tracker.due(T0 + DEFAULT_MAX_WAIT - SECOND) == []
    (missed,) = tracker.due(T0 + DEFAULT_MAX_WAIT)
    assert missed == MISSED  # the root CDR adds nothing to the fields


def test_voicemail_event_arriving_after_the_cdrs_within_grace_still_counts() -> None:
    events = run("voicemail")
    mwi = [e for e in events if isinstance(e, VoicemailWaiting)]
    rest = [e for e in events if not isinstance(e, VoicemailWaiting)]
    vm_cdr_dropped = [e for e in rest if not (isinstance(e, CallEnded) and e.last_application == "VoiceMail")]
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    for event in vm_cdr_dropped:
        tracker.observe(event, T0)
    tracker.observe(mwi[0], T0 + GRACE - SECOND)  # does not extend the grace, but is counted
    assert tracker.due(T0 + GRACE) == []
    assert len(tracker) == 0


def test_a_voicemail_event_alone_is_forgotten_after_the_grace_and_one_without_linkedid_is_ignored() -> None:
    recorded = VoicemailRecorded(
        key="vmfile:lab:x", mailbox="100", context="default", message_file="/x/msg0000",
        status="SUCCESS", account="acct1001", unique_id="9.1", linked_id="9.0",
    )  # fmt: skip
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    tracker.observe(recorded, T0)
    tracker.observe(dataclasses.replace(recorded, linked_id=""), T0)
    assert len(tracker) == 1
    assert tracker.due(T0 + GRACE) == []
    assert len(tracker) == 0


# --- ring groups ------------------------------------------------------------------------------------


def fork(dial: CallEnded, dest_channel: str, *, answered_after: int | None = None, talked: int = 0) -> CallEnded:
    """Another forked CDR of the same Dial (same channel and Uniqueid, another DestinationChannel)."""
    changes: dict[str, object] = {
        "destination_channel": dest_channel,
        "key": cdr_key("lab", dial.unique_id, dest_channel),
    }
    if answered_after is not None:
        changes |= {
            "disposition": Disposition.ANSWERED,
            "answer": dial.start + timedelta(seconds=answered_after),
            "duration": answered_after + talked,
            "billable_seconds": talked,
        }
    return dataclasses.replace(dial, **changes)  # type: ignore[arg-type]


def ring_group(*, answered: bool) -> list[CallEnded]:
    cdrs = cdrs_of("missed_call")
    (dial,) = [c for c in cdrs if c.last_application == "Dial"]
    others = [c for c in cdrs if c is not dial]
    forks = [
        fork(dial, "Local/101@lab-phones-00000010;1"),
        fork(dial, "Local/102@lab-phones-00000011;1", answered_after=3 if answered else None, talked=20),
    ]
    return [*others, *forks]


def test_ring_group_where_one_fork_answered_is_not_missed() -> None:
    cdrs = ring_group(answered=True)
    assert len({c.linked_id for c in cdrs}) == 1
    assert len({c.key for c in cdrs}) == len(cdrs)
    assert decide(cdrs, voicemail=False, owner="acct1001", system="lab") is None
    assert replay(cdrs)[1] == []


def test_ring_group_where_no_fork_answered_is_one_missed_call() -> None:
    cdrs = ring_group(answered=False)
    assert replay(cdrs)[1] == [MISSED]


def test_sequential_hunt_rang_from_the_first_attempt_to_the_end_of_the_last() -> None:
    cdrs = ring_group(answered=False)
    second = cdrs[-1]
    cdrs[-1] = dataclasses.replace(second, start=second.start + timedelta(seconds=4), duration=6)
    missed = decide(cdrs, voicemail=False, owner="acct1001", system="lab")
    assert missed is not None
    assert missed.rang_seconds == 10


def test_a_hunt_across_the_spring_dst_change_rang_for_the_real_seconds() -> None:
    """2026-03-29 in Bucharest the clocks go from 03:00 to 04:00: the second attempt starting at
    04:00:05 wall clock is 15 s after the first at 02:59:50, not an hour and 15 s (regression)."""
    cdrs = ring_group(answered=False)
    first, second = cdrs[-2], cdrs[-1]
    before, after = datetime(2026, 3, 29, 2, 59, 50, tzinfo=ZONE), datetime(2026, 3, 29, 4, 0, 5, tzinfo=ZONE)
    assert (after - before, after.astimezone(UTC) - before.astimezone(UTC)) == (
        timedelta(hours=1, seconds=15),
        15 * SECOND,
    )
    cdrs = [dataclasses.replace(c, start=before, end=before + 4 * SECOND) for c in cdrs[:-2]] + [
        dataclasses.replace(first, start=before, end=before + 5 * SECOND, duration=5),
        dataclasses.replace(second, start=after, end=after + 10 * SECOND, duration=10),
    ]
    missed = decide(cdrs, voicemail=False, owner="acct1001", system="lab")
    assert missed is not None
    assert (missed.rang_seconds, missed.started_at) == (25, before)


@pytest.mark.parametrize(
    ("first_at", "second_at", "rang"),
    [
        # 2026-10-25 in Bucharest 04:00 EEST becomes 03:00 EET: 03:00-04:00 happens twice
        ((3, 59, 50), (3, 0, 5), 25),  # the second attempt in the repeated hour: 15 s later, not 59 min earlier
        ((3, 59, 55), (4, 0, 5), 20),  # the first in the repeated hour (read as its first occurrence)
        ((3, 10, 0), (3, 10, 30), 40),  # both in it: unambiguous between them
    ],
)
def test_a_hunt_in_the_repeated_autumn_hour_rang_for_seconds_not_an_hour(
    first_at: tuple[int, int, int], second_at: tuple[int, int, int], rang: int
) -> None:
    """A CDR time is a wall time without an offset, read with fold=0 (AMI and Master.csv alike): a
    CDR in the second 03:00-04:00 of the autumn change came out an hour early, and the ring time
    an hour long (regression)."""
    cdrs = ring_group(answered=False)
    first, second = cdrs[-2], cdrs[-1]
    before, after = (datetime(2026, 10, 25, *at, tzinfo=ZONE) for at in (first_at, second_at))
    cdrs = [dataclasses.replace(c, start=before, end=before + 4 * SECOND) for c in cdrs[:-2]] + [
        dataclasses.replace(first, start=before, end=before + 5 * SECOND, duration=5),
        dataclasses.replace(second, start=after, end=after + 10 * SECOND, duration=10),
    ]
    missed = decide(cdrs, voicemail=False, owner="acct1001", system="lab")
    assert missed is not None
    assert missed.rang_seconds == rang


# --- order, duplicates, replays, memory ----------------------------------------------------------------


def test_cdrs_before_the_dial_outcomes_and_in_reverse_give_the_same_single_decision() -> None:
    events = run("missed_call")
    outcomes = [e for e in events if isinstance(e, DialOutcome)]
    assert [o.dial_status for o in outcomes] == ["NOANSWER", "NOANSWER"]
    cdrs_first = [e for e in reversed(events) if not isinstance(e, DialOutcome)] + outcomes
    assert replay(cdrs_first)[1] == [MISSED]


def test_duplicate_cdrs_count_once_and_do_not_extend_the_grace() -> None:
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    for event in run("missed_call"):
        tracker.observe(event, T0)
    for cdr in cdrs_of("missed_call"):
        tracker.observe(dataclasses.replace(cdr, origin=EventSource.CSV), T0 + 20 * SECOND)
    assert tracker.due(T0 + GRACE) == [MISSED]


def handled_voicemail() -> list[DomainEvent]:
    """The voicemail call as the shipped dialplan leaves it: its hangup handler
    (``clickphone-vm-result``, ends in ``Return``) runs last on the VoiceMail channel, so that CDR's
    LastApplication is ``Return``, as on the recorded fax calls' CDRs; only the MWI says voicemail."""
    events = run("voicemail")
    return [
        dataclasses.replace(e, last_application="Return")
        if isinstance(e, CallEnded) and e.last_application == "VoiceMail"
        else e
        for e in events
    ]


def test_a_decided_call_is_not_decided_again_by_its_master_csv_twins() -> None:
    """Regression: the twins made a new group without the MWI, decided 'missed', and mailed."""
    events = handled_voicemail()
    twins = [dataclasses.replace(e, origin=EventSource.CSV) for e in events if isinstance(e, CallEnded)]
    assert decide(twins, voicemail=False, owner="acct1001", system="lab") is not None  # the CDRs alone: missed
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    for event in events:
        tracker.observe(event, T0)
    decisions = tracker.decisions(T0 + GRACE)
    assert decisions == [Decision("missed:lab:1795882906.12", "1795882906.12", None)]  # the MWI decided it
    later = T0 + timedelta(minutes=1)  # the next Master.csv pass
    for twin in twins:
        tracker.observe(twin, later)
    assert not tracker.undecided("1795882906.12")
    assert tracker.decisions(later + DEFAULT_MAX_WAIT) == []
    assert (len(tracker), tracker.late) == (0, len(twins))


def test_a_replay_after_the_decision_is_ignored_and_a_new_tracker_derives_the_same_key() -> None:
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    assert replay(run("missed_call"))[1] == [MISSED]
    for event in run("missed_call"):
        tracker.observe(event, T0)
    assert tracker.due(T0 + GRACE) == [MISSED]
    for event in run("missed_call"):
        tracker.observe(event, T0 + 5 * GRACE)
    assert tracker.due(T0 + 10 * GRACE) == []  # decided once
    # a restarted daemon decides it again: with the same key, which the first decision claimed
    assert replay(run("missed_call"), at=T0 + 5 * GRACE)[1] == [MISSED]
    assert MISSED.key == missed_key("lab", "1795882897.4") == "missed:lab:1795882897.4"
    assert missed_key("a:b", "1.2\n") == "missed:ab:1.2"  # a value cannot add a ':' or a newline


def test_only_owned_calls_get_a_decision_and_decided_linkedids_are_remembered_within_a_bound() -> None:
    outbound = MissedCallTracker(GRACE, owner_of=lab_owner)
    for event in run("answered_call"):
        outbound.observe(event, T0)
    assert (outbound.decisions(T0 + GRACE), outbound.decided) == ([], 1)  # decided, nobody's: nothing to claim
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner, max_calls=2)
    cdrs = cdrs_of("missed_call")
    for n in range(3):
        for cdr in as_call(cdrs, n):
            tracker.observe(cdr, T0 + n * GRACE)
        assert [d.linked_id for d in tracker.decisions(T0 + (n + 1) * GRACE)] == [f"{n}.1795882897.4"]
    later = T0 + 4 * GRACE
    for n in (2, 1, 0):  # the oldest decided Linkedid was forgotten: only its group opens again
        for cdr in as_call(cdrs, n):
            tracker.observe(cdr, later)
    assert (len(tracker), tracker.late) == (1, 2 * len(cdrs))
    assert tracker.undecided("0.1795882897.4")


def test_cdrs_without_a_linkedid_are_counted_not_grouped() -> None:
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    tracker.observe(dataclasses.replace(cdrs_of("missed_call")[0], linked_id=None), T0)
    assert (len(tracker), tracker.unlinked) == (0, 1)


def as_call(cdrs: Sequence[CallEnded], n: int) -> list[CallEnded]:
    """The same CDRs as another call (Linkedid/Uniqueids prefixed with ``n``)."""
    return [
        dataclasses.replace(
            c,
            linked_id=f"{n}.{c.linked_id}",
            unique_id=f"{n}.{c.unique_id}",
            key=cdr_key("lab", f"{n}.{c.unique_id}", c.destination_channel),
        )
        for c in cdrs
    ]


def test_memory_is_bounded_oldest_call_evicted_and_counted() -> None:
    tracker = MissedCallTracker(GRACE, owner_of=lab_owner, max_calls=3)
    cdrs = cdrs_of("missed_call")
    for n in range(5):
        for cdr in as_call(cdrs, n):
            tracker.observe(cdr, T0 + n * SECOND)
    assert (len(tracker), tracker.evictions) == (3, 2)
    due = tracker.due(T0 + 4 * SECOND + GRACE)
    assert [m.linked_id for m in due] == ["2.1795882897.4", "3.1795882897.4", "4.1795882897.4"]
    assert len(tracker) == 0


def test_constructor_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="grace"):
        MissedCallTracker(timedelta(seconds=-1), owner_of=lab_owner)
    with pytest.raises(ValueError, match="max_wait"):
        MissedCallTracker(timedelta(minutes=5), owner_of=lab_owner, max_wait=timedelta(minutes=1))
    with pytest.raises(ValueError, match="max_calls"):
        MissedCallTracker(owner_of=lab_owner, max_calls=0)
    assert MissedCallTracker(owner_of=lab_owner).grace == timedelta(seconds=30)


def test_decide_takes_one_calls_cdrs() -> None:
    cdrs = cdrs_of("missed_call")
    with pytest.raises(ValueError, match="one Linkedid"):
        decide([*cdrs, *as_call(cdrs, 1)], voicemail=False, owner="acct1001", system="lab")
    with pytest.raises(ValueError, match="one Linkedid"):
        decide([dataclasses.replace(cdrs[0], linked_id=None)], voicemail=False, owner="acct1001", system="lab")
    assert decide([], voicemail=False, owner="acct1001", system="lab") is None
    assert decide(cdrs, voicemail=False, owner=None, system="lab") is None


# --- property: arrival order never changes the decision ------------------------------------------------

GROUPS: dict[str, list[CallEnded]] = {
    "missed_call": cdrs_of("missed_call"),
    "voicemail": cdrs_of("voicemail"),
    "voicemail_without_vm_cdr": [c for c in cdrs_of("voicemail") if c.last_application != "VoiceMail"],
    "ring_group_answered": ring_group(answered=True),
    "ring_group_missed": ring_group(answered=False),
    "busy_call": cdrs_of("busy_call"),
}


@settings(max_examples=200, deadline=None, database=None)
@given(
    name=st.sampled_from(sorted(GROUPS)),
    data=st.data(),
    owner_of=st.sampled_from([lab_owner, context_owner, accountcode_owner]),
)
def test_shuffling_a_calls_cdrs_does_not_change_the_decision(name: str, data: st.DataObject, owner_of: OwnerFn) -> None:
    cdrs = GROUPS[name]
    shuffled = data.draw(st.permutations(cdrs))
    repeated = data.draw(st.lists(st.sampled_from(cdrs), max_size=3))  # duplicates on top
    gaps = data.draw(st.lists(st.integers(0, 29), min_size=len(shuffled), max_size=len(shuffled)))

    expected = decide(cdrs, voicemail=False, owner=call_owner(cdrs, owner_of), system="lab")
    arrived = [*shuffled, *repeated]
    assert decide(arrived, voicemail=False, owner=call_owner(arrived, owner_of), system="lab") == expected

    tracker = MissedCallTracker(GRACE, owner_of=owner_of)
    at = T0
    for cdr, gap in zip(shuffled, gaps, strict=True):
        at += timedelta(seconds=gap)
        tracker.observe(cdr, at)
    for cdr in repeated:
        tracker.observe(cdr, at)
    assert tracker.due(at + GRACE) == ([] if expected is None else [expected])
    assert len(tracker) == 0


def test_the_called_number_comes_from_the_callers_leg_when_uniqueids_gain_a_digit() -> None:
    """Asterisk's Uniqueid is ``<epoch>.<counter>``: a leg created after the caller's has a higher
    counter, but ``.10`` sorts before ``.9`` as text. With the phone's own Dial in the same second,
    the mail took the phone leg's ``Destination`` (its extension) for the number called (regression)."""
    cdrs = cdrs_of("missed_call")
    (dial,) = [c for c in cdrs if c.last_application == "Dial"]
    (phone,) = [c for c in cdrs if c.last_application == "Wait"]
    caller_leg = dataclasses.replace(
        dial, unique_id="1795882897.9", key=cdr_key("lab", "1795882897.9", dial.destination_channel),
        destination="0212345679",
    )  # fmt: skip
    phone_leg = dataclasses.replace(
        phone, unique_id="1795882897.10", key=cdr_key("lab", "1795882897.10", "PJSIP/100-00000001"),
        last_application="Dial", last_data="PJSIP/100", destination_channel="PJSIP/100-00000001",
        disposition=Disposition.NO_ANSWER,
    )  # fmt: skip
    others = [c for c in cdrs if c is not dial and c is not phone]
    missed = decide([*others, caller_leg, phone_leg], voicemail=False, owner="acct1001", system="lab")
    assert missed is not None
    assert (missed.called, missed.caller_num, missed.rang_seconds) == ("0212345679", "0744123456", 4)
