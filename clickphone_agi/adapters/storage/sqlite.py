"""SQLite storage: the embedded default behind :class:`clickphone_agi.ports.Store`.

Durability settings follow ``shared/NOTES.md``: WAL, ``synchronous=FULL`` (money and the outbox
must survive power loss, not only a crash), ``secure_delete=ON`` (deleted mail bodies are
overwritten). Exactly one writer: a single task owns the writer connection and runs each batch
of queued units of work in one thread hop — one ``BEGIN IMMEDIATE``, a ``SAVEPOINT`` per unit so
one failing unit rolls back alone, one ``COMMIT`` (one fsync) for the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import structlog

from clickphone_agi.adapters.storage.codec import account_from_json, account_to_json
from clickphone_agi.adapters.storage.migrations import LATEST_VERSION, MIGRATIONS
from clickphone_agi.clock import Clock
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.money import Notice, RatedCall
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow, OutboxStatus
from clickphone_agi.ports import WriteTx

T = TypeVar("T")
log = structlog.get_logger(__name__)

MAX_BATCH = 256


class StorageError(Exception):
    """A storage problem the operator has to act on; the message says what to do."""


class SchemaTooNew(StorageError):
    def __init__(self, path: Path | str, found: int) -> None:
        super().__init__(
            f"{path}: database schema version {found} is newer than this clickphone-agi supports "
            f"({LATEST_VERSION}); it was written by a newer release. Upgrade clickphone-agi or "
            "restore a backup made by this version — refusing to touch it."
        )
        self.found = found


class WriterBusy(StorageError):
    """Another process holds the writer role for this database."""


def to_db(moment: datetime) -> str:
    """UTC, fixed width, so text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_db(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def configure_connection(conn: sqlite3.Connection, busy_timeout: float = 5.0) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageError(f"cannot switch the database to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("PRAGMA foreign_keys = ON")


def connect_sync(path: Path, busy_timeout: float = 5.0, *, readonly: bool = False) -> sqlite3.Connection:
    """A configured connection in autocommit mode (we issue BEGIN ourselves)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=busy_timeout)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        return conn
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    configure_connection(conn, busy_timeout)
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """0 for an empty database; raises nothing for a foreign one (that shows as version 0)."""
    row = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
    if row is None:
        return 0
    found = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
    return int(found or 0)


def migrate(conn: sqlite3.Connection, now: datetime, path: Path | str = "database") -> list[int]:
    """Apply pending migrations, each in its own transaction; refuse a newer database."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    INTEGER PRIMARY KEY,
                   name       TEXT NOT NULL,
                   applied_at TEXT NOT NULL
               )"""
        )
        current = schema_version(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if current > LATEST_VERSION:
        raise SchemaTooNew(path, current)
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in migration.statements:
                params = {"now": to_db(now)} if ":now" in statement else {}
                conn.execute(statement, params)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, to_db(now)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(migration.version)
    return applied


def check_version(conn: sqlite3.Connection, path: Path | str) -> int:
    version = schema_version(conn)
    if version > LATEST_VERSION:
        raise SchemaTooNew(path, version)
    return version


class WriterLock:
    """An advisory ``flock`` on ``<db>.lock``: whoever holds it is the database's one writer.

    The daemon holds it for its lifetime; a CLI verb that writes while the daemon is down takes
    it for the verb's duration. The kernel drops it if the holder dies, so a crash never leaves
    a stale lock behind.
    """

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise WriterBusy(
                f"{self.path}: another process (pid {holder}) is the database writer; "
                "is clickphone-agi running? Stop it or use its control socket."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SqliteTx:
    """:class:`WriteTx` over the writer connection, valid only inside one unit of work."""

    def __init__(self, conn: sqlite3.Connection, now: datetime) -> None:
        self._conn = conn
        self.now = now
        self.enqueued = 0  # outbox rows added in this transaction: the sender is woken after COMMIT

    def claim_event(self, key: str, kind: str) -> bool:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO processed_events (key, kind, processed_at) VALUES (?, ?, ?)",
            (key, kind, to_db(self.now)),
        )
        return cur.rowcount == 1

    def record_call(self, call: CallEnded) -> None:
        self._conn.execute(
            """INSERT OR IGNORE INTO cdrs
                   (key, system_name, account, unique_id, linked_id, sequence, source, destination,
                    destination_context, channel, destination_channel, last_application, disposition,
                    duration, billable_seconds, start_at, answer_at, end_at, origin, recorded_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                call.key,
                call.system_name,
                call.account,
                call.unique_id,
                call.linked_id,
                call.sequence,
                call.source,
                call.destination,
                call.destination_context,
                call.channel,
                call.destination_channel,
                call.last_application,
                str(call.disposition),
                call.duration,
                call.billable_seconds,
                to_db(call.start),
                to_db(call.answer) if call.answer else None,
                to_db(call.end),
                str(call.origin),
                to_db(self.now),
            ),
        )

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---- money (all inside the caller's transaction) ----------------------------------------

    def get_account(self, code: str) -> Account | None:
        row = self._conn.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
        return account_from_json(row[0]) if row else None

    def account_for_did(self, did: str) -> Account | None:
        row = self._conn.execute(
            "SELECT a.data FROM account_dids d JOIN accounts a ON a.code = d.account WHERE d.did = ?", (did,)
        ).fetchone()
        return account_from_json(row[0]) if row else None

    def account_for_mailbox(self, box: str) -> Account | None:
        row = self._conn.execute(
            "SELECT a.data FROM account_mailboxes m JOIN accounts a ON a.code = m.account WHERE m.box = ?", (box,)
        ).fetchone()
        return account_from_json(row[0]) if row else None

    def upsert_account(self, account: Account, opening_balance: int) -> bool:
        """Insert or update; the opening balance is booked only for a new account. True if new."""
        now = to_db(self.now)
        data = account_to_json(account)
        is_new = self._conn.execute("SELECT 1 FROM accounts WHERE code = ?", (account.code,)).fetchone() is None
        if is_new:
            self._conn.execute(
                "INSERT INTO accounts (code, data, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (account.code, data, now, now),
            )
        else:
            self._conn.execute(
                "UPDATE accounts SET data = ?, updated_at = ? WHERE code = ? AND data != ?",
                (data, now, account.code, data),
            )
        self._conn.execute("DELETE FROM account_dids WHERE account = ?", (account.code,))
        self._conn.execute("DELETE FROM account_mailboxes WHERE account = ?", (account.code,))
        for table, column, values in (
            ("account_dids", "did", account.dids),
            ("account_mailboxes", "box", tuple(m.box for m in account.mailboxes)),
        ):
            for value in values:
                owner = self._conn.execute(
                    f"SELECT account FROM {table} WHERE {column} = ?",  # noqa: S608 - constant names
                    (value,),
                ).fetchone()
                if owner is not None:
                    raise ValueError(f"{account.code}: {column} {value} already belongs to account {owner[0]}")
                self._conn.execute(
                    f"INSERT INTO {table} ({column}, account) VALUES (?, ?)",  # noqa: S608 - constant names
                    (value, account.code),
                )
        self._conn.execute("INSERT OR IGNORE INTO balances (account, balance) VALUES (?, 0)", (account.code,))
        if is_new and opening_balance:
            self.post_ledger(account.code, opening_balance, "opening", f"opening:{account.code}", "opening balance")
        return is_new

    def balance(self, code: str) -> int:
        row = self._conn.execute("SELECT balance FROM balances WHERE account = ?", (code,)).fetchone()
        return int(row[0]) if row else 0

    def post_ledger(self, code: str, amount: int, kind: str, ref: str, reason: str | None) -> bool:
        """Append one money movement and move the cached balance; False if ``ref`` was booked already."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO ledger (account, amount, kind, ref, reason, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (code, amount, kind, ref, reason, to_db(self.now)),
        )
        if cur.rowcount != 1:
            return False
        self._conn.execute(
            "INSERT INTO balances (account, balance) VALUES (?, ?)"
            " ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance",
            (code, amount),
        )
        return True

    def spent(self, code: str, day: str) -> int:
        row = self._conn.execute("SELECT spent FROM daily_spend WHERE account = ? AND day = ?", (code, day)).fetchone()
        return int(row[0]) if row else 0

    def add_spend(self, code: str, day: str, amount: int) -> int:
        self._conn.execute(
            "INSERT INTO daily_spend (account, day, spent) VALUES (?, ?, ?)"
            " ON CONFLICT (account, day) DO UPDATE SET spent = spent + excluded.spent",
            (code, day, amount),
        )
        return self.spent(code, day)

    def reservations(self, code: str) -> tuple[int, int]:
        """(amount held, calls) by unexpired reservations of the account."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM reservations WHERE account = ? AND expires_at > ?",
            (code, to_db(self.now)),
        ).fetchone()
        return int(row[0]), int(row[1])

    def reserve(self, call_id: str, code: str, amount: int, expires_at: datetime) -> bool:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO reservations (call_id, account, amount, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (call_id, code, amount, to_db(self.now), to_db(expires_at)),
        )
        return cur.rowcount == 1

    def release(self, call_id: str) -> int | None:
        row = self._conn.execute("DELETE FROM reservations WHERE call_id = ? RETURNING amount", (call_id,)).fetchone()
        return int(row[0]) if row else None

    def purge_expired_reservations(self) -> int:
        return self._conn.execute("DELETE FROM reservations WHERE expires_at <= ?", (to_db(self.now),)).rowcount

    def get_state(self, code: str, name: str) -> str | None:
        row = self._conn.execute(
            "SELECT value FROM notice_state WHERE account = ? AND name = ?", (code, name)
        ).fetchone()
        return str(row[0]) if row else None

    def set_state(self, code: str, name: str, value: str) -> None:
        self._conn.execute(
            "INSERT INTO notice_state (account, name, value) VALUES (?, ?, ?)"
            " ON CONFLICT (account, name) DO UPDATE SET value = excluded.value",
            (code, name, value),
        )

    def record_rated(self, rated: RatedCall) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO rated_calls (key, account, destination, prefix, tariff, class, answered_at, day,"
            " billable, billed_seconds, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rated.key,
                rated.account,
                rated.destination,
                rated.prefix,
                rated.tariff,
                rated.destination_class,
                to_db(rated.answered_at),
                rated.day,
                rated.billable_seconds,
                rated.billed_seconds,
                rated.cost,
            ),
        )

    def enqueue_notice(self, notice: Notice) -> bool:
        """An outbox row whose body the sender renders from ``payload`` (decided inside this transaction)."""
        cur = self._conn.execute(
            """INSERT OR IGNORE INTO outbox
                   (idempotency_key, kind, recipient, account, message, payload, created_at, expires_at,
                    next_attempt_at)
               VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?)""",
            (
                notice.key,
                notice.kind,
                notice.recipient,
                notice.account,
                json.dumps(notice.payload, sort_keys=True),
                to_db(self.now),
                to_db(self.now + notice.lifetime),
                to_db(self.now),
            ),
        )
        self.enqueued += cur.rowcount
        return cur.rowcount == 1

    def enqueue(self, message: OutboxMessage) -> bool:
        cur = self._conn.execute(
            """INSERT OR IGNORE INTO outbox
                   (idempotency_key, kind, recipient, account, message, created_at, expires_at,
                    next_attempt_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                message.idempotency_key,
                message.kind,
                message.recipient,
                message.account,
                message.mime,
                to_db(message.created_at),
                to_db(message.expires_at),
                to_db(message.created_at),
            ),
        )
        self.enqueued += cur.rowcount
        return cur.rowcount == 1

    def set_message(self, row_id: int, mime: bytes) -> None:
        self._conn.execute("UPDATE outbox SET message = ? WHERE id = ? AND message IS NULL", (mime, row_id))

    def mark_sent(self, row_id: int, smtp_reply: str) -> None:
        self._conn.execute(
            """UPDATE outbox SET status = 'sent', attempts = attempts + 1, smtp_reply = ?,
                   sent_at = ?, last_error = NULL WHERE id = ?""",
            (smtp_reply[:500], to_db(self.now), row_id),
        )

    def mark_failed(self, row_id: int, error: str, next_attempt_at: datetime, *, dead: bool) -> None:
        self._conn.execute(
            """UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,
                   status = CASE WHEN ? THEN 'dead' ELSE status END WHERE id = ?""",
            (error[:500], to_db(next_attempt_at), dead, row_id),
        )

    def mark_expired(self, row_id: int) -> None:
        self._conn.execute("UPDATE outbox SET status = 'expired' WHERE id = ? AND status = 'pending'", (row_id,))


@dataclass
class _Job:
    work: Callable[[WriteTx], Any]
    future: asyncio.Future[Any]


def _run_batch(conn: sqlite3.Connection, jobs: list[_Job], now: datetime) -> tuple[list[tuple[bool, Any]], int]:
    """One transaction for the batch, a savepoint per job; runs on the writer's thread.

    Returns each job's outcome and how many outbox rows the committed jobs enqueued.
    """
    outcomes: list[tuple[bool, Any]] = []
    enqueued = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for job in jobs:
            conn.execute("SAVEPOINT unit")
            tx = SqliteTx(conn, now)
            try:
                result = job.work(tx)
            except Exception as exc:
                conn.execute("ROLLBACK TO unit")
                conn.execute("RELEASE unit")
                outcomes.append((False, exc))
            else:
                conn.execute("RELEASE unit")
                outcomes.append((True, result))
                enqueued += tx.enqueued
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes, enqueued


class SqliteStore:
    """The SQLite :class:`~clickphone_agi.ports.Store`.

    Open with :meth:`open` (migrates unless told not to), start the writer with :meth:`start`
    inside the event loop that will use it, and :meth:`close` to drain queued writes.
    """

    def __init__(self, path: Path, clock: Clock, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self.path = path
        self._clock = clock
        self._writer = writer
        self._reader = reader
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        self.units = 0
        self.on_outbox: Callable[[], None] | None = None

    @classmethod
    async def open(cls, path: Path, clock: Clock, *, busy_timeout: float = 5.0, do_migrate: bool = True) -> SqliteStore:
        def factory() -> sqlite3.Connection:
            return connect_sync(path, busy_timeout)

        writer = aiosqlite.Connection(factory, iter_chunk_size=64)
        await writer
        try:
            version = await _call(writer, schema_version)
            if version > LATEST_VERSION:
                raise SchemaTooNew(path, version)
            if do_migrate:
                applied = await _call(writer, migrate, clock.now(), path)
                if applied:
                    log.info("db.migrated", path=str(path), applied=applied)
            elif version < LATEST_VERSION:
                raise StorageError(f"{path}: schema version {version} needs migrating: run 'clickphone-agi db migrate'")
            reader = aiosqlite.Connection(lambda: connect_sync(path, busy_timeout, readonly=True), iter_chunk_size=64)
            await reader
        except BaseException:
            await writer.close()
            raise
        return cls(path, clock, writer, reader)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._writer_loop(), name="db-writer")

    async def write(self, work: Callable[[WriteTx], T]) -> T:
        if self._task is None:
            raise StorageError("store writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(work, future))
        return await future

    async def _writer_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            jobs, stop_after = self._take_batch(first)
            enqueued = 0
            try:
                outcomes, enqueued = await _call(self._writer, _run_batch, jobs, self._clock.now())
            except Exception as exc:
                # COMMIT itself failed: every unit of the batch failed with it
                log.error("db.commit_failed", error=str(exc), units=len(jobs))
                outcomes = [(False, StorageError(f"commit failed: {exc}"))] * len(jobs)
            else:
                self.commits += 1
                self.units += len(jobs)
                if enqueued and self.on_outbox is not None:
                    self.on_outbox()  # committed mail is delivered now, not at the next poll
            for job, (ok, value) in zip(jobs, outcomes, strict=True):
                if not job.future.done():
                    if ok:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)
            if stop_after:
                return

    def _take_batch(self, first: _Job) -> tuple[list[_Job], bool]:
        """Everything already queued (up to MAX_BATCH) joins ``first`` in one transaction."""
        jobs = [first]
        while len(jobs) < MAX_BATCH and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if nxt is None:
                return jobs, True
            jobs.append(nxt)
        return jobs, False

    async def close(self) -> None:
        """Finish every queued write, then close both connections."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
        await self._reader.close()
        await self._writer.close()

    # ---- reads -------------------------------------------------------------------------------

    async def _fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        async with self._reader.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def went_live_at(self) -> datetime:
        rows = await self._fetchall("SELECT value FROM meta WHERE key = 'went_live_at'")
        return from_db(rows[0][0])

    async def due_outbox(self, now: datetime, limit: int) -> list[tuple[OutboxRow, bytes]]:
        rows = await self._fetchall(
            f"SELECT {_OUTBOX_COLUMNS}, payload, message FROM outbox"  # noqa: S608 - constant column list
            " WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (to_db(now), limit),
        )
        return [
            (replace(_outbox_row(r), payload=json.loads(r[-2]) if r[-2] else None), bytes(r[-1] or b"")) for r in rows
        ]

    async def outbox_rows(self, limit: int = 100) -> list[OutboxRow]:
        sql = f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY id DESC LIMIT ?"  # noqa: S608 - constant column list
        rows = await self._fetchall(sql, (limit,))
        return [_outbox_row(r) for r in rows]

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT status, COUNT(*) FROM outbox GROUP BY status")
        return {str(r[0]): int(r[1]) for r in rows}

    async def event_count(self, kind: str | None = None) -> int:
        if kind is None:
            rows = await self._fetchall("SELECT COUNT(*) FROM processed_events")
        else:
            rows = await self._fetchall("SELECT COUNT(*) FROM processed_events WHERE kind = ?", (kind,))
        return int(rows[0][0])

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetchall("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def calls(self, account: str | None = None) -> list[dict[str, Any]]:
        """Stored CDRs, oldest first (tests, export)."""
        sql = "SELECT * FROM cdrs WHERE ? IS NULL OR account = ? ORDER BY end_at, key"
        async with self._reader.execute(sql, (account, account)) as cur:
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

    async def event_counts(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT kind, COUNT(*) FROM processed_events GROUP BY kind")
        return {str(r[0]): int(r[1]) for r in rows}


_OUTBOX_COLUMNS = (
    "id, idempotency_key, kind, recipient, account, status, attempts, created_at, expires_at,"
    " next_attempt_at, last_error, smtp_reply, sent_at"
)


def _outbox_row(r: sqlite3.Row | tuple[Any, ...]) -> OutboxRow:
    return OutboxRow(
        id=int(r[0]),
        idempotency_key=r[1],
        kind=r[2],
        recipient=r[3],
        account=r[4],
        status=OutboxStatus(r[5]),
        attempts=int(r[6]),
        created_at=from_db(r[7]),
        expires_at=from_db(r[8]),
        next_attempt_at=from_db(r[9]),
        last_error=r[10],
        smtp_reply=r[11],
        sent_at=from_db(r[12]) if r[12] else None,
    )


async def _call(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on the connection's own thread: one hop.

    aiosqlite has no public API for this; ``_execute`` is how its own methods do it (pinned
    to aiosqlite < 0.23 in pyproject.toml, covered by the storage tests).
    """
    raw = conn._conn
    execute = cast(Callable[..., Any], conn._execute)
    return cast(T, await execute(fn, raw, *args))


# ---- offline maintenance (CLI) ---------------------------------------------------------------


@contextlib.contextmanager
def _closing(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        yield conn
    finally:
        conn.close()


def integrity_check(path: Path) -> str:
    with _closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def backup(db_path: Path, target: Path, busy_timeout: float = 5.0) -> dict[str, Any]:
    """Online, consistent copy through SQLite's backup API, safe while the daemon writes.

    All pages are copied in one step inside one read transaction, so the copy is a snapshot of
    one commit; it is written beside the target and renamed into place only once it passes
    ``PRAGMA integrity_check``.
    """
    if not db_path.exists():
        raise StorageError(f"{db_path}: no such database")
    tmp = target.with_name(f".{target.name}.partial")
    tmp.unlink(missing_ok=True)
    with _closing(connect_sync(db_path, busy_timeout, readonly=True)) as src:
        version = check_version(src, db_path)
        with _closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode = DELETE")
    result = integrity_check(tmp)
    if result != "ok":
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{target}: backup failed its integrity check: {result}")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return {"path": str(target), "schema_version": version, "bytes": target.stat().st_size}


def restore(source: Path, db_path: Path, busy_timeout: float = 5.0) -> dict[str, Any]:
    """Replace the database with ``source`` — the caller must hold the :class:`WriterLock`.

    ``source`` is integrity-checked and version-checked before anything is touched; the copy
    goes through the backup API into the live file, so the WAL is handled by SQLite itself.
    """
    if not source.exists():
        raise StorageError(f"{source}: no such backup file")
    try:
        result = integrity_check(source)
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{source}: not a usable SQLite database: {exc}") from None
    if result != "ok":
        raise StorageError(f"{source}: integrity check failed, nothing restored: {result}")
    with _closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src:
        version = schema_version(src)
        if version == 0:
            raise StorageError(f"{source}: not a clickphone-agi database (no schema version)")
        if version > LATEST_VERSION:
            raise SchemaTooNew(source, version)
        with _closing(connect_sync(db_path, busy_timeout)) as dst:
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"path": str(db_path), "from": str(source), "schema_version": version}


def info(db_path: Path, busy_timeout: float = 5.0) -> dict[str, Any]:
    if not db_path.exists():
        raise StorageError(f"{db_path}: no such database (run 'clickphone-agi db migrate')")
    with _closing(connect_sync(db_path, busy_timeout, readonly=True)) as conn:
        version = schema_version(conn)
        out: dict[str, Any] = {
            "path": str(db_path),
            "schema_version": version,
            "code_schema_version": LATEST_VERSION,
            "sqlite_version": sqlite3.sqlite_version,
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "bytes": db_path.stat().st_size,
        }
        if version >= 1:
            out["went_live_at"] = conn.execute("SELECT value FROM meta WHERE key='went_live_at'").fetchone()[0]
            out["processed_events"] = conn.execute("SELECT COUNT(*) FROM processed_events").fetchone()[0]
            out["outbox"] = dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
        if version > LATEST_VERSION:
            out["warning"] = str(SchemaTooNew(db_path, version))
        return out
