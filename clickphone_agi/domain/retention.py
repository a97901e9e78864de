"""Retention: how long each kind of personal data is kept, and when the daily job runs.

Pure: the time is a parameter. The job itself is :mod:`clickphone_agi.services.retention`.

**Idempotency keys and replays.** An event's key (``processed_events``) is what stops a replay
— a Master.csv row re-read, a voicemail still in the spool — from charging or mailing twice. Once
keys older than ``processed_event_retention_days`` are purged, a replay of an event that old
would look new. So the purge also moves a *key floor* forward (:func:`key_floor`): recovered
events older than the floor are ignored, exactly like events older than the go-live baseline.
The floor sits :data:`FLOOR_MARGIN` after the purge cutoff because a key is claimed when the event
is processed, which can be a little after the event's own time (Asterisk's clock, a CDR that
arrives late). The floor is stored in the database, so a restart keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = [
    "FINISHED_STATUSES",
    "FLOOR_MARGIN",
    "MIN_KEY_RETENTION_DAYS",
    "PURGE_AFTER_SEND",
    "RetentionPolicy",
    "key_floor",
    "next_run_at",
]

FLOOR_MARGIN = timedelta(days=1)
MIN_KEY_RETENTION_DAYS = 62
"""The reconciliation reads Master.csv and the rest of Master.csv.1 (the rotated file); with a
monthly logrotate the oldest row it can meet is under two months old. Keys must outlive that."""

FINISHED_STATUSES = ("sent", "dead", "expired", "bounced")
"""Outbox statuses whose body may be purged; a pending row is never touched."""

PURGE_AFTER_SEND = frozenset({"password_recovery", "payment_confirmed", "topup"})
"""Kinds whose body is dropped as soon as the mail is delivered (or expired): a reset link, and
payment details that are kept nowhere else (the billing system at the company's seat holds them)."""


@dataclass(frozen=True)
class RetentionPolicy:
    """Periods in days (the ``privacy`` section of the configuration)."""

    outbox_body_days: int
    processed_event_days: int
    cdr_days: int
    api_request_days: int

    def cutoffs(self, now: datetime) -> dict[str, datetime]:
        """Everything older than its cutoff is purged (by what the cutoff applies to, see the job)."""
        return {
            "outbox_bodies": now - timedelta(days=self.outbox_body_days),
            "processed_events": now - timedelta(days=self.processed_event_days),
            "cdrs": now - timedelta(days=self.cdr_days),
            "rated_calls": now - timedelta(days=self.cdr_days),
            "api_requests": now - timedelta(days=self.api_request_days),
        }


def key_floor(key_cutoff: datetime) -> datetime:
    """Recovered events older than this are ignored once keys older than ``key_cutoff`` are purged."""
    return key_cutoff + FLOOR_MARGIN


ERASURE_MARGIN = timedelta(days=30)
"""How much longer than the key floor an erased number's digest is kept: a call that started
before the erasure and ended after the floor would need to last this long."""


def erased_numbers_cutoff(floor: datetime) -> datetime:
    """Erased numbers' digests older than this are purged. They keep a CDR leg or voicemail from
    before an erasure from being recorded or mailed again; once the key floor has passed the
    erasure by :data:`ERASURE_MARGIN`, nothing from before it is read again (recovered CDRs and
    spool messages older than the floor are ignored), and the digest has no purpose left."""
    return floor - ERASURE_MARGIN


def next_run_at(now: datetime, zone: ZoneInfo, hour: int) -> datetime:
    """The first ``hour``:00 local time strictly after ``now``, as an aware UTC datetime.

    On the spring-forward day a skipped hour (03:00 in Bucharest) runs at the transition instant
    (fold=0 reads it with the offset before the gap); on the autumn-back day a repeated hour runs
    at its first occurrence. Either way: once per local day.
    """
    if not 0 <= hour <= 23:
        raise ValueError(f"hour must be 0-23, got {hour}")
    local = now.astimezone(zone)
    day = local.date()
    for offset in range(3):
        candidate = datetime.combine(day + timedelta(days=offset), time(hour), tzinfo=zone).astimezone(UTC)
        if candidate > now:
            return candidate
    raise AssertionError("unreachable: a local day always has the hour within three days")
