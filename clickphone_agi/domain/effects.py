"""Which durable effects an event has (pure). Later features add rating and notices here.

Every event with an effect is *claimed* under its idempotency key in the same transaction as
the effect, so a replay, a reconnect or the Master.csv twin of an AMI CDR has no second effect.
Recovered history (Master.csv rows) older than the go-live baseline has none: the first start
never re-charges or re-mails what happened before the daemon went live.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from clickphone_agi.domain.events import (
    AccountEvent,
    AsteriskLifecycle,
    CallEnded,
    DialOutcome,
    DomainEvent,
    EventSource,
    FaxEvent,
    FaxResult,
    VoicemailPasswordChanged,
    VoicemailRecorded,
    VoicemailWaiting,
)
from clickphone_agi.domain.missed import missed_key


@dataclass(frozen=True)
class Plan:
    """What to do with one event: ``kind`` None means nothing durable (counted only)."""

    kind: str | None
    record_call: bool = False
    reason: str = ""
    # keys settled by this event, claimed with it: a voicemail event decides its call "not missed"
    # for good, so a crash before the missed-call tracker decided the call cannot turn its CDRs,
    # read again without the event, into a false missed-call mail
    settles: tuple[str, ...] = ()


def plan(event: DomainEvent, went_live_at: datetime) -> Plan:
    if isinstance(event, CallEnded):
        # A live AMI Cdr proves the call just ended; history recovered from Master.csv does not.
        if event.origin is not EventSource.AMI and event.end < went_live_at:
            return Plan(None, reason="before go-live baseline")
        return Plan("cdr", record_call=True)
    if isinstance(event, (AsteriskLifecycle, DialOutcome)):
        return Plan(None, reason="no durable effect")
    if isinstance(event, VoicemailWaiting | VoicemailRecorded):
        settles = (missed_key(event.system_name, event.linked_id),) if event.system_name and event.linked_id else ()
        return Plan("mwi" if isinstance(event, VoicemailWaiting) else "voicemail", settles=settles)
    if isinstance(event, FaxResult):
        return Plan("fax_result")
    if isinstance(event, FaxEvent):
        return Plan("fax")
    if isinstance(event, VoicemailPasswordChanged):
        return Plan("vm_password")
    if isinstance(event, AccountEvent):
        return Plan("account_event")
    return Plan(None, reason="unhandled event type")
