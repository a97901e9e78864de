"""SQLite storage: migrations, the go-live baseline, one writer, idempotent units, backup/restore."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.migrations import LATEST_VERSION, MIGRATIONS
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.outbox import OutboxMessage, OutboxStatus
from clickphone_agi.ports import WriteTx

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def _message(key: str, clock: FakeClock) -> OutboxMessage:
    return OutboxMessage.build(
        key=key,
        kind="test",
        recipient="ion.popescu@example.ro",
        account="acct1001",
        mime=b"Subject: x\r\n\r\nbody\r\n",
        now=clock.now(),
        lifetime=timedelta(days=1),
    )


@pytest.fixture
async def store(tmp_path: Path) -> db.SqliteStore:
    s = await db.SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    yield s  # type: ignore[misc]
    await s.close()


async def test_fresh_database_is_migrated_with_durable_pragmas(store: db.SqliteStore) -> None:
    conn = sqlite3.connect(store.path)
    try:
        assert db.schema_version(conn) == LATEST_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    # synchronous and secure_delete are per connection: check the writer's own settings
    assert await db._call(store._writer, lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    assert await db._call(store._writer, lambda c: c.execute("PRAGMA secure_delete").fetchone()[0]) == 1


async def test_the_wal_shrinks_back_after_one_big_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without journal_size_limit the -wal file kept the size of the biggest transaction it ever
    held (290 MB after a retention pass over voicemail bodies) for as long as the daemon ran."""
    monkeypatch.setattr(db, "WAL_SIZE_LIMIT", 256 * 1024)
    s = await db.SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    try:
        wal = tmp_path / "t.db-wal"

        def big(tx: WriteTx) -> None:
            tx.set_meta("filler", "x" * (6 << 20))  # type: ignore[attr-defined]

        await s.write(big)
        peak = wal.stat().st_size
        await s.write(lambda tx: tx.set_meta("filler", "small"))  # type: ignore[attr-defined]
        await s.write(lambda tx: tx.set_meta("filler", "smaller"))  # type: ignore[attr-defined]
        assert peak > 6 << 20
        assert wal.stat().st_size <= 256 * 1024
    finally:
        await s.close()


async def test_go_live_baseline_recorded_once(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    s = await db.SqliteStore.open(tmp_path / "t.db", clock)
    first = await s.went_live_at()
    await s.close()
    await clock.advance(86_400)
    s = await db.SqliteStore.open(tmp_path / "t.db", clock)
    try:
        assert await s.went_live_at() == first == NOW
    finally:
        await s.close()


async def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    await s.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 'x')", (LATEST_VERSION + 1,))
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(db.SchemaTooNew, match=f"schema version {LATEST_VERSION + 1} is newer"):
        await db.SqliteStore.open(path, FakeClock(NOW))
    assert path.read_bytes() == before


async def test_migration_9_moves_only_the_archives_own_policy_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``policy:<v>`` row whose hash is the version's sha256 was the archive's: it becomes
    ``policy <v>``; a client's ``policy:<v>`` (the hash of its request) is left alone."""
    path = tmp_path / "t.db"
    monkeypatch.setattr(db, "MIGRATIONS", MIGRATIONS[:8])  # a database from before migration 9
    monkeypatch.setattr(db, "LATEST_VERSION", 8)
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    await s.close()
    monkeypatch.undo()
    sha = "ab" * 32
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO policies VALUES ('3', ?, x'41', 's', '2027-01-01', 'x')", (sha,))
        conn.execute("INSERT INTO policies VALUES ('4', ?, x'42', 's', '2027-01-01', 'x')", ("cd" * 32,))
        for key, body_hash in (("policy:3", sha), ("policy:4", "ef" * 32), ("other", sha)):
            conn.execute("INSERT INTO api_requests VALUES (?, ?, 201, '{}', 'x')", (key, body_hash))
    conn.close()
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    await s.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        keys = [row[0] for row in conn.execute("SELECT key FROM api_requests ORDER BY key")]
    conn.close()
    assert keys == ["other", "policy 3", "policy:4"]


