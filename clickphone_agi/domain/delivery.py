"""When to retry a notification, Postfix-style, and what every sent mail must carry (pure).

The gap before the next attempt is the message's age clamped to [min_gap, max_gap]; after
``lifetime`` a retryable failure becomes a dead letter. 5xx replies are permanent at once;
4xx, timeouts and dropped connections (no code) are retryable. The sender supplies the time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from clickphone_agi.domain.outbox import OutboxRow


@dataclass(frozen=True)
class RetryPolicy:
    min_gap: timedelta = timedelta(minutes=5)
    max_gap: timedelta = timedelta(minutes=67)
    lifetime: timedelta = timedelta(days=5)

    @classmethod
    def from_seconds(cls, min_gap: float, max_gap: float, lifetime: float) -> RetryPolicy:
        return cls(timedelta(seconds=min_gap), timedelta(seconds=max_gap), timedelta(seconds=lifetime))


@dataclass(frozen=True)
class Failure:
    dead: bool
    next_attempt_at: datetime


def is_permanent(code: int | None) -> bool:
    return code is not None and 500 <= code <= 599


def after_failure(
    policy: RetryPolicy, *, now: datetime, created_at: datetime, code: int | None, ambiguous: bool = False
) -> Failure:
    """``created_at`` is when the message's lifetime started (its creation, or an operator's retry).

    ``ambiguous``: no reply came to the end of the data, so the relay may have queued the message.
    RFC 5321 4.5.3.2.6 still makes that a temporary failure (retrying risks a duplicate, giving up
    risks a loss); the retry waits the longest gap, not the shortest, so an overloaded relay (the
    usual cause) can finish what it was doing, and a duplicate never follows within minutes.
    """
    if is_permanent(code) or now - created_at >= policy.lifetime:
        return Failure(dead=True, next_attempt_at=now)
    gap = policy.max_gap if ambiguous else min(max(now - created_at, policy.min_gap), policy.max_gap)
    return Failure(dead=False, next_attempt_at=now + gap)


def message_id(idempotency_key: str, domain: str) -> str:
    """Stable, valid and opaque: the same notification always carries the same Message-ID."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}@{domain}>"


@dataclass(frozen=True)
class DueMail:
    """A pending row handed to the sender: its stored body and what the sender must know first."""

    row: OutboxRow
    mime: bytes
    suppressed: str | None = None  # why the recipient is suppressed, if it is
    retried_at: datetime | None = None  # an operator's replay restarts the lifetime

    @property
    def lifetime_start(self) -> datetime:
        return self.retried_at or self.row.created_at


class RateLimiter:
    """Evenly spaced send slots at ``rate`` per second (a token bucket of depth one).

    :meth:`reserve` books the next slot and returns how long the caller waits for it; the
    caller passes monotonic time, so tests drive it with a fake clock.
    """

    def __init__(self) -> None:
        self._next = 0.0

    def reserve(self, now: float, rate: float | None) -> float:
        if not rate:
            return 0.0
        slot = max(now, self._next)
        self._next = slot + 1.0 / rate
        return slot - now


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def ensure_headers(mime: bytes, msg_id: str) -> bytes:
    """Every mail carries ``Auto-Submitted: auto-generated`` and a Message-ID: add what is missing.

    Prepending a header is safe whatever renderer built ``mime`` (header order carries no
    meaning), so the guarantee holds even for a template that forgot them.
    """
    end = _HEADER_END.search(mime)
    head = mime[: end.start()] if end else mime
    eol = b"\r\n" if b"\r\n" in (mime[: end.end()] if end else mime) else b"\n"
    extra = b""
    if not re.search(rb"(?im)^auto-submitted[ \t]*:", head):
        extra += b"Auto-Submitted: auto-generated" + eol
    if not re.search(rb"(?im)^message-id[ \t]*:", head):
        extra += b"Message-ID: " + msg_id.encode("ascii") + eol
    return extra + mime
