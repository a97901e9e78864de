"""Money end to end with real SQLite: authorisation with reservations, charging of recorded calls,
threshold notices, and the ledger always summing to the balance."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.dialplan_vars import Reason
from clickphone_agi.domain.accounts import Account, Mailbox
from clickphone_agi.domain.ami_translate import TranslateContext, translate
from clickphone_agi.domain.charging import BillingRule, Numbering
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.rating import cost
from clickphone_agi.domain.tariffs import TariffEntry, TariffTable
from clickphone_agi.services.accounts import adjust_unit, import_unit
from clickphone_agi.services.ingest import EventProcessor
from clickphone_agi.services.money import MoneyService, MoneySettings
from clickphone_agi.sim.ami_server import load_transcript, packaged_scenarios

REPO = Path(__file__).resolve().parent.parent
TZ = ZoneInfo("Europe/Bucharest")
NOW = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)
SINCE = datetime(2026, 1, 1, tzinfo=TZ)


def entry(
    prefix: str, rate: str, cls: str = "national", *, step: int = 1, initial: int = 60, **kw: object
) -> TariffEntry:
    return TariffEntry(
        prefix=prefix, name=f"test {prefix}", destination_class=cls, rate_per_minute=Decimal(rate),
        connection_fee=int(kw.get("fee", 0)), initial_block=initial, step=step, minimum_charge=0,
        free=bool(kw.get("free", False)), effective_from=SINCE, effective_to=None,
    )  # fmt: skip


TABLE = TariffTable(
    (
        entry("40", "0.05"),  # 5 bani/min, 60/1
        entry("4021", "0.03"),  # Bucharest fixed: 3 bani/min
        entry("40900", "1.50", "premium"),
        entry("870", "9.00", "satellite"),
    )
)
ACCOUNT = Account(
    code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro", language="ro",
    daily_limit=1000, low_balance_threshold=500, allowed_ips=(ipaddress.ip_network("127.0.0.1/32"),),
    dids=("40212345678",), mailboxes=(Mailbox("100@default", None),), blocked_classes=frozenset({"premium"}),
    max_concurrent_calls=3, max_call_seconds=3600,
)  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    yield s
    await s.close()


def service(store: SqliteStore, **kw: object) -> MoneyService:
    settings = MoneySettings(tariffs=TABLE, zone=TZ, rule=BillingRule("Dial", ("lab-outbound",), None))
    for k, v in kw.items():
        setattr(settings, k, v)
    return MoneyService(store, FakeClock(NOW), settings)


async def provision(store: SqliteStore, balance: int, account: Account = ACCOUNT) -> None:
    await store.write(import_unit([(account, balance)]))


async def test_import_is_idempotent_and_never_overwrites_a_balance(store: SqliteStore) -> None:
    assert await store.write(import_unit([(ACCOUNT, 2000)])) == {"created": ["acct1001"], "updated": []}
    assert await store.write(import_unit([(ACCOUNT, 99999)])) == {"created": [], "updated": ["acct1001"]}
    assert await store.write(lambda tx: tx.balance("acct1001")) == 2000


@pytest.mark.parametrize(
    ("number", "ip", "reason"),
    [
        ("0040212345678", "10.1.1.1", Reason.IP_NOT_ALLOWED),
        ("0900123456", "127.0.0.1", Reason.BLOCKED_CLASS),
        ("004412345", "127.0.0.1", Reason.NO_ROUTE),  # no tariff for +44: denied, not free
        ("abc", "127.0.0.1", Reason.NO_ROUTE),
    ],
)
async def test_denials(store: SqliteStore, number: str, ip: str, reason: Reason) -> None:
    await provision(store, 2000)
    decision = await service(store).authorize("acct1001", number, ip, "call-1")
    assert (decision.allow, decision.reason, decision.max_seconds) == (False, reason, 0)


async def test_unknown_and_disabled_accounts(store: SqliteStore) -> None:
    money = service(store)
    assert (await money.authorize("nobody", "0212345678", "127.0.0.1", "c")).reason is Reason.NO_ACCOUNT
    await provision(store, 2000, Account(code="acct9", name="X", email="x@example.ro", enabled=False))
    assert (await money.authorize("acct9", "0212345678", "127.0.0.1", "c")).reason is Reason.DISABLED


async def test_allow_gives_the_longest_affordable_call_and_reserves_it(store: SqliteStore) -> None:
    await provision(store, 300)  # 3,00 lei; daily limit 10,00 lei
    decision = await service(store).authorize("acct1001", "0212345678", "127.0.0.1", "call-1")
    assert decision.allow
    assert decision.max_seconds == 3600  # 60 min x 3 bani = 180 bani fits: capped by max call length
    assert decision.reserve == cost(TABLE.entries[1], 3600) == 180
    decision = await service(store).authorize("acct1001", "0721000001", "127.0.0.1", "call-2")
    assert decision.allow
    assert decision.max_seconds == 24 * 60  # 120 bani left at 5 bani/min, 60/1 → 24 min
    assert cost(TABLE.entries[0], decision.max_seconds) <= 120 < cost(TABLE.entries[0], decision.max_seconds + 1)


async def test_emergency_is_always_allowed_and_never_reserved(store: SqliteStore) -> None:
    decision = await service(store).authorize("nobody", "112", "203.0.113.9", "call-e")
    assert decision.allow
    assert decision.reason is Reason.EMERGENCY
    assert await store.write(lambda tx: tx.reservations("nobody")) == (0, 0)


async def test_twenty_concurrent_authorisations_never_exceed_the_budget(tmp_path: Path) -> None:
    """Each ALLOW holds its worst case; together they fit the balance, also across a restart."""
    path = tmp_path / "t.db"
    store = await SqliteStore.open(path, FakeClock(NOW))
    store.start()
    wide = Account(code="acct1001", name="Ion", email="ion.popescu@example.ro", daily_limit=None,
                   max_concurrent_calls=100, max_call_seconds=600)  # fmt: skip
    await provision(store, 200, wide)
    money = service(store)
    decisions = await asyncio.gather(
        *(money.authorize("acct1001", "0721000001", "127.0.0.1", f"c{i}") for i in range(20))
    )
    held, calls = await store.write(lambda tx: tx.reservations("acct1001"))
    assert held == sum(d.reserve for d in decisions if d.allow)
    assert held <= 200
    assert calls == sum(d.allow for d in decisions) >= 1
    assert any(d.reason is Reason.NO_CREDIT for d in decisions)
    await store.close()

    store = await SqliteStore.open(path, FakeClock(NOW))  # a restart does not free the budget
    store.start()
    try:
        again = await service(store).authorize("acct1001", "0721000001", "127.0.0.1", "after-restart")
        held_after, _ = await store.write(lambda tx: tx.reservations("acct1001"))
        assert held_after == held + again.reserve
        assert held_after <= 200
    finally:
        await store.close()


async def test_twenty_concurrent_authorisations_hold_their_budget_across_a_sigkill(tmp_path: Path) -> None:
    """Reservations commit relaxed (no fsync on the call's path): a daemon killed the moment the
    twenty answers are out still holds every reserved ban when it comes back."""
    path = tmp_path / "killed.db"
    child = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from pathlib import Path
        from clickphone_agi.adapters.storage.sqlite import SqliteStore
        from clickphone_agi.clock import FakeClock
        from clickphone_agi.domain.accounts import Account
        from tests.test_money import NOW, provision, service

        async def main():
            store = await SqliteStore.open(Path({str(path)!r}), FakeClock(NOW))
            store.start()
            wide = Account(code="acct1001", name="Ion", email="ion.popescu@example.ro", daily_limit=None,
                           max_concurrent_calls=100, max_call_seconds=600)
            await provision(store, 200, wide)
            money = service(store)
            decisions = await asyncio.gather(
                *(money.authorize("acct1001", "0721000001", "127.0.0.1", f"c{{i}}") for i in range(20))
            )
            assert store.relaxed_commits >= 1
            print(sum(d.reserve for d in decisions if d.allow), sum(d.allow for d in decisions), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert Path(f"{path}-wal").exists()  # killed before a close could checkpoint the WAL away
    held, allowed = (int(x) for x in out.decode().splitlines()[-1].split())
    assert 0 < held <= 200
    assert allowed >= 1

    store = await SqliteStore.open(path, FakeClock(NOW))  # the restart after the kill
    store.start()
    try:
        assert await store.write(lambda tx: tx.reservations("acct1001")) == (held, allowed)
        again = await service(store).authorize("acct1001", "0721000001", "127.0.0.1", "after-kill")
        held_after, _ = await store.write(lambda tx: tx.reservations("acct1001"))
        assert held_after == held + again.reserve <= 200
    finally:
        await store.close()


async def test_too_many_calls(store: SqliteStore) -> None:
    await provision(store, 5000)
    money = service(store)
    results = [await money.authorize("acct1001", "0212345678", "127.0.0.1", f"c{i}") for i in range(4)]
    assert [r.allow for r in results] == [True, True, True, False]
    assert results[3].reason is Reason.TOO_MANY_CALLS


def _calls(name: str) -> list[CallEnded]:
    transcript = load_transcript(packaged_scenarios()[name])
    correlator = LinkedIdCorrelator()
    ctx = TranslateContext("pbx1", TZ)
    out = []
    for frame in transcript.replay_frames:
        correlator.observe(frame.message.headers)
        event = translate(frame.message.headers, ctx, correlator.linked_id_for)
        if isinstance(event, CallEnded):
            out.append(event)
    return out


async def test_each_recorded_call_is_charged_exactly_once(store: SqliteStore) -> None:
    await provision(store, 2000)
    money = service(store)
    processor = EventProcessor(store, SINCE, money)
    names = ["answered_call", "long_call", "voicemail", "fax", "fax_failed", "missed_call", "busy_call"]
    for _ in range(2):  # the second pass is a replay: nothing more may be charged
        for name in names:
            for call in _calls(name):
                await processor.handle(call)
    assert money.charged == 2
    # both go to Bucharest fixed (prefix 4021, 3 bani/min, 60/1): 3 s → one 60 s block = 3 bani;
    # 65 s → 65 x 3 / 60 = 3.25 → 4 bani (rounded up once)
    balance = await store.write(lambda tx: tx.balance("acct1001"))
    assert balance == 2000 - 3 - 4
    conn = sqlite3.connect(store.path)
    ledger = conn.execute("SELECT kind, amount FROM ledger ORDER BY id").fetchall()
    rated = conn.execute("SELECT destination, billed_seconds, cost FROM rated_calls ORDER BY answered_at").fetchall()
    conn.close()
    assert ledger == [("opening", 2000), ("call", -3), ("call", -4)]
    assert sum(a for _, a in ledger) == balance
    assert rated == [("40212345678", 60, 3), ("40216500000", 65, 4)]


async def test_limit_and_low_balance_notices_fire_once(store: SqliteStore) -> None:
    account = Account(code="acct1001", name="Ion", email="ion.popescu@example.ro", daily_limit=8,
                      low_balance_threshold=1995)  # fmt: skip
    await provision(store, 2000, account)
    money = service(store)
    processor = EventProcessor(store, SINCE, money)
    for name in ("answered_call", "long_call", "answered_call"):
        for call in _calls(name):
            await processor.handle(call)
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT idempotency_key, kind, recipient, payload FROM outbox ORDER BY id").fetchall()
    conn.close()
    kinds = [(k.split(":")[0], kind) for k, kind, _, _ in rows]
    # spend 3 then 7 of an 8-ban limit: 80 % (7 bani) fires on the second call only, once (the third
    # is a replay); balance 1997 → 1993 crosses the 1995 threshold once
    assert kinds == [("limit", "daily_limit"), ("lowbal", "low_balance")]
    assert all(r[2] == "ion.popescu@example.ro" for r in rows)
    assert '"percent": 80' in rows[0][3]


async def test_daily_limit_and_no_credit_refusals_each_mail_once_per_period(store: SqliteStore) -> None:
    """A daily-limit refusal does not use up the no-credit mail: that one asks for a top-up."""
    capped = dataclasses.replace(ACCOUNT, daily_limit=1, low_balance_threshold=0)  # 1 ban: no minute fits
    await provision(store, 2000, capped)
    money = service(store)
    reasons = [(await money.authorize("acct1001", "0721000001", "127.0.0.1", f"d{i}")).reason for i in range(2)]
    await store.write(adjust_unit("acct1001", -1998, "correction", "adj-1"))  # 2 bani left
    await provision(store, 0, dataclasses.replace(capped, daily_limit=None))  # the limit lifted
    reasons += [(await money.authorize("acct1001", "0721000001", "127.0.0.1", f"n{i}")).reason for i in range(2)]
    assert reasons == [Reason.DAILY_LIMIT] * 2 + [Reason.NO_CREDIT] * 2
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT idempotency_key, payload FROM outbox WHERE kind = 'insufficient_funds' ORDER BY id")
    mails = [(key, json.loads(payload)["reason"]) for key, payload in rows]
    conn.close()
    assert mails == [("nofunds:acct1001:d0", "daily_limit"), ("nofunds:acct1001:n0", "no_credit")]


async def test_expired_reservations_stop_holding_budget(store: SqliteStore) -> None:
    await provision(store, 300)
    money = service(store)
    await money.authorize("acct1001", "0212345678", "127.0.0.1", "c1")
    held_now = await store.write(lambda tx: tx.reservations("acct1001"))
    assert held_now[1] == 1
    future = NOW + timedelta(hours=3)
    store._clock = FakeClock(future)  # the writer stamps tx.now from the store's clock
    assert await store.write(lambda tx: tx.reservations("acct1001")) == (0, 0)


async def test_spend_day_is_the_local_day_of_the_answer_across_dst(store: SqliteStore) -> None:
    """2026-10-25 is 25 h long in Bucharest: a call answered at 21:30 UTC on the 24th (00:30 local on
    the 25th, summer time) counts for the 25th, one at 20:59:59 UTC for the 24th."""
    account = Account(code="acct1001", name="Ion", email="ion.popescu@example.ro", daily_limit=None)
    await provision(store, 2000, account)
    money = service(store)
    processor = EventProcessor(store, SINCE, money)
    (template,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    late = datetime(2026, 10, 24, 21, 30, tzinfo=UTC).astimezone(TZ)
    early = datetime(2026, 10, 24, 20, 59, 59, tzinfo=UTC).astimezone(TZ)
    for i, at in enumerate((late, early)):
        call = dataclasses.replace(template, key=f"{template.key}:{i}", start=at, answer=at, end=at)
        await processor.handle(call)
    day25 = await store.write(lambda tx: tx.spent("acct1001", "2026-10-25"))
    day24 = await store.write(lambda tx: tx.spent("acct1001", "2026-10-24"))
    assert (day24, day25) == (3, 3)


async def test_tariff_change_at_midnight_rates_by_answer_time(store: SqliteStore) -> None:
    """A new rate from 2026-12-01 00:00 local: a call answered 23:59:59 the day before pays the old one."""
    old = entry("4021", "0.03")
    new = TariffEntry(
        prefix="4021", name="new", destination_class="national", rate_per_minute=Decimal("0.60"), connection_fee=0,
        initial_block=60, step=1, minimum_charge=0, free=False, effective_from=datetime(2026, 12, 1, tzinfo=TZ),
    )  # fmt: skip
    old = dataclasses.replace(old, effective_to=datetime(2026, 12, 1, tzinfo=TZ))
    table = TariffTable((old, new))
    await provision(store, 2000, Account(code="acct1001", name="Ion", email="ion.popescu@example.ro"))
    processor = EventProcessor(store, SINCE, service(store, tariffs=table))
    (template,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    for i, at in enumerate((datetime(2026, 11, 30, 23, 59, 59, tzinfo=TZ), datetime(2026, 12, 1, 0, 0, 1, tzinfo=TZ))):
        await processor.handle(dataclasses.replace(template, key=f"k{i}", start=at, answer=at, end=at))
    conn = sqlite3.connect(store.path)
    costs = [r[0] for r in conn.execute("SELECT cost FROM rated_calls ORDER BY answered_at")]
    conn.close()
    assert costs == [3, 60]


async def test_an_unanswered_call_frees_what_its_authorisation_reserved(store: SqliteStore) -> None:
    """The recorded busy call: its CDRs (BUSY, NO ANSWER) charge nothing, and the one of the channel
    that asked (the Dial in lab-outbound) ends its reservation at once, not MAXSEC + margin later."""
    await provision(store, 5000)
    money = service(store)
    calls = _calls("busy_call")
    (dial,) = [c for c in calls if c.last_application == "Dial"]
    for i in (1, 2):
        assert (await money.authorize("acct1001", "0212345678", "127.0.0.1", f"other{i}")).allow
    assert (await money.authorize("acct1001", "0219999999", "127.0.0.1", dial.unique_id)).allow
    full = await money.authorize("acct1001", "0212345678", "127.0.0.1", "fourth")
    assert (full.allow, full.reason) == (False, Reason.TOO_MANY_CALLS)  # three calls up: the cap
    held_before = (await store.write(lambda tx: tx.reservations("acct1001")))[0]
    processor = EventProcessor(store, SINCE, money)
    for call in calls:
        await processor.handle(call)
    held, active = await store.write(lambda tx: tx.reservations("acct1001"))
    assert active == 2
    assert 0 < held < held_before
    assert money.charged == 0
    assert await store.write(lambda tx: tx.balance("acct1001")) == 5000
    assert (await money.authorize("acct1001", "0212345678", "127.0.0.1", "fourth")).allow


async def test_a_channel_that_asks_again_replaces_its_reservation(store: SqliteStore) -> None:
    """A dialplan that retries after BUSY asks again from the same channel (same uniqueid): the new
    decision's reservation replaces the first one instead of being dropped beside it."""
    await provision(store, 5000)
    money = service(store)
    first = await money.authorize("acct1001", "0212345678", "127.0.0.1", "chan-1")
    assert await store.write(lambda tx: tx.reservations("acct1001")) == (first.reserve, 1)
    again = await money.authorize("acct1001", "0721000001", "127.0.0.1", "chan-1")  # a dearer number
    assert again.reserve != first.reserve
    assert await store.write(lambda tx: tx.reservations("acct1001")) == (again.reserve, 1)


async def test_an_emergency_call_is_never_charged_whatever_it_normalises_to(store: SqliteStore) -> None:
    """With an empty national prefix, 112 normalises to +40112 and the +40 tariff would price it."""
    await provision(store, 1000)
    money = service(store, numbering=Numbering("40", "", "00"))
    assert money.rate(dataclasses.replace(_dial("answered_call"), destination="112")) is not None  # priceable
    decision = await money.authorize("acct1001", "112", "203.0.113.9", "e1")
    assert (decision.allow, decision.reason) == (True, Reason.EMERGENCY)
    processor = EventProcessor(store, SINCE, money)
    call = dataclasses.replace(_dial("answered_call"), key="k112", unique_id="e1", destination="112")
    assert await processor.handle(call) is True  # recorded
    assert money.charged == 0
    assert await store.write(lambda tx: tx.balance("acct1001")) == 1000


async def test_manual_adjustments_warn_and_rearm_like_any_balance_move(store: SqliteStore) -> None:
    account = dataclasses.replace(ACCOUNT, low_balance_threshold=500, daily_limit=None)
    await provision(store, 600, account)
    await store.write(adjust_unit("acct1001", -150, "correction", "adj-1"))  # 600 -> 450: below, warns
    await store.write(adjust_unit("acct1001", -50, "correction", "adj-2"))  # still below: silent
    await store.write(adjust_unit("acct1001", 300, "goodwill", "adj-3"))  # 700: re-armed
    processor = EventProcessor(store, SINCE, service(store))
    long = dataclasses.replace(_dial("answered_call"), key="k-long", billable_seconds=10_000, duration=10_000)
    await processor.handle(long)  # 10,000 s at 3 bani/min = 500 bani: 700 -> 200
    conn = sqlite3.connect(store.path)
    keys = [k for (k,) in conn.execute("SELECT idempotency_key FROM outbox WHERE kind = 'low_balance' ORDER BY id")]
    conn.close()
    assert keys == ["lowbal:acct1001:adj-1", f"lowbal:acct1001:{long.key}"]
    assert await store.write(lambda tx: tx.balance("acct1001")) == 200


def _dial(name: str) -> CallEnded:
    (call,) = [c for c in _calls(name) if c.last_application == "Dial"]
    return call


@contextlib.asynccontextmanager
async def _half_a_minute_before(
    cut: datetime, tmp_path: Path, entries: tuple[TariffEntry, ...], balance: int
) -> AsyncIterator[tuple[SqliteStore, MoneyService, MoneySettings]]:
    """A store and a money service 30 s before ``cut``, acct1001 (no daily limit) holding ``balance``."""
    eve = cut - timedelta(seconds=30)
    s = await SqliteStore.open(tmp_path / "t.db", FakeClock(eve))
    s.start()
    try:
        account = Account(code="acct1001", name="Ion", email="ion.popescu@example.ro", daily_limit=None)
        await provision(s, balance, account)
        settings = MoneySettings(tariffs=TariffTable(entries), zone=TZ, rule=BillingRule("Dial", ("lab-outbound",)))
        yield s, MoneyService(s, FakeClock(eve), settings), settings
    finally:
        await s.close()


async def test_a_rate_change_during_the_ringing_cannot_push_a_call_past_its_budget(tmp_path: Path) -> None:
    """Authorised at 23:59:30 at 5 bani/min, answered at 00:00:10 under the new 60 bani/min: the
    tariff at the answer prices the call, so MAXSEC and the reservation come from the dearer one."""
    cut = datetime(2026, 12, 1, tzinfo=TZ)
    old = dataclasses.replace(entry("40", "0.05"), effective_to=cut)
    new = dataclasses.replace(entry("40", "0.60"), name="new", effective_from=cut)
    async with _half_a_minute_before(cut, tmp_path, (old, new), 300) as (s, money, _):
        decision = await money.authorize("acct1001", "0721000001", "127.0.0.1", "c1")
        assert (decision.allow, decision.max_seconds, decision.reserve) == (True, 300, 300)  # 5 min at 60 bani
        answered = cut + timedelta(seconds=10)
        call = dataclasses.replace(
            _dial("answered_call"), key="k1", unique_id="c1", destination="0721000001", start=answered,
            answer=answered, end=answered + timedelta(seconds=decision.max_seconds),
            billable_seconds=decision.max_seconds, duration=decision.max_seconds,
        )  # fmt: skip
        await EventProcessor(s, SINCE, money).handle(call)
        assert await s.write(lambda tx: tx.balance("acct1001")) == 0  # all of it, and not a ban more


async def test_a_tariff_that_ends_during_the_ringing_with_no_successor_denies_the_call(tmp_path: Path) -> None:
    """The operator stops pricing a destination at midnight (``effective_to`` and no successor).
    A call authorised at 23:59:30 may be answered after midnight, when no tariff prices it: its
    CDR could then not be charged, so the call would be free. It is denied like a number with no
    tariff; one authorised after the margin before the end, or with a successor, is not affected."""
    cut = datetime(2026, 12, 1, tzinfo=TZ)
    ending = dataclasses.replace(entry("40", "0.05"), effective_to=cut)
    async with _half_a_minute_before(cut, tmp_path, (ending,), 1000) as (s, money, settings):
        decision = await money.authorize("acct1001", "0721000001", "127.0.0.1", "c1")
        assert (decision.allow, decision.reason, decision.reserve) == (False, Reason.NO_ROUTE, 0)
        earlier = MoneyService(s, FakeClock(cut - timedelta(minutes=6)), settings)  # answered before the end
        assert (await earlier.authorize("acct1001", "0721000001", "127.0.0.1", "c2")).allow
        successor = dataclasses.replace(entry("4072", "0.05"), name="successor", effective_from=cut)
        settings.tariffs = TariffTable((ending, successor))  # a longer prefix takes over: still priced
        assert (await money.authorize("acct1001", "0721000001", "127.0.0.1", "c3")).allow


async def test_a_call_reserved_well_before_midnight_does_not_hold_todays_limit(tmp_path: Path) -> None:
    """Reserved at 23:30 for the whole daily limit and still up at 00:10: it was answered yesterday
    and yesterday's spend pays for it, so today's limit is free. One reserved at 23:58 may still be
    answered after midnight (it may ring for the margin): it counts against today."""
    async with _limited_at(tmp_path, datetime(2026, 11, 28, 23, 30, tzinfo=TZ)) as (s, money):
        first = await money.authorize("acct1001", "0721000001", "127.0.0.1", "c1")
        assert (first.allow, first.reserve) == (True, 300)  # the whole day's limit
        s._clock = FakeClock(datetime(2026, 11, 28, 23, 58, tzinfo=TZ))
        denied = await money.authorize("acct1001", "0721000001", "127.0.0.1", "c2")
        assert (denied.allow, denied.reason) == (False, Reason.DAILY_LIMIT)  # still the same day
        s._clock = FakeClock(datetime(2026, 11, 29, 0, 10, tzinfo=TZ))
        today = await money.authorize("acct1001", "0721000001", "127.0.0.1", "c3")
        assert (today.allow, today.reserve) == (True, 300)  # c1 is yesterday's
        assert await s.write(lambda tx: tx.reservations("acct1001")) == (600, 2)  # the balance holds both


async def test_a_call_reserved_within_the_margin_before_midnight_counts_against_the_new_day(
    tmp_path: Path,
) -> None:
    async with _limited_at(tmp_path, datetime(2026, 11, 28, 23, 58, tzinfo=TZ)) as (s, money):
        assert (await money.authorize("acct1001", "0721000001", "127.0.0.1", "c1")).reserve == 300
        s._clock = FakeClock(datetime(2026, 11, 29, 0, 1, tzinfo=TZ))  # c1 may still be ringing
        after = await money.authorize("acct1001", "0721000001", "127.0.0.1", "c2")
        assert (after.allow, after.reason) == (False, Reason.DAILY_LIMIT)


@contextlib.asynccontextmanager
async def _limited_at(tmp_path: Path, moment: datetime) -> AsyncIterator[tuple[SqliteStore, MoneyService]]:
    """A store whose clock reads ``moment``, acct1001 in it with 100 lei and a 3-lei daily limit."""
    s = await SqliteStore.open(tmp_path / "t.db", FakeClock(moment))
    s.start()
    try:
        account = dataclasses.replace(ACCOUNT, daily_limit=300, max_call_seconds=4 * 3600, max_concurrent_calls=5)
        await provision(s, 10_000, account)
        yield s, service(s)
    finally:
        await s.close()


@pytest.mark.parametrize(("amount", "reason"), [(500, ""), (500, " \t"), (0, "nothing")])
def test_a_manual_adjustment_needs_a_reason_and_an_amount(amount: int, reason: str) -> None:
    """The daemon's control socket builds the same unit as the CLI: a blank reason or a zero
    amount is refused before anything reaches the ledger."""
    with pytest.raises(ValueError, match=r"^(reason|amount): "):
        adjust_unit("acct1001", amount, reason, "adj-x")
