"""The disk fills up under the database: a real tmpfs, filled to the last byte, then freed.

What an operator must be able to count on: while SQLite refuses every write, the events and
mails in hand are held, not dropped and not repeated; ``status`` and ``/healthz`` say so; once
space returns, every held event commits once, in stream order, and every delivered mail is
marked sent without going out again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from structlog.testing import capture_logs

from clickphone_agi.adapters.smtp import OutboxSender
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.app import Daemon
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.ami_translate import TranslateContext
from clickphone_agi.domain.charging import BillingRule
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.outbox import OutboxMessage, OutboxStatus
from clickphone_agi.notices.render import Renderer
from clickphone_agi.ports import StorageRetry, StorageUnavailable
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.services.health import database_writable, health
from clickphone_agi.services.ingest import EventProcessor, EventQueue, IngestWorker
from clickphone_agi.services.money import MoneyService, MoneySettings
from clickphone_agi.services.notices import NoticeSettings, Notifier
from clickphone_agi.sim.agi_client import agi_call
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript, packaged_scenarios
from clickphone_agi.sim.smtp_sink import SmtpSink
from clickphone_agi.status_view import format_status
from tests.api_harness import TOKEN, _free_port
from tests.conftest import REPO, write_secret
from tests.full_disk import FullDisk, mounted
from tests.test_notices import SPOOL
from tests.test_privacy import ION
from tests.test_writer_batch import TABLE, _billing_cdr

TZ = ZoneInfo("Europe/Bucharest")
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)
AUTHORIZE_ARGS = [ION.code, "0212345678", "198.51.100.77"]  # account, number, source IP (on his list)


def _money(store: db.SqliteStore) -> MoneyService:
    settings = MoneySettings(tariffs=TABLE, zone=TZ, rule=BillingRule("Dial", (), None))
    return MoneyService(store, FakeClock(NOW), settings)


def _rows(path: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # reading works on a full disk
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _ledger_is_balance(path: Path) -> bool:
    ledger = dict(_rows(path, "SELECT account, SUM(amount) FROM ledger GROUP BY account"))
    return ledger == dict(_rows(path, "SELECT account, balance FROM balances"))


async def _truncate_wal(store: db.SqliteStore) -> None:
    """Checkpoint and truncate the WAL, so that the next write must grow it (see tests/full_disk.py)."""
    busy, _, _ = await db._call(store._writer, lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    assert busy == 0


@pytest.fixture
async def disk(short_tmp: Path) -> AsyncIterator[FullDisk]:
    with mounted(short_tmp / "disk") as d:
        yield d


@pytest.fixture
async def store(disk: FullDisk) -> AsyncIterator[db.SqliteStore]:
    s = await db.SqliteStore.open(disk.path / "t.db", FakeClock(NOW))
    s.start()
    await s.write(import_unit([(dataclasses.replace(ION, daily_limit=None), 100_000)]))
    yield s
    if disk.filler.exists():
        disk.free()
    await s.close()


def _calls(n: int) -> list[CallEnded]:
    base = dataclasses.replace(_billing_cdr(), account=ION.code)
    return [dataclasses.replace(base, key=f"{base.key}:{i}", unique_id=f"{base.unique_id}{i}") for i in range(n)]


async def test_a_full_disk_refuses_each_unit_as_unavailable_and_the_same_units_commit_once_later(
    disk: FullDisk, store: db.SqliteStore
) -> None:
    processor = EventProcessor(store, SINCE, _money(store))
    calls = _calls(20)
    await _truncate_wal(store)
    disk.fill()

    outcomes = await processor.handle_many(calls)
    assert all(isinstance(o, StorageUnavailable) for o in outcomes), outcomes
    assert "disk is full" in str(outcomes[0])
    assert not await database_writable(store)  # the health probe writes a row: it fails too
    assert (await health(store, None, {}))["ok"] is False
    assert _rows(store.path, "SELECT COUNT(*) FROM cdrs") == [(0,)]
    assert await store.went_live_at()  # reads still work

    disk.free()
    assert await processor.apply_many(calls) == [True] * len(calls)
    assert await processor.apply_many(calls) == [False] * len(calls)  # once
    assert _rows(store.path, "SELECT COUNT(*), COUNT(DISTINCT ref) FROM ledger WHERE kind = 'call'") == [(20, 20)]
    assert _ledger_is_balance(store.path)
    assert await database_writable(store)


async def test_the_ingest_holds_the_stream_while_the_disk_is_full_then_commits_it_once_in_order(
    disk: FullDisk, store: db.SqliteStore
) -> None:
    processor = EventProcessor(store, SINCE, _money(store))
    queue = EventQueue(10_000, on_overflow=lambda: None)
    recovered: list[int] = []
    worker = IngestWorker(
        queue, processor, TranslateContext("pbx1", TZ), on_storage_recovered=lambda: recovered.append(1),
        storage_retry=(0.05, 0.2),
    )  # fmt: skip
    task = asyncio.create_task(worker.run())
    scenarios = packaged_scenarios()
    stream = [
        f.message
        for name in ("answered_call", "missed_call", "busy_call", "long_call")
        for f in load_transcript(scenarios[name]).replay_frames
    ]
    cdr_keys = [m.get("UniqueID") for m in stream if m.event == "Cdr"]
    await _truncate_wal(store)
    disk.fill()
    try:
        with capture_logs() as logs:
            for message in stream:
                queue.offer(message)
            async with asyncio.timeout(10):
                while queue.depth or worker.storage_retries < 3:
                    await asyncio.sleep(0.01)
            outage = worker.storage_outage()
            assert outage is not None
            assert outage["held_events"] == worker.held > 0
            assert "disk is full" in outage["error"]
            assert (await health(store, None, {}, outage))["ok"] is False
            assert "STORAGE OUTAGE" in format_status({"storage_outage": outage})
            assert _rows(store.path, "SELECT COUNT(*) FROM processed_events") == [(0,)]
            assert recovered == []

            disk.free()
            async with asyncio.timeout(10):
                while worker.held or worker.storage_outage() is not None:
                    await asyncio.sleep(0.01)
        assert recovered == [1]  # a Master.csv pass is asked for: the full queue may have dropped some
        events = [e["event"] for e in logs]
        assert events.count("ingest.storage_unavailable") == 1
        assert events.count("ingest.storage_recovered") == 1
        assert "ingest.effect_failed" not in events
        assert worker.effect_errors == 0

        # every CDR once; the two answered calls charged once each, in stream order (the recordings
        # were made one after another, so their keys sort in time)
        recorded = _rows(store.path, "SELECT unique_id FROM cdrs")
        assert sorted(r[0] for r in recorded) == sorted(cdr_keys)
        charges = [r[0] for r in _rows(store.path, "SELECT ref FROM ledger WHERE kind = 'call' ORDER BY id")]
        assert len(charges) == 2
        assert charges == sorted(charges)
        assert _ledger_is_balance(store.path)

        for message in stream:  # the same stream again changes nothing
            queue.offer(message)
        async with asyncio.timeout(10):
            while queue.depth:
                await asyncio.sleep(0.01)
        await store.write(lambda tx: None)  # after the worker's writes
        assert _rows(store.path, "SELECT COUNT(*) FROM cdrs") == [(len(cdr_keys),)]
    finally:
        queue.close()
        await asyncio.wait_for(task, 10)


async def test_a_stop_while_the_disk_is_full_says_which_held_events_are_lost(
    disk: FullDisk, store: db.SqliteStore
) -> None:
    """The daemon's drain is bounded: when it runs out with the disk still full, the held events
    cannot be kept. They are counted and logged with their keys (the CDRs among them come back
    from Master.csv at the next start), not dropped in silence with their tasks."""
    processor = EventProcessor(store, SINCE, _money(store))
    queue = EventQueue(10_000, on_overflow=lambda: None)
    worker = IngestWorker(queue, processor, TranslateContext("pbx1", TZ), storage_retry=(0.05, 0.2))
    task = asyncio.create_task(worker.run())
    stream = [f.message for f in load_transcript(packaged_scenarios()["answered_call"]).replay_frames]
    await _truncate_wal(store)
    disk.fill()
    with capture_logs() as logs:
        for message in stream:
            queue.offer(message)
        async with asyncio.timeout(10):
            while queue.depth or not worker.held:
                await asyncio.sleep(0.01)
        held = worker.held
        task.cancel()  # what the daemon's bounded drain does
        with pytest.raises(asyncio.CancelledError):
            await task
    lost = [e for e in logs if e["event"] == "ingest.held_events_lost"]
    assert sum(e["events"] for e in lost) == held == worker.held_lost
    assert worker.held == 0
    assert all(key.startswith("cdr:pbx1:") for e in lost for key in e["keys"])


@pytest.mark.timeout(60)
async def test_a_mail_delivered_while_the_disk_is_full_goes_once_and_is_marked_sent_when_space_returns(
    disk: FullDisk, short_tmp: Path
) -> None:
    clock = FakeClock(NOW)
    store = await db.SqliteStore.open(disk.path / "mail.db", clock)
    store.start()
    sink = SmtpSink(short_tmp / "mail")
    await sink.start()
    cfg = SmtpConfig(host="127.0.0.1", port=sink.port, timeout=5, max_concurrency=2, message_id_domain="example.ro")
    sender = OutboxSender(store, clock, config=lambda: cfg, password=lambda: None)
    store.on_outbox = sender.wake
    stop = asyncio.Event()
    message = OutboxMessage.build(
        key="disk:1", kind="test", recipient=ION.email, account=ION.code, now=clock.now(),
        mime=b"From: ClickPhone <no-reply@example.ro>\r\nTo: ion.popescu@example.ro\r\nSubject: x\r\n\r\nbody\r\n",
        lifetime=timedelta(days=2),
    )  # fmt: skip
    await store.write(lambda tx: tx.enqueue(message))
    await _truncate_wal(store)
    disk.fill()
    task = asyncio.create_task(sender.run(stop))

    async def status() -> dict[str, Any]:
        return dict((await sender.metrics())["sender"])

    try:
        with capture_logs() as logs:
            await sink.wait_for(1)
            async with asyncio.timeout(10):
                while (await status())["sent_not_marked"] != 1:
                    await asyncio.sleep(0.01)
            # the hold doubles: 0.5, 1, 2, 4, 8 s; each try of the mark fails and sends nothing
            for _ in range(5):
                await clock.advance(8)
                await asyncio.sleep(0.05)
            assert len(sink.messages) == 1
            assert (await status())["storage_held"] is True
            assert [r.status for r in await store.outbox_rows(10)] == [OutboxStatus.PENDING]

            disk.free()
            await clock.advance(30)
            async with asyncio.timeout(10):
                while (await store.outbox_rows(10))[0].status is not OutboxStatus.SENT:
                    await asyncio.sleep(0.01)
            await clock.advance(3600)
            await asyncio.sleep(0.1)
        assert len(sink.messages) == 1  # delivered once in all
        assert (await status())["storage_held"] is False
        events = [e["event"] for e in logs]
        assert events.count("mail.storage_unavailable") == 1
        assert events.count("mail.marked_sent_late") == 1
        assert "mail.attempt_crashed" not in events
        assert "mail.attempt_failed" not in events
        assert sender.sent == 1
        assert sender.marks_committed_late == 1
    finally:
        stop.set()
        sender.wake()
        await asyncio.wait_for(task, 10)
        await sink.close()
        if disk.filler.exists():
            disk.free()
        await store.close()


def test_the_probe_counts_a_full_disk_not_an_empty_transaction(short_tmp: Path) -> None:
    """Why the health probe writes a row: on a full disk, a transaction that writes nothing commits."""
    with mounted(short_tmp / "disk") as disk:
        conn = db.connect_sync(disk.path / "p.db")
        db.migrate(conn, NOW)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        disk.fill()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("COMMIT")  # nothing written: fine
        with pytest.raises(sqlite3.OperationalError, match="full") as raised:  # at the INSERT or the COMMIT
            conn.executescript("BEGIN IMMEDIATE; INSERT INTO meta (key, value) VALUES ('health_probe', 'x'); COMMIT;")
        assert db.is_unavailable(raised.value)
        conn.rollback()
        disk.free()
        conn.close()


def test_only_the_databases_own_refusals_count_as_unavailable() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorcode = 10 | (3 << 8)  # type: ignore[attr-defined]  # SQLITE_IOERR_WRITE
    syntax = sqlite3.OperationalError("near 'x': syntax error")
    syntax.sqlite_errorcode = 1  # type: ignore[attr-defined]
    assert db.is_unavailable(full)
    assert db.is_unavailable(ioerr)
    assert not db.is_unavailable(syntax)
    assert not db.is_unavailable(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not db.is_unavailable(ValueError("a unit's own bug"))
    assert db.is_unavailable(db.DatabaseUnavailable("commit failed"))


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_the_daemon_on_a_full_disk_holds_the_calls_says_so_and_refuses_api_writes_then_catches_up(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    with mounted(short_tmp / "db") as disk:
        vm, fax = short_tmp / "spool" / "voicemail", short_tmp / "spool" / "fax"
        vm.mkdir(parents=True)
        fax.mkdir()
        port = _free_port()
        agi_port = _free_port()
        while agi_port == port:  # closed at once, a port may be handed out twice in a row
            agi_port = _free_port()
        write_secret(short_tmp / "api-token", TOKEN + "\n")
        async with AmiReplayServer("clickphone", "labsecret") as ami:
            cfg = write_config(
                ami_port=ami.port, ami_enabled=True, smtp_port=smtp_sink.port,
                extra=(
                    f"api:\n  enabled: true\n  port: {port}\n  token_file: {short_tmp / 'api-token'}\n"
                    f"agi:\n  enabled: true\n  port: {agi_port}\n"
                    f"asterisk:\n  system_name: pbx1\n  master_csv: null\n  voicemail_spool: {vm}\n  fax_spool: {fax}\n"
                    "notifications:\n  inbound_contexts: [lab-inbound]\n  scan_interval: 3600\n"
                    f"billing:\n  tariffs_file: {REPO / 'etc' / 'tariffs.yaml'}\n"
                    "  billing_cdr:\n    destination_contexts: [lab-outbound]\n"
                ),
            )  # fmt: skip
            loaded = load_config(cfg)
            conn = db.connect_sync(loaded.config.database.path)
            db.migrate(conn, datetime(2026, 11, 28, tzinfo=UTC))  # live before the recorded calls
            conn.close()
            daemon = Daemon(loaded, config_path=cfg, install_signal_handlers=False)
            run = asyncio.create_task(daemon.run())
            headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "top-disk"}
            topup = {"type": "topup", "data": {"amount": "12.50"}}
            base = f"http://127.0.0.1:{port}"
            try:
                await asyncio.wait_for(daemon.ready.wait(), 10)
                await ami.wait_for_login(10)
                store = daemon._running().store
                await store.write(import_unit([(ION, 5000)]))
                path = store.path
                await _truncate_wal(store)
                disk.fill()

                async with aiohttp.ClientSession() as http:
                    async with http.post(f"{base}/v1/accounts/acct1001/events", json=topup, headers=headers) as r:
                        assert r.status == 503, await r.text()
                        assert r.headers["Retry-After"] == "30"
                    # no reservation can be kept: no call is allowed (emergency numbers never ask)
                    denied = await agi_call("127.0.0.1", agi_port, "authorize", AUTHORIZE_ARGS)
                    assert denied.variables["CLICKPHONE_AUTH"] == "DENY"
                    assert denied.variables["CLICKPHONE_REASON"] == "error"
                    await ami.play(load_transcript(packaged_scenarios()["answered_call"]))
                    # a voicemail is left meanwhile (Asterisk writes the spool, then MWI): its notice
                    # cannot commit; the box is tried again at the next pass, not the next scan (1 h)
                    shutil.copytree(SPOOL / "voicemail", vm, dirs_exist_ok=True)
                    await ami.play(load_transcript(packaged_scenarios()["voicemail"]))
                    async with asyncio.timeout(15):
                        while (await daemon._cmd_status({}))["held_for_storage"]["held"] < 3:
                            await asyncio.sleep(0.05)
                    status = await daemon._cmd_status({})
                    assert status["storage_outage"]["held_events"] >= 3  # the call's three CDRs, the voicemail's
                    assert status["health"]["ok"] is False
                    assert status["health"]["database_writable"] is False
                    assert "STORAGE OUTAGE" in format_status(status)
                    async with http.get(f"{base}/healthz") as r:
                        assert r.status == 503
                        assert (await r.json())["storage_outage"]["held_events"] >= 3

                    disk.free()
                    async with asyncio.timeout(30):
                        while (await daemon._cmd_status({}))["cdrs"]["recorded"] < 3:
                            await asyncio.sleep(0.05)
                    async with http.post(f"{base}/v1/accounts/acct1001/events", json=topup, headers=headers) as r:
                        assert r.status == 200, await r.text()
                    async with http.get(f"{base}/healthz") as r:
                        assert r.status == 200
                await smtp_sink.wait_for(2, 30)
                await asyncio.sleep(0.5)
                kinds = [m.data.split(b"X-ClickPhone-Kind: ", 1)[1].split(b"\r\n", 1)[0] for m in smtp_sink.messages]
                assert sorted(kinds) == [b"topup", b"voicemail"]  # each once
                allowed = await agi_call("127.0.0.1", agi_port, "authorize", AUTHORIZE_ARGS)
                assert allowed.variables["CLICKPHONE_AUTH"] == "ALLOW"
                status = await daemon._cmd_status({})
                assert status["storage_outage"] is None
                assert status["held_for_storage"]["outages"] == 1
                kinds = _rows(path, "SELECT kind, COUNT(*) FROM ledger WHERE account = 'acct1001' GROUP BY kind")
                assert dict(kinds) == {"opening": 1, "call": 1, "topup": 1}
                assert _ledger_is_balance(path)
            finally:
                daemon.request_stop()
                assert await asyncio.wait_for(run, 20) == 0


def test_the_wait_before_a_refused_write_is_tried_again_doubles_to_its_cap_and_resets() -> None:
    retry = StorageRetry(0.5, 30.0)
    assert [retry.take() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert retry.delay == 30.0
    retry.reset()
    assert retry.take() == 0.5


async def test_voicemail_held_by_a_full_disk_is_tried_again_less_often_counted_once_a_pass_and_sent_when_woken(
    disk: FullDisk, store: db.SqliteStore, short_tmp: Path
) -> None:
    """A voicemail found while the disk is full: each refused pass counts one error (it counted
    two), the passes back off 5, 10, 20, 30, 30 s (they came every 5 s, two warnings each, for as
    long as the disk stayed full), and the ingest's "writes again" wakes the loop at once."""
    vm, fax = short_tmp / "spool" / "voicemail", short_tmp / "spool" / "fax"
    shutil.copytree(SPOOL / "voicemail", vm)
    fax.mkdir()
    settings = NoticeSettings(
        system_name="pbx1", sender="ClickPhone <no-reply@clickphone.example>",
        message_id_domain="clickphone.example", voicemail_root=vm, fax_root=fax,
    )  # fmt: skip
    clock = FakeClock(NOW)
    notifier = Notifier(store, clock, Renderer(), settings, SINCE)
    await _truncate_wal(store)
    disk.fill()
    stop = asyncio.Event()

    async def sleeping_until(deadline: float) -> None:
        async with asyncio.timeout(10):
            while not clock.sleeps_until(deadline):
                await asyncio.sleep(0.01)

    with capture_logs() as logs:
        run = asyncio.create_task(notifier.run(stop))
        try:
            await sleeping_until(5.0)  # the start-up scan: refused
            assert notifier.errors == 1
            deadlines = []
            for wait in (5.0, 10.0, 20.0, 30.0):
                deadline = clock.monotonic() + wait
                await sleeping_until(deadline)
                deadlines.append(deadline)
                await clock.advance(wait)
            await sleeping_until(clock.monotonic() + 30.0)  # capped
            assert deadlines == [5.0, 15.0, 35.0, 65.0]
            assert notifier.errors == 5  # the start-up scan and four passes, each counted once
            assert await store.outbox_rows() == []

            disk.free()
            notifier.wake()  # what the composition root does when the ingest's writes commit again
            await sleeping_until(clock.monotonic() + 5.0)  # a normal pass, the backoff reset
            assert [r.kind for r in await store.outbox_rows()] == ["voicemail"]
            assert notifier.errors == 5
        finally:
            stop.set()
            await asyncio.wait_for(run, 10)
    deferred = [e for e in logs if e["event"] == "notices.voicemail_deferred"]
    assert len(deferred) == 5
    assert {e["box"] for e in deferred} == {"100@default"}
    assert [e["retry_in"] for e in logs if e["event"] == "notices.pass_deferred"] == [5.0, 10.0, 20.0, 30.0, 30.0]
