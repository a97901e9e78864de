"""What an outbox row is, independent of where it is stored.

A notification is rendered to MIME bytes *before* the transaction that records the change
causing it; the row and the change then commit together, and delivery happens after commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

MAX_KEY = 200  # the longest idempotency key an outbox row takes


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    EXPIRED = "expired"
    BOUNCED = "bounced"


@dataclass(frozen=True)
class OutboxMessage:
    """A rendered notification waiting to be committed with the change that caused it."""

    idempotency_key: str
    kind: str
    recipient: str
    account: str | None
    mime: bytes
    created_at: datetime
    expires_at: datetime
    # stored next to the pre-rendered ``mime`` (the sender renders only rows without one), e.g.
    # where a voicemail sits, for the removal after the 250; JSON-serialisable
    payload: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.idempotency_key or len(self.idempotency_key) > MAX_KEY:
            raise ValueError(f"idempotency_key must be 1-{MAX_KEY} characters")
        if any(ord(c) < 32 for c in self.recipient) or "@" not in self.recipient:
            raise ValueError("recipient must be a bare e-mail address")
        if self.expires_at <= self.created_at:
            raise ValueError("expires_at must be after created_at")

    @classmethod
    def build(
        cls,
        *,
        key: str,
        kind: str,
        recipient: str,
        account: str | None,
        mime: bytes,
        now: datetime,
        lifetime: timedelta,
        payload: dict[str, Any] | None = None,
    ) -> OutboxMessage:
        return cls(key, kind, recipient, account, mime, now, now + lifetime, payload)


@dataclass(frozen=True)
class OutboxRow:
    """An outbox row as read back for delivery or inspection."""

    id: int
    idempotency_key: str
    kind: str
    recipient: str
    account: str | None
    status: OutboxStatus
    attempts: int
    created_at: datetime
    expires_at: datetime
    next_attempt_at: datetime
    last_error: str | None
    smtp_reply: str | None
    sent_at: datetime | None
    payload: dict[str, Any] | None = None  # template data of a notice the sender renders
