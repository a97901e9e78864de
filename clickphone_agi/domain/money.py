"""Values that money decisions produce: rated calls, authorisation decisions, notices to send.

Amounts are integer bani (1 RON = 100 bani) everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class RatedCall:
    """A billed CDR: what the ledger was charged and why (exported for the billing system)."""

    key: str
    account: str
    destination: str
    prefix: str
    tariff: str
    destination_class: str
    answered_at: datetime
    day: str  # the subscriber's local day, ISO date
    billable_seconds: int
    billed_seconds: int
    cost: int


@dataclass(frozen=True)
class Notice:
    """A notification decided inside a transaction; the sender renders it from ``payload``."""

    key: str
    kind: str
    recipient: str
    account: str
    payload: dict[str, Any] = field(default_factory=dict)
    lifetime: timedelta = timedelta(days=2)


def format_ron(bani: int, language: str = "ro") -> str:
    """``1250`` → ``12,50 lei`` (ro) or ``12.50 RON`` (en); exact, no float."""
    sign = "-" if bani < 0 else ""
    whole, cents = divmod(abs(bani), 100)
    if language == "ro":
        grouped = f"{whole:,}".replace(",", ".")
        return f"{sign}{grouped},{cents:02d} lei"
    return f"{sign}{whole:,}.{cents:02d} RON"
