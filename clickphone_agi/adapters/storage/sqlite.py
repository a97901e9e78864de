"""SQLite storage: the embedded default behind :class:`clickphone_agi.ports.Store`.

Durability settings follow ``shared/NOTES.md``: WAL, ``synchronous=FULL`` (money and the outbox
must survive power loss, not only a crash), ``secure_delete=ON`` (deleted mail bodies are
overwritten). A batch of only ``durable=False`` writes (``authorize`` reservations) commits with
``synchronous=NORMAL`` and a thread of its own syncs the WAL soon after (:class:`_Durability`).
Exactly one writer: the writer connection's own thread drains the queued units of work batch
after batch (:meth:`SqliteStore._drain`) — one ``BEGIN IMMEDIATE``, a ``SAVEPOINT`` per unit so
one failing unit rolls back alone, one ``COMMIT`` (one fsync, unless relaxed) for the batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import json
import operator
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import structlog

from clickphone_agi.adapters.storage import privacy as privacy_sql
from clickphone_agi.adapters.storage.codec import account_from_json, account_to_json
from clickphone_agi.adapters.storage.migrations import LATEST_VERSION, MIGRATIONS
from clickphone_agi.adapters.storage.privacy import address_hash_sql
from clickphone_agi.clock import Clock
from clickphone_agi.domain.accounts import Account, AccountConflict
from clickphone_agi.domain.consent import Candidate, ConsentRecord
from clickphone_agi.domain.delivery import DueMail
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.money import Notice, RatedCall
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow, OutboxStatus
from clickphone_agi.domain.policy import Policy
from clickphone_agi.domain.privacy import address_forms, ascii_lower, erased_leg, number_digest
from clickphone_agi.faults import crash_point
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.ports import StorageUnavailable, WriteTx

T = TypeVar("T")
log = structlog.get_logger(__name__)

MAX_BATCH = 256
"""Units of work per transaction (a :meth:`SqliteStore.write_many` group joins a batch whole)."""
_PREFETCH_CHUNK = 500  # keys per IN (...) list, well under SQLite's 32,766 variables
WAL_SYNC_INTERVAL = 0.01
"""Seconds, at most, between the WAL syncs that make relaxed commits durable against power loss."""
RETRY_FAILED_SYNC = 1.0
"""Seconds before the sync thread tries again after a failed WAL sync (each failure is logged)."""


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


class DatabaseUnavailable(StorageError, StorageUnavailable):
    """SQLite took no write for a reason of the database's, not the unit's: a full disk, an I/O
    error, a read-only or locked file. The units may be retried as they are."""


#: SQLite's primary result codes that say "not now", not "not this": full, I/O error, busy,
#: locked, read-only, cannot open, locking protocol (https://sqlite.org/rescode.html)
_UNAVAILABLE_CODES = frozenset({5, 6, 8, 10, 13, 14, 15})


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite refusing every write for now, not a unit's own error."""
    if isinstance(exc, StorageUnavailable):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and isinstance(code, int) and code & 0xFF in _UNAVAILABLE_CODES


def to_db(moment: datetime) -> str:
    """UTC, fixed width, so text order is time order: ``2026-11-28T14:00:00.000000Z``.

    The same text as ``strftime("%Y-%m-%dT%H:%M:%S.%fZ")`` (years 1000-9999), by ``%`` on the
    fields: half the cost of ``isoformat(timespec=...)`` (whose keyword parsing dominates) and a
    third of ``strftime``'s. It runs four times per CDR on the writer thread.
    """
    m = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031 - measurably faster than f-string/format here
        m.year,
        m.month,
        m.day,
        m.hour,
        m.minute,
        m.second,
        m.microsecond,
    )


