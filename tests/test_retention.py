"""The daily retention job: what is older than its period goes, in short batches, never a pending
mail; the key floor keeps a replay of a purged key from charging again; the schedule follows the
local day on a FakeClock; reset links and payment details leave as soon as the mail is delivered."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import ConfigError, load_config
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.charging import Numbering
from clickphone_agi.domain.events import EventSource
from clickphone_agi.domain.money import RatedCall
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.domain.retention import PURGE_AFTER_SEND, RetentionPolicy, next_run_at
from clickphone_agi.ports import WriteTx
from clickphone_agi.services import privacy
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.services.ingest import EventProcessor
from clickphone_agi.services.retention import FLOOR_META, RetentionJob, RetentionSettings
from tests.test_delivery import CountingSink, Rig, _is, until
from tests.test_money import SINCE, _calls
from tests.test_privacy import ION, _money

BUCHAREST = ZoneInfo("Europe/Bucharest")
START = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)  # "old" rows are written now...
NOW = START + timedelta(days=500)  # ...and the job runs 500 days later
POLICY = RetentionPolicy(outbox_body_days=30, processed_event_days=400, cdr_days=180, api_request_days=90)


def _settings(batch: int = 3, hour: int = 3) -> RetentionSettings:
    return RetentionSettings(policy=POLICY, zone=BUCHAREST, hour=hour, batch=batch)


def _message(key: str, now: datetime, kind: str = "missed_call") -> OutboxMessage:
    return OutboxMessage.build(
        key=key, kind=kind, recipient="ion.popescu@example.ro", account="acct1001",
        mime=b"Subject: x\r\n\r\nVasile Ionescu called\r\n", now=now, lifetime=timedelta(days=900),
    )  # fmt: skip


def _rated(key: str, at: datetime) -> RatedCall:
    return RatedCall(
        key=key, account="acct1001", destination="40212345678", prefix="4021", tariff="t", destination_class="national",
        answered_at=at, day=at.date().isoformat(), billable_seconds=3, billed_seconds=60, cost=3,
    )  # fmt: skip


async def _rows(store: SqliteStore, clock: FakeClock, age: str, n: int) -> None:
    """``n`` rows of every purged kind, written at the clock's time, tagged ``age``."""
    calls = list(_calls("answered_call"))
    now = clock.now()

    def unit(tx: WriteTx) -> None:
        for i in range(n):
            assert tx.claim_event(f"{age}:event:{i}", "test")
            call = dataclasses.replace(calls[i % len(calls)], key=f"{age}:cdr:{i}", start=now, answer=now, end=now)
            tx.record_call(call)
            tx.record_rated(_rated(f"{age}:rated:{i}", now))
            tx.record_api_request(f"{age}:api:{i}", "h", 200, "{}")
            for status in ("sent", "dead", "expired", "pending"):
                assert tx.enqueue(_message(f"{age}:{status}:{i}", now))
        ids = {key: row_id for row_id, key in tx._conn.execute("SELECT id, idempotency_key FROM outbox")}  # type: ignore[attr-defined]
        for i in range(n):
            tx.mark_sent(ids[f"{age}:sent:{i}"], "250 ok")
            tx.mark_failed(ids[f"{age}:dead:{i}"], "550 no", now, dead=True)
            tx.mark_expired(ids[f"{age}:expired:{i}"])

    await store.write(unit)


def _count(path: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
async def aged(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, FakeClock]]:
    """A store holding old rows (500 days) and recent ones (a day), the clock at NOW."""
    clock = FakeClock(START)
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    await store.write(import_unit([(ION, 5000)]))
    await _rows(store, clock, "old", 7)
    await clock.advance((NOW - START - timedelta(days=1)).total_seconds())
    await _rows(store, clock, "new", 2)
    await clock.advance(86_400)
    yield store, clock
    await store.close()


