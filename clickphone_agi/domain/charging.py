"""Which CDR is billed, and what charging it does to an account (pure).

A Local-channel call yields 3-4 CDRs, several of them ANSWERED (the callee half, the voicemail
or fax leg), so exactly one must be picked: the configured rule selects the CDR of the ``Dial``
towards the trunk. Charging returns the ledger amount, the spend-day and the notices the
crossing of a threshold causes; the caller commits all of it with the CDR's key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from zoneinfo import ZoneInfo

from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.events import CallEnded, Disposition
from clickphone_agi.domain.money import Notice, RatedCall, format_ron
from clickphone_agi.domain.numbers import normalise_or_none
from clickphone_agi.domain.rating import billed_seconds, cost
from clickphone_agi.domain.tariffs import TariffTable
from clickphone_agi.domain.thresholds import LowBalanceState, daily_limit_crossings, local_day, low_balance_step


@dataclass(frozen=True)
class BillingRule:
    """Picks the billing CDR: ANSWERED, billable seconds > 0, and every configured condition."""

    last_application: str = "Dial"
    destination_contexts: tuple[str, ...] = ()
    destination_channel_pattern: str | None = None

    def selects(self, call: CallEnded) -> bool:
        if call.disposition is not Disposition.ANSWERED or call.billable_seconds <= 0:
            return False
        if self.last_application and call.last_application != self.last_application:
            return False
        if self.destination_contexts and call.destination_context not in self.destination_contexts:
            return False
        pattern = self.destination_channel_pattern
        return pattern is None or re.search(pattern, call.destination_channel) is not None


@dataclass(frozen=True)
class Numbering:
    country_code: str = "40"
    national_prefix: str = "0"
    international_prefix: str = "00"

    def normalise(self, number: str) -> str | None:
        return normalise_or_none(number, self.country_code, self.national_prefix, self.international_prefix)


def rate_call(call: CallEnded, table: TariffTable, numbering: Numbering, zone: ZoneInfo) -> RatedCall | None:
    """The billing CDR's rated cost at its answer time; None when no tariff covers it."""
    destination = numbering.normalise(call.destination)
    answered = call.answer or call.start
    if destination is None:
        return None
    entry = table.match(destination, answered)
    if entry is None:
        return None
    return RatedCall(
        key=call.key,
        account=call.account,
        destination=destination,
        prefix=entry.prefix,
        tariff=entry.name,
        destination_class=entry.destination_class,
        answered_at=answered,
        day=local_day(answered, zone).isoformat(),
        billable_seconds=call.billable_seconds,
        billed_seconds=billed_seconds(entry, call.billable_seconds),
        cost=cost(entry, call.billable_seconds),
    )


def threshold_notices(
    account: Account,
    rated: RatedCall,
    *,
    balance_before: int,
    balance_after: int,
    spent_before: int,
    spent_after: int,
    limit_fired: frozenset[int],
    low_state: LowBalanceState,
    percents: tuple[int, ...],
) -> tuple[list[Notice], frozenset[int], LowBalanceState]:
    """The limit and low-balance notices this charge causes, and the updated notice state."""
    notices = []
    fired = daily_limit_crossings(account.daily_limit, spent_before, spent_after, percents, limit_fired)
    lang = account.language
    for pct in fired:
        notices.append(
            Notice(
                key=f"limit:{account.code}:{rated.day}:{pct}",
                kind="daily_limit",
                recipient=account.email,
                account=account.code,
                payload={
                    "percent": pct,
                    "day": rated.day,
                    "limit": format_ron(account.daily_limit or 0, lang),
                    "spent": format_ron(spent_after, lang),
                    "name": account.name,
                    "language": lang,
                },
            )
        )
    low, new_state = low_balance_notice(account, rated.key, balance_before, balance_after, low_state)
    if low is not None:
        notices.append(low)
    return notices, limit_fired | frozenset(fired), new_state


def low_balance_notice(
    account: Account, ref: str, balance_before: int, balance_after: int, state: LowBalanceState
) -> tuple[Notice | None, LowBalanceState]:
    """The "low balance" notice a balance move from ``balance_before`` to ``balance_after`` causes
    (a call's charge, a manual adjustment; ``ref`` is the move's ledger ref), and the new state:
    a fall below the threshold warns once, a rise back to it re-arms (:func:`low_balance_step`)."""
    fire, new_state = low_balance_step(account.low_balance_threshold, balance_before, balance_after, state)
    if not fire or account.billing != "prepaid":
        return None, new_state
    lang = account.language
    notice = Notice(
        key=f"lowbal:{account.code}:{ref}",
        kind="low_balance",
        recipient=account.email,
        account=account.code,
        payload={
            "balance": format_ron(balance_after, lang),
            "threshold": format_ron(account.low_balance_threshold, lang),
            "name": account.name,
            "language": lang,
        },
        lifetime=timedelta(days=2),
    )
    return notice, new_state