async def test_a_database_from_before_migration_10_migrates_with_its_own_numbers_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made by the code before erased_numbers opens, migrates, and gets a random key of
    its own, made once (a digest must not change meaning when the daemon restarts)."""
    path = tmp_path / "t.db"
    monkeypatch.setattr(db, "MIGRATIONS", MIGRATIONS[:9])
    monkeypatch.setattr(db, "LATEST_VERSION", 9)
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    s.start()
    await s.write(lambda tx: tx.claim_event("cdr:pbx1:1.0:x", "cdr"))
    await s.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert db.schema_version(conn) == 9
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'erased_numbers'").fetchone() is None
    monkeypatch.undo()

    def key(db_path: Path) -> str:
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            assert db.schema_version(conn) == LATEST_VERSION
            assert conn.execute("SELECT COUNT(*) FROM erased_numbers").fetchone() == (0,)
            return str(conn.execute("SELECT value FROM meta WHERE key = 'erased_numbers_key'").fetchone()[0])

    for _ in range(2):
        s = await db.SqliteStore.open(path, FakeClock(NOW))
        assert await s.has_event("cdr:pbx1:1.0:x")
        await s.close()
    first = key(path)
    assert len(bytes.fromhex(first)) == 32
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    await s.close()
    assert key(path) == first
    other = await db.SqliteStore.open(tmp_path / "other.db", FakeClock(NOW))
    await other.close()
    assert key(tmp_path / "other.db") != first


async def test_claim_event_is_idempotent(store: db.SqliteStore) -> None:
    assert await store.write(lambda tx: tx.claim_event("cdr:pbx1:1.0:x", "cdr")) is True
    assert await store.write(lambda tx: tx.claim_event("cdr:pbx1:1.0:x", "cdr")) is False
    assert await store.event_count("cdr") == 1


async def test_outbox_row_commits_with_its_cause_or_not_at_all(store: db.SqliteStore) -> None:
    clock = FakeClock(NOW)

    def decide_and_fail(tx: WriteTx) -> None:
        tx.claim_event("vm:100@default:1", "voicemail")
        tx.enqueue(_message("vm:100@default:1", clock))
        raise RuntimeError("rendering bug discovered mid-transaction")

    with pytest.raises(RuntimeError):
        await store.write(decide_and_fail)
    assert await store.event_count() == 0
    assert await store.outbox_counts() == {}

    def decide(tx: WriteTx) -> bool:
        return tx.claim_event("vm:100@default:1", "voicemail") and tx.enqueue(_message("vm:100@default:1", clock))

    assert await store.write(decide) is True
    assert await store.write(decide) is False  # duplicate event: nothing doubled
    assert await store.outbox_counts() == {"pending": 1}


async def test_concurrent_units_batch_but_fail_alone(store: db.SqliteStore) -> None:
    """Many queued units share commits; one failing unit rolls back only its own changes."""

    def ok(i: int):  # type: ignore[no-untyped-def]
        return lambda tx: tx.claim_event(f"k{i}", "t")

    def bad(tx: WriteTx) -> None:
        tx.claim_event("bad", "t")
        raise ValueError("boom")

    results = await asyncio.gather(*[store.write(ok(i)) for i in range(200)], store.write(bad), return_exceptions=True)
    assert results[:200] == [True] * 200
    assert isinstance(results[200], ValueError)
    assert await store.event_count() == 200
    assert store.units == 201
    assert store.commits < 201  # batched: fewer fsyncs than units


async def test_due_outbox_and_status_updates(store: db.SqliteStore) -> None:
    clock = FakeClock(NOW)
    await store.write(lambda tx: tx.enqueue(_message("a", clock)))
    await store.write(lambda tx: tx.enqueue(_message("b", clock)))
    due = await store.due_outbox(NOW, 10)
    assert [r.idempotency_key for r, _ in due] == ["a", "b"]
    assert due[0][1].startswith(b"Subject: x")
    a, b = due[0][0], due[1][0]
    await store.write(lambda tx: tx.mark_sent(a.id, "250 2.0.0 Ok"))
    later = NOW + timedelta(minutes=5)
    await store.write(lambda tx: tx.mark_failed(b.id, "421 busy", later, dead=False))
    assert [r.idempotency_key for r, _ in await store.due_outbox(NOW, 10)] == []
    assert [r.idempotency_key for r, _ in await store.due_outbox(later, 10)] == ["b"]
    rows = {r.idempotency_key: r for r in await store.outbox_rows()}
    assert rows["a"].status is OutboxStatus.SENT
    assert rows["a"].smtp_reply == "250 2.0.0 Ok"
    assert rows["b"].attempts == 1
    assert rows["b"].last_error == "421 busy"


def test_writer_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with db.WriterLock(path), pytest.raises(db.WriterBusy, match="another process"):
        db.WriterLock(path).acquire()
    with db.WriterLock(path) as again:  # released: can be taken again
        assert again.held


async def test_backup_while_writing_is_consistent_and_restores(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    s.start()
    stop = asyncio.Event()

    async def writer() -> int:
        n = 0
        while not stop.is_set():
            await s.write(lambda tx, n=n: tx.claim_event(f"e{n}", "t"))
            n += 1
        return n

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.05)
    result = await asyncio.to_thread(db.backup, path, tmp_path / "backup.db")
    stop.set()
    written = await task
    await s.close()
    assert db.integrity_check(tmp_path / "backup.db") == "ok"
    assert result["schema_version"] == LATEST_VERSION
    conn = sqlite3.connect(tmp_path / "backup.db")
    in_backup = conn.execute("SELECT COUNT(*) FROM processed_events").fetchone()[0]
    conn.close()
    assert 0 < in_backup <= written

    # restore brings exactly the backed-up data back
    with db.WriterLock(path):
        db.restore(tmp_path / "backup.db", path)
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    try:
        assert await s.event_count() == in_backup
    finally:
        await s.close()


async def test_a_new_database_and_its_wal_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """``db migrate`` (or any writing verb) run by hand before the first start creates the
    database: it and its -wal/-shm are 0600 as under the unit's UMask=0077, not 0644."""
    path = tmp_path / "t.db"
    old = os.umask(0o022)
    try:
        s = await db.SqliteStore.open(path, FakeClock(NOW))
        s.start()
        await s.write(lambda tx: tx.claim_event("k", "t"))
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.glob("t.db*")}
        await s.close()
    finally:
        os.umask(old)
    assert modes == {"t.db": 0o600, "t.db-wal": 0o600, "t.db-shm": 0o600}


