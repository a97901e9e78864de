"""May this account dial this number now, and for how long? (pure)

The FastAGI ``authorize`` route gathers the facts inside one write transaction (balance, today's
spend, budget already held by calls in progress) and this function decides. An ALLOW reserves
the worst-case cost of the call — the cost of MAXSEC seconds — so N simultaneous calls can never
jointly spend more than the balance or the daily limit. The budget is

    min(balance - held, daily_limit - spent_today - held_today)      (prepaid, with a daily limit)

where ``held_today`` leaves out reservations made before today's midnight minus the reservation
margin: those calls were answered yesterday, and yesterday's spend pays for them.

and MAXSEC is the longest duration whose rated cost fits it, capped by the account's maximum call
length; when the tariff changes before the call can be answered (the reservation margin), under
every tariff that may price it (and a number left without any tariff in that time is denied, as
one without a tariff now is). Emergency numbers are always allowed and never charged.
"""

from __future__ import annotations

from dataclasses import dataclass

from clickphone_agi.dialplan_vars import Reason
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.rating import cost, max_seconds
from clickphone_agi.domain.tariffs import TariffEntry

EMERGENCY_MAX_SECONDS = 4 * 3600


@dataclass(frozen=True)
class AuthFacts:
    """What the decision needs, read in the same transaction that records its reservation."""

    account: Account | None
    emergency: bool
    destination: str | None  # E.164 digits; None when the number could not be normalised
    tariff: TariffEntry | None
    source_ip: str
    balance: int
    spent_today: int
    held: int  # budget held by unexpired reservations
    active_calls: int  # unexpired reservations
    # of ``held``, what may still land on today's spend: a call reserved so long before midnight
    # that it was answered yesterday is charged to yesterday (None: all of it)
    held_today: int | None = None
    # entries that take over from ``tariff`` before the call can be answered (a rate change during
    # the ringing): the tariff at the answer prices the call, so the dearest of them bounds MAXSEC
    later_tariffs: tuple[TariffEntry, ...] = ()
    # no entry prices the number at some moment before the call can be answered (a tariff ended
    # with no successor): a call answered then could not be charged, so it is denied like no route
    tariff_lapses: bool = False


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: Reason | None
    max_seconds: int
    reserve: int  # bani to hold until the call's CDR arrives

    @classmethod
    def deny(cls, reason: Reason) -> Decision:
        return cls(False, reason, 0, 0)


def decide(f: AuthFacts) -> Decision:
    if f.emergency:
        return Decision(True, Reason.EMERGENCY, EMERGENCY_MAX_SECONDS, 0)
    account = f.account
    if account is None:
        return Decision.deny(Reason.NO_ACCOUNT)
    if not account.enabled:
        return Decision.deny(Reason.DISABLED)
    if not account.ip_allowed(f.source_ip):
        return Decision.deny(Reason.IP_NOT_ALLOWED)
    if f.destination is None or f.tariff is None or f.tariff_lapses:
        return Decision.deny(Reason.NO_ROUTE)
    tariffs = (f.tariff, *f.later_tariffs)
    if any(t.destination_class in account.blocked_classes for t in tariffs):
        return Decision.deny(Reason.BLOCKED_CLASS)
    if f.active_calls >= account.max_concurrent_calls:
        return Decision.deny(Reason.TOO_MANY_CALLS)

    budgets: list[tuple[int, Reason]] = []
    if account.billing == "prepaid":
        budgets.append((f.balance - f.held, Reason.NO_CREDIT))
    if account.daily_limit is not None:
        held_today = f.held if f.held_today is None else f.held_today
        budgets.append((account.daily_limit - f.spent_today - held_today, Reason.DAILY_LIMIT))
    if budgets:
        budget, binding = min(budgets, key=lambda b: b[0])
        seconds = min(max_seconds(t, max(0, budget), cap=account.max_call_seconds) for t in tariffs)
        if seconds <= 0:
            return Decision.deny(binding)
    else:  # postpaid without a daily limit: only the call length cap applies
        seconds = account.max_call_seconds
    return Decision(True, None, seconds, max(cost(t, seconds) for t in tariffs))
