"""Relaxed commits: ``write(..., durable=False)`` (the ``authorize`` reservations).

A batch of only such writes commits with ``synchronous=NORMAL`` (no fsync on the caller's path),
the store's WAL-sync thread makes it durable against power loss soon after, and it survives a
kill of the daemon at once. Everything else still commits FULL. Power loss itself cannot be
made here; what can fail here is asserted: the level each batch commits with, that the WAL is
synced after a relaxed commit (inline when it enqueued mail) and that a "sent" mark never rides
in a relaxed transaction; ``test_money`` kills a daemon right after twenty relaxed reservations.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.money import Notice
from clickphone_agi.ports import WriteTx

NOW = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)
GUARD = 10.0  # seconds; only a hang guard


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[db.SqliteStore]:
    s = await db.SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    yield s
    await s.close()


async def _synchronous(store: db.SqliteStore) -> int:
    """The writer connection's level now: 1 NORMAL, 2 FULL (it stays as the last batch set it)."""
    return int(await db._call(store._writer, lambda c: c.execute("PRAGMA synchronous").fetchone()[0]))


def _meta(name: str) -> Any:
    def work(tx: WriteTx) -> str:
        tx.set_meta(name, "1")
        return name

    return work


def _alert(key: str, kind: str) -> Notice:
    """A mail a denied authorize enqueues (the IP or no-funds alert): what makes a relaxed batch sync inline."""
    return Notice(
        key=key,
        kind=kind,
        recipient="ion.popescu@example.ro",
        account="acct1001",
        payload={"name": "Ion Popescu", "language": "ro"},
    )