async def test_backup_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """A backup holds every subscriber's personal data: it is written 0600 even when the operator's
    shell (or cron) runs with umask 022, like ``export calls --out`` and ``privacy export``."""
    path = tmp_path / "t.db"
    s = await db.SqliteStore.open(path, FakeClock(NOW))
    await s.close()
    old = os.umask(0o022)
    try:
        db.backup(path, tmp_path / "backup.db")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "backup.db").stat().st_mode) == 0o600


async def _open_and_close(path: Path) -> None:
    opened = await db.SqliteStore.open(path, FakeClock(NOW))
    await opened.close()


@pytest.mark.parametrize("content", ["foreign", "junk"])
async def test_a_foreign_or_corrupt_file_at_the_database_path_is_refused_untouched(
    tmp_path: Path, content: str
) -> None:
    """``database.path`` pointing at another application's SQLite file, or at a file that is not
    a database: refused with the path in one clear line (exit 65), and not a byte changed: no
    tables added, no switch to WAL."""
    path = tmp_path / "t.db"
    if content == "foreign":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE customers (name TEXT)")
            conn.commit()
    else:
        path.write_bytes(b"not a database " * 500)
    before = path.read_bytes()
    threads = set(threading.enumerate())
    with pytest.raises(db.StorageError, match=f"{path}: not a"):
        await _open_and_close(path)
    # aiosqlite's thread of the refused connection has stopped: left running, it reported its stop
    # to an event loop closed meanwhile and died with "Event loop is closed" (seen once in CI)
    workers = [t for t in set(threading.enumerate()) - threads if "_connection_worker_thread" in t.name]
    assert [t for t in workers if t.is_alive()] == []
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.db"]