async def test_old_rows_go_in_short_batches_recent_and_pending_stay(aged: tuple[SqliteStore, FakeClock]) -> None:
    store, clock = aged
    commits = store.commits
    job = RetentionJob(store, clock, lambda: _settings(batch=3))
    with capture_logs() as logs:
        result = await job.run_once()
    path = store.path
    assert result["purged"] == {
        "outbox_bodies": 21,  # old sent/dead/expired; never the pending ones
        "processed_events": 7,
        "cdrs": 7,
        "rated_calls": 7,
        "api_requests": 7,
        "erased_numbers": 0,  # nobody was erased
    }
    assert _count(path, "SELECT COUNT(*) FROM processed_events WHERE key LIKE 'old:%'") == 0
    assert _count(path, "SELECT COUNT(*) FROM processed_events WHERE key LIKE 'new:%'") == 2
    assert _count(path, "SELECT COUNT(*) FROM cdrs WHERE key LIKE 'new:%'") == 2
    assert _count(path, "SELECT COUNT(*) FROM rated_calls") == 2
    assert _count(path, "SELECT COUNT(*) FROM api_requests") == 2
    assert _count(path, "SELECT COUNT(*) FROM outbox WHERE message IS NULL") == 21
    assert _count(path, "SELECT COUNT(*) FROM outbox WHERE status = 'pending' AND message IS NOT NULL") == 9
    assert _count(path, "SELECT COUNT(*) FROM outbox") == 36  # rows stay: the audit trail
    # batches of 3 keys: every table took several short transactions
    assert store.commits - commits >= 5 * 3
    (done,) = [e for e in logs if e["event"] == "retention.done"]
    assert done["processed_events"] == 7
    assert done["outbox_bodies"] == 21
    assert (await job.run_once())["purged"] == dict.fromkeys(result["purged"], 0)  # nothing twice


async def test_big_bodies_go_in_windows_of_bounded_bytes(tmp_path: Path) -> None:
    """A window of ``retention_batch`` (2000) voicemail or fax mails can be gigabytes: clearing
    it in one transaction held the writer (authorize, charging) for seconds — 4.5 s for 2000
    rows of 150 KB — and grew the WAL by as much. A window also stops at a few MiB of bodies."""
    clock = FakeClock(START)
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    try:
        body = b"Subject: voicemail\r\n\r\n" + b"A" * (1 << 20)
        for i in range(12):
            message = dataclasses.replace(_message(f"vm:{i}", clock.now(), kind="voicemail"), mime=body)
            await store.write(lambda tx, m=message: tx.enqueue(m))
        await store.write(lambda tx: tx._conn.execute("UPDATE outbox SET status = 'sent'"))  # type: ignore[attr-defined]
        await clock.advance((NOW - START).total_seconds())
        cutoff = POLICY.cutoffs(clock.now())["outbox_bodies"]
        cleared, after = await store.write(lambda tx: tx.purge_bodies_window(cutoff, 0, 2000, PURGE_AFTER_SEND))
        assert 1 <= cleared <= 8  # at most 8 MiB in one transaction
        assert after is not None  # the rest in the next windows
        result = await RetentionJob(store, clock, lambda: _settings(batch=2000)).run_once()
        assert cleared + result["purged"]["outbox_bodies"] == 12
        assert _count(store.path, "SELECT COUNT(*) FROM outbox WHERE message IS NOT NULL") == 0
    finally:
        await store.close()


async def test_a_dead_reset_link_mail_loses_its_body_once_the_link_expired(tmp_path: Path) -> None:
    """A reset-link mail that died (relay refused it) keeps its body for ``outbox retry``; once the
    link has expired nothing is left to retry, but the link stayed in the file for the 30 days of
    body retention."""
    clock = FakeClock(START)
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    try:
        for key, hours in (("api:password_recovery:old", 1), ("api:password_recovery:new", 48)):
            message = dataclasses.replace(
                _message(key, clock.now(), kind="password_recovery"),
                expires_at=clock.now() + timedelta(hours=hours),
            )
            await store.write(lambda tx, m=message: tx.enqueue(m))
        await store.write(lambda tx: tx._conn.execute("UPDATE outbox SET status = 'dead'"))  # type: ignore[attr-defined]
        await clock.advance(2 * 3600)  # the first link expired, the second has 46 h left
        cutoff = POLICY.cutoffs(clock.now())["outbox_bodies"]  # 30 days ago: neither row is that old
        cleared, _ = await store.write(lambda tx: tx.purge_bodies_window(cutoff, 0, 2000, PURGE_AFTER_SEND))
        assert cleared == 1
        kept = "SELECT idempotency_key FROM outbox WHERE message IS NOT NULL"
        conn = sqlite3.connect(store.path)
        assert conn.execute(kept).fetchall() == [("api:password_recovery:new",)]  # still retryable
        conn.close()
    finally:
        await store.close()


