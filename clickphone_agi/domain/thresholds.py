"""When to warn a subscriber about money: daily-limit percentages, low balance, no funds.

Pure decisions; the caller persists what they return (the percentages already fired per
account and local day, the :class:`LowBalanceState` per account, when the last
insufficient-funds mail went out) in the same transaction as the balance change, so a crash
cannot fire a warning twice or lose one.  Amounts are integer bani, the time is a parameter.

Local days (:func:`local_day`, :func:`day_bounds`) are the subscriber's calendar day in the
configured zone (``Europe/Bucharest`` by default), so a daily limit resets at local midnight
and is 23 h long on the last Sunday of March and 25 h long on the last Sunday of October.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = [
    "DEFAULT_INSUFFICIENT_FUNDS_PERIOD",
    "DEFAULT_ZONE_NAME",
    "LowBalanceState",
    "daily_limit_crossings",
    "day_bounds",
    "insufficient_funds_due",
    "local_day",
    "low_balance_step",
]

DEFAULT_ZONE_NAME = "Europe/Bucharest"
DEFAULT_INSUFFICIENT_FUNDS_PERIOD = timedelta(hours=6)


def daily_limit_crossings(
    limit: int | None, before: int, after: int, percents: Sequence[int], already: Collection[int]
) -> list[int]:
    """Percentages of the daily limit crossed by this change of today's spend, ascending.

    ``before``/``after`` are today's spend in bani before and after the change.  The
    threshold of ``p`` percent is ``ceil(limit * p / 100)`` bani (integer arithmetic), and it
    is crossed when ``before < threshold <= after``: reaching the threshold exactly counts
    (spending 40,00 of a 50,00 limit is "80 % used"), starting on it does not.  A change that
    crosses several thresholds returns all of them; percentages in ``already`` (fired earlier
    the same local day; the caller keeps that set) are left out, as are duplicates in
    ``percents``.  A refund (``after < before``) crosses nothing.  ``limit=None``: ``[]``.

    Raises :class:`ValueError` for a percentage that is not positive (a configuration bug).
    """
    for p in percents:
        if isinstance(p, bool) or p <= 0:
            raise ValueError(f"percentages must be positive integers, got {p!r}")
    if limit is None:
        return []
    crossed = []
    for p in sorted(set(percents)):
        if p in already:
            continue
        threshold = -(-limit * p // 100)  # ceil without floats
        if before < threshold <= after:
            crossed.append(p)
    return crossed


@dataclass(frozen=True)
class LowBalanceState:
    """Whether the next fall below the threshold should warn (persist it per account)."""

    armed: bool = True


def low_balance_step(threshold: int, before: int, after: int, state: LowBalanceState) -> tuple[bool, LowBalanceState]:
    """Decide whether this balance change warns "low balance"; returns ``(fire, new_state)``.

    "Low" means ``balance < threshold``; a balance exactly at the threshold is not low.

    * Fires when the state is armed, the balance went **down** (``after < before``) and is now
      low; the state is then disarmed, so further calls while below do not warn again.
    * Re-arms when the balance is back at or above the threshold (``after >= threshold``,
      typically a top-up; exactly reaching the threshold re-arms).
    * A top-up that still leaves the balance below the threshold neither warns nor re-arms.
    * A fresh (armed) account that starts below the threshold warns on its first debit,
      not on import: nobody is told "low balance" for a top-up.
    """
    if after >= threshold:
        return False, LowBalanceState(armed=True)
    if state.armed and after < before:
        return True, LowBalanceState(armed=False)
    return False, state


def insufficient_funds_due(
    last_sent: datetime | None, now: datetime, period: timedelta = DEFAULT_INSUFFICIENT_FUNDS_PERIOD
) -> bool:
    """May another "insufficient funds" mail go out now?  At most one per ``period`` (6 h).

    Never sent before → due.  Otherwise due once ``period`` has passed since ``last_sent``.
    A ``last_sent`` more than ``period`` in the *future* (the clock was stepped back) also
    counts as due, so a bad clock cannot silence the warning indefinitely.  Both datetimes
    must be timezone-aware.
    """
    if period <= timedelta(0):
        raise ValueError(f"period must be positive, got {period}")
    _require_aware(now, "now")
    if last_sent is None:
        return True
    _require_aware(last_sent, "last_sent")
    return abs(now - last_sent) >= period


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    """The calendar day in ``zone`` of the aware instant ``moment``.

    ``2026-10-24T21:30:00Z`` is 00:30 on 2026-10-25 in Bucharest (still EEST, UTC+3), so
    it belongs to 2026-10-25; ``2026-10-24T20:59:59Z`` belongs to 2026-10-24.
    """
    _require_aware(moment, "moment")
    return moment.astimezone(zone).date()


def day_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """``[start, end)`` of local ``day`` in ``zone`` as aware UTC datetimes.

    24 h long on ordinary days, 23 h on the spring-forward day, 25 h on the autumn-back day.
    Assumes local midnight is not inside a fold (true for Europe/Bucharest, which changes at
    03:00/04:00 local; in a zone that moves the clock back across midnight the day is not one
    interval).  When midnight falls in a gap, the day starts at the transition.
    """
    return _local_midnight(day, zone), _local_midnight(day + timedelta(days=1), zone)


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    # fold=0 reads a skipped wall time with the offset in force before the gap, which lands
    # exactly on the transition instant: the first instant of that local day.
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _require_aware(moment: datetime, name: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {moment!r}")