def test_restore_refuses_corrupt_or_foreign_files(tmp_path: Path) -> None:
    target = tmp_path / "t.db"
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(db.StorageError, match=r"not a usable SQLite database|integrity"):
        db.restore(junk, target)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).close()
    with pytest.raises(db.StorageError, match="not a clickphone-agi database"):
        db.restore(foreign, target)
    assert not target.exists()


def _bulk(count: int, clock: FakeClock) -> list[OutboxMessage]:
    """``count`` rows of one tariff-change broadcast (a bulk kind), one per account."""
    return [
        OutboxMessage.build(
            key=f"bc:b1:acct{i:04d}",
            kind="tariff_change",
            recipient=f"a{i}@example.ro",
            account=f"acct{i:04d}",
            mime=b"Subject: x\r\n\r\nbody\r\n",
            now=clock.now(),
            lifetime=timedelta(days=30),
        )
        for i in range(count)
    ]


async def test_bulk_mail_waits_behind_every_other_due_mail(tmp_path: Path) -> None:
    """A broadcast queued first must not hold back a voicemail queued after it (rate-limited sender)."""
    clock = FakeClock(NOW)
    store = await db.SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    try:
        bulk = _bulk(50, clock)
        await store.write(lambda tx: [tx.enqueue(m) for m in bulk])
        await clock.advance(60)
        await store.write(lambda tx: tx.enqueue(_message("vm:pbx1:100@default:1", clock)))
        await clock.advance(1)
        due = await store.due_mail(clock.now(), 10)
        plan = await store._fetchall(
            "EXPLAIN QUERY PLAN SELECT id FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?"
            " ORDER BY bulk, next_attempt_at, id LIMIT 10",
            (db.to_db(clock.now()),),
        )
    finally:
        await store.close()
    assert [d.row.idempotency_key for d in due][:2] == ["vm:pbx1:100@default:1", "bc:b1:acct0000"]
    assert len(due) == 10
    assert any("outbox_due_bulk" in str(tuple(r)) for r in plan)  # ordered by the index, not a sort


async def test_due_mail_caps_bulk_rows_but_never_service_rows(tmp_path: Path) -> None:
    """The sender asks for service mail even when bulk rows already fill its window (bulk_limit=0)."""
    clock = FakeClock(NOW)
    store = await db.SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    try:
        bulk = _bulk(5, clock)
        await store.write(lambda tx: [tx.enqueue(m) for m in bulk])
        await store.write(lambda tx: tx.enqueue(_message("vm:pbx1:100@default:1", clock)))
        await store.write(lambda tx: tx.enqueue(_message("vm:pbx1:100@default:2", clock)))
        await clock.advance(1)
        # the sender already holds the oldest bulk row: the cap counts the rows after it
        (first,) = [d.row.id for d in await store.due_mail(clock.now(), 10) if d.row.idempotency_key.endswith("0000")]
        keys = {
            limit: [d.row.idempotency_key for d in await store.due_mail(clock.now(), 10, {first}, bulk_limit=limit)]
            for limit in (0, 2, None)
        }
    finally:
        await store.close()
    assert keys[0] == ["vm:pbx1:100@default:1", "vm:pbx1:100@default:2"]
    assert keys[2] == ["vm:pbx1:100@default:1", "vm:pbx1:100@default:2", "bc:b1:acct0001", "bc:b1:acct0002"]
    assert len(keys[None]) == 6  # every due row but the excluded one


