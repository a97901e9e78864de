"""The storage interface services depend on; SQLite implements it today, PostgreSQL later.

A write is a *unit of work*: a plain synchronous function that receives a :class:`WriteTx` and
runs inside one transaction on the storage's own writer. It must only decide and call ``tx``
methods — no sockets, no file reads, no rendering (do those before). That keeps SQL and
transaction handling inside the adapter and makes each transaction one hop to the database.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, TypeVar

from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow

T = TypeVar("T")


class WriteTx(Protocol):
    """Operations available inside one write transaction."""

    now: datetime

    def claim_event(self, key: str, kind: str) -> bool:
        """Record an event's idempotency key; False if it was already processed."""
        ...

    def record_call(self, call: CallEnded) -> None:
        """Store one CDR (call after :meth:`claim_event` succeeded for its key)."""
        ...

    def set_meta(self, key: str, value: str) -> None:
        """Small durable state such as the Master.csv read position."""
        ...

    def enqueue(self, message: OutboxMessage) -> bool:
        """Add an outbox row; False (and nothing inserted) if its key already exists."""
        ...

    def mark_sent(self, row_id: int, smtp_reply: str) -> None: ...

    def mark_failed(self, row_id: int, error: str, next_attempt_at: datetime, *, dead: bool) -> None: ...

    def mark_expired(self, row_id: int) -> None: ...


class Store(Protocol):
    """What the daemon's services need from storage."""

    async def write(self, work: Callable[[WriteTx], T]) -> T:
        """Run ``work`` in one write transaction (BEGIN IMMEDIATE … COMMIT) and return its result."""
        ...

    async def went_live_at(self) -> datetime:
        """When this database first went live: nothing older is ever charged or mailed."""
        ...

    async def due_outbox(self, now: datetime, limit: int) -> list[tuple[OutboxRow, bytes]]:
        """Pending rows whose next attempt is due, with their MIME bytes, oldest first."""
        ...

    async def outbox_counts(self) -> dict[str, int]: ...

    async def event_count(self, kind: str | None = None) -> int: ...

    async def get_meta(self, key: str) -> str | None: ...
