"""Money: FastAGI call authorisation with reservations, and charging of billing CDRs.

Both run as units of work on the single writer, so the decision and its record (a reservation,
a ledger row, spend, threshold state, outbox rows) commit together and concurrent calls on one
account are serialised: 20 simultaneous ``authorize`` requests cannot jointly hold more than the
budget. The pure decisions live in :mod:`clickphone_agi.domain.authorize` and
:mod:`clickphone_agi.domain.charging`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import structlog

from clickphone_agi.adapters.logging import debug_enabled
from clickphone_agi.clock import Clock
from clickphone_agi.dialplan_vars import Reason
from clickphone_agi.domain.authorize import AuthFacts, Decision, decide
from clickphone_agi.domain.charging import BillingRule, Numbering, rate_call, threshold_notices
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.money import Notice, RatedCall, format_ron
from clickphone_agi.domain.numbers import is_emergency
from clickphone_agi.domain.tariffs import TariffEntry, TariffTable
from clickphone_agi.domain.thresholds import LowBalanceState, insufficient_funds_due, local_day
from clickphone_agi.ports import Store, WriteTx

log = structlog.get_logger(__name__)


@dataclass
class MoneySettings:
    tariffs: TariffTable
    zone: ZoneInfo
    numbering: Numbering = field(default_factory=Numbering)
    rule: BillingRule = field(default_factory=BillingRule)
    limit_percents: tuple[int, ...] = (80, 100)
    insufficient_funds_period: timedelta = timedelta(hours=6)
    ip_alert_period: timedelta = timedelta(hours=1)
    emergency_numbers: tuple[str, ...] = ("112",)
    reservation_margin: timedelta = timedelta(minutes=5)  # ringing before the answer, CDR delay


class MoneyService:
    def __init__(self, store: Store, clock: Clock, settings: MoneySettings) -> None:
        self._store = store
        self._clock = clock
        self.settings = settings
        self.allowed = 0
        self.denied: dict[str, int] = {}
        self.charged = 0
        self.unrated = 0

    # ---- FastAGI authorize ---------------------------------------------------------------

    async def authorize(self, account_code: str, number: str, source_ip: str, call_id: str) -> Decision:
        s = self.settings
        # what needs no stored state is worked out here, on the event loop: the writer's thread,
        # which every authorize and CDR queue for, only reads the account's figures and decides
        emergency = self.is_emergency(number)
        destination = s.numbering.normalise(number)
        now = self._clock.now()
        tariff = s.tariffs.match(destination, now) if destination else None
        # the tariff at the answer prices the call: one taking over during the ringing counts too
        later: tuple[TariffEntry, ...] = ()
        lapses = False
        if destination and tariff:
            during, lapses = s.tariffs.priced_during(destination, now, now + s.reservation_margin)
            later = during[1:]

        def unit(tx: WriteTx) -> Decision:
            now = tx.now
            account = tx.get_account(account_code)
            # a channel asks again only once its last Dial is over (a retry after BUSY, say): what
            # that attempt reserved is replaced by this decision, not added to it or kept instead
            tx.release(call_id)
            held, active = tx.reservations(account_code)
            today = local_day(now, s.zone)
            # a call answered before midnight is charged to that day; one reserved after midnight
            # minus the margin (the longest it may ring) may be answered today
            midnight = datetime.combine(today, time(), tzinfo=s.zone).astimezone(UTC)
            held_today = tx.held_since(account_code, midnight - s.reservation_margin) if held else 0
            facts = AuthFacts(
                account=account,
                emergency=emergency,
                destination=destination,
                tariff=tariff,
                source_ip=source_ip,
                balance=tx.balance(account_code),
                spent_today=tx.spent(account_code, today.isoformat()),
                held=held,
                active_calls=active,
                held_today=held_today,
                later_tariffs=later,
                tariff_lapses=lapses,
            )
            decision = decide(facts)
            if decision.allow and not emergency:
                expires = now + timedelta(seconds=decision.max_seconds) + s.reservation_margin
                tx.reserve(call_id, account_code, decision.reserve, expires)
            elif account is not None and decision.reason is Reason.IP_NOT_ALLOWED:
                self._rate_limited_notice(
                    tx,
                    account.code,
                    "ip_alert_last",
                    s.ip_alert_period,
                    Notice(
                        key=f"ipdeny:{account.code}:{call_id}",
                        kind="ip_denied",
                        recipient=account.email,
                        account=account.code,
                        payload={
                            "name": account.name,
                            "source_ip": source_ip,
                            "number": number,
                            "at": now.isoformat(timespec="seconds"),
                            "language": account.language,
                        },
                    ),
                )
            elif account is not None and decision.reason in (Reason.NO_CREDIT, Reason.DAILY_LIMIT):
                # each reason has its own slot: a daily-limit refusal at noon must not keep quiet
                # the first no-credit refusal that evening, which needs a top-up, not a new day
                self._rate_limited_notice(
                    tx,
                    account.code,
                    "insufficient_last" if decision.reason is Reason.NO_CREDIT else "daily_denied_last",
                    s.insufficient_funds_period,
                    Notice(
                        key=f"nofunds:{account.code}:{call_id}",
                        kind="insufficient_funds",
                        recipient=account.email,
                        account=account.code,
                        payload={
                            "name": account.name,
                            "reason": str(decision.reason),
                            "balance": format_ron(facts.balance, account.language),
                            "number": number,
                            "language": account.language,
                        },
                    ),
                )
            return decision

        # a reservation commits relaxed: durable across a restart at once, across power loss within
        # milliseconds (the store's WAL sync), which a power cut's dropped calls never need sooner
        decision = await self._store.write(unit, durable=False)
        if decision.allow:
            self.allowed += 1
        else:
            reason = str(decision.reason)
            self.denied[reason] = self.denied.get(reason, 0) + 1
        # a denial is news (fraud, a limit, a missing tariff); an allowed call is told by its CDR:
        # at a thousand calls a second a rendered, masked line per call costs ~0.1 ms of the loop
        if decision.allow and not debug_enabled():
            return decision
        (log.debug if decision.allow else log.info)(
            "agi.authorize",
            account=account_code,
            dst=number,
            src_ip=source_ip,
            call_id=call_id,
            allow=decision.allow,
            reason=str(decision.reason) if decision.reason else None,
            maxsec=decision.max_seconds,
            reserve=decision.reserve,
        )
        return decision

    @staticmethod
    def _rate_limited_notice(tx: WriteTx, account: str, state: str, period: timedelta, notice: Notice) -> None:
        last = tx.get_state(account, state)
        if insufficient_funds_due(datetime.fromisoformat(last) if last else None, tx.now, period):
            tx.enqueue_notice(notice)
            tx.set_state(account, state, tx.now.isoformat())

    # ---- charging (called inside the CDR's unit of work) ----------------------------------

    def is_billing_cdr(self, call: CallEnded) -> bool:
        """The configured rule picks the billing CDR; an emergency call is never charged, whatever
        its number normalises to (with an empty national prefix, 112 would look like +40112)."""
        return self.settings.rule.selects(call) and not self.is_emergency(call.destination)

    def is_emergency(self, number: str) -> bool:
        """112 or a configured emergency number, compared in the configured numbering plan."""
        s = self.settings
        n = s.numbering
        return is_emergency(
            number,
            s.emergency_numbers,
            country_code=n.country_code,
            national_prefix=n.national_prefix,
            international_prefix=n.international_prefix,
        )

    def rate(self, call: CallEnded) -> RatedCall | None:
        """The billing CDR rated by the current tariffs, or None if none covers it (pure: no storage)."""
        s = self.settings
        return rate_call(call, s.tariffs, s.numbering, s.zone)

    def charge(self, tx: WriteTx, call: CallEnded) -> int | None:
        """Charge a billing CDR in the caller's transaction; the cost, or None if unrated."""
        return self.charge_rated(tx, call, self.rate(call))

    def charge_rated(self, tx: WriteTx, call: CallEnded, rated: RatedCall | None) -> int | None:
        """:meth:`charge` with the CDR already rated by :meth:`rate`, before the unit of work: rating
        is pure, so the ingest path does it on the event loop and keeps the writer's thread for SQL."""
        s = self.settings
        tx.release(call.unique_id)
        account = tx.get_account(call.account)
        if account is None:
            log.error("charge.unknown_account", key=call.key, account=call.account)
            self.unrated += 1
            return None
        if rated is None:
            log.error("charge.no_tariff", key=call.key, account=call.account, dst=call.destination)
            self.unrated += 1
            return None
        balance_before = tx.balance(account.code)
        spent_before = tx.spent(account.code, rated.day)
        tx.post_ledger(account.code, -rated.cost, "call", call.key, f"{rated.tariff} {rated.billed_seconds}s")
        spent_after = tx.add_spend(account.code, rated.day, rated.cost)
        tx.record_rated(rated)
        fired_name = f"limit_fired:{rated.day}"
        fired_text = tx.get_state(account.code, fired_name)
        limit_fired: frozenset[int] = frozenset(json.loads(fired_text)) if fired_text else frozenset()
        low_before = low_balance_state(tx, account.code)
        notices, fired, low = threshold_notices(
            account,
            rated,
            balance_before=balance_before,
            balance_after=balance_before - rated.cost,
            spent_before=spent_before,
            spent_after=spent_after,
            limit_fired=limit_fired,
            low_state=low_before,
            percents=s.limit_percents,
        )
        for notice in notices:
            tx.enqueue_notice(notice)
        # the state is written only when it changes (rarely): no row reads as nothing fired, armed
        if fired != limit_fired:
            tx.set_state(account.code, fired_name, json.dumps(sorted(fired)))
        save_low_balance_state(tx, account.code, low_before, low)
        self.charged += 1
        return rated.cost


def low_balance_state(tx: WriteTx, code: str) -> LowBalanceState:
    """The account's low-balance warning state as stored (no row reads as armed)."""
    return LowBalanceState(armed=tx.get_state(code, "low_armed") != "0")


def save_low_balance_state(tx: WriteTx, code: str, before: LowBalanceState, after: LowBalanceState) -> None:
    """Store ``after`` if it differs from ``before`` (it rarely does: a charge seldom crosses)."""
    if after != before:
        tx.set_state(code, "low_armed", "1" if after.armed else "0")