async def test_erased_numbers_outlive_the_keys_and_go_once_nothing_from_before_can_come_back(
    tmp_path: Path,
) -> None:
    """The erased numbers' digests keep an erasure honoured when Master.csv is read again, so
    retention purges the old rows around them and not them; but once the key floor is past the
    erasure by a margin, a record from before it is ignored anyway (the floor): they go too."""
    clock = FakeClock(START)
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    try:
        await store.write(import_unit([(ION, 5000)]))
        await _rows(store, clock, "old", 2)
        (leg,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
        before = START - timedelta(hours=1)  # a leg of a call to him, made before the erasure
        leg = dataclasses.replace(
            leg, account="", source="0744123456", destination="0721000001", origin=EventSource.CSV,
            start=before, answer=before, end=before + timedelta(minutes=5), key="cdr:pbx1:before:erasure",
        )  # fmt: skip
        await privacy.erase_account(store, "acct1001", Numbering())
        erased = _count(store.path, "SELECT COUNT(*) FROM erased_numbers")
        assert erased == 5  # the four spellings of Ion's number, and his voicemail box
        assert await store.write(lambda tx: tx.erased_leg(leg)) is True

        # the floor passes the erasure: the digests stay for the margin
        floor_at = START + timedelta(days=POLICY.processed_event_days) - timedelta(days=1)
        await clock.advance((floor_at + timedelta(days=29) - clock.now()).total_seconds())
        result = await RetentionJob(store, clock, _settings).run_once()
        assert result["purged"]["cdrs"] == 2
        assert result["purged"]["erased_numbers"] == 0
        assert _count(store.path, "SELECT COUNT(*) FROM erased_numbers") == erased

        # past the margin they go, and the writer's cache forgets them
        await clock.advance((NOW - clock.now()).total_seconds())
        processor = EventProcessor(store, SINCE, _money(store))
        job = RetentionJob(store, clock, _settings, baselines=(processor.raise_baseline,))
        result = await job.run_once()
        assert result["purged"]["erased_numbers"] == erased
        assert _count(store.path, "SELECT COUNT(*) FROM erased_numbers") == 0
        assert await store.write(lambda tx: tx.erased_leg(leg)) is False
        # and the leg read again from Master.csv is still not recorded: it is older than the floor
        assert await processor.handle(leg) is False
        assert processor.skipped["before go-live baseline"] == 1
        assert _count(store.path, "SELECT COUNT(*) FROM cdrs WHERE key = 'cdr:pbx1:before:erasure'") == 0
    finally:
        await store.close()


async def test_key_floor_stops_a_replay_of_a_purged_call(aged: tuple[SqliteStore, FakeClock]) -> None:
    store, clock = aged
    processor = EventProcessor(store, SINCE, _money(store))
    (billing,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    old_end = START + timedelta(days=10)
    old = dataclasses.replace(
        billing, origin=EventSource.CSV, start=old_end, answer=old_end, end=old_end
    )  # a Master.csv row re-read long after: its key would be gone
    job = RetentionJob(store, clock, _settings, baselines=(processor.raise_baseline,))
    result = await job.run_once()
    floor = datetime.fromisoformat(result["key_floor"])
    assert floor == NOW - timedelta(days=400) + timedelta(days=1)
    assert await store.get_meta(FLOOR_META) == floor.isoformat()
    balance = await store.write(lambda tx: tx.balance("acct1001"))
    assert await processor.handle(old) is False
    assert processor.skipped["before go-live baseline"] == 1
    assert await store.write(lambda tx: tx.balance("acct1001")) == balance
    # after a restart the stored floor applies before anything is replayed
    fresh = EventProcessor(store, SINCE, _money(store))
    assert await RetentionJob(store, clock, _settings, baselines=(fresh.raise_baseline,)).apply_saved_floor() == floor
    assert await fresh.handle(old) is False
    recent = dataclasses.replace(old, start=NOW, answer=NOW, end=NOW, key="cdr:pbx1:recent:x")
    assert await fresh.handle(recent) is True  # newer than the floor: charged as usual


async def test_runs_at_start_then_daily_at_the_local_hour(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2026, 11, 28, 10, 0, tzinfo=UTC))  # 12:00 in Bucharest
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    job = RetentionJob(store, clock, lambda: _settings(batch=100, hour=3))
    stop = asyncio.Event()
    task = asyncio.create_task(job.run(stop))
    try:
        # asleep on the fake clock, not only scheduled: advanced before the sleep starts, the clock
        # would move the sleep's start too, and the job would wake 15 hours late
        await until(lambda: job.runs == 1 and job.next_run is not None and clock.sleepers > 0)
        assert job.next_run == datetime(2026, 11, 29, 1, 0, tzinfo=UTC)  # 03:00 EET
        await clock.advance(14 * 3600 + 59 * 60)  # 02:59 local: not yet
        await asyncio.sleep(0.05)
        assert job.runs == 1
        await clock.advance(120)
        await until(lambda: job.runs == 2)
        assert job.last_run is not None
        assert job.last_run["at"].startswith("2026-11-29T01:0")
        assert job.snapshot()["next_run"] == "2026-11-30T01:00:00+00:00"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await store.close()


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 11, 28, 10, 0, tzinfo=UTC), datetime(2026, 11, 29, 1, 0, tzinfo=UTC)),
        (datetime(2026, 11, 28, 0, 30, tzinfo=UTC), datetime(2026, 11, 28, 1, 0, tzinfo=UTC)),
        # spring forward (29 March 2026): 03:00 does not exist, the run is at the transition (04:00 EEST)
        (datetime(2026, 3, 28, 12, 0, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
        (datetime(2026, 3, 29, 1, 0, tzinfo=UTC), datetime(2026, 3, 30, 0, 0, tzinfo=UTC)),
        # fall back (25 October 2026): 03:00 happens twice, the run is at the first
        (datetime(2026, 10, 24, 12, 0, tzinfo=UTC), datetime(2026, 10, 25, 0, 0, tzinfo=UTC)),
        (datetime(2026, 10, 25, 0, 30, tzinfo=UTC), datetime(2026, 10, 26, 1, 0, tzinfo=UTC)),
    ],
)
def test_next_run_once_per_local_day_across_dst(now: datetime, expected: datetime) -> None:
    assert next_run_at(now, BUCHAREST, 3) == expected


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    sink = CountingSink(clock)
    await sink.start()
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    r = Rig(store, clock, sink, SmtpConfig(host="127.0.0.1", port=sink.port, timeout=5))
    try:
        yield r
    finally:
        await r.close()
        await store.close()
        await sink.close()


