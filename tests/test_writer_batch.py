"""The writer's batch: deferred writes, per-unit undo, the money cache, and the CDR log lines.

Units queued together share one transaction; the money path's rows are written at its end
(``_Batch.flush``) and its state is served from the writer's cache. None of that may change
what a unit sees or what survives a failing unit, a failing batch or another writer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.ami_translate import TranslateContext, translate
from clickphone_agi.domain.charging import BillingRule
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.tariffs import TariffEntry, TariffTable
from clickphone_agi.ports import WriteTx
from clickphone_agi.services.accounts import adjust_unit, import_unit
from clickphone_agi.services.ingest import EventProcessor
from clickphone_agi.services.money import MoneyService, MoneySettings
from clickphone_agi.sim.ami_server import load_transcript, packaged_scenarios

TZ = ZoneInfo("Europe/Bucharest")
NOW = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)
SINCE = datetime(2026, 1, 1, tzinfo=TZ)
GUARD = 10.0  # seconds; only a hang guard
ACCOUNT = Account(code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro", daily_limit=None)
TABLE = TariffTable(
    (
        TariffEntry(
            prefix="40", name="national", destination_class="national", rate_per_minute=Decimal("0.60"),
            connection_fee=0, initial_block=60, step=1, minimum_charge=0, free=False, effective_from=SINCE,
            effective_to=None,
        ),
    )
)  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[db.SqliteStore]:
    s = await db.SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    yield s
    await s.close()


def _billing_cdr() -> CallEnded:
    transcript = load_transcript(packaged_scenarios()["answered_call"])
    correlator = LinkedIdCorrelator()
    ctx = TranslateContext("pbx1", TZ)
    for frame in transcript.replay_frames:
        correlator.observe(frame.message.headers)
        event = translate(frame.message.headers, ctx, correlator.linked_id_for)
        if isinstance(event, CallEnded) and event.last_application == "Dial" and event.billable_seconds > 0:
            return dataclasses.replace(event, account=ACCOUNT.code)
    raise AssertionError("answered_call has no billing CDR")


def _cdrs(n: int) -> list[CallEnded]:
    base = _billing_cdr()
    return [dataclasses.replace(base, key=f"{base.key}:{i}", unique_id=f"{base.unique_id}{i}") for i in range(n)]


def _money(store: db.SqliteStore) -> MoneyService:
    rule = BillingRule("Dial", (), None)
    return MoneyService(store, FakeClock(NOW), MoneySettings(tariffs=TABLE, zone=TZ, rule=rule))


def _rows(store: db.SqliteStore, sql: str) -> list[Any]:
    conn = sqlite3.connect(store.path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _ledger_matches(store: db.SqliteStore) -> bool:
    ledger = dict(_rows(store, "SELECT account, SUM(amount) FROM ledger GROUP BY account"))
    return ledger == dict(_rows(store, "SELECT account, balance FROM balances"))


async def _together(store: db.SqliteStore, *units: Any, commits: int = 1) -> list[Any]:
    """Queue ``units`` at once (one batch: ``commits`` is 1, or 0 if it fails); each outcome or its exception."""
    before = store.commits
    outcomes = await asyncio.gather(*(store.write(u) for u in units), return_exceptions=True)
    assert store.commits == before + commits
    return outcomes


async def test_a_failing_unit_leaves_nothing_while_its_batch_commits(store: db.SqliteStore) -> None:
    await store.write(import_unit([(ACCOUNT, 10_000)]))
    money = _money(store)
    good, bad = _cdrs(2)

    def charge(call: CallEnded, fail: bool) -> Any:
        def unit(tx: WriteTx) -> int | None:
            assert tx.claim_event(call.key, "cdr")
            tx.record_call(call)
            cost = money.charge(tx, call)
            if fail:
                raise RuntimeError("boom")
            return cost

        return unit

    ok, failed = await _together(store, charge(good, False), charge(bad, True))
    assert ok == 60  # 60 s at 0,60 lei/min
    assert isinstance(failed, RuntimeError)
    assert _rows(store, "SELECT key FROM processed_events") == [(good.key,)]
    assert _rows(store, "SELECT key FROM cdrs") == [(good.key,)]
    assert _rows(store, "SELECT key FROM rated_calls") == [(good.key,)]
    assert _rows(store, "SELECT kind, amount, ref FROM ledger ORDER BY id") == [
        ("opening", 10_000, "opening:acct1001"),
        ("call", -60, good.key),
    ]
    assert await store.write(lambda tx: tx.balance(ACCOUNT.code)) == 10_000 - 60
    assert await store.write(lambda tx: tx.spent(ACCOUNT.code, "2026-11-28")) == 60
    assert _ledger_matches(store)


async def test_duplicates_within_one_batch_behave_as_across_batches(store: db.SqliteStore) -> None:
    await store.write(import_unit([(ACCOUNT, 10_000)]))
    processor = EventProcessor(store, SINCE, _money(store))
    (call,) = _cdrs(1)
    handled = await asyncio.gather(*(processor.handle(call) for _ in range(3)))
    assert handled == [True, False, False]
    assert await processor.handle(call) is False  # and in a later batch
    assert (processor.applied["cdr"], processor.duplicates["cdr"]) == (1, 3)
    assert _rows(store, "SELECT COUNT(*) FROM cdrs") == [(1,)]
    assert _rows(store, "SELECT COUNT(*) FROM ledger WHERE kind = 'call'") == [(1,)]
    assert _ledger_matches(store)


async def test_a_ledger_ref_books_once_within_and_across_batches(store: db.SqliteStore) -> None:
    await store.write(import_unit([(ACCOUNT, 1_000)]))
    booked = await _together(store, *(adjust_unit(ACCOUNT.code, 250, "top-up", "pay:1") for _ in range(2)))
    assert [b["booked"] for b in booked] == [True, False]
    assert [b["balance"] for b in booked] == [1_250, 1_250]
    again = await store.write(adjust_unit(ACCOUNT.code, 250, "top-up", "pay:1"))
    assert (again["booked"], again["balance"]) == (False, 1_250)

    # a claimed key that is already a ledger ref is not booked twice either
    def claim_and_book(tx: WriteTx) -> bool:
        assert tx.claim_event("pay:1", "payment")
        return tx.post_ledger(ACCOUNT.code, 250, "topup", "pay:1", None)

    assert await store.write(claim_and_book) is False
    assert _ledger_matches(store)


async def test_rows_insert_or_ignore_would_skip_are_skipped(store: db.SqliteStore) -> None:
    """As INSERT OR IGNORE did at once: a NULL in a NOT NULL column or a refused ledger kind is
    no row and no error (and never fails the batch's flush)."""
    await store.write(import_unit([(ACCOUNT, 1_000)]))
    first, second = _cdrs(2)
    broken = dataclasses.replace(second, system_name=None)  # type: ignore[arg-type]

    def record(call: CallEnded) -> Any:
        def unit(tx: WriteTx) -> bool:
            tx.record_call(call)
            return tx.claim_event(call.key, "cdr")

        return unit

    assert await _together(store, record(first), record(broken)) == [True, True]
    assert _rows(store, "SELECT key FROM cdrs") == [(first.key,)]
    assert await store.write(lambda tx: tx.claim_event("k", None)) is False  # type: ignore[arg-type]
    assert await store.write(lambda tx: tx.post_ledger(ACCOUNT.code, 1, "gift", "gift:1", None)) is False
    assert await store.write(lambda tx: tx.post_ledger(ACCOUNT.code, None, "topup", "t:1", None)) is False  # type: ignore[arg-type]
    assert await store.write(lambda tx: tx.balance(ACCOUNT.code)) == 1_000
    assert _ledger_matches(store)


async def test_a_failed_flush_fails_the_batch_and_forgets_the_cache(
    store: db.SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.write(import_unit([(ACCOUNT, 1_000)]))
    assert await store.write(lambda tx: tx.balance(ACCOUNT.code)) == 1_000
    flush = db._Batch.flush

    def failing_flush(self: db._Batch, conn: sqlite3.Connection) -> None:
        flush(self, conn)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(db._Batch, "flush", failing_flush)
    outcomes = await _together(store, *(adjust_unit(ACCOUNT.code, 100, "x", f"r{i}") for i in range(3)), commits=0)
    assert all(isinstance(o, db.StorageError) for o in outcomes)
    monkeypatch.setattr(db._Batch, "flush", flush)
    assert await store.write(lambda tx: tx.balance(ACCOUNT.code)) == 1_000
    assert _ledger_matches(store)


async def test_a_commit_by_another_connection_is_seen(store: db.SqliteStore) -> None:
    await store.write(import_unit([(ACCOUNT, 1_000)]))
    assert await store.write(lambda tx: tx.balance(ACCOUNT.code)) == 1_000  # now cached
    assert await store.write(lambda tx: tx.get_state(ACCOUNT.code, "low_armed")) is None
    conn = sqlite3.connect(store.path)
    with conn:  # e.g. a hand-made correction, or a restore
        conn.execute(
            "INSERT INTO ledger (account, amount, kind, ref, created_at) VALUES (?, 5, 'adjustment', 'h', 'x')",
            (ACCOUNT.code,),
        )
        conn.execute("UPDATE balances SET balance = balance + 5 WHERE account = ?", (ACCOUNT.code,))
        conn.execute("INSERT INTO notice_state VALUES (?, 'low_armed', '0')", (ACCOUNT.code,))
    conn.close()
    assert await store.write(lambda tx: tx.balance(ACCOUNT.code)) == 1_005
    assert await store.write(lambda tx: tx.get_state(ACCOUNT.code, "low_armed")) == "0"


async def test_reservations_are_released_once_and_purged(store: db.SqliteStore) -> None:
    later = NOW + timedelta(minutes=5)

    def reserve(tx: WriteTx) -> tuple[bool, bool, tuple[int, int]]:
        return (
            tx.reserve("c1", ACCOUNT.code, 40, later),
            tx.reserve("c1", ACCOUNT.code, 99, later),
            tx.reservations(ACCOUNT.code),
        )

    assert await store.write(reserve) == (True, False, (40, 1))
    released = await _together(store, lambda tx: tx.release("c1"), lambda tx: tx.release("c1"))
    assert released == [40, None]
    assert await store.write(lambda tx: tx.reservations(ACCOUNT.code)) == (0, 0)

    # a failing unit's reservation and release are undone with it
    def reserve_then_fail(tx: WriteTx) -> None:
        tx.reserve("c2", ACCOUNT.code, 10, later)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.write(reserve_then_fail)
    assert await store.write(lambda tx: tx.release("c2")) is None

    await store.write(lambda tx: tx.reserve("c3", ACCOUNT.code, 10, NOW - timedelta(seconds=1)))
    assert await store.write(lambda tx: tx.purge_expired_reservations()) == 1
    assert await store.write(lambda tx: tx.release("c3")) is None
    assert _rows(store, "SELECT COUNT(*) FROM reservations") == [(0,)]


async def test_a_unit_that_only_reads_opens_no_savepoint(store: db.SqliteStore) -> None:
    await store.write(import_unit([(ACCOUNT, 1_000)]))
    assert await store.write(lambda tx: tx.savepoint) is False  # type: ignore[attr-defined]

    def reads(tx: WriteTx) -> bool:
        tx.get_account(ACCOUNT.code)
        tx.balance(ACCOUNT.code)
        tx.claim_event("k1", "t")
        return tx.savepoint  # type: ignore[attr-defined, no-any-return]

    assert await store.write(reads) is False
    assert await store.write(lambda tx: tx.set_meta("m", "1") or tx.savepoint) is True  # type: ignore[attr-defined, func-returns-value]


def test_to_db_is_the_fixed_width_utc_text() -> None:
    for moment in (
        datetime(2026, 10, 25, 2, 30, 0, 5, tzinfo=TZ),
        datetime(2026, 3, 29, 2, 59, 59, 999_999, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 0, tzinfo=ZoneInfo("America/New_York")),
    ):
        assert db.to_db(moment) == moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert db.from_db(db.to_db(moment)) == moment.astimezone(UTC)


async def test_cdrs_committed_together_log_one_summary_line(store: db.SqliteStore) -> None:
    processor = EventProcessor(store, SINCE)
    alone, *burst = _cdrs(4)
    with capture_logs() as logs:
        await processor.handle(alone)
        await asyncio.sleep(0)
        await asyncio.gather(*(processor.handle(c) for c in burst))
        await asyncio.sleep(0)
    info = [e for e in logs if e["log_level"] == "info"]
    assert [e["event"] for e in info] == ["cdr.recorded", "cdrs.recorded"]
    assert info[0]["key"] == alone.key
    assert info[0]["billsec"] == alone.billable_seconds
    assert (info[1]["count"], info[1]["first_key"], info[1]["last_key"]) == (3, burst[0].key, burst[-1].key)
    assert [e["key"] for e in logs if e["log_level"] == "debug" and e["event"] == "cdr.recorded"] == [
        c.key for c in burst
    ]


async def test_reservations_within_one_batch_end_as_if_committed_one_by_one(tmp_path: Path) -> None:
    """Reservations are written with the batch: reserve, release and reserve again of one call id in
    one transaction leave the rows (and the next writer's view) a unit-by-unit run would."""
    later = NOW + timedelta(minutes=5)
    store = await db.SqliteStore.open(tmp_path / "r.db", FakeClock(NOW))
    store.start()
    try:
        await store.write(lambda tx: tx.reserve("old", ACCOUNT.code, 7, later))
        outcomes = await _together(
            store,
            lambda tx: tx.reserve("a", ACCOUNT.code, 10, later),
            lambda tx: tx.release("a"),  # reserved in this batch: never reaches the table
            lambda tx: tx.release("old"),  # committed before: deleted with the batch
            lambda tx: tx.reserve("old", ACCOUNT.code, 30, later),  # the same id again, a new amount
            lambda tx: tx.reserve("b", ACCOUNT.code, 20, later),
            lambda tx: tx.reservations(ACCOUNT.code),
        )
        assert outcomes == [True, 10, 7, True, True, (50, 2)]
        rows = _rows(store, "SELECT call_id, amount FROM reservations ORDER BY call_id")
        assert rows == [("b", 20), ("old", 30)]
        assert await store.write(lambda tx: tx.reservations(ACCOUNT.code)) == (50, 2)
    finally:
        await store.close()
    # a restart reads them back from the table: nothing freed early
    again = await db.SqliteStore.open(tmp_path / "r.db", FakeClock(NOW))
    again.start()
    try:
        assert await again.write(lambda tx: tx.reservations(ACCOUNT.code)) == (50, 2)
        assert await again.write(lambda tx: tx.reserve("b", ACCOUNT.code, 1, later)) is False
        assert await again.write(lambda tx: tx.release("b")) == 20
        assert _rows(again, "SELECT call_id FROM reservations") == [("old",)]
    finally:
        await again.close()


async def test_write_many_runs_each_unit_alone_in_one_commit(store: db.SqliteStore) -> None:
    def boom(tx: WriteTx) -> None:
        tx.set_meta("boom", "1")
        raise RuntimeError("boom")

    before = store.commits
    out = await store.write_many(
        [lambda tx: tx.claim_event("k1", "t"), boom, lambda tx: tx.claim_event("k1", "t"), lambda tx: 5]
    )
    assert store.commits == before + 1
    assert [out[0], out[2], out[3]] == [True, False, 5]
    assert isinstance(out[1], RuntimeError)
    assert _rows(store, "SELECT key FROM meta WHERE key = 'boom'") == []  # the failing unit rolled back alone
    assert await store.write_many([]) == []


async def test_prefetched_claims_answer_as_the_point_reads_would(store: db.SqliteStore) -> None:
    """Keys read ahead for a group: claimed ones stay claimed, a ledger ref counts as booked, and SQL
    run by a unit in the group (which could change either) sends the rest back to point reads."""
    await store.write(import_unit([(ACCOUNT, 10_000)]))
    await store.write(lambda tx: tx.claim_event("seen", "t"))
    await store.write(lambda tx: tx.post_ledger(ACCOUNT.code, 5, "topup", "booked", None))

    def forget(tx: WriteTx) -> None:
        tx.set_meta("x", "1")  # any SQL: the prefetch is dropped

    keys = ["seen", "new1", "booked", "new2", "new1"]
    out = await store.write_many(
        [
            lambda tx: tx.claim_event("seen", "t"),
            lambda tx: tx.claim_event("new1", "t"),
            lambda tx: tx.claim_event("booked", "t") and tx.post_ledger(ACCOUNT.code, 5, "topup", "booked", None),
            forget,
            lambda tx: tx.claim_event("new2", "t"),
            lambda tx: tx.claim_event("new1", "t"),
        ],
        prefetch_claims=keys,
    )
    assert out == [False, True, False, None, True, False]
    claimed = {k for (k,) in _rows(store, "SELECT key FROM processed_events")}
    assert claimed == {"seen", "new1", "booked", "new2"}
    assert _ledger_matches(store)


async def test_rows_encoded_ahead_are_used_only_for_the_objects_encoded(store: db.SqliteStore) -> None:
    """``records``: CDR and rating rows encoded on the event loop. A unit that records another
    object under the same key (a stale or different twin) gets its own row, as without the hint."""
    await store.write(import_unit([(ACCOUNT, 10_000)]))
    money = _money(store)
    first, second = _cdrs(2)
    rated_first, rated_second = money.rate(first), money.rate(second)
    assert rated_first is not None
    assert rated_second is not None
    # the hint for `second` names a twin with another destination and another rating
    twin = dataclasses.replace(second, destination="0311111111")
    twin_rated = dataclasses.replace(rated_second, destination="40311111111", cost=1)

    def unit(call: CallEnded, rated: Any) -> Any:
        def work(tx: WriteTx) -> bool:
            assert tx.claim_event(call.key, "cdr")
            tx.record_call(call)
            tx.record_rated(rated)
            return True

        return work

    out = await store.write_many(
        [unit(first, rated_first), unit(second, rated_second)],
        records=[(first, rated_first), (twin, twin_rated)],
    )
    assert out == [True, True]
    cdrs = dict(_rows(store, "SELECT key, destination FROM cdrs"))
    assert cdrs == {first.key: first.destination, second.key: second.destination}
    rated = {k: (d, c) for k, d, c in _rows(store, "SELECT key, destination, cost FROM rated_calls")}
    assert rated == {
        first.key: (rated_first.destination, rated_first.cost),
        second.key: (rated_second.destination, rated_second.cost),
    }
    # and the encoded row is the row the writer would have built
    columns = (
        "key, system_name, account, unique_id, linked_id, sequence, source, destination, destination_context,"
        " channel, destination_channel, last_application, disposition, duration, billable_seconds, start_at,"
        " answer_at, end_at, origin"
    )
    conn = sqlite3.connect(store.path)
    try:
        row = conn.execute(f"SELECT {columns} FROM cdrs WHERE key = ?", (first.key,)).fetchone()
    finally:
        conn.close()
    assert row == db._cdr_head(first)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 40), st.one_of(st.none(), st.text(max_size=3))), max_size=400),
    upsert=st.booleans(),
)
def test_multi_row_inserts_write_what_executemany_writes(rows: list[tuple[int, str | None]], upsert: bool) -> None:
    """The flush's multi-row VALUES lists (chunks of 128, 32, 8, 2, 1) against executemany: the
    same rows, in the same order (rowids), the same conflicts ignored or upserted."""
    schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL UNIQUE, v TEXT)"
    if upsert:
        head, tail, sql = (
            "INSERT INTO t (k, v)",
            " ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            "INSERT INTO t (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        )
    else:
        head, tail, sql = "INSERT OR IGNORE INTO t (k, v)", "", "INSERT OR IGNORE INTO t (k, v) VALUES (?, ?)"
    ours, theirs = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    try:
        ours.execute(schema)
        theirs.execute(schema)
        db._insert_rows(ours, head, 2, rows, tail)
        theirs.executemany(sql, rows)
        query = "SELECT id, k, v FROM t ORDER BY id"
        assert ours.execute(query).fetchall() == theirs.execute(query).fetchall()
    finally:
        ours.close()
        theirs.close()


def test_multi_row_inserts_stay_within_old_sqlite_variable_limits() -> None:
    """SQLite before 3.32 binds at most 999 values per statement: a cdrs-wide batch still goes in."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        columns = ", ".join(f"c{i}" for i in range(20))
        conn.execute(f"CREATE TABLE t ({columns})")
        rows = [tuple(range(n, n + 20)) for n in range(300)]
        db._insert_rows(conn, f"INSERT INTO t ({columns})", 20, rows)
        assert conn.execute(f"SELECT {columns} FROM t ORDER BY rowid").fetchall() == rows
    finally:
        conn.close()


async def test_a_cdr_that_cannot_be_encoded_ahead_fails_alone(store: db.SqliteStore) -> None:
    """The records hint is encoded on the event loop: a record it cannot encode is left to its
    unit, which fails on its own; the group's other CDRs are recorded."""
    await store.write(import_unit([(ACCOUNT, 10_000)]))
    good, bad = _cdrs(2)
    broken = dataclasses.replace(bad, end=None)  # type: ignore[arg-type]

    def unit(call: CallEnded) -> Any:
        def work(tx: WriteTx) -> bool:
            assert tx.claim_event(call.key, "cdr")
            tx.record_call(call)
            return True

        return work

    out = await store.write_many([unit(good), unit(broken)], records=[(good, None), (broken, None)])
    assert out[0] is True
    assert isinstance(out[1], AttributeError)
    assert _rows(store, "SELECT key FROM cdrs") == [(good.key,)]
    assert _rows(store, "SELECT key FROM processed_events") == [(good.key,)]  # the failed unit's claim undone


async def test_an_urgent_write_commits_ahead_of_what_is_queued(store: db.SqliteStore) -> None:
    """The sender's "sent" marks: a crash between the relay's 250 and their commit sends the mail
    again, so they do not wait behind queued batches, only for the one in flight."""
    gate, running = threading.Event(), threading.Event()
    order: list[str] = []

    def unit(name: str, wait: bool = False) -> Any:
        def work(tx: WriteTx) -> str:
            if wait:
                running.set()
                gate.wait(GUARD)
            order.append(name)
            tx.set_meta(f"order:{name}", str(len(order)))
            return name

        return work

    in_flight = asyncio.ensure_future(store.write(unit("A", wait=True)))
    async with asyncio.timeout(GUARD):
        while not running.is_set():  # A's batch is in flight on the writer's thread
            await asyncio.sleep(0.005)
    queued = [asyncio.ensure_future(store.write(unit(n))) for n in ("B", "C")]
    urgent = asyncio.ensure_future(store.write(unit("U"), urgent=True))
    await asyncio.sleep(0.05)
    gate.set()
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(in_flight, *queued, urgent)
    assert results == ["A", "B", "C", "U"]
    assert order == ["A", "U", "B", "C"]
    assert _rows(store, "SELECT key, value FROM meta WHERE key LIKE 'order:%' ORDER BY value") == [
        ("order:A", "1"), ("order:U", "2"), ("order:B", "3"), ("order:C", "4"),
    ]  # fmt: skip


async def test_an_urgent_write_joins_the_batch_in_flight_and_commits_it_at_once(store: db.SqliteStore) -> None:
    """A "sent" mark queued while a batch runs does not wait for the whole batch: between two
    of its jobs the mark joins it and the transaction commits, then the rest of the batch goes
    on in a new one. The window in which a crash sends the mail again is one job long."""
    gates = {name: threading.Event() for name in ("X", "A")}
    running = {name: threading.Event() for name in ("X", "A")}
    order: list[str] = []

    def unit(name: str) -> Any:
        def work(tx: WriteTx) -> str:
            if name in gates:
                running[name].set()
                gates[name].wait(GUARD)
            order.append(name)
            tx.set_meta(f"order:{name}", str(len(order)))
            return name

        return work

    async def until(event: threading.Event) -> None:
        async with asyncio.timeout(GUARD):
            while not event.is_set():
                await asyncio.sleep(0.005)

    first = asyncio.ensure_future(store.write(unit("X")))
    await until(running["X"])  # X's batch is in flight; A and B queue behind it, for one batch
    batch = [asyncio.ensure_future(store.write(unit(n))) for n in ("A", "B")]
    await asyncio.sleep(0.05)
    gates["X"].set()
    await until(running["A"])  # the batch of A and B is in flight, A running
    commits = store.commits
    mark = asyncio.ensure_future(store.write(unit("U"), urgent=True))
    await asyncio.sleep(0.05)
    gates["A"].set()
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(first, *batch, mark)
    assert results == ["X", "A", "B", "U"]
    assert order == ["X", "A", "U", "B"]  # U ran before B, in A's transaction
    assert store.commits - commits == 2  # A with U, then B
    assert _rows(store, "SELECT key, value FROM meta WHERE key LIKE 'order:%' ORDER BY value") == [
        ("order:X", "1"), ("order:A", "2"), ("order:U", "3"), ("order:B", "4"),
    ]  # fmt: skip


async def test_when_the_rest_of_a_split_batch_fails_only_its_jobs_fail(
    store: db.SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mark that joined a batch commits with the jobs before it; if the transaction of the jobs
    after it then fails, those fail alone: what committed is reported as committed."""
    gate, running = threading.Event(), threading.Event()
    commits: list[int] = []
    real_commit = db._commit

    def commit(conn: sqlite3.Connection, batch: Any) -> None:
        commits.append(1)
        if len(commits) == 3:  # the blocker's, then A's with the mark, then B's
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(conn, batch)

    def unit(name: str, hold: bool = False) -> Any:
        def work(tx: WriteTx) -> str:
            if hold:
                running.set()
                gate.wait(GUARD)
            tx.set_meta(f"split:{name}", name)
            return name

        return work

    blocker = threading.Event()
    first = asyncio.ensure_future(store.write(lambda tx: blocker.wait(GUARD)))  # A and B queue behind it
    await asyncio.sleep(0.05)
    batch = [asyncio.ensure_future(store.write(unit("A", hold=True))), asyncio.ensure_future(store.write(unit("B")))]
    await asyncio.sleep(0.05)
    monkeypatch.setattr(db, "_commit", commit)
    blocker.set()
    async with asyncio.timeout(GUARD):
        while not running.is_set():
            await asyncio.sleep(0.005)
    mark = asyncio.ensure_future(store.write(unit("U"), urgent=True))
    await asyncio.sleep(0.05)
    gate.set()
    async with asyncio.timeout(GUARD):
        outcomes = await asyncio.gather(first, *batch, mark, return_exceptions=True)
    assert outcomes[1] == "A"
    assert outcomes[3] == "U"
    assert isinstance(outcomes[2], db.StorageError)
    assert "disk I/O error" in str(outcomes[2])
    assert _rows(store, "SELECT value FROM meta WHERE key LIKE 'split:%' ORDER BY value") == [("A",), ("U",)]


async def test_a_purge_in_the_batch_that_reserves_a_call_id_again_keeps_the_new_reservation(
    store: db.SqliteStore,
) -> None:
    """authorize releases a channel's earlier reservation and reserves again; a purge of expired
    rows in the same batch deletes the old row and must leave the new one counted."""
    await store.write(lambda tx: tx.reserve("c1", ACCOUNT.code, 100, NOW - timedelta(seconds=1)))  # expired

    def again(tx: WriteTx) -> int:
        tx.release("c1")
        tx.reserve("c1", ACCOUNT.code, 700, NOW + timedelta(minutes=10))
        return tx.purge_expired_reservations()

    assert await store.write(again) == 1  # the old row
    assert await store.write(lambda tx: tx.reservations(ACCOUNT.code)) == (700, 1)
    assert _rows(store, "SELECT call_id, amount FROM reservations") == [("c1", 700)]
    assert await store.write(lambda tx: tx.release("c1")) == 700


async def test_a_row_that_cannot_be_stored_fails_its_unit_not_the_batch(store: db.SqliteStore) -> None:
    """Deferred rows are written at COMMIT: one with text SQLite cannot bind (a lone surrogate,
    as surrogateescape decoding makes of a stray byte) is refused when queued, in its unit."""
    later = NOW + timedelta(minutes=5)
    outcomes = await _together(
        store,
        lambda tx: tx.reserve("ok-1", ACCOUNT.code, 10, later),
        lambda tx: tx.reserve("\udcff", ACCOUNT.code, 10, later),
        lambda tx: tx.claim_event("key-\udcff", "cdr"),
        lambda tx: tx.reserve("ok-2", ACCOUNT.code, 10, later),
    )
    assert outcomes[0] is True
    assert outcomes[3] is True
    assert isinstance(outcomes[1], UnicodeEncodeError)
    assert isinstance(outcomes[2], UnicodeEncodeError)
    assert _rows(store, "SELECT call_id FROM reservations ORDER BY call_id") == [("ok-1",), ("ok-2",)]
