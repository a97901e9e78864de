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


@dataclass(frozen=True)
class Plan:
    """What to do with one event: ``kind`` None means nothing durable (counted only)."""

    kind: str | None
    record_call: bool = False
    reason: str = ""


def plan(event: DomainEvent, went_live_at: datetime) -> Plan:
    if isinstance(event, CallEnded):
        # A live AMI Cdr proves the call just ended; history recovered from Master.csv does not.
        if event.origin is not EventSource.AMI and event.end < went_live_at:
            return Plan(None, reason="before go-live baseline")
        return Plan("cdr", record_call=True)
    if isinstance(event, (AsteriskLifecycle, DialOutcome)):
        return Plan(None, reason="no durable effect")
    if isinstance(event, VoicemailWaiting):
        return Plan("mwi")
    if isinstance(event, VoicemailRecorded):
        return Plan("voicemail")
    if isinstance(event, FaxResult):
        return Plan("fax_result")
    if isinstance(event, FaxEvent):
        return Plan("fax")
    if isinstance(event, VoicemailPasswordChanged):
        return Plan("vm_password")
    if isinstance(event, AccountEvent):
        return Plan("account_event")
    return Plan(None, reason="unhandled event type")