async def test_reset_links_and_payments_leave_at_the_250(rig: Rig) -> None:
    recovery = await rig.enqueue("api:password_recovery:k1", kind="password_recovery")
    payment = await rig.enqueue("api:payment_confirmed:k2", kind="payment_confirmed")
    missed = await rig.enqueue("missed:pbx1:1", kind="missed_call")
    stale = await rig.enqueue(
        "api:password_recovery:k3", kind="password_recovery", lifetime=timedelta(hours=1), created=timedelta(hours=2)
    )
    rig.start()
    for row_id, status in ((recovery, "sent"), (payment, "sent"), (missed, "sent"), (stale, "expired")):
        await until(lambda row_id=row_id, status=status: _is(rig.status(row_id), status))
    assert len(rig.sink.messages) == 3
    assert rig.column(recovery, "message") is None
    assert rig.column(payment, "message") is None
    assert rig.column(stale, "message") is None
    assert rig.column(missed, "message") is not None  # others keep theirs until retention


def test_key_retention_must_outlive_master_csv_and_cdrs(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ami:\n  enabled: false\nprivacy:\n  processed_event_retention_days: 30\n")
    with pytest.raises(ConfigError, match="processed_event_retention_days"):
        load_config(path, environ={})
    path.write_text("ami:\n  enabled: false\nprivacy:\n  processed_event_retention_days: 100\n")
    with pytest.raises(ConfigError, match="cdr_retention_days"):
        load_config(path, environ={})
    path.write_text(
        "ami:\n  enabled: false\nprivacy:\n  processed_event_retention_days: 100\n  cdr_retention_days: 90\n"
    )
    assert load_config(path, environ={}).config.privacy.processed_event_retention_days == 100