# ~0.5-2 s of SQLite work before its one row: a read still running while the test commits. It
# reads a table, so it opens a read transaction (a snapshot) when it starts
_SLOW_READ = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000)"
    " SELECT max(x) + (SELECT COUNT(*) FROM outbox) FROM c"
)


async def test_a_read_issued_after_a_commit_sees_it_even_behind_a_slow_read(store: db.SqliteStore) -> None:
    """The mail sender's due-mail read must see the "sent" mark its attempt just committed, or the
    mail goes out twice. Reads share one reader connection: a read that ran its statement in one
    thread hop and fetched its rows in another left the statement open between the two, and a
    read queued meanwhile joined its snapshot, taken before the commit (the demo once mailed a
    low-balance warning twice this way). Each read is now one hop: its own, current snapshot."""
    clock = FakeClock(NOW)
    await store.write(lambda tx: tx.enqueue(_message("a", clock)))
    (row,) = [r for r, _ in await store.due_outbox(NOW, 10)]
    slow = asyncio.create_task(store._fetchall(_SLOW_READ))
    await asyncio.sleep(0.05)  # the slow read's statement has started: its snapshot predates the mark
    await store.write(lambda tx: tx.mark_sent(row.id, "250 2.0.0 Ok"))
    due = asyncio.create_task(store.due_mail(NOW, 10))  # queued on the reader behind the slow read
    assert (await slow)[0][0] == 3_000_001
    assert [m.row.idempotency_key for m in await due] == []


def _filled_then_purged(path: Path, rows: int = 20_000, kept: int = 100) -> None:
    """A database whose retention purged most of what it held: the file keeps its peak size."""
    conn = db.connect_sync(path)
    db.migrate(conn, NOW, path)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO processed_events (key, kind, processed_at) VALUES (?, 'cdr', ?)",
        ((f"cdr:pbx1:{i:08d}:{'x' * 80}", db.to_db(NOW)) for i in range(rows)),
    )
    conn.execute("COMMIT")
    conn.execute("DELETE FROM processed_events WHERE key >= ?", (f"cdr:pbx1:{kept:08d}",))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_vacuum_gives_back_what_retention_freed_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _filled_then_purged(path)
    before = db.info(path)
    assert before["free_bytes"] > before["bytes"] // 2  # most of the file is free pages
    with db.WriterLock(path):
        result = db.vacuum(path)
    assert result["bytes_before"] == before["bytes"]
    assert result["bytes_after"] < before["bytes"] // 4
    assert result["free_pages_before"] > 0
    after = db.info(path)
    assert after["free_bytes"] == 0
    assert after["processed_events"] == 100  # what was kept is all there
    assert db.integrity_check(path) == "ok"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # rewritten in place: still private


def test_vacuum_without_room_for_its_copy_does_nothing(short_tmp: Path) -> None:
    """VACUUM needs about twice the data free beside the database: with less it is refused
    before it starts, and the database is left as it was (a half-done rewrite on a full disk
    would also refuse the daemon's writes)."""
    from tests.full_disk import mounted

    with mounted(short_tmp / "disk", size="6m") as disk:
        path = disk.path / "t.db"
        _filled_then_purged(path, rows=12_000, kept=6_000)  # ~1 MB of data kept
        size = path.stat().st_size
        ballast = disk.path / "ballast"
        ballast.write_bytes(b"\0" * max(0, disk.free_bytes() - size))  # less than 2x the data left
        with (
            db.WriterLock(path),
            pytest.raises(db.StorageError, match=r"VACUUM needs about \d+ bytes free.*nothing done"),
        ):
            db.vacuum(path)
        assert path.stat().st_size == size
        assert db.info(path)["processed_events"] == 6_000
        ballast.unlink()
        with db.WriterLock(path):
            assert db.vacuum(path)["bytes_after"] < size
        assert db.integrity_check(path) == "ok"