def from_db(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# the -wal file is truncated back to this after a checkpoint: one big transaction (a restore, a
# retention pass, a burst) otherwise leaves it at its peak size for as long as the daemon runs
WAL_SIZE_LIMIT = 64 * 1024 * 1024


def configure_connection(conn: sqlite3.Connection, busy_timeout: float = 5.0) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageError(f"cannot switch the database to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("PRAGMA foreign_keys = ON")
    _add_functions(conn)


def _add_functions(conn: sqlite3.Connection) -> None:
    """SQL functions the queries use: ``address_hash(x)``, a suppressed address's erased form."""
    conn.create_function("address_hash", 1, address_hash_sql, deterministic=True)


def connect_sync(path: Path, busy_timeout: float = 5.0, *, readonly: bool = False) -> sqlite3.Connection:
    """A configured connection in autocommit mode (we issue BEGIN ourselves)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=busy_timeout)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        _tables(conn, path)
        _add_functions(conn)
        return conn
    path.parent.mkdir(parents=True, exist_ok=True)
    _create_private(path)  # personal data, also when a CLI verb creates it under umask 022
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    tables = _tables(conn, path)
    if tables and "schema_migrations" not in tables:
        conn.close()
        raise StorageError(
            f"{path}: not a clickphone-agi database (it has tables but no schema_migrations); "
            "refusing to touch it — check database.path"
        )
    configure_connection(conn, busy_timeout)
    return conn


def _tables(conn: sqlite3.Connection, path: Path) -> set[str]:
    """The file's table names, read before anything is written; a file that is not an SQLite
    database is refused with its path (and the connection closed)."""
    try:
        return {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError:  # locked, I/O error: not the file's fault
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StorageError(
            f"{path}: not a usable SQLite database ({exc}); refusing to touch it — check database.path, "
            "or move the file aside and 'clickphone-agi db restore' a backup"
        ) from None


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


_MISSING: Any = object()  # "no entry" in the undo log and the caches (None is a value there)
_LEDGER_KINDS = frozenset({"opening", "call", "topup", "adjustment"})  # the ledger's CHECK constraint
# the NOT NULL columns of each deferred row, by position (itemgetters: picked in C, see _ignored)
_EVENT_NOT_NULL = operator.itemgetter(0, 1)
_CDR_NOT_NULL = operator.itemgetter(0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19)
_LEDGER_NOT_NULL = operator.itemgetter(0, 1, 2, 3, 5)
_RATED_NOT_NULL = operator.itemgetter(*range(11))  # every rated_calls column
_NEVER = datetime.min.replace(tzinfo=UTC)


class _WriterCache:
    """Money state as the writer last committed it, kept from batch to batch (writer thread only).

    Accounts (parsed), balances, daily spend and notice state, so that charging a CDR reads
    nothing back; the erased numbers, so that checking a leg without an account code reads nothing
    either. The writer connection is the database's only writer and every write to those tables
    goes through :class:`SqliteTx`, which keeps this cache in step (undone with a failed unit,
    dropped with a failed batch). Anything committed by another connection (the CLI while
    the daemon is stopped, a restore, a hand-edit) changes ``PRAGMA data_version``: the cache is
    then dropped at the start of the next batch, as it is when it grows past ``MAX_ENTRIES``.
    """

    MAX_ENTRIES = 200_000

    def __init__(self) -> None:
        self.data_version: int | None = None
        self.accounts: dict[str, Account | None] = {}
        self.balances: dict[str, int] = {}
        self.spend: dict[tuple[str, str], int] = {}
        self.states: dict[tuple[str, str], str | None] = {}
        # every reservation once loaded, call id: (account, amount, expires_at as stored), and the
        # call ids held by each account: few (calls in progress), and they answer authorize's
        # "how much is held" without a statement
        self.reservations: dict[str, tuple[str, int, str, str]] | None = None  # + created_at as stored
        self.held: dict[str, dict[str, None]] = {}
        # every erased number once loaded, digest: erased_at (domain.privacy.erased_leg), and the
        # key of the digests; few (a handful per erased account), so never counted as MAX_ENTRIES.
        # erased_until is at or after every erased_at (a failed erasure's undo leaves it, which costs
        # only hashing): a leg that started at or after it is not looked up, so not hashed.
        self.erased_numbers: dict[str, datetime] | None = None
        self.erased_until: datetime = _NEVER
        self.numbers_key: bytes | None = None

    def clear(self) -> None:
        self.data_version = None
        self.reservations = None
        self.erased_numbers = None
        self.erased_until = _NEVER
        self.numbers_key = None
        for entries in (self.accounts, self.balances, self.spend, self.states, self.held):
            entries.clear()

    def validate(self, conn: sqlite3.Connection) -> None:
        """At the start of a batch, inside its transaction: forget what someone else may have changed."""
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        size = len(self.accounts) + len(self.balances) + len(self.spend) + len(self.states)
        size += 2 * len(self.reservations or ())
        if version != self.data_version or size > self.MAX_ENTRIES:
            self.clear()
            self.data_version = version


class _Batch:
    """One batch's deferred writes, and the undo log of the unit of work running now.

    The money path's appends (``processed_events``, ``cdrs``, ``ledger``, ``rated_calls``) and its
    moves of balances, daily spend and notice state are kept here and written just before COMMIT
    with a few multi-row ``INSERT``s per table (:meth:`flush`), in unit order: charging a CDR then costs one
    point read (the claim) instead of 17 statements, and the writer thread hands the GIL back and
    forth far less often. Units keep their isolation: every change here is logged, and a unit that
    raises has its changes undone (:meth:`undo`) along with its savepoint. A unit never sees a
    difference: reads consult the pending rows first. A row that INSERT OR IGNORE would skip (a
    NULL in a NOT NULL column, a ledger kind its CHECK refuses) is skipped when queued, with the
    same result as before, so the flush can only fail as COMMIT can (I/O, disk full), and then the
    whole batch fails as it would on COMMIT.
    """

    def __init__(self, cache: _WriterCache, now: datetime) -> None:
        self.cache = cache
        self.now_db = to_db(now)
        # rows to insert (INSERT OR IGNORE, in unit order), by their unique key
        self.events: dict[str, tuple[str, str, str]] = {}
        self.cdrs: dict[str, tuple[Any, ...]] = {}
        self.ledger: dict[str, tuple[Any, ...]] = {}
        self.rated: dict[str, tuple[Any, ...]] = {}
        # claimed keys that no ledger row had as its ref when claimed (a CDR's key is its charge's ref)
        self.unbooked: dict[str, None] = {}
        # rows to upsert with their new value (the cache holds the same values)
        self.balances: dict[str, int] = {}
        self.spend: dict[tuple[str, str], int] = {}
        self.states: dict[tuple[str, str], str] = {}
        # reservations to write (INSERT OR REPLACE) and to delete; never both for one call id
        self.reserve_rows: dict[str, tuple[str, str, int, str, str]] = {}
        self.released: dict[str, None] = {}
        # (claimed, booked) of keys read ahead for the whole batch (:meth:`prefetch_claims`)
        self.claims: dict[str, tuple[bool, bool]] = {}
        # rows encoded before the batch (see _encode); read only
        self.encoded: dict[str, _Encoded] = {}
        self._undo: list[tuple[dict[Any, Any], Any, Any]] = []

    def prefetch_claims(self, conn: sqlite3.Connection, keys: list[str]) -> None:
        """Read whether each key is claimed and booked, for many keys in a few statements: a CDR's
        claim then costs no statement of its own. Valid until a unit writes ``processed_events``
        or ``ledger`` other than through the batch (see :class:`_UnitConnection`)."""
        claims = self.claims
        for start in range(0, len(keys), _PREFETCH_CHUNK):
            chunk = keys[start : start + _PREFETCH_CHUNK]
            marks = ",".join("?" * len(chunk))
            claimed = {
                row[0]
                for row in conn.execute(
                    f"SELECT key FROM processed_events WHERE key IN ({marks})",  # noqa: S608 - marks only
                    chunk,
                )
            }
            booked = {
                row[0]
                for row in conn.execute(f"SELECT ref FROM ledger WHERE ref IN ({marks})", chunk)  # noqa: S608
            }
            for key in chunk:
                claims[key] = (key in claimed, key in booked)

    def put(self, entries: dict[Any, Any], key: Any, value: Any) -> None:
        """``entries[key] = value``, undone if the current unit fails."""
        self._undo.append((entries, key, entries.get(key, _MISSING)))
        entries[key] = value

    def drop(self, entries: dict[Any, Any], key: Any) -> None:
        """``del entries[key]`` (if there), undone if the current unit fails."""
        old = entries.pop(key, _MISSING)
        if old is not _MISSING:
            self._undo.append((entries, key, old))

    def undo(self) -> None:
        """The current unit failed: take back everything it changed here."""
        for entries, key, old in reversed(self._undo):
            if old is _MISSING:
                entries.pop(key, None)
            else:
                entries[key] = old
        self._undo.clear()

    def keep(self) -> None:
        """The current unit succeeded: its changes stay."""
        self._undo.clear()

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write what the batch's units deferred (inside the batch's transaction, before COMMIT)."""
        # processed_events and ledger: plain INSERT, their keys were checked when queued; a clash
        # here would be a bug, and must fail the batch rather than lose a claim or a booking
        _insert_rows(conn, "INSERT INTO processed_events (key, kind, processed_at)", 3, self.events.values())
        _insert_rows(
            conn,
            "INSERT OR IGNORE INTO cdrs (key, system_name, account, unique_id, linked_id, sequence, source,"
            " destination, destination_context, channel, destination_channel, last_application, disposition,"
            " duration, billable_seconds, start_at, answer_at, end_at, origin, recorded_at)",
            20,
            self.cdrs.values(),
        )
        _insert_rows(
            conn, "INSERT INTO ledger (account, amount, kind, ref, reason, created_at)", 6, self.ledger.values()
        )
        _insert_rows(
            conn,
            "INSERT OR IGNORE INTO rated_calls (key, account, destination, prefix, tariff, class, answered_at,"
            " day, billable, billed_seconds, cost)",
            11,
            self.rated.values(),
        )
        _insert_rows(
            conn,
            "INSERT INTO balances (account, balance)",
            2,
            self.balances.items(),
            " ON CONFLICT (account) DO UPDATE SET balance = excluded.balance",
        )
        _insert_rows(
            conn,
            "INSERT INTO daily_spend (account, day, spent)",
            3,
            [(code, day, spent) for (code, day), spent in self.spend.items()],
            " ON CONFLICT (account, day) DO UPDATE SET spent = excluded.spent",
        )
        _insert_rows(
            conn,
            "INSERT INTO notice_state (account, name, value)",
            3,
            [(code, name, value) for (code, name), value in self.states.items()],
            " ON CONFLICT (account, name) DO UPDATE SET value = excluded.value",
        )
        released = list(self.released)
        for start in range(0, len(released), _PREFETCH_CHUNK):
            chunk = released[start : start + _PREFETCH_CHUNK]
            conn.execute(f"DELETE FROM reservations WHERE call_id IN ({','.join('?' * len(chunk))})", chunk)  # noqa: S608
        _insert_rows(
            conn,
            "INSERT OR REPLACE INTO reservations (call_id, account, amount, created_at, expires_at)",
            5,
            self.reserve_rows.values(),
        )


# rows per multi-row INSERT: a batch of n rows takes a dozen statements at most, from 5 texts per
# table; a chunk never binds more than 999 values, the limit of SQLite builds before 3.32
_ROW_CHUNKS = (128, 32, 8, 2, 1)
_MAX_VARIABLES = 999


@functools.lru_cache(maxsize=128)
def _values_sql(head: str, width: int, rows: int, tail: str) -> str:
    marks = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([marks] * rows)}{tail}"


def _insert_rows(
    conn: sqlite3.Connection, head: str, width: int, rows: Collection[tuple[Any, ...]], tail: str = ""
) -> None:
    """``INSERT`` ``rows`` with multi-row ``VALUES`` lists: the same rows as ``executemany``, in the
    same order, with one statement step per chunk instead of per row. Each step runs without the
    GIL, so the writer takes the GIL back a few times per table instead of once per row: under
    load, each of those takes waits for the event loop's thread."""
    if not rows:
        return
    ordered = list(rows)
    start, total = 0, len(ordered)
    for size in _ROW_CHUNKS:
        if size * width > _MAX_VARIABLES:
            continue
        while total - start >= size:
            chunk = ordered[start : start + size]
            conn.execute(_values_sql(head, width, size, tail), [value for row in chunk for value in row])
            start += size


def _cdr_head(call: CallEnded) -> tuple[Any, ...]:
    """A ``cdrs`` row but its last column (``recorded_at``, the batch's time)."""
    return (
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
    )


def _rated_row(rated: RatedCall) -> tuple[Any, ...]:
    """A ``rated_calls`` row."""
    return (
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
    )


# a write_many group's CDRs encoded ahead, by key: (call, its cdrs row head, its rating, that row)
_Encoded = tuple[CallEnded, tuple[Any, ...], RatedCall | None, tuple[Any, ...] | None]


def _encode(records: Sequence[tuple[CallEnded, RatedCall | None]]) -> dict[str, _Encoded]:
    """Rows of the CDRs and ratings a group's units will record, encoded on the caller's thread
    (the event loop, mostly idle during a burst) instead of the writer's, which is the one that
    limits a burst. A unit uses them only for the very objects encoded (checked by identity).
    A record that cannot be encoded is left out: its unit encodes it, and fails alone."""
    encoded: dict[str, _Encoded] = {}
    for call, rated in records:
        try:
            encoded[call.key] = (call, _cdr_head(call), rated, _rated_row(rated) if rated else None)
        except Exception:  # noqa: S112 - the unit meets the same error, in its own unit of work
            continue
    return encoded


def _check_text(row: tuple[Any, ...]) -> None:
    """Raise in the unit, as an immediate INSERT would when binding, for text SQLite cannot store
    (a lone surrogate: FastAGI values are decoded with ``surrogateescape``). Queued, such a row
    would fail the flush, and with it every unit of the batch."""
    for value in row:
        if type(value) is str and not value.isascii():
            value.encode("utf-8")  # UnicodeEncodeError (a ValueError): this unit fails alone


def _ignored(row: tuple[Any, ...], not_null: operator.itemgetter[Any]) -> bool:
    """Whether INSERT OR IGNORE would skip ``row`` for a NULL in one of its ``not_null`` columns."""
    return None in row and None in not_null(row)


class _UnitConnection:
    """The writer connection as one unit of work sees it: the unit's savepoint opens before its first
    statement. A unit that only reads, and defers its writes to the batch (a CDR), needs none."""

    __slots__ = ("_conn", "savepoint")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.savepoint = False  # opened: the unit ran SQL of its own

    def _open(self) -> sqlite3.Connection:
        if not self.savepoint:
            self._conn.execute("SAVEPOINT unit")
            self.savepoint = True
        return self._conn

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self._open().execute(sql, parameters)

    def __getattr__(self, name: str) -> Any:  # executemany, lastrowid, ...: the savepoint first
        return getattr(self._open(), name)


class SqliteTx:
    """:class:`WriteTx` over the writer connection, valid only inside one unit of work.

    The money methods and :meth:`claim_event`/:meth:`record_call` defer their writes to the
    batch (:class:`_Batch`) and read through ``_read`` (no savepoint needed); everything else runs
    its SQL at once through ``_conn``, which opens the unit's savepoint first.
    """

    def __init__(self, conn: sqlite3.Connection, now: datetime, batch: _Batch) -> None:
        self._conn = _UnitConnection(conn)  # opens the savepoint: every immediate write goes through it
        self._read = conn  # reads only
        self.now = now
        self._batch = batch
        self._cache = batch.cache
        self.enqueued = 0  # outbox rows added in this transaction: the sender is woken after COMMIT

    @property
    def savepoint(self) -> bool:
        """Whether the unit ran SQL that its failure must roll back (its savepoint is open)."""
        return self._conn.savepoint

    def claim_event(self, key: str, kind: str) -> bool:
        batch = self._batch
        if key in batch.events:
            return False
        known = batch.claims.get(key)
        if known is not None:
            claimed, booked = known
        else:
            # one read answers both: is the key claimed, and is it a ledger ref (see post_ledger)
            claimed, booked = self._read.execute(
                "SELECT EXISTS (SELECT 1 FROM processed_events WHERE key = ?1),"
                " EXISTS (SELECT 1 FROM ledger WHERE ref = ?1)",
                (key,),
            ).fetchone()
        if claimed:
            return False
        row = (key, kind, batch.now_db)
        if _ignored(row, _EVENT_NOT_NULL):
            return False
        _check_text(row)
        batch.put(batch.events, key, row)  # inserted at the end of the batch
        if not booked:
            batch.put(batch.unbooked, key, None)
        return True

    def record_call(self, call: CallEnded) -> None:
        batch = self._batch
        if call.key in batch.cdrs:
            return  # INSERT OR IGNORE: the first row stays
        encoded = batch.encoded.get(call.key)
        head = encoded[1] if encoded is not None and encoded[0] is call else _cdr_head(call)
        row = (*head, batch.now_db)
        if not _ignored(row, _CDR_NOT_NULL):
            _check_text(row)
            batch.put(batch.cdrs, call.key, row)  # inserted at the end of the batch

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---- money (all inside the caller's transaction) ----------------------------------------
    # Reads come from the writer's cache when they can; writes other than the reservations' are
    # deferred to the batch (see _Batch and _WriterCache): keep both in step in any new method.

    def get_account(self, code: str) -> Account | None:
        accounts = self._cache.accounts
        account = accounts.get(code, _MISSING)
        if account is _MISSING:
            row = self._read.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
            account = account_from_json(row[0]) if row else None
            self._batch.put(accounts, code, account)
        return cast(Account | None, account)

    def account_for_did(self, did: str) -> Account | None:
        row = self._read.execute(
            "SELECT a.data FROM account_dids d JOIN accounts a ON a.code = d.account WHERE d.did = ?", (did,)
        ).fetchone()
        return account_from_json(row[0]) if row else None

    def account_for_mailbox(self, box: str) -> Account | None:
        row = self._read.execute(
            "SELECT a.data FROM account_mailboxes m JOIN accounts a ON a.code = m.account WHERE m.box = ?", (box,)
        ).fetchone()
        return account_from_json(row[0]) if row else None

    def upsert_account(self, account: Account, opening_balance: int) -> bool:
        """Insert or update; the opening balance is booked only for a new account. True if new."""
        old = self.get_account(account.code)
        if old is not None and old.erased:
            raise AccountConflict("code", f"{account.code}: this account's data was erased; its code is not reused")
        now = self._batch.now_db
        data = account_to_json(account)
        is_new = self._conn.execute("SELECT 1 FROM accounts WHERE code = ?", (account.code,)).fetchone() is None
        if is_new:
            # acct1001 and ACCT1001 side by side would confuse every report (an import file refuses
            # them too): a new code may not differ only in case from a stored one
            twin = self._conn.execute(
                "SELECT code FROM accounts WHERE code = ? COLLATE NOCASE LIMIT 1", (account.code,)
            ).fetchone()
            if twin is not None:
                raise AccountConflict(
                    "code", f"{account.code!r} differs only in case from the stored account {twin[0]!r}"
                )
            self._conn.execute(
                "INSERT INTO accounts (code, data, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (account.code, data, now, now),
            )
        else:
            self._conn.execute(
                "UPDATE accounts SET data = ?, updated_at = ? WHERE code = ? AND data != ?",
                (data, now, account.code, data),
            )
        self._batch.put(self._cache.accounts, account.code, account)
        self._conn.execute("DELETE FROM account_dids WHERE account = ?", (account.code,))
        self._conn.execute("DELETE FROM account_mailboxes WHERE account = ?", (account.code,))
        for table, column, key, what, values in (
            ("account_dids", "did", "dids", "+{}", account.dids),
            ("account_mailboxes", "box", "mailboxes", "voicemail box {}", tuple(m.box for m in account.mailboxes)),
        ):
            for value in values:
                owner = self._conn.execute(
                    f"SELECT account FROM {table} WHERE {column} = ?",  # noqa: S608 - constant names
                    (value,),
                ).fetchone()
                if owner is not None:
                    raise AccountConflict(key, f"{what.format(value)} already belongs to account {owner[0]}")
                self._conn.execute(
                    f"INSERT INTO {table} ({column}, account) VALUES (?, ?)",  # noqa: S608 - constant names
                    (value, account.code),
                )
        # a missing row reads as 0 in the cache, so this leaves it right
        self._conn.execute("INSERT OR IGNORE INTO balances (account, balance) VALUES (?, 0)", (account.code,))
        if is_new and opening_balance:
            self.post_ledger(account.code, opening_balance, "opening", f"opening:{account.code}", "opening balance")
        return is_new

    def balance(self, code: str) -> int:
        balances = self._cache.balances
        balance = balances.get(code)
        if balance is None:
            row = self._read.execute("SELECT balance FROM balances WHERE account = ?", (code,)).fetchone()
            balance = int(row[0]) if row else 0
            self._batch.put(balances, code, balance)
        return balance

    def post_ledger(self, code: str, amount: int, kind: str, ref: str, reason: str | None) -> bool:
        """Append one money movement and move the cached balance; False if ``ref`` was booked already."""
        batch = self._batch
        if ref in batch.ledger:
            return False
        # every ledger row of this batch is in batch.ledger, so "unbooked when claimed" still holds
        if ref not in batch.unbooked and self._read.execute("SELECT 1 FROM ledger WHERE ref = ?", (ref,)).fetchone():
            return False
        row = (code, amount, kind, ref, reason, batch.now_db)
        if kind not in _LEDGER_KINDS or _ignored(row, _LEDGER_NOT_NULL):
            return False  # INSERT OR IGNORE skips a row its CHECK or NOT NULL refuses
        _check_text(row)
        balance = self.balance(code) + amount
        batch.put(batch.ledger, ref, row)  # both written at the end of the batch, in unit order
        batch.put(batch.balances, code, balance)
        batch.put(self._cache.balances, code, balance)
        return True

    def spent(self, code: str, day: str) -> int:
        spend = self._cache.spend
        spent = spend.get((code, day))
        if spent is None:
            row = self._read.execute(
                "SELECT spent FROM daily_spend WHERE account = ? AND day = ?", (code, day)
            ).fetchone()
            spent = int(row[0]) if row else 0
            self._batch.put(spend, (code, day), spent)
        return spent

    def add_spend(self, code: str, day: str, amount: int) -> int:
        spent = self.spent(code, day) + amount
        self._batch.put(self._batch.spend, (code, day), spent)  # written at the end of the batch
        self._batch.put(self._cache.spend, (code, day), spent)
        return spent

    def reservations(self, code: str) -> tuple[int, int]:
        """(amount held, calls) by unexpired reservations of the account."""
        return self._held(code, "")

    def held_since(self, code: str, moment: datetime) -> int:
        """The amount held by the account's unexpired reservations made at or after ``moment``."""
        return self._held(code, to_db(moment))[0]

    def _held(self, code: str, since_db: str) -> tuple[int, int]:
        """(amount, calls) of the account's unexpired reservations made at or after ``since_db``
        ("" for all): fixed-width UTC text, so text order is time order."""
        reserved = self._reserved()
        now_db = self._batch.now_db
        held = calls = 0
        for call_id in self._cache.held.get(code, ()):
            _, amount, expires_db, created_db = reserved[call_id]
            if expires_db > now_db and created_db >= since_db:
                held += amount
                calls += 1
        return held, calls

    def _reserved(self) -> dict[str, tuple[str, int, str, str]]:
        """Every reservation by call id, read once into the writer's cache (with each account's ids)."""
        cache = self._cache
        if cache.reservations is None:
            rows = self._read.execute(
                "SELECT call_id, account, amount, expires_at, created_at FROM reservations"
            ).fetchall()
            cache.reservations = {str(c): (str(a), int(m), str(e), str(t)) for c, a, m, e, t in rows}
            cache.held.clear()
            for call_id, (code, *_) in cache.reservations.items():
                cache.held.setdefault(code, {})[call_id] = None
        return cache.reservations

    def reserve(self, call_id: str, code: str, amount: int, expires_at: datetime) -> bool:
        """Hold ``amount`` for the call until its CDR or ``expires_at``; False if the call id holds one
        already. Written with the batch (deferred, like the ledger): no statement of its own."""
        reserved = self._reserved()
        if call_id in reserved:
            return False  # as INSERT OR IGNORE on the primary key
        batch = self._batch
        row = (call_id, code, amount, batch.now_db, to_db(expires_at))
        if None in row:
            return False  # a NOT NULL column: INSERT OR IGNORE would skip it
        _check_text(row)
        batch.drop(batch.released, call_id)
        batch.put(batch.reserve_rows, call_id, row)
        batch.put(reserved, call_id, (code, amount, row[4], row[3]))
        batch.put(self._cache.held.setdefault(code, {}), call_id, None)
        return True

    def release(self, call_id: str) -> int | None:
        reserved = self._reserved()
        entry = reserved.get(call_id)
        if entry is None:
            return None  # most CDRs without an authorize: nothing at all
        code, amount, *_ = entry
        batch = self._batch
        batch.drop(reserved, call_id)
        batch.drop(self._cache.held.get(code, {}), call_id)
        batch.drop(batch.reserve_rows, call_id)
        batch.put(batch.released, call_id, None)  # deleted with the batch (a no-op if never written)
        return amount

    def purge_expired_reservations(self) -> int:
        reserved = self._reserved()
        purged = self._conn.execute(
            "DELETE FROM reservations WHERE expires_at <= ? RETURNING call_id", (self._batch.now_db,)
        ).fetchall()
        for (call_id,) in purged:
            if call_id in self._batch.reserve_rows:
                continue  # released and reserved again in this batch: the old row went, the new one stays
            entry = reserved.get(call_id)
            if entry is not None:
                self._batch.drop(self._cache.held.get(entry[0], {}), call_id)
            self._batch.drop(reserved, call_id)
        return len(purged)

    def get_state(self, code: str, name: str) -> str | None:
        states = self._cache.states
        value = states.get((code, name), _MISSING)
        if value is _MISSING:
            row = self._read.execute(
                "SELECT value FROM notice_state WHERE account = ? AND name = ?", (code, name)
            ).fetchone()
            value = str(row[0]) if row else None
            self._batch.put(states, (code, name), value)
        return cast(str | None, value)

    def set_state(self, code: str, name: str, value: str) -> None:
        if self.get_state(code, name) == value:
            return  # unchanged: nothing to write
        _check_text((code, name, value))
        self._batch.put(self._batch.states, (code, name), value)  # written at the end of the batch
        self._batch.put(self._cache.states, (code, name), value)

    def record_rated(self, rated: RatedCall) -> None:
        batch = self._batch
        if rated.key in batch.rated:
            return  # INSERT OR IGNORE: the first row stays
        encoded = batch.encoded.get(rated.key)
        row = encoded[3] if encoded is not None and encoded[2] is rated else None
        if row is None:
            row = _rated_row(rated)
        if not _ignored(row, _RATED_NOT_NULL):
            _check_text(row)
            batch.put(batch.rated, rated.key, row)  # inserted at the end of the batch

    def api_request(self, key: str) -> tuple[str, int, str] | None:
        """The intake API's record of ``key``: (body hash, status, response JSON), or None."""
        row = self._conn.execute(
            "SELECT body_hash, status, response FROM api_requests WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), str(row[2]))

    def record_api_request(self, key: str, body_hash: str, status: int, response: str) -> bool:
        """Record an intake API request's key with its first response; False if the key exists."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO api_requests (key, body_hash, status, response, created_at) VALUES (?, ?, ?, ?, ?)",
            (key, body_hash, status, response, self._batch.now_db),
        )
        return cur.rowcount == 1

    def enqueue_notice(self, notice: Notice) -> bool:
        """An outbox row whose body the sender renders from ``payload`` (decided inside this transaction)."""
        if self._erased(notice.account):
            return False
        cur = self._conn.execute(
            """INSERT OR IGNORE INTO outbox
                   (idempotency_key, kind, recipient, account, message, payload, created_at, expires_at,
                    next_attempt_at, bulk)
               VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)""",
            (
                notice.key,
                notice.kind,
                notice.recipient,
                notice.account,
                json.dumps(notice.payload, sort_keys=True),
                to_db(self.now),
                to_db(self.now + notice.lifetime),
                to_db(self.now),
                _bulk(notice.kind),
            ),
        )
        self.enqueued += cur.rowcount
        return cur.rowcount == 1

    def enqueue(self, message: OutboxMessage) -> bool:
        if self._erased(message.account):
            return False
        cur = self._conn.execute(
            """INSERT OR IGNORE INTO outbox
                   (idempotency_key, kind, recipient, account, message, payload, created_at, expires_at,
                    next_attempt_at, bulk)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                message.idempotency_key,
                message.kind,
                message.recipient,
                message.account,
                message.mime,
                None if message.payload is None else json.dumps(message.payload, sort_keys=True),
                to_db(message.created_at),
                to_db(message.expires_at),
                to_db(message.created_at),
                _bulk(message.kind),
            ),
        )
        self.enqueued += cur.rowcount
        return cur.rowcount == 1

    def set_message(self, row_id: int, mime: bytes) -> None:
        # pending only: an erasure may have emptied the row while the sender was rendering it
        self._conn.execute(
            "UPDATE outbox SET message = ? WHERE id = ? AND message IS NULL AND status = 'pending'", (mime, row_id)
        )

    def mark_sent(self, row_id: int, smtp_reply: str, *, envelope_from: str | None = None) -> None:
        # only a pending row: a DSN may have marked it bounced while the session was still open
        self._conn.execute(
            """UPDATE outbox SET status = 'sent', attempts = attempts + 1, smtp_reply = ?,
                   sent_at = ?, envelope_from = COALESCE(?, envelope_from)
               WHERE id = ? AND status = 'pending'""",
            (smtp_reply[:500], to_db(self.now), envelope_from, row_id),
        )

    def mark_failed(
        self,
        row_id: int,
        error: str,
        next_attempt_at: datetime,
        *,
        dead: bool,
        smtp_reply: str | None = None,
        envelope_from: str | None = None,
        count_attempt: bool = True,
    ) -> None:
        self._conn.execute(
            """UPDATE outbox SET attempts = attempts + ?, last_error = ?, next_attempt_at = ?,
                   status = CASE WHEN ? THEN 'dead' ELSE status END,
                   smtp_reply = COALESCE(?, smtp_reply), envelope_from = COALESCE(?, envelope_from)
               WHERE id = ? AND status = 'pending'""",
            (
                1 if count_attempt else 0,
                error[:500],
                to_db(next_attempt_at),
                dead,
                smtp_reply[:500] if smtp_reply else None,
                envelope_from,
                row_id,
            ),
        )

    def mark_expired(self, row_id: int) -> None:
        self._conn.execute("UPDATE outbox SET status = 'expired' WHERE id = ? AND status = 'pending'", (row_id,))

    def outbox_row(self, row_id: int) -> OutboxRow | None:
        row = self._conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?",  # noqa: S608 - constant column list
            (row_id,),
        ).fetchone()
        return _outbox_row(row) if row else None

    def mark_bounced(self, row_id: int, error: str) -> bool:
        cur = self._conn.execute(
            """UPDATE outbox SET status = 'bounced', bounced_at = ?, last_error = ?
               WHERE id = ? AND status != 'bounced'""",
            (to_db(self.now), error[:500], row_id),
        )
        return cur.rowcount == 1

    def suppression(self, address: str) -> str | None:
        # the plain address, or its digest once its owner's data was erased (domain.privacy)
        row = self._conn.execute(
            "SELECT reason FROM suppressions WHERE address IN (?, ?) AND suppressed_at IS NOT NULL",
            address_forms(address),
        ).fetchone()
        return str(row[0]) if row else None

    def count_hard_bounce(self, address: str, reason: str, limit: int, row_id: int | None = None) -> bool:
        if row_id is not None:
            current = self._conn.execute("SELECT recipient FROM outbox WHERE id = ?", (row_id,)).fetchone()
            if current is None or ascii_lower(str(current[0])) != ascii_lower(address):
                return False  # erased (or purged) while in flight: its address must not be stored again
        now = to_db(self.now)
        plain, hashed = address_forms(address)
        # an address kept as its digest since its owner's erasure stays a digest: the plain address
        # is not stored again, and the diagnostic text loses it too
        erased = self._conn.execute("SELECT 1 FROM suppressions WHERE address = ?", (hashed,)).fetchone()
        key, reason = (hashed, privacy_sql.scrub(reason, [plain]) or "") if erased else (plain, reason)
        row = self._conn.execute(
            """INSERT INTO suppressions (address, reason, hard_bounces, created_at, updated_at)
                   VALUES (?, ?, 1, ?, ?)
               ON CONFLICT (address) DO UPDATE SET hard_bounces = hard_bounces + 1,
                   reason = excluded.reason, updated_at = excluded.updated_at
               RETURNING hard_bounces, suppressed_at""",
            (key, reason[:500], now, now),
        ).fetchone()
        if row[1] is not None:
            return True
        if int(row[0]) >= limit:
            self._conn.execute("UPDATE suppressions SET suppressed_at = ? WHERE address = ?", (now, key))
            return True
        return False

    def verp_key(self, candidate: bytes | None) -> bytes | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'verp_key'").fetchone()
        if row is not None:
            return bytes.fromhex(row[0])
        if candidate is None:
            return None
        self._conn.execute("INSERT INTO meta (key, value) VALUES ('verp_key', ?)", (candidate.hex(),))
        return candidate

    def retry_outbox(self, row_ids: list[int] | None) -> dict[str, Any]:
        if row_ids is None:
            row_ids = [int(r[0]) for r in self._conn.execute("SELECT id FROM outbox WHERE status = 'dead' ORDER BY id")]
        now = to_db(self.now)
        retried: list[int] = []
        skipped: dict[str, str] = {}
        for row_id in row_ids:
            row = self.outbox_row(row_id)
            reason = None
            if row is None:
                reason = "no such outbox row"
            elif row.status is not OutboxStatus.DEAD:
                reason = f"status {row.status}: only dead letters are retried"
            elif (why := self.suppression(row.recipient)) is not None:
                reason = f"recipient is suppressed ({why})"
            elif row.expires_at <= self.now:
                reason = f"expired at {row.expires_at.isoformat()}: it would not be sent"
            if reason is not None:
                skipped[str(row_id)] = reason
                continue
            assert row is not None
            history = f"retried by operator at {now}; before: {row.last_error or '-'}"
            self._conn.execute(
                """UPDATE outbox SET status = 'pending', next_attempt_at = ?, retried_at = ?, last_error = ?
                   WHERE id = ? AND status = 'dead'""",
                (now, now, history[:500], row_id),
            )
            retried.append(row_id)
        self.enqueued += len(retried)  # wakes the sender after COMMIT
        return {"retried": retried, "skipped": skipped}

    def purge_outbox(self, before: datetime, statuses: tuple[str, ...], *, keep_rows: bool) -> int:
        wanted = [s for s in statuses if s != OutboxStatus.PENDING]  # pending mail is never purged
        if not wanted:
            return 0
        marks = ", ".join("?" * len(wanted))
        if keep_rows:
            sql = (
                f"UPDATE outbox SET message = NULL, payload = NULL WHERE status IN ({marks})"  # noqa: S608 - marks only
                " AND created_at < ? AND (message IS NOT NULL OR payload IS NOT NULL)"
            )
        else:
            sql = f"DELETE FROM outbox WHERE status IN ({marks}) AND created_at < ?"  # noqa: S608 - marks only
        return int(self._conn.execute(sql, (*wanted, to_db(before))).rowcount)

    # ---- consent, suppressions, policies, broadcasts (schema 6) ------------------------------

    def consent(self, code: str) -> bool | None:
        """The account's newest marketing consent record (True granted, False withdrawn), or None."""
        row = self._conn.execute(
            "SELECT granted FROM consent_records WHERE account = ? AND purpose = 'marketing' ORDER BY id DESC LIMIT 1",
            (code,),
        ).fetchone()
        return None if row is None else bool(row[0])

    def record_consent(
        self, code: str, granted: bool, source: str, policy_version: str | None, evidence: str | None
    ) -> ConsentRecord:
        """Append one grant or withdrawal to the account's consent history."""
        cur = self._conn.execute(
            "INSERT INTO consent_records (account, purpose, granted, recorded_at, source, policy_version, evidence)"
            " VALUES (?, 'marketing', ?, ?, ?, ?, ?)",
            (code, int(granted), to_db(self.now), source, policy_version, evidence),
        )
        return ConsentRecord(int(cur.lastrowid or 0), code, granted, self.now, source, policy_version, evidence)

    def marketing_suppression(self, address: str) -> str | None:
        """Why ``address`` gets no marketing (plain or erased form on the list): :meth:`marketing_suppressed`."""
        return self.marketing_suppressed(address)

    def add_marketing_suppression(self, address: str, reason: str) -> bool:
        """Put ``address`` on the marketing suppression list; False if it already was (reason kept)."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO marketing_suppressions (address, reason, created_at) VALUES (lower(?), ?, ?)",
            (address, reason, to_db(self.now)),
        )
        return cur.rowcount == 1

    def remove_marketing_suppression(self, address: str) -> bool:
        cur = self._conn.execute("DELETE FROM marketing_suppressions WHERE address = lower(?)", (address,))
        return cur.rowcount == 1

    def policy(self, version: str) -> Policy | None:
        row = self._conn.execute(
            f"SELECT {_POLICY_COLUMNS} FROM policies WHERE version = ?",  # noqa: S608 - constant columns
            (version,),
        ).fetchone()
        return None if row is None else _policy(row)

    def publish_policy(self, policy: Policy) -> bool:
        """Archive a version (immutable afterwards: the table's triggers refuse UPDATE and DELETE)."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO policies (version, sha256, text, summary, effective_on, published_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                policy.version,
                policy.sha256,
                policy.text,
                policy.summary,
                policy.effective_on.isoformat(),
                to_db(policy.published_at),
            ),
        )
        return cur.rowcount == 1

    def policy_in_force(self, day: str) -> str | None:
        """The version in force on local ``day`` (ISO): the latest effective on or before it."""
        row = self._conn.execute(
            "SELECT version FROM policies WHERE effective_on <= ? ORDER BY effective_on DESC, published_at DESC"
            " LIMIT 1",
            (day,),
        ).fetchone()
        return None if row is None else str(row[0])

    def broadcast(self, broadcast_id: str) -> tuple[str, str] | None:
        """(kind, params JSON) of a broadcast already started under this id."""
        row = self._conn.execute("SELECT kind, params FROM broadcasts WHERE id = ?", (broadcast_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def start_broadcast(self, broadcast_id: str, kind: str, params: str) -> bool:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO broadcasts (id, kind, params, created_at) VALUES (?, ?, ?, ?)",
            (broadcast_id, kind, params, to_db(self.now)),
        )
        return cur.rowcount == 1

    def finish_broadcast(self, broadcast_id: str, recipients: int, skipped: int) -> None:
        self._conn.execute(
            "UPDATE broadcasts SET recipients = ?, skipped = ? WHERE id = ?", (recipients, skipped, broadcast_id)
        )

    def candidates(self, after: str | None, limit: int) -> list[Candidate]:
        """Up to ``limit`` accounts with codes after ``after`` (code order), with their consent and
        suppressions (an address in either form: plain, or hashed by an erasure): one chunk of a
        broadcast, read in the unit of work that enqueues it."""
        rows = self._conn.execute(
            """SELECT a.data,
                      (SELECT c.granted FROM consent_records c
                        WHERE c.account = a.code AND c.purpose = 'marketing' ORDER BY c.id DESC LIMIT 1),
                      EXISTS (SELECT 1 FROM marketing_suppressions m
                               WHERE m.address IN (lower(json_extract(a.data, '$.email')),
                                                   address_hash(json_extract(a.data, '$.email')))),
                      EXISTS (SELECT 1 FROM suppressions s
                               WHERE s.address IN (lower(json_extract(a.data, '$.email')),
                                                   address_hash(json_extract(a.data, '$.email')))
                                 AND s.suppressed_at IS NOT NULL)
               FROM accounts a WHERE a.code > ? ORDER BY a.code LIMIT ?""",
            (after or "", limit),
        ).fetchall()
        return [
            Candidate(account_from_json(r[0]), None if r[1] is None else bool(r[1]), bool(r[2]), bool(r[3]))
            for r in rows
        ]

    # ---- data rights and retention (SQL in adapters/storage/privacy.py) ---------------------

    def _erased(self, code: str | None) -> bool:
        """Whether ``code`` names an erased account: no mail is ever queued for one."""
        if code is None:
            return False
        account = self.get_account(code)
        return account is not None and account.erased

    def marketing_suppressed(self, address: str) -> str | None:
        """The reason ``address`` must get no marketing (plain or, after an erasure, hashed), or None.

        Marketing only; :meth:`suppression` is the bounce list that stops every mail.
        """
        row = self._conn.execute(
            "SELECT reason FROM marketing_suppressions WHERE address IN (?, ?)", address_forms(address)
        ).fetchone()
        return str(row[0]) if row else None

    def erased_leg(self, call: CallEnded) -> bool:
        """Whether ``call`` is a leg without an account code carrying a number erased after the call
        started (:func:`~clickphone_agi.domain.privacy.erased_leg`), from the writer's cache: no
        statement, and no hashing while nothing was erased or the call started after the last erasure."""
        if call.account:
            return False
        erased = self._erased_numbers()
        if not erased or call.start >= self._cache.erased_until:
            return False
        return erased_leg(call.account, (call.source, call.destination), call.start, erased, self._numbers_key())

    def box_erased_at(self, box: str) -> datetime | None:
        """When voicemail box ``box`` (``mailbox@context``) was last erased with its account, or None;
        from the writer's cache: no statement, and no hashing while nothing was erased."""
        erased = self._erased_numbers()
        if not erased:
            return None
        return erased.get(number_digest(self._numbers_key(), box))

    def _erased_numbers(self) -> dict[str, datetime]:
        """Every erased number's digest with when it was erased, read once into the writer's cache."""
        cache = self._cache
        if cache.erased_numbers is None:
            rows = self._read.execute("SELECT digest, erased_at FROM erased_numbers").fetchall()
            cache.erased_numbers = {str(digest): from_db(str(at)) for digest, at in rows}
            cache.erased_until = max(cache.erased_numbers.values(), default=_NEVER)
        return cache.erased_numbers

    def _numbers_key(self) -> bytes:
        """The database's key of the erased numbers' digests (made by migration 10)."""
        cache = self._cache
        if cache.numbers_key is None:
            row = self._read.execute("SELECT value FROM meta WHERE key = 'erased_numbers_key'").fetchone()
            if row is None:
                raise StorageError("the database has no erased_numbers_key: run 'clickphone-agi db migrate'")
            cache.numbers_key = bytes.fromhex(str(row[0]))
        return cache.numbers_key

    def erase_account(
        self,
        code: str,
        *,
        forms: Callable[[str], tuple[str, ...]],
        outbox_ids: Collection[int],
        outbox_seen_up_to: int,
        salt: bytes,
    ) -> dict[str, Any] | None:
        """Anonymise account ``code`` (see :mod:`~clickphone_agi.adapters.storage.privacy`); None if unknown.

        Raises :class:`~clickphone_agi.adapters.storage.privacy.ErasureDeferred` while this batch
        still holds deferred rows of the account (written only at COMMIT): the caller retries.
        """
        batch = self._batch
        cache = self._cache
        numbers = privacy_sql.account_numbers(self._read, code, forms)
        # the deferred rows erasure would miss: the account's own, and legs without an account
        # code that carry one of its numbers (the erasure's SQL blanks those too)
        spellings = set(numbers)
        boxes = privacy_sql.account_boxes(self._read, code)
        if (
            any(row[2] == code or (not row[2] and {row[6], row[7]} & spellings) for row in batch.cdrs.values())
            or any(privacy_sql.names_box(key, boxes) for key in batch.events)
            or any(row[0] == code for row in batch.ledger.values())
            or any(row[1] == code for row in batch.rated.values())
        ):
            raise privacy_sql.ErasureDeferred(code)
        self._reserved()
        held = list(cache.held.get(code, ()))  # the cache has this batch's too
        erased = self._erased_numbers()  # read before the unit writes: its undo then leaves the cache right
        key = self._numbers_key()
        # a box is kept erased like a number (often it is one): its old messages stay unmailed
        digests = sorted({number_digest(key, name) for name in (*numbers, *boxes)})
        done = privacy_sql.erase_account(
            self._conn, code, forms=forms, outbox_ids=sorted(outbox_ids), outbox_seen_up_to=outbox_seen_up_to,
            now_db=batch.now_db, salt=salt, number_digests=digests,
        )  # fmt: skip
        if done is None:
            return None
        for call_id in held:
            self.release(call_id)
        done["reservations"] = len(held)
        # the writer's cache must see the erased account and numbers from the next statement on
        row = self._conn.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
        batch.put(cache.accounts, code, account_from_json(row[0]))
        erased_at = from_db(batch.now_db)  # as stored
        cache.erased_until = max(cache.erased_until, erased_at)
        for digest in digests:
            batch.put(erased, digest, max(erased.get(digest, erased_at), erased_at))
        return done

    def purge_window(self, step: str, cutoff: datetime, after: str | None, limit: int) -> tuple[int, str | None]:
        """One retention window of ``step`` (processed_events, cdrs, rated_calls, api_requests,
        erased_numbers)."""
        deleted, nxt = privacy_sql.purge_window(self._conn, step, to_db(cutoff), after, limit)
        if step == "erased_numbers" and deleted:
            self._cache.erased_numbers = None  # read again at the next use, without the purged digests
        return deleted, nxt

    def purge_bodies_window(
        self, cutoff: datetime, after: int, limit: int, at_once: frozenset[str]
    ) -> tuple[int, int | None]:
        """One retention window of outbox bodies (finished rows only; never pending)."""
        return privacy_sql.purge_outbox_bodies_window(
            self._conn, to_db(cutoff), after, limit, at_once, now_db=self._batch.now_db
        )

    def drop_body(self, row_id: int) -> None:
        """Forget a finished row's body and template data at once (a reset link, payment details)."""
        self._conn.execute(
            "UPDATE outbox SET message = NULL, payload = NULL WHERE id = ? AND status != 'pending'", (row_id,)
        )


_POLICY_COLUMNS = "version, text, summary, effective_on, published_at"


def _policy(row: sqlite3.Row | tuple[Any, ...]) -> Policy:
    return Policy(
        version=str(row[0]),
        text=bytes(row[1]),
        summary=str(row[2]),
        effective_on=date.fromisoformat(row[3]),
        published_at=from_db(row[4]),
    )


@dataclass
class _Job:
    """One :meth:`SqliteStore.write` (``works`` is None) or one :meth:`SqliteStore.write_many`
    group (``work`` unused): its units, and the keys to read ahead for their claims."""

    work: Callable[[WriteTx], Any] | None
    future: asyncio.Future[Any]
    works: list[Callable[[WriteTx], Any]] | None = None
    prefetch: list[str] | None = None
    encoded: dict[str, _Encoded] | None = None
    durable: bool = True  # False: may commit relaxed (see _Durability)

    @property
    def size(self) -> int:
        return 1 if self.works is None else len(self.works)


@dataclass
class _Steal:
    """The urgent lane as the writer's thread watches it during a batch (see :func:`_run_batch`)."""

    lane: collections.deque[_Job]
    report: Callable[[list[_Job], list[Any], int], None]  # jobs committed mid-batch, their outcomes
    taken: list[_Job] = field(default_factory=list)  # every job taken from the lane


class _Durability:
    """How the writer connection makes a commit durable, and the thread that finishes the job
    for relaxed ones.

    FULL (money, mail, everything by default): ``COMMIT`` returns after the WAL's fsync.
    Relaxed, for a batch of only ``durable=False`` writes (``authorize`` reservations): the
    connection is switched to ``synchronous=NORMAL`` (SQLite refuses the switch inside a
    transaction, so it is made before ``BEGIN``, and only when the level changes), and ``COMMIT``
    writes the WAL without an fsync. That commit survives a crash or kill of the daemon at once
    (the WAL is in the kernel's page cache) and power loss once the WAL file is synced: by this
    thread, within :data:`WAL_SYNC_INTERVAL`, or earlier by the next FULL commit or checkpoint.

    Why: at a thousand ``authorize`` calls a second the fsync made most of each batch, kept the
    writer's thread busy 80-90 % of the time and queued the calls behind each other. A
    reservation protects the budget of a call in progress; a power cut ends those calls too.
    Syncing the WAL here, a few times a second, also keeps SQLite's checkpoints short: a
    checkpoint must first sync all the WAL it copies, and several MB of it stalled the writer for
    10-20 ms.
    """

    def __init__(self, wal: Path, interval: float = WAL_SYNC_INTERVAL) -> None:
        self.level = "FULL"  # the writer connection's PRAGMA synchronous (connect_sync sets FULL)
        self._wal = wal
        self._interval = interval
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.syncs = 0
        self.failures = 0

    def use(self, conn: sqlite3.Connection, *, relaxed: bool) -> None:
        """Before ``BEGIN``, on the writer's thread: the level this batch commits with."""
        level = "NORMAL" if relaxed else "FULL"
        if level != self.level:
            conn.execute(f"PRAGMA synchronous = {level}")
            self.level = level

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="db-wal-sync", daemon=True)
            self._thread.start()

    def request(self) -> None:
        """A relaxed commit happened: sync the WAL soon (thread-safe, never blocks)."""
        self._wanted.set()

    def committed(self, *, mail: bool) -> None:
        """After a relaxed ``COMMIT``, on the writer's thread: sync soon, or now if it enqueued mail
        (so mail is durable before anyone is told it committed). The commit stands either way: a
        failed sync is logged and left to the thread to try again, not reported as a failed commit."""
        if mail:
            try:
                self.sync()
                return
            except OSError as exc:
                self._failed(exc)
        self.request()

    def _failed(self, exc: OSError) -> None:
        with self._lock:
            self.failures += 1
        log.error("db.wal_sync_failed", path=str(self._wal), error=str(exc))

    def sync(self) -> None:
        """fsync the WAL file now (on the calling thread): every commit written to it is durable.

        Opened by name each time: SQLite may truncate or recreate the file, and ``fdatasync``
        flushes the file whichever descriptor wrote its pages.
        """
        try:
            fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # checkpointed and deleted at a close: nothing left to sync
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self.syncs += 1

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            self._wanted.clear()
            pause = self._interval
            try:
                self.sync()
            except OSError as exc:
                self._failed(exc)
                self._wanted.set()  # what it was asked to sync is still not durable: try again
                pause = max(pause, RETRY_FAILED_SYNC)  # not a log line every 10 ms
            if self._stopping.wait(pause):
                return

    def stop(self) -> None:
        """Stop the thread after a last sync of whatever it was asked to sync."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wanted.set()
        thread.join()
        try:
            self.sync()
        except OSError as exc:
            self._failed(exc)


def _run_batch(
    conn: sqlite3.Connection,
    jobs: list[_Job],
    now: datetime,
    cache: _WriterCache | None = None,
    *,
    steal: _Steal | None = None,
    durability: _Durability | None = None,
    relaxed: bool = False,
) -> tuple[list[_Job], list[Any], int]:
    """One transaction for the batch, a savepoint per unit that runs SQL; runs on the writer's thread.

    The units' deferred writes are flushed just before COMMIT (:class:`_Batch`); ``cache`` is the
    writer's :class:`_WriterCache` (a throwaway one when None).

    ``steal`` watches the store's urgent lane (the mail sender's "sent" marks) between jobs: jobs
    found there join the transaction at once and it commits, ``steal.report`` is told of every
    job done so far, and the rest of the batch goes on in a new transaction. A mark thus waits
    for one job of the batch in flight, not for all of it: a crash in between sends its mail again.

    ``relaxed`` (with ``durability``): commit with ``synchronous=NORMAL`` and have the WAL synced
    soon after, or at once if the batch enqueued mail (:class:`_Durability`). A relaxed batch takes
    no urgent jobs: a mark waits for it (it is short), then commits FULL in a batch of its own.

    Returns the jobs not reported, each one's outcome (an ``(ok, value)`` pair, a
    list of them for a :meth:`SqliteStore.write_many` group) and how many outbox rows they enqueued.
    """
    if cache is None:
        cache = _WriterCache()
    if relaxed:
        assert durability is not None, "a relaxed batch needs the thread that syncs the WAL"
        steal = None
    if durability is not None:
        durability.use(conn, relaxed=relaxed)
    done: list[_Job] = []  # jobs of the transaction open now
    outcomes: list[Any] = []
    enqueued = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        batch = _begin(conn, cache, now, jobs)
        for index, job in enumerate(jobs):
            if steal is not None and steal.lane:
                stolen = []
                while steal.lane:  # this thread is the only one taking from it during a batch
                    stolen.append(steal.lane.popleft())
                steal.taken.extend(stolen)
                for extra in stolen:
                    outcome, added = _run_job(conn, now, batch, extra)
                    done.append(extra)
                    outcomes.append(outcome)
                    enqueued += added
                _commit(conn, batch)
                steal.report(done, outcomes, enqueued)
                done, outcomes, enqueued = [], [], 0
                conn.execute("BEGIN IMMEDIATE")
                batch = _begin(conn, cache, now, jobs[index:])
            outcome, added = _run_job(conn, now, batch, job)
            done.append(job)
            outcomes.append(outcome)
            enqueued += added
        _commit(conn, batch)
        if relaxed and durability is not None:
            durability.committed(mail=bool(enqueued))
    except BaseException:
        cache.clear()  # it may hold what is being rolled back
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return done, outcomes, enqueued


def _run_job(conn: sqlite3.Connection, now: datetime, batch: _Batch, job: _Job) -> tuple[Any, int]:
    """A job's outcome (a list of them for a group) and the outbox rows its units enqueued."""
    if job.works is None:
        assert job.work is not None
        return _run_unit(conn, now, batch, job.work)
    group, enqueued = [], 0
    for work in job.works:
        outcome, added = _run_unit(conn, now, batch, work)
        group.append(outcome)
        enqueued += added
    return group, enqueued


