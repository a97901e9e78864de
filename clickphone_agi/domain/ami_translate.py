"""AMI event headers → typed domain events. Pure: stdlib only, no I/O, nothing from ``adapters``.

:func:`translate` takes one AMI frame's headers (an ordered sequence of ``(name, value)`` pairs,
names may repeat; the first occurrence wins, names are matched case-insensitively) and returns a
:mod:`~clickphone_agi.domain.events` event, ``None`` for an event the daemon does not act on, or
raises :class:`TranslateError` for a frame it should act on but cannot read (the caller counts
and logs it, and keeps running).

Routing (one visible table, :data:`_HANDLERS`, plus the UserEvent names):

* ``Cdr`` → :class:`CallEnded` (one per CDR; a call has several, one per channel segment)
* ``DialEnd`` → :class:`DialOutcome`
* ``MessageWaiting`` → :class:`VoicemailWaiting`
* ``ReceiveFAX`` / ``SendFAX`` → :class:`FaxReceived` / :class:`FaxSent`
* ``UserEvent`` named in :data:`FAX_RESULT_USER_EVENTS` → :class:`FaxResult`
* ``UserEvent: ClickPhoneVoicemail`` (the dialplan snippet's VM_MESSAGEFILE) → :class:`VoicemailRecorded`
* ``UserEvent: ClickPhone<Name>``, ``<Name>`` in :data:`ACCOUNT_USER_EVENTS` → :class:`AccountEvent`
* ``VoicemailPasswordChange`` → :class:`VoicemailPasswordChanged` (the password is never read)
* ``FullyBooted`` / ``Shutdown`` → :class:`AsteriskLifecycle`
* anything else (Newchannel, VarSet, Newexten, other UserEvents, responses) → ``None``

Hostile text. Caller-ID names are chosen by whoever places the call. Channel-snapshot fields
(``CallerIDName``, ``ConnectedLineName`` in Hangup/DialEnd/MessageWaiting/…) arrive C-escaped
(:func:`c_unescape`); the Cdr ``CallerID`` does not: Asterisk builds it with
``ast_escape_quoted``, so inside the quoted name every ``"``, ``\\`` and control character
(a raw CR or LF included) is preceded by a backslash (:func:`parse_caller_id`). Every text that
reaches an event goes through :func:`clean_text` (human text) or :func:`_ident` (Asterisk
identifiers). Values are still untrusted for anything but display.

Idempotency keys are free of times and prefixed with the system name; every part taken from a
header is cleaned like :mod:`~clickphone_agi.domain.keys` does (printable, no ``:``, ≤120 chars).
The CallEnded key is exactly :func:`keys.cdr_key` over the *raw* ``UniqueID`` and
``DestinationChannel`` so that the Master.csv reconciliation derives the same key.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar
from zoneinfo import ZoneInfo

from clickphone_agi import dialplan_vars
from clickphone_agi.domain import keys
from clickphone_agi.domain.events import (
    CDR_YEARS,
    AccountEvent,
    AsteriskLifecycle,
    CallEnded,
    DialOutcome,
    Disposition,
    DomainEvent,
    FaxEvent,
    FaxReceived,
    FaxResult,
    FaxSent,
    VoicemailPasswordChanged,
    VoicemailRecorded,
    VoicemailWaiting,
)

__all__ = [
    "ACCOUNT_USER_EVENTS",
    "FAX_RESULT_USER_EVENTS",
    "HANDLED_EVENTS",
    "MAX_CALL_SECONDS",
    "TranslateContext",
    "TranslateError",
    "c_unescape",
    "clean_text",
    "parse_caller_id",
    "translate",
    "unsupported_user_event",
]

USER_EVENT_PREFIX: Final = "ClickPhone"

ACCOUNT_USER_EVENTS: Final[frozenset[str]] = frozenset(
    {
        # A password changed on the PBX side (voicemail/IVR menu, or self-care echoing it to the
        # PBX). Typical fields: Username, ChangedBy. Never the password itself.
        "PasswordChanged",
        # A PIN was created in an IVR (e.g. the calling-card/prepaid PIN). Fields such as Kind,
        # CreatedBy. The PIN itself must not be sent; if it is, it is dropped: every header whose
        # name looks secret (…pin…, …pass…, …token…, …code…, …key…) is, so "PinType" is too.
        "PinCreated",
        # An existing PIN was changed in an IVR. Same rules as PinCreated.
        "PinChanged",
    }
)
"""``UserEvent: ClickPhone<Name>`` names that become an :class:`AccountEvent`.