def _rows(path: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


class _Recorder:
    """Units that record the order they ran in on the writer's thread; ``hold=True`` makes one
    wait there (``running`` set) until ``gate`` is set."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate, self.running = threading.Event(), threading.Event()

    def unit(self, name: str, hold: bool = False) -> Any:
        def work(tx: WriteTx) -> str:
            if hold:
                self.running.set()
                self.gate.wait(GUARD)
            self.order.append(name)
            tx.set_meta(f"order:{name}", str(len(self.order)))
            return name

        return work


async def _until(check: Any) -> None:
    async with asyncio.timeout(GUARD):
        while not check():
            await asyncio.sleep(0.002)


async def test_a_relaxed_write_commits_normal_and_the_wal_is_synced_soon_after(store: db.SqliteStore) -> None:
    syncs = store.wal_syncs
    assert await store.write(_meta("held"), durable=False) == "held"
    assert store.relaxed_commits == 1
    assert await _synchronous(store) == 1  # NORMAL: COMMIT did not wait for the fsync
    await _until(lambda: store.wal_syncs > syncs)  # the sync thread did, after it
    assert _rows(store.path, "SELECT key FROM meta WHERE key = 'held'") == [("held",)]

    assert await store.write(_meta("money")) == "money"  # durable by default: FULL again
    assert store.relaxed_commits == 1
    assert await _synchronous(store) == 2


async def test_one_durable_write_in_the_batch_makes_it_commit_full(store: db.SqliteStore) -> None:
    gate = threading.Event()
    blocker = asyncio.ensure_future(store.write(lambda tx: gate.wait(GUARD), durable=False))
    await asyncio.sleep(0.05)  # the blocker's batch is in flight; the next two queue for one batch
    queued = [
        asyncio.ensure_future(store.write(_meta("relaxed"), durable=False)),
        asyncio.ensure_future(store.write(_meta("durable"))),
    ]
    await asyncio.sleep(0.05)
    commits = store.commits
    gate.set()
    async with asyncio.timeout(GUARD):
        await asyncio.gather(blocker, *queued)
    assert store.commits - commits == 2  # the blocker's, then the two together
    assert store.relaxed_commits == 1  # the blocker's only
    assert await _synchronous(store) == 2


async def test_a_relaxed_write_that_enqueues_mail_syncs_the_wal_before_it_returns(store: db.SqliteStore) -> None:
    await store.write(_meta("warm-up"), durable=False)
    await _until(lambda: store.wal_syncs >= 1)
    await asyncio.sleep(3 * db.WAL_SYNC_INTERVAL)  # the sync thread has nothing left to do
    syncs = store.wal_syncs
    notice = _alert("ipdeny:acct1001:1718000000.1", "ip_denied")
    assert await store.write(lambda tx: tx.enqueue_notice(notice), durable=False) is True
    assert store.wal_syncs == syncs + 1  # inline, before the commit was reported: not "soon after"
    assert store.relaxed_commits == 2


async def test_a_sent_mark_never_joins_a_relaxed_batch(store: db.SqliteStore) -> None:
    """An urgent write queued while a relaxed batch runs waits for it and commits FULL on its own
    (it would join a FULL batch in flight: see test_writer_batch)."""
    rec = _Recorder()
    blocker = threading.Event()
    first = asyncio.ensure_future(store.write(lambda tx: blocker.wait(GUARD), durable=False))
    await asyncio.sleep(0.05)
    batch = [
        asyncio.ensure_future(store.write(rec.unit("A", hold=True), durable=False)),
        asyncio.ensure_future(store.write(rec.unit("B"), durable=False)),
    ]
    await asyncio.sleep(0.05)
    blocker.set()
    await _until(rec.running.is_set)  # the relaxed batch of A and B is in flight, A running
    commits, relaxed = store.commits, store.relaxed_commits
    mark = asyncio.ensure_future(store.write(rec.unit("U"), urgent=True))
    await asyncio.sleep(0.05)
    rec.gate.set()
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(first, *batch, mark)
    assert results[1:] == ["A", "B", "U"]
    assert rec.order == ["A", "B", "U"]  # U waited for the relaxed batch: no mid-batch commit
    assert store.commits - commits == 2  # A with B, then U
    assert store.relaxed_commits - relaxed == 1
    assert await _synchronous(store) == 2  # U's commit was FULL


async def test_a_hop_waiting_for_the_writers_thread_runs_between_two_batches_of_a_drain(
    store: db.SqliteStore,
) -> None:
    """The writer's thread drains batch after batch while jobs keep coming; a checkpoint (or any
    other hop on that thread) queued meanwhile runs after the batch in flight, not after the burst."""
    rec = _Recorder()
    first = asyncio.ensure_future(store.write(rec.unit("A", hold=True)))
    await _until(rec.running.is_set)
    second = asyncio.ensure_future(store.write(rec.unit("B")))  # the next batch of the same drain
    await asyncio.sleep(0.02)
    hop = asyncio.ensure_future(db._call(store._writer, lambda conn: rec.order.append("hop")))
    await asyncio.sleep(0.02)
    rec.gate.set()
    async with asyncio.timeout(GUARD):
        assert await asyncio.gather(first, second) == ["A", "B"]
        await hop
    assert rec.order == ["A", "hop", "B"]


async def test_a_write_after_close_began_is_refused_not_left_hanging(tmp_path: Path) -> None:
    s = await db.SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    gate = threading.Event()
    queued = asyncio.ensure_future(s.write(lambda tx: gate.wait(GUARD)))
    await asyncio.sleep(0.02)
    closing = asyncio.ensure_future(s.close())
    await asyncio.sleep(0.02)
    with pytest.raises(db.StorageError, match="not running"):
        await s.write(_meta("late"))
    gate.set()
    async with asyncio.timeout(GUARD):
        assert await queued is True  # what was queued before close is finished
        await closing


async def test_a_failed_wal_sync_is_logged_and_the_commit_stands(store: db.SqliteStore) -> None:
    """fdatasync can fail (EIO on a dying disk; here EINVAL, from a device that cannot sync): the
    relaxed commit has happened, so its caller gets its result, and the failure is loud."""
    store._durability._wal = Path("/dev/null")  # the one failure this machine can make: EINVAL
    notice = _alert("nofunds:acct1001:1718000000.2", "insufficient_funds")
    with capture_logs() as logs:
        assert await store.write(lambda tx: tx.enqueue_notice(notice), durable=False) is True
    assert store._durability.failures >= 1  # inline, then maybe the thread's retry
    errors = [e["event"] for e in logs if e["log_level"] == "error"]
    assert errors
    assert set(errors) == {"db.wal_sync_failed"}
    assert _rows(store.path, "SELECT idempotency_key FROM outbox") == [(notice.key,)]


async def test_the_wal_synced_is_the_one_sqlite_writes_even_through_a_symlinked_path(tmp_path: Path) -> None:
    """SQLite resolves a symlinked database path and keeps its -wal beside the target: syncing
    "<configured path>-wal" would find no file and leave relaxed commits unsynced, silently."""
    (tmp_path / "real").mkdir()
    (tmp_path / "t.db").symlink_to(tmp_path / "real" / "t.db")
    s = await db.SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    try:
        await s.write(_meta("held"), durable=False)
        await _until(lambda: s.wal_syncs >= 1)
        assert (tmp_path / "real" / "t.db-wal").exists()
        assert not (tmp_path / "t.db-wal").exists()
        assert s._durability.failures == 0
    finally:
        await s.close()


async def test_the_sync_thread_tries_a_failed_wal_sync_again(
    store: db.SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync that failed on the thread leaves the relaxed commits it was for still not durable:
    the thread tries again (after RETRY_FAILED_SYNC) without waiting for another commit."""
    monkeypatch.setattr(db, "RETRY_FAILED_SYNC", 0.05)
    wal = store._durability._wal
    store._durability._wal = Path("/dev/null")  # EINVAL from fdatasync
    with capture_logs():
        await store.write(_meta("held"), durable=False)  # no mail: the thread syncs it
        await _until(lambda: store._durability.failures >= 1)
        syncs = store.wal_syncs
        store._durability._wal = wal  # the disk is back
        await _until(lambda: store.wal_syncs > syncs)  # no new commit needed