def _begin(conn: sqlite3.Connection, cache: _WriterCache, now: datetime, jobs: list[_Job]) -> _Batch:
    """The deferred writes of a transaction just begun, with the claims of ``jobs`` read ahead."""
    cache.validate(conn)
    batch = _Batch(cache, now)
    prefetch = [key for job in jobs if job.prefetch for key in job.prefetch]
    if prefetch:
        batch.prefetch_claims(conn, prefetch)
    for job in jobs:
        if job.encoded:
            batch.encoded.update(job.encoded)
    return batch


def _commit(conn: sqlite3.Connection, batch: _Batch) -> None:
    batch.flush(conn)
    crash_point("writer.before_commit")
    conn.execute("COMMIT")
    crash_point("writer.after_commit")


def _run_unit(
    conn: sqlite3.Connection, now: datetime, batch: _Batch, work: Callable[[WriteTx], Any]
) -> tuple[tuple[bool, Any], int]:
    """One unit of work inside the batch's transaction: ((ok, result or exception), rows enqueued)."""
    tx = SqliteTx(conn, now, batch)  # opens the savepoint "unit" when it first needs it
    try:
        result = work(tx)
    except Exception as exc:
        if tx.savepoint:
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
        batch.undo()
        if is_unavailable(exc) and not isinstance(exc, StorageUnavailable):  # the disk, not the unit
            exc = DatabaseUnavailable(str(exc))
        outcome: tuple[bool, Any] = (False, exc)
        added = 0
    else:
        if tx.savepoint:
            conn.execute("RELEASE unit")
        batch.keep()
        outcome = (True, result)
        added = tx.enqueued
    if tx.savepoint and batch.claims:  # its SQL may have claimed or booked: read them again
        batch.claims.clear()  # read again, one key at a time, for the rest of the batch
    crash_point("writer.after_unit")
    return outcome, added