Only PBX-side, non-money security notices: password recovery (it carries a link) and allowed-IP
changes come from the HTTP API, not from AMI. Any AMI client with ``write=user`` can send a
UserEvent, so nothing here moves money. Another ``ClickPhone*`` name gives ``None``; the caller
can detect it with :func:`unsupported_user_event` and count it.
"""

FAX_RESULT_USER_EVENTS: Final[frozenset[str]] = frozenset({dialplan_vars.FAX_RESULT_EVENT, "LabFaxResult"})
VOICEMAIL_USER_EVENT: Final = dialplan_vars.VOICEMAIL_EVENT
"""UserEvents published by a fax channel's hangup handler with the outcome (FAXSTATUS, FAXERROR,
FAXOPT_status, FAXOPT_statusstr, FAXOPT_error, FAXPAGES, FAXBITRATE, FAXRESOLUTION,
LOCALSTATIONID, REMOTESTATIONID, ``Direction: receive|send`` and optionally ``FileName``).
``LabFaxResult`` is the recording lab's name, ``ClickPhoneFaxResult`` the product's own."""

MAX_CALL_SECONDS: Final = 31 * 24 * 3600
"""Duration/BillableSeconds above this (31 days) are refused as malformed, not rated."""

_MAX_NAME = 80
_MAX_CALLER_ID = 512
_MAX_NUMBER = 64
_MAX_TEXT = 256
_MAX_IDENT = 255
_MAX_PATH = 1024
_MAX_FIELDS = 32
_MAX_FIELD_NAME = 64
_MAX_FIELD_VALUE = 200
_MAX_COUNT = 1_000_000
_MAX_RATE = 1_000_000
_MAX_RESOLUTION = 1_000_000

# ast_escape_c's table: \a \b \f \n \r \t \v \\ \' \" \?
_C_ESCAPES: Final[Mapping[str, str]] = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}
_BACKSLASH_PAIR_RE = re.compile(r"\\(.)", re.DOTALL)
# Unicode categories removed from any text: Cc (C0, DEL, C1), Cf (bidi embeddings/overrides/
# isolates U+202A-202E/U+2066-2069, zero-width chars, BOM, soft hyphen), Cs (lone surrogates),
# Zl/Zp (U+2028/U+2029).
_DROP_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_WHITESPACE_RE = re.compile(r"\s+")
_NUMBER_ONLY_RE = re.compile(r"\+?[0-9*#]+")
_QUOTED_CID_RE = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*<([^<>]*)>\s*', re.DOTALL)
_LOOSE_CID_RE = re.compile(r"(.*?)\s*<([^<>]*)>\s*", re.DOTALL)
_DIGITS_RE = re.compile(r"[0-9]{1,15}")
_RESOLUTION_RE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_FIELD_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")
# a header whose name contains one of these is never kept in AccountEvent.fields; errs on the
# side of dropping (ReasonCode, Author): losing a label is cheap, mailing a PIN is not
_SECRET_NAME_RE = re.compile(r"pass|pwd|secret|pin|token|otp|code|key|cred|auth|cookie|session|cvv")
# transport noise of a UserEvent: the channel snapshot and the AMI envelope
_NOISE_NAMES: Final = frozenset(
    {
        "event",
        "privilege",
        "userevent",
        "actionid",
        "language",
        "context",
        "exten",
        "priority",
        "uniqueid",
        "linkedid",
        "accountcode",
        "account",
        "systemname",  # added to every event when asterisk.conf sets systemname
        "timestamp",  # added to every event with manager.conf timestampevents=yes
    }
)
_NOISE_PREFIXES: Final = ("channel", "callerid", "connectedline")
_UNKNOWN = "<unknown>"
_FaxT = TypeVar("_FaxT", bound=FaxEvent)


class TranslateError(ValueError):
    """A frame of a type the daemon acts on, with a header it cannot read.

    ``header`` names the offending header; the message quotes at most 40 characters of the value
    (``repr``, so control characters are visible, never raw).
    """

    def __init__(self, event: str, header: str, problem: str, value: str | None = None) -> None:
        self.event = event
        self.header = header
        shown = "" if value is None else f", got {value[:40]!r}"
        super().__init__(f"{event}: header {header!r}: {problem}{shown}")


@dataclass(frozen=True)
class TranslateContext:
    """What the translator needs besides the frame.

    ``system_name`` is Asterisk's ``systemname`` (the key prefix). ``timezone`` is Asterisk's
    own time zone: Cdr StartTime/AnswerTime/EndTime are its local wall-clock times without an
    offset (``YYYY-MM-DD HH:MM:SS``), and are turned into aware datetimes in this zone.

    In the autumn-back hour a wall time happens twice; Asterisk does not say which, so
    ``fold=0`` (the first, summer-time occurrence) is used: such a time may be an hour early.
    A wall time that does not exist (the spring-forward gap, possible only if this zone differs
    from Asterisk's) is interpreted with the offset before the gap and normalised to the real
    local time of that instant (``03:30`` → ``04:30+03:00`` in Europe/Bucharest). Durations
    never come from these times, so neither case changes what is rated.
    """

    system_name: str
    timezone: ZoneInfo


#: A live Cdr is posted at the hangup (cdr.conf ``batch = no``; within the batch's time with
#: ``yes``), so its EndTime is seconds old when it arrives. Read in ``asterisk.timezone``, it is
#: further off than this only when that is not Asterisk's zone (or one of the clocks is wrong).
CDR_CLOCK_TOLERANCE: Final = timedelta(minutes=30)
ZONES_DIFFER_AT_MOST: Final = timedelta(hours=26)  # UTC-12 to UTC+14


def cdr_clock_skew(end: datetime, received: datetime) -> timedelta | None:
    """How far a live Cdr's end (Asterisk's wall time read in the configured zone) lies before
    ``received``, when that points to a wrong zone: more than :data:`CDR_CLOCK_TOLERANCE` and
    no more than two zones can differ (older is history replayed, not a zone). None otherwise.

    Why it matters: a wrong zone moves every call by the difference (the spend's local day, the
    tariff in force), and calls recovered from Master.csv look older than the go-live and are
    skipped (seen with Asterisk in a container left on UTC: tests/asterisk_live)."""
    skew = received - end
    if CDR_CLOCK_TOLERANCE < abs(skew) <= ZONES_DIFFER_AT_MOST:
        return skew
    return None


# --- text -------------------------------------------------------------------------------------


def c_unescape(s: str) -> str:
    """Undo Asterisk's ``ast_escape_c``: ``\\n`` (two characters) → LF, ``\\"`` → ``"``, ….

    Known escapes are ``\\a \\b \\f \\n \\r \\t \\v \\\\ \\' \\" \\?``; any other backslash
    pair, and a lone trailing backslash, are kept as they are. The result may hold control
    characters again: pass it to :func:`clean_text`.
    """
    if "\\" not in s:
        return s
    return _BACKSLASH_PAIR_RE.sub(lambda m: _C_ESCAPES.get(m.group(1), m.group(0)), s)


def clean_text(s: str, max_len: int = _MAX_NAME) -> str:
    """Text from strangers made safe to show and to put in a mail header's display part.

    Every control or invisible formatting character (Unicode Cc, Cf, Cs, Zl, Zp: C0, DEL, C1,
    U+2028/2029, bidi overrides U+202A-202E and isolates U+2066-2069, zero-width characters)
    becomes a space; every ``=?`` (the start of an RFC 2047 encoded word, CVE-2024-6923) is
    removed, repeatedly, so ``==??`` cannot rebuild one; whitespace runs collapse to one space;
    the ends are stripped; the result is at most ``max_len`` characters.
    """
    s = s[: max_len * 8]  # bound the work on a 10 KB name
    # isprintable() is False for every character of the categories Cc, Cf, Cs, Zl and Zp, and
    # in a printable string the only whitespace is the ASCII space: skip the per-character check
    if not s.isprintable():
        s = "".join(" " if unicodedata.category(c) in _DROP_CATEGORIES else c for c in s)
    while "=?" in s:
        s = s.replace("=?", "")
    s = _WHITESPACE_RE.sub(" ", s).strip()
    return s[:max_len].rstrip()


def _ident(s: str, max_len: int = _MAX_IDENT) -> str:
    """An Asterisk identifier (channel, unique id, context, account code, path): control and
    formatting characters removed, nothing else changed, at most ``max_len`` characters."""
    s = s[: max_len * 2]
    if s.isprintable():  # nothing of the dropped categories (see clean_text)
        return s.strip()[:max_len]
    return "".join(c for c in s if unicodedata.category(c) not in _DROP_CATEGORIES).strip()[:max_len]


def _key_part(s: str) -> str:
    # the same rule as keys._clean: a value can never add a ':' to a key
    if s.isprintable() and ":" not in s:
        return s[:120]
    return "".join(c for c in s if c.isprintable() and c != ":")[:120]


def _snapshot_name(value: str) -> str:
    """A C-escaped channel-snapshot name; ``<unknown>`` (Asterisk's empty) → ``''``."""
    return "" if value == _UNKNOWN else clean_text(c_unescape(value), _MAX_NAME)


def _snapshot_number(value: str) -> str:
    # snapshot numbers are not escaped by Asterisk; a hostile one is still cleaned
    return "" if value == _UNKNOWN else clean_text(value, _MAX_NUMBER)


def parse_caller_id(s: str) -> tuple[str, str]:
    """Split a Cdr ``CallerID`` (or Master.csv ``clid``) into cleaned ``(name, number)``.

    Asterisk writes ``"name" <number>`` with ``\\`` before every ``"``, ``\\`` and control
    character of the name (``ast_escape_quoted``), ``name`` alone, or ``number`` alone:

    * ``"Ion Popescu" <0721000001>`` → ``("Ion Popescu", "0721000001")``
    * ``"O\\'Brien" <…>`` / ``"O'Brien" <…>`` → ``("O'Brien", …)``: inside quotes a backslash
      escapes the next character, whatever it is (a raw LF too, which is then cleaned away)
    * ``<0721000001>`` → ``("", "0721000001")``; ``0721000001`` → ``("", "0721000001")``
    * an unquoted ``Name <num>``, or quotes left unbalanced by a hostile name, fall back to
      "everything before the last ``<…>``", outer quotes stripped
    * anything else that is not only ``+``, digits, ``*``, ``#`` → ``(text, "")``; a value cut
      inside the quotes (the CDR ``clid`` field holds 79 bytes, so a long name loses its closing
      quote and the number) gives the name part and ``""``: take the number from ``Source``

    Both parts go through :func:`clean_text`; ``<unknown>`` gives ``("", "")``.
    """
    s = s[:_MAX_CALLER_ID]  # Asterisk's clid holds 79 bytes; a longer value is not from a CDR
    if s.strip() in ("", _UNKNOWN):
        return "", ""
    quoted = _QUOTED_CID_RE.fullmatch(s)
    if quoted is not None:
        name = _BACKSLASH_PAIR_RE.sub(lambda m: m.group(1), quoted.group(1))
        return clean_text(name, _MAX_NAME), clean_text(quoted.group(2), _MAX_NUMBER)
    loose = _LOOSE_CID_RE.fullmatch(s)
    if loose is not None:
        name = loose.group(1).strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1]
        return clean_text(name, _MAX_NAME), clean_text(loose.group(2), _MAX_NUMBER)
    stripped = s.strip()
    if _NUMBER_ONLY_RE.fullmatch(stripped):
        return "", clean_text(stripped, _MAX_NUMBER)
    if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
        stripped = stripped[1:-1]
    elif stripped.startswith('"'):
        # cut by the CDR's 80-byte clid field before the closing quote: the rest is the name
        stripped = _BACKSLASH_PAIR_RE.sub(lambda m: m.group(1), stripped[1:])
    return clean_text(stripped, _MAX_NAME), ""