async def test_urgent_writes_commit_in_the_order_they_were_made(store: db.SqliteStore) -> None:
    """An urgent write queued while an urgent batch runs waits for that batch (it would be stolen
    into it ahead of the batch's later jobs)."""
    rec = _Recorder()
    gate = threading.Event()
    blocker = asyncio.ensure_future(store.write(lambda tx: gate.wait(GUARD)))
    await asyncio.sleep(0.05)
    u1 = asyncio.ensure_future(store.write(rec.unit("U1", hold=True), urgent=True))
    u2 = asyncio.ensure_future(store.write(rec.unit("U2"), urgent=True))
    await asyncio.sleep(0.02)
    gate.set()  # the drain takes the urgent lane, U1 and U2, as one batch
    await _until(rec.running.is_set)
    u3 = asyncio.ensure_future(store.write(rec.unit("U3"), urgent=True))
    await asyncio.sleep(0.02)
    rec.gate.set()
    async with asyncio.timeout(GUARD):
        await asyncio.gather(blocker, u1, u2, u3)
    assert rec.order == ["U1", "U2", "U3"]


async def test_a_unit_raising_past_exception_fails_its_batch_and_the_writer_goes_on(store: db.SqliteStore) -> None:
    """SystemExit from a unit (a bug) must not leave its caller waiting, nor a write queued while
    that drain ran (it got no hop of its own: a drain was running)."""
    gate, running = threading.Event(), threading.Event()

    def bad(tx: WriteTx) -> None:
        running.set()
        gate.wait(GUARD)
        raise SystemExit("a unit's bug")

    failing = asyncio.ensure_future(store.write(bad))
    await _until(running.is_set)
    behind = asyncio.ensure_future(store.write(_meta("behind")))
    await asyncio.sleep(0.02)
    with capture_logs() as logs:
        gate.set()
        async with asyncio.timeout(GUARD):
            with pytest.raises(db.StorageError, match="interrupted"):
                await failing
            assert await behind == "behind"
    assert "db.writer_drain_failed" in [e["event"] for e in logs]
