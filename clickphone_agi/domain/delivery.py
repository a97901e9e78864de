"""When to retry a notification, Postfix-style (pure; the sender supplies the time).

The gap before the next attempt is the message's age clamped to [min_gap, max_gap]; after
``lifetime`` a retryable failure becomes a dead letter. 5xx replies are permanent at once;
4xx, timeouts and dropped connections (no code) are retryable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    min_gap: timedelta = timedelta(minutes=5)
    max_gap: timedelta = timedelta(minutes=67)
    lifetime: timedelta = timedelta(days=5)


@dataclass(frozen=True)
class Failure:
    dead: bool
    next_attempt_at: datetime


def is_permanent(code: int | None) -> bool:
    return code is not None and 500 <= code <= 599


def after_failure(policy: RetryPolicy, *, now: datetime, created_at: datetime, code: int | None) -> Failure:
    if is_permanent(code) or now - created_at >= policy.lifetime:
        return Failure(dead=True, next_attempt_at=now)
    gap = min(max(now - created_at, policy.min_gap), policy.max_gap)
    return Failure(dead=False, next_attempt_at=now + gap)


def message_id(idempotency_key: str, domain: str) -> str:
    """Stable, valid and opaque: the same notification always carries the same Message-ID."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}@{domain}>"
