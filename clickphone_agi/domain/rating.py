"""Pricing a call from its tariff entry, in integer bani. Pure, stdlib only.

Rounding rule (the only one; every charged amount is an ``int`` of bani, 1 RON = 100 bani):

    The billable seconds are first rounded up to the entry's increments (``billed_seconds``:
    the first ``initial_block`` seconds are charged whole, then whole ``step`` s). The variable
    part, ``rate_per_minute * billed_seconds / 60`` RON, is computed EXACTLY from the Decimal
    rate (no float, no intermediate rounding) and converted to bani by rounding UP to the next
    whole ban, once (``ROUND_CEILING``). The connection fee (whole bani) is then added and the
    minimum charge applied::

        cost = max(minimum_charge, connection_fee + ceil(rate_per_minute * billed_seconds * 100 / 60))

    Because the fee and the minimum are whole bani, this is the same as rounding the call's final
    cost up to the next ban. A call with 0 billable seconds (unanswered, or hung up within the
    answering second) costs 0: no connection fee, no minimum charge. A ``free`` entry costs 0.

Example: 0.05 RON/min, 60/1 increments, 65 s → 0.05 * 65 / 60 = 0.0541666… RON = 5.41666… bani →
6 bani. The exact value is computed as the integer fraction of the Decimal rate
(``Decimal.as_integer_ratio``), which equals a Decimal computation carried out with unbounded
precision and a single ``ROUND_CEILING`` quantisation.

:func:`max_seconds` answers the authorisation question "how long may this call last within a
budget" with the same rule, in O(1) arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from clickphone_agi.domain.numbers import normalise
from clickphone_agi.domain.tariffs import TariffEntry, TariffTable

__all__ = [
    "Rated",
    "billed_seconds",
    "cost",
    "max_seconds",
    "rate",
]


def billed_seconds(entry: TariffEntry, billable_seconds: int) -> int:
    """``billable_seconds`` rounded up to ``entry``'s increments; 0 stays 0.

    ``max(initial_block, initial_block + ceil((s - initial_block) / step) * step)``: 60/1 bills
    3 s as 60 and 65 s as 65; 60/60 bills 65 s as 120; 1/1 bills what it is given.
    """
    if billable_seconds < 0:
        raise ValueError(f"billable_seconds must be >= 0, got {billable_seconds}")
    if billable_seconds == 0:
        return 0
    first = entry.initial_block
    if billable_seconds <= first:
        return first
    step = entry.step
    return first - (-(billable_seconds - first) // step) * step


def cost(entry: TariffEntry, billable_seconds: int) -> int:
    """The charge in bani for a call of ``billable_seconds`` (see the module's rounding rule)."""
    billed = billed_seconds(entry, billable_seconds)
    if billed == 0 or entry.free:
        return 0
    return max(entry.minimum_charge, entry.connection_fee + _variable_bani(entry, billed))


def _variable_bani(entry: TariffEntry, billed: int) -> int:
    """``ceil(rate_per_minute * billed * 100 / 60)`` in exact integer arithmetic."""
    num, den = entry.rate_fraction
    return -(-(num * billed * 100) // (den * 60))


@dataclass(frozen=True)
class Rated:
    """A priced call: the entry that applied, the seconds charged for and the cost in bani."""

    entry: TariffEntry
    billed_seconds: int
    cost: int


def rate(
    table: TariffTable,
    number: str,
    billable_seconds: int,
    answered_at: datetime,
    *,
    country_code: str = "40",
    national_prefix: str = "0",
    international_prefix: str = "00",
    bare_is_e164: bool = False,
) -> Rated | None:
    """Price a call to ``number`` (any form :func:`~clickphone_agi.domain.numbers.normalise`
    accepts) with the tariff in force at ``answered_at``; that entry prices the whole call, even
    if the tariff changes during it.

    None means no tariff covers the number: ``authorize`` must deny such a call, and a CDR
    without a tariff is reported, never charged as free. A string that is not a number raises
    :class:`~clickphone_agi.domain.numbers.InvalidNumber`.
    """
    e164 = normalise(
        number,
        country_code=country_code,
        national_prefix=national_prefix,
        international_prefix=international_prefix,
        bare_is_e164=bare_is_e164,
    )
    entry = table.match(e164, answered_at)
    if entry is None:
        return None
    return Rated(entry, billed_seconds(entry, billable_seconds), cost(entry, billable_seconds))


def max_seconds(entry: TariffEntry, budget: int, *, cap: int) -> int:
    """The longest duration ``s`` in ``[0, cap]`` with ``cost(entry, s) <= budget`` (bani).

    0 when not even the first block fits (or ``budget`` is negative): the call must be denied.
    A free entry, or one that charges nothing per minute, gets ``cap`` if its fixed charges fit.

    Cost only changes at billing boundaries and the longest duration with a given billed length
    is that length itself, so the answer is the largest boundary ``initial_block + k * step``
    (k ≥ 0) whose cost fits, capped at ``cap``. It is solved in integer arithmetic:
    ``fee + ceil(num * B * 100 / (den * 60)) <= budget``  ⇔  ``B <= (budget - fee) * den * 60 //
    (num * 100)``, then checked with :func:`cost`.
    """
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    if budget < 0 or cap == 0:
        return 0
    if entry.free:
        return cap
    variable_budget = budget - entry.connection_fee
    if entry.minimum_charge > budget or variable_budget < 0:
        return 0
    num, den = entry.rate_fraction
    first = entry.initial_block
    if num == 0:
        seconds = cap
    else:
        longest_billed = (variable_budget * den * 60) // (num * 100)
        if longest_billed < first:
            return 0
        seconds = min(cap, first + (longest_billed - first) // entry.step * entry.step)
    if cost(entry, seconds) > budget:  # cannot happen; a wrong limit would give away calls
        raise ArithmeticError(f"max_seconds({entry.name!r}, {budget}) found {seconds} s over budget")
    return seconds
