"""Typed domain events: what the rest of the daemon reasons about instead of raw AMI frames.

Every event carries ``key``, its idempotency key: stable across reconnects, replays and the
Master.csv reconciliation, free of times, and prefixed with Asterisk's ``systemname``. Processing
records the key in the same transaction as the event's effects, so a duplicate has no second
effect. Text fields that came from strangers (caller-ID names) are already C-unescaped and
stripped of control characters here; they are still untrusted for anything but display.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Disposition(StrEnum):
    ANSWERED = "ANSWERED"
    NO_ANSWER = "NO ANSWER"
    BUSY = "BUSY"
    FAILED = "FAILED"
    CONGESTION = "CONGESTION"
    UNKNOWN = "UNKNOWN"


CDR_YEARS = range(2, 9999)
"""Years a CDR time may have. Asterisk writes the current year; the margin of a year at each end
of ``datetime``'s range keeps converting the time to any zone (and adding a few days) from
overflowing: ``0001-01-01 00:00:00`` in Europe/Bucharest is in year 0 in UTC."""


class EventSource(StrEnum):
    AMI = "ami"
    CSV = "csv"  # recovered from Master.csv after a gap
    SPOOL = "spool"  # recovered from the voicemail/fax spool after a gap


@dataclass(frozen=True)
class CallEnded:
    """One CDR (a Cdr AMI event or a Master.csv row); a call usually has several."""

    key: str
    system_name: str
    account: str
    source: str
    destination: str
    destination_context: str
    caller_id_name: str
    caller_id_num: str
    channel: str
    destination_channel: str
    last_application: str
    last_data: str
    disposition: Disposition
    duration: int
    billable_seconds: int
    start: datetime
    answer: datetime | None
    end: datetime
    unique_id: str
    linked_id: str | None
    sequence: int | None
    user_field: str
    origin: EventSource = EventSource.AMI


@dataclass(frozen=True)
class DialOutcome:
    """A DialEnd: how one dialled leg ended (ANSWER, NOANSWER, BUSY, CANCEL, …)."""

    key: str
    account: str
    unique_id: str
    linked_id: str
    channel: str
    context: str
    exten: str
    caller_id_num: str
    caller_id_name: str
    dest_channel: str
    dest_unique_id: str
    dial_status: str


class _InBox:
    """A voicemail event's box as accounts, keys and the spool name it."""

    mailbox: str
    context: str

    @property
    def box(self) -> str:
        """``mailbox@context``."""
        return f"{self.mailbox}@{self.context}"


@dataclass(frozen=True)
class VoicemailWaiting(_InBox):
    """MessageWaiting: a mailbox's counts changed; the message itself is in the spool."""

    key: str
    mailbox: str
    context: str
    new: int
    old: int
    waiting: bool
    account: str
    caller_id_num: str
    caller_id_name: str
    unique_id: str
    linked_id: str
    system_name: str = ""  # the PBX it came from: names the call's missed-call key (see effects.plan)


@dataclass(frozen=True)
class FaxEvent:
    """ReceiveFAX/SendFAX; status comes from the dialplan's result UserEvent or sidecar, if any."""

    key: str
    account: str
    unique_id: str
    linked_id: str
    caller_id_num: str
    caller_id_name: str
    local_station: str
    remote_station: str
    pages: int
    transfer_rate: int
    resolution_dpi: tuple[int, int] | None
    file_path: str
    status: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class FaxReceived(FaxEvent):
    pass


@dataclass(frozen=True)
class FaxSent(FaxEvent):
    pass


@dataclass(frozen=True)
class FaxResult:
    """The outcome the dialplan's hangup handler publishes (ReceiveFAX/SendFAX carry none)."""

    key: str
    direction: str  # "receive" | "send"
    account: str
    unique_id: str
    linked_id: str
    status: str  # FAXSTATUS: SUCCESS | FAILED
    error: str
    status_text: str
    pages: int
    rate: int
    resolution_dpi: tuple[int, int] | None
    local_station: str
    remote_station: str
    file_path: str


@dataclass(frozen=True)
class VoicemailRecorded(_InBox):
    """``UserEvent: ClickPhoneVoicemail`` from the dialplan snippet: the exact file just recorded.

    ``message_file`` is Asterisk's ``VM_MESSAGEFILE`` (a path without extension); it is only a
    hint, validated against the spool root before anything reads it.
    """

    key: str
    mailbox: str
    context: str
    message_file: str
    status: str
    account: str
    unique_id: str
    linked_id: str
    system_name: str = ""  # the PBX it came from: names the call's missed-call key (see effects.plan)


@dataclass(frozen=True)
class VoicemailPasswordChanged(_InBox):
    """Never carries the new password: it is dropped in the translator.

    ``identified``: the key tells this change from any other (see :class:`AccountEvent`).
    """

    key: str
    mailbox: str
    context: str
    identified: bool = False


@dataclass(frozen=True)
class AccountEvent:
    """A non-money account event sent as ``UserEvent: ClickPhone<Name>`` (e.g. a PIN created in an IVR).

    Money never arrives this way: any AMI client with ``write=user`` can send a UserEvent.
    """

    key: str
    name: str  # e.g. "PasswordChanged", "PinCreated"
    account: str
    fields: dict[str, str] = field(default_factory=dict)
    identified: bool = True
    """The key tells this change from any other: the sender's ``RequestId``, or Asterisk's
    ``Timestamp`` (``timestampevents=yes``). ``False``: only what the event says, which two alike
    changes share; AMI delivers an event once, so the notice is then keyed by its arrival."""


@dataclass(frozen=True)
class AsteriskLifecycle:
    """FullyBooted / Shutdown: used to trigger reconciliation, never stored as an effect."""

    key: str
    state: str  # "booted" | "shutdown"
    detail: str


DomainEvent = (
    CallEnded
    | DialOutcome
    | VoicemailWaiting
    | FaxReceived
    | FaxSent
    | FaxResult
    | VoicemailRecorded
    | VoicemailPasswordChanged
    | AccountEvent
    | AsteriskLifecycle
)