# --- header access and numbers ----------------------------------------------------------------


class _Frame:
    """First-wins, case-insensitive view of one frame's headers."""

    __slots__ = ("event", "values")

    def __init__(self, headers: Sequence[tuple[str, str]]) -> None:
        values: dict[str, str] = {}
        for name, value in headers:
            values.setdefault(name.lower(), value)
        self.values = values
        self.event = values.get("event", "")

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name.lower(), default)

    def first(self, *names: str) -> str:
        """The first of ``names`` that is present and not empty, else ``''``."""
        for name in names:
            value = self.values.get(name.lower(), "")
            if value:
                return value
        return ""

    def error(self, header: str, problem: str, value: str | None = None) -> TranslateError:
        return TranslateError(self.event, header, problem, value)

    def required(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise self.error(name, "missing or empty")
        return value

    def integer(self, name: str, maximum: int, *, default: int | None = None) -> int:
        """A non-negative decimal (ASCII digits only) ≤ ``maximum``; empty/missing → ``default``
        if one is given, else an error."""
        raw = self.get(name)
        if raw == "" and default is not None:
            return default
        if not _DIGITS_RE.fullmatch(raw):
            raise self.error(name, f"expected a whole number 0..{maximum}", raw)
        value = int(raw)
        if value > maximum:
            raise self.error(name, f"expected a whole number 0..{maximum}", raw)
        return value

    def optional_integer(self, name: str, maximum: int) -> int | None:
        return None if self.get(name) == "" else self.integer(name, maximum)

    def resolution(self, name: str) -> tuple[int, int] | None:
        """``8031x7700`` pixels per metre → ``(204, 196)`` dpi; empty or a zero → ``None``."""
        raw = self.get(name)
        if raw == "":
            return None
        match = _RESOLUTION_RE.fullmatch(raw)
        if match is None:
            raise self.error(name, "expected <x>x<y> pixels per metre", raw)
        x, y = int(match.group(1)), int(match.group(2))
        if x > _MAX_RESOLUTION or y > _MAX_RESOLUTION:
            raise self.error(name, "resolution out of range", raw)
        if x == 0 or y == 0:
            return None
        return round(x * 0.0254), round(y * 0.0254)

    def local_time(self, name: str, zone: ZoneInfo) -> datetime:
        raw = self.get(name)
        if not _TIME_RE.fullmatch(raw):
            raise self.error(name, "expected YYYY-MM-DD HH:MM:SS", raw)
        try:
            # the regex fixed every field's position and its ASCII digits; datetime() refuses
            # what strptime("%Y-%m-%d %H:%M:%S") refuses (month 13, 30 February, hour 24, ...)
            naive = datetime(  # the zone is attached below
                int(raw[0:4]), int(raw[5:7]), int(raw[8:10]), int(raw[11:13]), int(raw[14:16]), int(raw[17:19])
            )
        except ValueError:
            raise self.error(name, "not a valid date and time", raw) from None
        if naive.year not in CDR_YEARS:
            raise self.error(name, f"year outside {CDR_YEARS.start}..{CDR_YEARS.stop - 1}", raw)
        return _attach_zone(naive, zone)

    def optional_local_time(self, name: str, zone: ZoneInfo) -> datetime | None:
        """Empty (an unanswered call's AnswerTime) → ``None``."""
        return None if self.get(name) == "" else self.local_time(name, zone)


def _attach_zone(naive: datetime, zone: ZoneInfo) -> datetime:
    """Asterisk's local wall time → aware datetime; see :class:`TranslateContext` for DST."""
    aware = naive.replace(tzinfo=zone, fold=0)
    # a wall time inside the spring-forward gap does not round-trip: normalise it
    normal = aware.astimezone(UTC).astimezone(zone)
    if normal.replace(tzinfo=None) != naive:
        return normal
    return aware


# --- handlers ---------------------------------------------------------------------------------


_LinkedIdFor = Callable[[str], str | None]


def _cdr(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> CallEnded:
    unique_id = f.required("UniqueID")
    destination_channel = f.get("DestinationChannel")
    disposition_raw = f.get("Disposition")
    try:
        disposition = Disposition(disposition_raw)
    except ValueError:
        disposition = Disposition.UNKNOWN
    linked_id = _ident(f.get("LinkedID") or linked_id_for(unique_id) or "")
    name, number = parse_caller_id(f.get("CallerID"))
    return CallEnded(
        key=keys.cdr_key(ctx.system_name, unique_id, destination_channel),
        system_name=ctx.system_name,
        account=_ident(f.get("AccountCode")),
        source=clean_text(f.get("Source"), _MAX_NUMBER),
        destination=clean_text(f.get("Destination"), _MAX_NUMBER),
        destination_context=_ident(f.get("DestinationContext")),
        caller_id_name=name,
        caller_id_num=number or clean_text(f.get("Source"), _MAX_NUMBER),
        channel=_ident(f.get("Channel")),
        destination_channel=_ident(destination_channel),
        last_application=_ident(f.get("LastApplication")),
        last_data=clean_text(f.get("LastData"), _MAX_TEXT),
        disposition=disposition,
        duration=f.integer("Duration", MAX_CALL_SECONDS),
        billable_seconds=f.integer("BillableSeconds", MAX_CALL_SECONDS),
        start=f.local_time("StartTime", ctx.timezone),
        answer=f.optional_local_time("AnswerTime", ctx.timezone),
        end=f.local_time("EndTime", ctx.timezone),
        unique_id=_ident(unique_id),
        linked_id=linked_id or None,
        sequence=f.optional_integer("Sequence", 2**31 - 1),
        user_field=clean_text(f.get("UserField"), _MAX_TEXT),
    )


def _dial_end(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> DialOutcome:
    # the DialEnd of an Originate has no calling channel: only the Dest* half is present
    unique_id = f.get("Uniqueid")
    dest_unique_id = f.required("DestUniqueid")
    return DialOutcome(
        key=f"dial:{_key_part(ctx.system_name)}:{_key_part(unique_id)}:{_key_part(dest_unique_id)}",
        account=_ident(f.first("AccountCode", "DestAccountCode")),
        unique_id=_ident(unique_id),
        linked_id=_ident(f.first("Linkedid", "DestLinkedid")),
        channel=_ident(f.get("Channel")),
        context=_ident(f.get("Context")),
        exten=clean_text(f.get("Exten"), _MAX_NUMBER),
        caller_id_num=_snapshot_number(f.get("CallerIDNum")),
        caller_id_name=_snapshot_name(f.get("CallerIDName")),
        dest_channel=_ident(f.get("DestChannel")),
        dest_unique_id=_ident(dest_unique_id),
        dial_status=_ident(f.get("DialStatus"), 32),
    )


def _split_mailbox(f: _Frame, header: str, default_context: str) -> tuple[str, str]:
    raw = f.required(header)
    mailbox, at, context = raw.rpartition("@")
    if not at:
        mailbox, context = raw, default_context
    mailbox, context = _ident(mailbox, 80), _ident(context, 80)
    if not mailbox:
        raise f.error(header, "no mailbox", raw)
    return mailbox, context or "default"


def _message_waiting(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> VoicemailWaiting:
    mailbox, context = _split_mailbox(f, "Mailbox", "default")
    new = f.integer("New", _MAX_COUNT)
    old = f.integer("Old", _MAX_COUNT)
    unique_id = f.get("Uniqueid")
    waiting_raw = f.get("Waiting").strip().lower()
    waiting = waiting_raw in ("1", "yes", "true") if waiting_raw else new > 0
    return VoicemailWaiting(
        key=(
            f"mwi:{_key_part(ctx.system_name)}:{_key_part(mailbox)}@{_key_part(context)}:{_key_part(unique_id)}:{new}"
        ),
        mailbox=mailbox,
        context=context,
        new=new,
        old=old,
        waiting=waiting,
        account=_ident(f.get("AccountCode")),
        caller_id_num=_snapshot_number(f.get("CallerIDNum")),
        caller_id_name=_snapshot_name(f.get("CallerIDName")),
        unique_id=_ident(unique_id),
        linked_id=_ident(f.get("Linkedid") or linked_id_for(unique_id) or ""),
        system_name=ctx.system_name,
    )


def _fax(cls: type[_FaxT], prefix: str, f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> _FaxT:
    """ReceiveFAX/SendFAX: no status (a failure shows only as PagesTransferred 0)."""
    unique_id = f.required("Uniqueid")
    return cls(
        key=f"{prefix}:{_key_part(ctx.system_name)}:{_key_part(unique_id)}",
        account=_ident(f.get("AccountCode")),
        unique_id=_ident(unique_id),
        linked_id=_ident(f.get("Linkedid") or linked_id_for(unique_id) or ""),
        caller_id_num=_snapshot_number(f.get("CallerIDNum")),
        caller_id_name=_snapshot_name(f.get("CallerIDName")),
        local_station=clean_text(f.get("LocalStationID"), _MAX_NAME),
        remote_station=clean_text(f.get("RemoteStationID"), _MAX_NAME),
        pages=f.integer("PagesTransferred", _MAX_COUNT, default=0),
        transfer_rate=f.integer("TransferRate", _MAX_RATE, default=0),
        resolution_dpi=f.resolution("Resolution"),
        file_path=_ident(f.get("FileName"), _MAX_PATH),
    )


def _receive_fax(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> FaxReceived:
    return _fax(FaxReceived, "faxrx", f, ctx, linked_id_for)


def _send_fax(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> FaxSent:
    return _fax(FaxSent, "faxtx", f, ctx, linked_id_for)


def _fax_result(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> FaxResult:
    unique_id = f.required("Uniqueid")
    direction = f.get("Direction").strip().lower()
    if direction not in ("receive", "send"):
        raise f.error("Direction", "expected 'receive' or 'send'", f.get("Direction"))
    # FAXSTATUS is empty when the channel hung up before the fax started: nothing was sent
    status = clean_text(f.first("FAXSTATUS", "FAXOPT_status"), 32).upper() or "FAILED"
    return FaxResult(
        key=f"faxresult:{_key_part(ctx.system_name)}:{_key_part(unique_id)}:{direction}",
        direction=direction,
        account=_ident(f.get("AccountCode")),
        unique_id=_ident(unique_id),
        linked_id=_ident(f.get("Linkedid") or linked_id_for(unique_id) or ""),
        status=status,
        error=clean_text(f.first("FAXERROR", "FAXOPT_error"), _MAX_TEXT),
        status_text=clean_text(f.get("FAXOPT_statusstr"), _MAX_TEXT),
        pages=f.integer("FAXPAGES", _MAX_COUNT, default=0),
        rate=f.integer("FAXBITRATE", _MAX_RATE, default=0),
        resolution_dpi=f.resolution("FAXRESOLUTION"),
        local_station=clean_text(f.get("LOCALSTATIONID"), _MAX_NAME),
        remote_station=clean_text(f.get("REMOTESTATIONID"), _MAX_NAME),
        file_path=_ident(f.get("FileName"), _MAX_PATH),
    )


def _voicemail_recorded(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> VoicemailRecorded:
    mailbox, context = _split_mailbox(f, "Mailbox", "default")
    message_file = _ident(f.required("MessageFile"), _MAX_PATH)
    unique_id = f.get("Uniqueid")
    return VoicemailRecorded(
        key=f"vmfile:{_key_part(ctx.system_name)}:{_key_part(message_file)}",
        mailbox=mailbox,
        context=context,
        message_file=message_file,
        status=clean_text(f.get("VMStatus"), 32),
        account=_ident(f.get("AccountCode")),
        unique_id=_ident(unique_id),
        linked_id=_ident(f.get("Linkedid") or linked_id_for(unique_id) or ""),
        system_name=ctx.system_name,
    )


def _is_noise(lower_name: str) -> bool:
    return lower_name in _NOISE_NAMES or lower_name.startswith(_NOISE_PREFIXES)


def _account_fields(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The sender's own headers: no transport noise, nothing that looks secret, values cleaned."""
    fields: dict[str, str] = {}
    for name, value in headers:
        clean_name = _FIELD_NAME_RE.sub("", name)[:_MAX_FIELD_NAME]
        lower = clean_name.lower()
        if not clean_name or _is_noise(lower) or _SECRET_NAME_RE.search(lower) or clean_name in fields:
            continue
        if len(fields) >= _MAX_FIELDS:
            break
        fields[clean_name] = clean_text(value, _MAX_FIELD_VALUE)
    return fields


def _account_event(name: str, f: _Frame, headers: Sequence[tuple[str, str]], ctx: TranslateContext) -> AccountEvent:
    account = _ident(f.first("Account", "AccountCode"), 80)
    if not account:
        raise f.error("Account", "missing or empty (nor AccountCode)")
    fields = _account_fields(headers)
    request_id = f.get("RequestId")
    prefix = f"acct:{_key_part(ctx.system_name)}:{name}:{_key_part(account)}"
    if request_id:
        key = f"{prefix}:{_key_part(request_id)}"
    else:
        # No RequestId: a digest of what the event says. A retry by the sender with a new
        # ActionID is then a new event; senders should always set RequestId. Two changes alike
        # (same fields, no Uniqueid, an ActionID a restarted sender reuses) share the digest
        # unless Asterisk stamped them (timestampevents=yes, to the microsecond): see ``identified``.
        timestamp = f.get("Timestamp")
        material = json.dumps(
            [sorted(fields.items()), f.get("Uniqueid"), f.get("ActionID"), *([timestamp] if timestamp else [])],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        key = f"{prefix}:sha256:{hashlib.sha256(material.encode()).hexdigest()}"
    identified = bool(request_id or f.get("Timestamp"))
    return AccountEvent(key=key, name=name, account=account, fields=fields, identified=identified)


def _user_event_name(f: _Frame) -> str:
    return f.get("UserEvent").strip()


MONEY_USER_EVENTS: Final[frozenset[str]] = frozenset(
    {"Topup", "TopUp", "Payment", "PaymentConfirmed", "Credit", "Adjust", "Adjustment", "Balance", "Refund"}
)
"""``ClickPhone<Name>`` UserEvents that would move money: refused, because any AMI client with
``write=user`` can send a UserEvent. Top-ups and payments come only from the intake API."""


def is_money_user_event(name: str) -> bool:
    return name.startswith(USER_EVENT_PREFIX) and name.removeprefix(USER_EVENT_PREFIX) in MONEY_USER_EVENTS


def unsupported_user_event(headers: Sequence[tuple[str, str]]) -> str | None:
    """The name of a ``UserEvent: ClickPhone*`` that :func:`translate` ignores, else ``None``:
    lets the caller count unknown product events (a typo in the dialplan, a newer sender)."""
    f = _Frame(headers)
    if f.event != "UserEvent":
        return None
    name = _user_event_name(f)
    if not name.startswith(USER_EVENT_PREFIX) or name in FAX_RESULT_USER_EVENTS or name == VOICEMAIL_USER_EVENT:
        return None
    return None if name.removeprefix(USER_EVENT_PREFIX) in ACCOUNT_USER_EVENTS else clean_text(name, 64)


def _voicemail_password_change(
    f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor
) -> VoicemailPasswordChanged:
    # NewPassword is never read. The event has no unique id: the key is the mailbox plus the
    # Timestamp (timestampevents=yes) or the Uniqueid/ActionID if some future version adds one.
    # Without a Timestamp two changes of one mailbox share a key: the notice is then keyed by its
    # arrival (``identified``), the event's own claim counts the second as a duplicate.
    mailbox, context = _split_mailbox(f, "Mailbox", f.get("Context"))
    timestamp = f.get("Timestamp")
    discriminator = timestamp or f.first("Uniqueid", "ActionID")
    key = f"vmpass:{_key_part(ctx.system_name)}:{_key_part(mailbox)}@{_key_part(context)}"
    if discriminator:
        key = f"{key}:{_key_part(discriminator)}"
    return VoicemailPasswordChanged(key=key, mailbox=mailbox, context=context, identified=bool(timestamp))


def _fully_booted(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> AsteriskLifecycle:
    return AsteriskLifecycle(
        key=f"lifecycle:{_key_part(ctx.system_name)}:booted",
        state="booted",
        detail=clean_text(f.get("Status"), _MAX_NAME),
    )


def _shutdown(f: _Frame, ctx: TranslateContext, linked_id_for: _LinkedIdFor) -> AsteriskLifecycle:
    how = clean_text(f.get("Shutdown"), 32)
    restart = clean_text(f.get("Restart"), 16)
    return AsteriskLifecycle(
        key=f"lifecycle:{_key_part(ctx.system_name)}:shutdown",
        state="shutdown",
        detail=f"{how}, restart={restart}" if restart else how,
    )


_Handler = Callable[[_Frame, TranslateContext, _LinkedIdFor], DomainEvent]

_HANDLERS: Final[Mapping[str, _Handler]] = {
    "Cdr": _cdr,
    "DialEnd": _dial_end,
    "MessageWaiting": _message_waiting,
    "ReceiveFAX": _receive_fax,
    "SendFAX": _send_fax,
    "VoicemailPasswordChange": _voicemail_password_change,
    "FullyBooted": _fully_booted,
    "Shutdown": _shutdown,
}


HANDLED_EVENTS: Final[frozenset[str]] = frozenset({*_HANDLERS, "UserEvent"})
"""Every ``Event`` name :func:`translate` may turn into a domain event; for any other name it
returns ``None`` without looking further, so a caller may skip those frames altogether."""


def _no_linked_id(_unique_id: str) -> str | None:
    return None


def _event_name(headers: Sequence[tuple[str, str]]) -> str:
    # _Frame's rule: the first header called "event" (case-insensitive), else ""
    for name, value in headers:
        if name == "Event" or name.lower() == "event":
            return value
    return ""


def translate(
    headers: Sequence[tuple[str, str]],
    ctx: TranslateContext,
    linked_id_for: Callable[[str], str | None] = _no_linked_id,
) -> DomainEvent | None:
    """One AMI frame → a domain event, ``None`` if the daemon does not act on it.

    ``linked_id_for(unique_id)`` supplies the Linkedid for a Cdr without a ``LinkedID`` header
    (cdr_manager.conf without ``[mappings] linkedid => LinkedID``), normally
    :meth:`~clickphone_agi.domain.correlation.LinkedIdCorrelator.linked_id_for`.

    Raises :class:`TranslateError` (a ``ValueError``) when a frame of a handled type has a
    header it cannot read (a missing UniqueID, ``BillableSeconds: abc``, a bad time); never
    anything else, whatever the text.
    """
    if _event_name(headers) not in HANDLED_EVENTS:
        return None  # most of the stream (Newexten, VarSet, Newchannel, ...): no _Frame built
    f = _Frame(headers)
    if f.event == "UserEvent":
        name = _user_event_name(f)
        if name in FAX_RESULT_USER_EVENTS:
            return _fax_result(f, ctx, linked_id_for)
        if name == VOICEMAIL_USER_EVENT:
            return _voicemail_recorded(f, ctx, linked_id_for)
        short = name.removeprefix(USER_EVENT_PREFIX)
        if name.startswith(USER_EVENT_PREFIX) and short in ACCOUNT_USER_EVENTS:
            return _account_event(short, f, headers, ctx)
        return None
    handler = _HANDLERS.get(f.event)
    return None if handler is None else handler(f, ctx, linked_id_for)