def _settle(jobs: list[_Job], outcomes: list[Any]) -> None:
    """Hand each job its outcome: a value or exception, or a write_many group's list of them."""
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.future.done():
            continue
        if job.works is not None:  # a write_many group: its units' outcomes, failures included
            group = outcome if isinstance(outcome, list) else [outcome] * len(job.works)  # all failed with COMMIT
            job.future.set_result(group)
            continue
        ok, value = outcome
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


async def _connected(conn: aiosqlite.Connection) -> aiosqlite.Connection:
    """``await conn``, and when the connection fails (a refused file, say) wait for aiosqlite's
    thread to stop: it reports its stop to this event loop, and a test or a CLI that closes the
    loop first makes that thread die with "Event loop is closed"."""
    try:
        return await conn
    except BaseException:
        thread = getattr(conn, "_thread", None)
        if isinstance(thread, threading.Thread) and thread.is_alive():
            await asyncio.to_thread(thread.join, 5.0)
        raise


class SqliteStore:
    """The SQLite :class:`~clickphone_agi.ports.Store`.

    Open with :meth:`open` (migrates unless told not to), start the writer with :meth:`start`
    inside the event loop that will use it, and :meth:`close` to drain queued writes.
    """

    def __init__(
        self,
        path: Path,
        clock: Clock,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        main_file: Path | None = None,
    ) -> None:
        self.path = path
        self._clock = clock
        self._writer = writer
        self._reader = reader
        # the lanes the writer's thread drains (see _drain); the loop appends under _lanes_lock
        self._lanes_lock = threading.Lock()
        self._queue: collections.deque[_Job | None] = collections.deque()  # None: stop after what is before it
        self._urgent: collections.deque[_Job] = collections.deque()  # committed ahead of the queue
        self._draining = False  # a _drain hop is queued or running on the writer's thread
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(): where jobs are settled
        self._closing = False
        self._stopped: asyncio.Future[None] | None = None
        # the WAL sits beside the file SQLite opened: through a symlink, that is the link's target
        self._durability = _Durability(Path(f"{main_file or path}-wal"))
        self.commits = 0
        self.units = 0
        self.relaxed_commits = 0  # of them, committed with synchronous=NORMAL (see _Durability)
        self.on_outbox: Callable[[], None] | None = None
        self._cache = _WriterCache()  # used on the writer's thread only, inside _run_batch

    @classmethod
    async def open(cls, path: Path, clock: Clock, *, busy_timeout: float = 5.0, do_migrate: bool = True) -> SqliteStore:
        def factory() -> sqlite3.Connection:
            return connect_sync(path, busy_timeout)

        writer = await _connected(aiosqlite.Connection(factory, iter_chunk_size=64))
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
            main_file = await _call(writer, _main_file)
            reader = await _connected(
                aiosqlite.Connection(lambda: connect_sync(path, busy_timeout, readonly=True), iter_chunk_size=64)
            )
        except BaseException:
            await writer.close()
            raise
        return cls(path, clock, writer, reader, main_file)

    def start(self) -> None:
        """Let writes in; their jobs are settled on the running event loop."""
        if self._loop is None:
            self._durability.start()
            self._loop = asyncio.get_running_loop()

    @property
    def wal_syncs(self) -> int:
        """WAL syncs made for relaxed commits (by the sync thread or inline)."""
        return self._durability.syncs

    def stats(self) -> dict[str, int]:
        """The writer's counters, for ``status`` and ``/metrics``."""
        return {
            "commits": self.commits,
            "units": self.units,
            "relaxed_commits": self.relaxed_commits,
            "wal_syncs": self._durability.syncs,
            "wal_sync_failures": self._durability.failures,
        }

    async def write(self, work: Callable[[WriteTx], T], *, urgent: bool = False, durable: bool = True) -> T:
        """Run ``work`` as one unit of work in the next batch; an ``urgent`` one goes in a batch of
        its own ahead of everything queued (a mail's "sent" mark: see :meth:`_drain`). A batch of
        only ``durable=False`` units commits relaxed (:class:`_Durability`)."""
        future: asyncio.Future[T] = self._running_loop().create_future()
        self._submit(_Job(work, future, durable=durable), urgent=urgent)
        return await future

    async def write_many(
        self,
        works: Sequence[Callable[[WriteTx], T]],
        *,
        prefetch_claims: Sequence[str] = (),
        records: Sequence[tuple[CallEnded, RatedCall | None]] = (),
    ) -> list[T | Exception]:
        """Run each of ``works`` as its own unit of work, in order, in one transaction.

        The same as ``gather(*(write(w) for w in works), return_exceptions=True)`` with one queue
        entry and one future for all of them: a burst of CDRs costs the event loop almost nothing
        per CDR. ``prefetch_claims`` names the idempotency keys the units will claim, read ahead
        in a few statements instead of one each; the rows of ``records`` (CDRs and their ratings)
        are encoded here, on the event loop, instead of on the writer's thread.
        """
        loop = self._running_loop()
        if not works:
            return []
        future: asyncio.Future[list[tuple[bool, Any]]] = loop.create_future()
        encoded = _encode(records) if records else None
        self._submit(_Job(None, future, list(works), list(prefetch_claims) or None, encoded))
        return [value for _, value in await future]

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._closing:
            raise StorageError("store writer is not running")
        return self._loop

    def _submit(self, job: _Job | None, *, urgent: bool = False) -> None:
        """Queue ``job`` (None: stop) and, unless the writer's thread is draining, start it."""
        with self._lanes_lock:
            if job is not None and urgent:
                self._urgent.append(job)
            else:
                self._queue.append(job)
            if self._draining:
                return  # the drain takes it before it stops: it looks under the same lock
            self._draining = True
        self._writer._tx.put_nowait((None, self._drain))  # aiosqlite's own hop, without a future (see _call)

    def _drain(self) -> None:
        """Batch after batch, in queue order, urgent jobs first; runs on the writer's thread.

        One hop of the writer's thread runs every batch queued and takes new jobs as they come,
        until both lanes are empty. A write thus costs the event loop no hop of its own and no
        turn to resume a writer task, only the ``call_soon_threadsafe`` that settles its
        transaction's jobs. If another hop waits for this thread (a checkpoint), the drain goes
        to the back of its queue between two batches.

        The urgent lane is for the SMTP sender's "sent" marks: between a relay's 250 and the
        commit of its mark, a crash means the mail goes again. Behind a backlog of CDR groups
        that window was several batches long. A mark queued between batches goes in a batch of
        its own, ahead of the queue, and one queued while a FULL batch runs joins that batch
        after the job running (see :func:`_run_batch`).
        """
        loop = self._loop
        assert loop is not None
        try:
            self._drain_lanes(loop)
        except BaseException:  # a bug, or the loop closed under it
            with self._lanes_lock:
                # jobs queued meanwhile got no hop of their own (a drain was running): start one
                again = bool(self._queue or self._urgent) and not loop.is_closed()
                self._draining = again
            log.exception("db.writer_drain_failed")
            if again:
                self._writer._tx.put_nowait((None, self._drain))
            raise

    def _drain_lanes(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lanes_lock:
                urgent = bool(self._urgent)
                if urgent:
                    jobs, stop = list(self._urgent), False
                    self._urgent.clear()
                elif self._queue:
                    jobs, stop = self._take_batch()
                else:
                    self._draining = False
                    return
            if jobs:
                # urgent jobs queued while an urgent batch runs wait for the next one: in submit order
                self._run_jobs(loop, jobs, steal=not urgent)
            if stop:
                with self._lanes_lock:
                    self._draining = False
                loop.call_soon_threadsafe(self._drained)
                return
            if not self._writer._tx.empty():  # another hop waits for this thread: let it run first
                self._writer._tx.put_nowait((None, self._drain))
                return

    def _run_jobs(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], *, steal: bool = True) -> None:
        """One batch (on the writer's thread); its jobs are settled on the loop."""
        stealing = _Steal(self._urgent, functools.partial(self._report, loop)) if steal else None
        relaxed = not any(job.durable for job in jobs)
        try:
            tail, outcomes, enqueued = _run_batch(
                self._writer._conn,
                jobs,
                self._clock.now(),
                self._cache,
                steal=stealing,
                durability=self._durability,
                relaxed=relaxed,
            )
        except BaseException as exc:
            # BEGIN or COMMIT failed, or a unit raised past Exception: every unit of that
            # transaction failed with it (the jobs of a transaction committed before it were
            # settled already, and are skipped); nobody waits for them forever
            taken = stealing.taken if stealing is not None else []
            failure = exc if isinstance(exc, Exception) else StorageError(f"writer interrupted: {exc!r}")
            loop.call_soon_threadsafe(self._failed, [*jobs, *taken], failure)
            if not isinstance(exc, Exception):
                raise
        else:
            loop.call_soon_threadsafe(self._committed, tail, outcomes, enqueued, relaxed)

    def _take_batch(self) -> tuple[list[_Job], bool]:
        """The queue's first jobs, up to MAX_BATCH units, for one transaction; True after the stop."""
        jobs: list[_Job] = []
        units = 0
        queue = self._queue
        while queue and units < MAX_BATCH:
            job = queue.popleft()
            if job is None:
                return jobs, True
            jobs.append(job)
            units += job.size
        return jobs, False

    def _report(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], outcomes: list[Any], enqueued: int) -> None:
        """A transaction committed in the middle of a batch (on the writer's thread)."""
        loop.call_soon_threadsafe(self._committed, jobs, outcomes, enqueued, False)

    def _committed(self, jobs: list[_Job], outcomes: list[Any], enqueued: int, relaxed: bool) -> None:
        """Settle the jobs of a committed transaction; wake the mail sender if they enqueued mail."""
        self.commits += 1
        self.relaxed_commits += relaxed
        self.units += sum(job.size for job in jobs)
        if enqueued and self.on_outbox is not None:
            self.on_outbox()  # committed mail is delivered now, not at the next poll
        _settle(jobs, outcomes)

    def _failed(self, jobs: list[_Job], exc: Exception) -> None:
        pending = [job for job in jobs if not job.future.done()]
        log.error("db.commit_failed", error=str(exc), units=len(pending))
        kind = DatabaseUnavailable if is_unavailable(exc) else StorageError
        _settle(pending, [(False, kind(f"commit failed: {exc}"))] * len(pending))

    def _drained(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def close(self) -> None:
        """Finish every queued write, then close both connections."""
        if self._loop is not None and not self._closing:
            self._closing = True
            self._stopped = self._loop.create_future()
            self._submit(None)
            await self._stopped
            await asyncio.to_thread(self._durability.stop)
        await self._reader.close()
        await self._writer.close()

    # ---- reads -------------------------------------------------------------------------------

    async def _fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """All rows of one read, in one hop to the reader's thread.

        Never an ``execute`` hop then a ``fetchall`` hop: between the two the statement is open,
        so the connection's read transaction is too, and a read another task queued meanwhile
        runs in that snapshot, older than commits it should see. The mail sender's due-mail read
        then returned a row whose "sent" mark had committed, and sent it again.
        """
        return await _call(self._reader, _read_all, sql, params)

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

    async def due_mail(
        self, now: datetime, limit: int, exclude: Collection[int] = (), bulk_limit: int | None = None
    ) -> list[DueMail]:
        skip = sorted(exclude)  # rows already in the sender's hands: not read again
        marks = ", ".join("?" * len(skip))
        due = f"status = 'pending' AND next_attempt_at <= ? AND id NOT IN ({marks})"
        bulk_params: tuple[Any, ...] = ()
        if bulk_limit is None:
            bulk = ""
        elif bulk_limit <= 0:
            bulk = " AND bulk = 0"
        else:
            # the oldest ``bulk_limit`` due bulk rows only (the index outbox_due_bulk serves both parts)
            bulk = (
                f" AND (bulk = 0 OR id IN (SELECT id FROM outbox WHERE {due} AND bulk = 1"  # noqa: S608 - ? marks
                " ORDER BY next_attempt_at, id LIMIT ?))"
            )
            bulk_params = (to_db(now), *skip, bulk_limit)
        rows = await self._fetchall(
            f"SELECT {_OUTBOX_COLUMNS}, payload, message, retried_at, {_SEND_STOP}"  # noqa: S608 - constants, ? marks
            f" FROM outbox WHERE {due}{bulk}"
            " ORDER BY bulk, next_attempt_at, id LIMIT ?",  # bulk mail after everything else due
            (to_db(now), *skip, *bulk_params, limit),
        )
        return [
            DueMail(
                row=replace(_outbox_row(r), payload=json.loads(r[-4]) if r[-4] else None),
                mime=bytes(r[-3] or b""),
                retried_at=from_db(r[-2]) if r[-2] else None,
                suppressed=r[-1],
            )
            for r in rows
        ]

    async def send_stop(self, row_id: int) -> str | None:
        rows = await self._fetchall(f"SELECT {_SEND_STOP} FROM outbox WHERE id = ?", (row_id,))  # noqa: S608
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    async def next_due_after(self, moment: datetime) -> datetime | None:
        rows = await self._fetchall(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending' AND next_attempt_at > ?",
            (to_db(moment),),
        )
        return from_db(rows[0][0]) if rows and rows[0][0] else None

    async def mail_metrics(self, now: datetime) -> dict[str, Any]:
        rows = await self._fetchall(
            """SELECT kind, status, COUNT(*),
                      SUM(CASE WHEN attempts > 1 OR (status = 'pending' AND attempts > 0) THEN 1 ELSE 0 END),
                      SUM(CASE WHEN status = 'dead' AND last_error LIKE 'suppressed:%' THEN 1 ELSE 0 END),
                      MIN(created_at)
               FROM outbox GROUP BY kind, status"""
        )
        suppressed_addresses = await self._fetchall("SELECT COUNT(*) FROM suppressions WHERE suppressed_at IS NOT NULL")
        return outbox_metrics(rows, now, int(suppressed_addresses[0][0]))

    async def event_count(self, kind: str | None = None) -> int:
        if kind is None:
            rows = await self._fetchall("SELECT COUNT(*) FROM processed_events")
        else:
            rows = await self._fetchall("SELECT COUNT(*) FROM processed_events WHERE kind = ?", (kind,))
        return int(rows[0][0])

    async def has_event(self, key: str) -> bool:
        """Whether an idempotency key was already claimed (skips re-rendering known notices)."""
        rows = await self._fetchall("SELECT 1 FROM processed_events WHERE key = ?", (key,))
        return bool(rows)

    async def outbox_status(self, key: str) -> str | None:
        """The status of the outbox row queued under ``key`` (``None``: no such row)."""
        rows = await self._fetchall("SELECT status FROM outbox WHERE idempotency_key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetchall("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def calls(self, account: str | None = None) -> list[dict[str, Any]]:
        """Stored CDRs, oldest first (tests, export)."""
        sql = "SELECT * FROM cdrs WHERE ? IS NULL OR account = ? ORDER BY end_at, key"

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = conn.execute(sql, (account, account))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return await _call(self._reader, read)

    async def event_counts(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT kind, COUNT(*) FROM processed_events GROUP BY kind")
        return {str(r[0]): int(r[1]) for r in rows}

    # ---- consent, policies, the notification audit trail (reads) ------------------------------

    async def consent_history(self, code: str, limit: int = 500) -> list[ConsentRecord]:
        """The account's consent records, newest first."""
        rows = await self._fetchall(
            "SELECT id, account, granted, recorded_at, source, policy_version, evidence FROM consent_records"
            " WHERE account = ? AND purpose = 'marketing' ORDER BY id DESC LIMIT ?",
            (code, limit),
        )
        return [ConsentRecord(int(r[0]), str(r[1]), bool(r[2]), from_db(r[3]), r[4], r[5], r[6]) for r in rows]

    async def marketing_suppression(self, address: str) -> str | None:
        rows = await self._fetchall(
            "SELECT reason FROM marketing_suppressions WHERE address IN (?, ?)", address_forms(address)
        )
        return str(rows[0][0]) if rows else None

    async def policies(self) -> list[dict[str, Any]]:
        """Every archived version without its text, newest effective date first."""
        rows = await self._fetchall(
            "SELECT version, sha256, effective_on, published_at, length(text) FROM policies"
            " ORDER BY effective_on DESC, published_at DESC"
        )
        return [
            {
                "version": r[0],
                "sha256": r[1],
                "effective_on": r[2],
                "published_at": from_db(r[3]).isoformat(),
                "bytes": int(r[4]),
            }
            for r in rows
        ]

    async def policy(self, version: str) -> Policy | None:
        rows = await self._fetchall(
            f"SELECT {_POLICY_COLUMNS} FROM policies WHERE version = ?",  # noqa: S608 - constant columns
            (version,),
        )
        return _policy(rows[0]) if rows else None

    async def notifications(self, code: str, limit: int, before: int | None) -> list[OutboxRow]:
        """One account's outbox rows, newest first, ids below ``before`` (no bodies)."""
        rows = await self._fetchall(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox"  # noqa: S608 - constant column list
            " WHERE account = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (code, before if before is not None else 2**63 - 1, limit),
        )
        return [_outbox_row(r) for r in rows]

    # ---- data rights, retention, status -------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the read-only connection, in one thread hop (exports, the erasure's scan)."""
        return await _call(self._reader, fn)

    async def export_account(self, code: str, forms: Callable[[str], tuple[str, ...]]) -> dict[str, Any] | None:
        """Everything stored about an account, one snapshot (``privacy export``); None if unknown."""
        return await self.read(lambda conn: privacy_sql.export_account(conn, code, forms))

    async def erasure_candidates(self, code: str) -> tuple[list[int], int]:
        """The outbox rows an erasure must visit (found on the reader: the outbox has no index for it)."""
        return await self.read(lambda conn: privacy_sql.outbox_candidates(conn, code))

    async def checkpoint(self, attempts: int = 5) -> tuple[int, int, int]:
        """``wal_checkpoint(TRUNCATE)``: copy the WAL into the database file and empty it.

        After an erasure this removes the old page images from the ``-wal`` file. Runs on the
        writer's thread between batches; a reader in the middle of a query makes it report busy,
        so it is tried a few times. Returns SQLite's (busy, log frames, checkpointed frames).
        """
        result: tuple[int, int, int] = (1, -1, -1)
        for attempt in range(attempts):
            row = await _call(self._writer, lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            result = (int(row[0]), int(row[1]), int(row[2]))
            if result[0] == 0:
                break
            await asyncio.sleep(0.05 * (attempt + 1))
        return result

    async def charges_between(self, start: datetime, end: datetime) -> tuple[int, int]:
        """(calls charged, bani) for calls answered in [start, end) — today's figures for ``status``."""
        rows = await self._fetchall(
            "SELECT COUNT(*), COALESCE(SUM(cost), 0) FROM rated_calls WHERE answered_at >= ? AND answered_at < ?",
            (to_db(start), to_db(end)),
        )
        return int(rows[0][0]), int(rows[0][1])


# Why a queued marketing mail must not go out any more, checked again at every send: an
# unsubscribe, a withdrawal or a suppression after the broadcast queued it still stops it.
_MARKETING_KINDS = ", ".join(f"'{name}'" for name, spec in sorted(KINDS.items()) if spec.category == "marketing")
_MARKETING_STOP = f"""CASE WHEN outbox.kind IN ({_MARKETING_KINDS}) THEN COALESCE(
        (SELECT 'marketing suppression: ' || m.reason FROM marketing_suppressions m
          WHERE m.address IN (lower(outbox.recipient), address_hash(outbox.recipient))),
        CASE WHEN COALESCE((SELECT c.granted FROM consent_records c
                             WHERE c.account = outbox.account AND c.purpose = 'marketing'
                             ORDER BY c.id DESC LIMIT 1), 0) = 0
             THEN 'no marketing consent' END) END"""  # noqa: S608 - kind names from the catalogue
# Why an outbox row must not be sent now: its recipient is suppressed (any kind), or the marketing stop.
_SEND_STOP = f"""COALESCE((SELECT s.reason FROM suppressions s
          WHERE s.address IN (lower(outbox.recipient), address_hash(outbox.recipient))
          AND s.suppressed_at IS NOT NULL), {_MARKETING_STOP})"""  # noqa: S608 - constant SQL

_OUTBOX_COLUMNS = (
    "id, idempotency_key, kind, recipient, account, status, attempts, created_at, expires_at,"
    " next_attempt_at, last_error, smtp_reply, sent_at"
)


_METRIC_STATUSES = ("pending", "sent", "dead", "expired", "bounced", "suppressed")


def outbox_metrics(rows: list[Any], now: datetime, suppressed_addresses: int) -> dict[str, Any]:
    """Fold ``(kind, status, count, retried, suppressed, oldest created_at)`` groups into the status figures.

    ``dead`` counts dead letters to replay; rows not sent because the recipient is suppressed
    (stored as dead with last_error 'suppressed: …') count as ``suppressed`` instead.
    """

    def zero() -> dict[str, int]:
        return dict.fromkeys((*_METRIC_STATUSES, "retried"), 0)

    total = zero()
    by_kind: dict[str, dict[str, int]] = {}
    oldest: str | None = None
    for kind, status, count, retried, suppressed, first in rows:
        figures = by_kind.setdefault(str(kind), zero())
        for target in (total, figures):
            target["retried"] += int(retried or 0)
            if status == "dead":
                target["suppressed"] += int(suppressed or 0)
                target["dead"] += int(count) - int(suppressed or 0)
            elif status in target:
                target[status] += int(count)
        if status == "pending" and (oldest is None or first < oldest):
            oldest = first
    return {
        **total,
        "oldest_pending_age_seconds": None if oldest is None else round((now - from_db(oldest)).total_seconds(), 1),
        "suppressed_addresses": suppressed_addresses,
        "by_kind": by_kind,
    }


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


def _read_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    """Run ``sql`` to its end: no statement is left open, so neither is a read transaction."""
    return conn.execute(sql, params).fetchall()


def _main_file(conn: sqlite3.Connection) -> Path | None:
    """The database file as SQLite opened it (symlinks resolved), from ``PRAGMA database_list``."""
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name == "main" and file:
            return Path(file)
    return None


async def _call(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on the connection's own thread: one hop.

    aiosqlite has no public API for this; ``_execute`` is how its own methods do it (pinned
    to aiosqlite < 0.23 in pyproject.toml, covered by the storage tests). The writer's drain
    (:meth:`SqliteStore._drain`) puts itself on the same thread's queue, ``_tx``, without a future.
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


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists: SQLite then opens it as an empty
    database and gives its journal, WAL and shared-memory files the same mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


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
    _create_private(tmp)  # personal data: not left to the operator's umask (SQLite would make it 0644)
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


def vacuum(db_path: Path, busy_timeout: float = 5.0) -> dict[str, Any]:
    """Give back the space retention freed — the caller must hold the :class:`WriterLock`.

    SQLite reuses the pages purged rows leave free, so the file never grows past its peak but
    never shrinks either; ``VACUUM`` rewrites it to what it holds. The rewrite goes through a
    temporary copy and, in WAL mode, the WAL: about twice the data's size must be free beside
    the database, or nothing is done (a full disk half-way would stop the daemon's writes too).
    """
    if not db_path.exists():
        raise StorageError(f"{db_path}: no such database")
    with _closing(connect_sync(db_path, busy_timeout)) as conn:
        version = check_version(conn, db_path)
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        before = db_path.stat().st_size
        needed = 2 * page_size * (pages - free_pages)
        available = shutil.disk_usage(db_path.parent).free
        if available < needed:
            raise StorageError(
                f"{db_path}: VACUUM needs about {needed} bytes free beside the database, {available} are; nothing done"
            )
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        check = str(conn.execute("PRAGMA quick_check").fetchone()[0])
    if check != "ok":
        raise StorageError(f"{db_path}: quick_check after VACUUM: {check}")
    return {
        "path": str(db_path),
        "schema_version": version,
        "bytes_before": before,
        "bytes_after": db_path.stat().st_size,
        "free_pages_before": free_pages,
    }


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
            # pages purged rows left: reused by new rows; 'clickphone-agi db vacuum' gives them back
            "free_bytes": int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            * int(conn.execute("PRAGMA page_size").fetchone()[0]),
        }
        if version >= 1:
            out["went_live_at"] = conn.execute("SELECT value FROM meta WHERE key='went_live_at'").fetchone()[0]
            out["processed_events"] = conn.execute("SELECT COUNT(*) FROM processed_events").fetchone()[0]
            out["outbox"] = dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
        if version > LATEST_VERSION:
            out["warning"] = str(SchemaTooNew(db_path, version))
        return out


# ---- outbox inspection (CLI, read-only) ------------------------------------------------------

_MAIL_SCHEMA = 4  # envelope_from, bounced_at, retried_at, suppressions
_SUMMARY_HEADERS = ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "Content-Type")


def _outbox_reader(db_path: Path, busy_timeout: float) -> sqlite3.Connection:
    return outbox_reader(db_path, busy_timeout)


def outbox_reader(db_path: Path, busy_timeout: float, *, minimum: int = _MAIL_SCHEMA) -> sqlite3.Connection:
    """A read-only connection for the CLI's direct reads, refused below schema ``minimum``."""
    if not db_path.exists():
        raise StorageError(f"{db_path}: no such database (run 'clickphone-agi db migrate')")
    conn = connect_sync(db_path, busy_timeout, readonly=True)
    version = check_version(conn, db_path)
    if version < minimum:
        conn.close()
        raise StorageError(f"{db_path}: schema version {version} needs migrating: run 'clickphone-agi db migrate'")
    return conn


def outbox_list(
    db_path: Path,
    *,
    status: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    busy_timeout: float = 5.0,
) -> list[dict[str, Any]]:
    """Newest rows first, one line of facts each (``clickphone-agi outbox list``)."""
    with _closing(_outbox_reader(db_path, busy_timeout)) as conn:
        rows = conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox"  # noqa: S608 - constant column list
            " WHERE (? IS NULL OR status = ?) AND (? IS NULL OR kind = ?) ORDER BY id DESC LIMIT ?",
            (status, status, kind, kind, limit),
        ).fetchall()
    out = []
    for r in rows:
        row = _outbox_row(r)
        out.append(
            {
                "id": row.id,
                "kind": row.kind,
                "status": str(row.status),
                "recipient": row.recipient,
                "attempts": row.attempts,
                "created_at": row.created_at.isoformat(),
                "next_attempt_at": row.next_attempt_at.isoformat() if row.status is OutboxStatus.PENDING else None,
                "sent_at": row.sent_at.isoformat() if row.sent_at else None,
                "last_error": row.last_error,
            }
        )
    return out


def outbox_show(db_path: Path, row_id: int, *, body: bool = False, busy_timeout: float = 5.0) -> dict[str, Any] | None:
    """One row: facts, headers summary, last error and SMTP reply; the MIME body only if asked."""
    with _closing(_outbox_reader(db_path, busy_timeout)) as conn:
        r = conn.execute(
            f"SELECT {_OUTBOX_COLUMNS}, payload, message, envelope_from, bounced_at, retried_at"  # noqa: S608
            " FROM outbox WHERE id = ?",
            (row_id,),
        ).fetchone()
        if r is None:
            return None
        row = _outbox_row(r)
        suppression = conn.execute(
            "SELECT reason, hard_bounces, suppressed_at FROM suppressions WHERE address IN (?, ?)",
            address_forms(row.recipient),
        ).fetchone()
    payload, message, envelope_from, bounced_at, retried_at = r[-5:]
    out: dict[str, Any] = {
        "id": row.id,
        "idempotency_key": row.idempotency_key,
        "kind": row.kind,
        "status": str(row.status),
        "recipient": row.recipient,
        "account": row.account,
        "attempts": row.attempts,
        "created_at": row.created_at.isoformat(),
        "expires_at": row.expires_at.isoformat(),
        "next_attempt_at": row.next_attempt_at.isoformat() if row.status is OutboxStatus.PENDING else None,
        "retried_at": retried_at,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "bounced_at": bounced_at,
        "envelope_from": envelope_from,
        "last_error": row.last_error,
        "smtp_reply": row.smtp_reply,
        "recipient_bounces": None
        if suppression is None
        else {"reason": suppression[0], "hard_bounces": suppression[1], "suppressed_at": suppression[2]},
    }
    if message:
        out["size_bytes"] = len(message)
        out["headers"] = _headers_summary(bytes(message))
        if body:
            out["body"] = bytes(message).decode("utf-8", "replace")
    elif payload:
        out["headers"] = None
        out["payload_keys"] = sorted(json.loads(payload))
        out["note"] = "rendered by the sender at its first attempt"
    else:
        out["headers"] = None
        out["note"] = "body purged"
    return out


def _headers_summary(message: bytes) -> dict[str, str | None]:
    from email import policy
    from email.parser import BytesHeaderParser

    try:
        headers = BytesHeaderParser(policy=policy.default).parsebytes(message)
        return {name: (None if headers[name] is None else str(headers[name])) for name in _SUMMARY_HEADERS}
    except Exception as exc:  # a damaged body must not hide the rest of the row
        return {"error": f"unreadable headers: {type(exc).__name__}"}


def _bulk(kind: str) -> int:
    """1 for a bulk kind (a broadcast, a policy notice): sent after every other due mail."""
    spec = KINDS.get(kind)
    return int(spec is not None and spec.bulk)
