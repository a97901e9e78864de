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
