"""Billing CDRs rated, charged and committed per second through the batching writer.

N billing CDRs (``CallEnded``, shaped like the billing CDR of the recorded ``answered_call``
session: ANSWERED, last application Dial; distinct keys and unique ids, spread round robin over
``--accounts`` accounts with large balances, destinations over fixed/mobile/international numbers
priced by ``etc/tariffs.yaml``, billable seconds 1-600) go through
:meth:`EventProcessor.handle_many` with a :class:`MoneyService`, as the ingest worker hands them
on during a burst: groups of ``_GROUP`` (128), each in a task of its own, at most ``--chunk`` CDRs
in flight (the worker's ``max_in_flight``). Each CDR is rated on the event loop, then is one unit
of work (claim the key, record the CDR, release the reservation, post the ledger, add the daily
spend, record the rated call, threshold state); a group is one queue entry on the writer, its
keys' claims are read ahead with a few ``IN (...)`` queries, and the writer batches what is
queued into one transaction (up to ``MAX_BATCH`` units), writing their rows with a few
multi-row ``INSERT``s per table before COMMIT; their ``cdrs`` and ``rated_calls`` rows are
encoded on the event loop (``write_many``'s ``records`` hint). The
store is a real :class:`SqliteStore` (WAL, synchronous=FULL) in a temp dir; logging at
``--log-level`` (default info, as shipped) rendered as JSON to /dev/null.

Baseline, in the same run: raw aiosqlite, ``executemany`` of N prepared rows into a table shaped
like ``cdrs`` (same columns, same two indexes, WITHOUT ROWID), one transaction, same pragmas.

The store runs also report CPU time per CDR: the event loop's thread, the SQLite writer's thread
(its per-thread CPU clock, SQL included) and the whole process. The writer's figure is the ceiling
the single writer puts on the store; process CPU close to wall time means the two threads took
turns on the GIL instead of overlapping.

Runs alternate (baseline, store, baseline, store, ...); medians are printed. Figures are measured
in this run only (2 shared, noisy cores): compare ratios, not absolute numbers. Nothing fails on
timing. When the store misses the goal (10,000 CDR/s), a smaller profiled run (cProfile on the
event loop thread and, separately, on the SQLite writer thread) prints the top costs.

Usage: python bench/rating.py [--cdrs N] [--runs R] [--chunk C] [--profile auto|always|never]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import ipaddress
import os
import pstats
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import aiosqlite

import clickphone_agi.adapters.storage.sqlite as sqlite_store
from clickphone_agi.adapters.logging import configure_logging
from clickphone_agi.adapters.storage.sqlite import MAX_BATCH, SqliteStore, connect_sync, to_db
from clickphone_agi.adapters.tariff_file import load_tariffs
from clickphone_agi.clock import SystemClock
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.ami_translate import TranslateContext, translate
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.services.ingest import _GROUP as GROUP
from clickphone_agi.services.ingest import EventProcessor
from clickphone_agi.services.money import MoneyService, MoneySettings
from clickphone_agi.sim.ami_server import load_transcript, packaged_scenarios

REPO = Path(__file__).resolve().parent.parent
TARIFFS = REPO / "etc" / "tariffs.yaml"
ZONE = ZoneInfo("Europe/Bucharest")
BALANCE = 10**10  # bani: never the binding budget
#: Destinations as Asterisk reports them, all priced by etc/tariffs.yaml.
NUMBERS = ("0040212345678", "0212345678", "0311234567", "0721234567", "0744123456", "004930123456", "00447700900123")
GOAL = 10_000  # CDR/s

CDR_COLUMNS = (
    "key, system_name, account, unique_id, linked_id, sequence, source, destination, destination_context, channel,"
    " destination_channel, last_application, disposition, duration, billable_seconds, start_at, answer_at, end_at,"
    " origin, recorded_at"
)
BASELINE_SCHEMA = (
    """CREATE TABLE cdrs_raw (
           key TEXT PRIMARY KEY, system_name TEXT NOT NULL, account TEXT NOT NULL, unique_id TEXT NOT NULL,
           linked_id TEXT, sequence INTEGER, source TEXT NOT NULL, destination TEXT NOT NULL,
           destination_context TEXT NOT NULL, channel TEXT NOT NULL, destination_channel TEXT NOT NULL,
           last_application TEXT NOT NULL, disposition TEXT NOT NULL, duration INTEGER NOT NULL,
           billable_seconds INTEGER NOT NULL, start_at TEXT NOT NULL, answer_at TEXT, end_at TEXT NOT NULL,
           origin TEXT NOT NULL, recorded_at TEXT NOT NULL
       ) WITHOUT ROWID""",
    "CREATE INDEX cdrs_raw_account_end ON cdrs_raw (account, end_at)",
    "CREATE INDEX cdrs_raw_linked ON cdrs_raw (linked_id)",
)


# -- the CDRs ------------------------------------------------------------------------------------


def template() -> CallEnded:
    """The billing CDR (ANSWERED, Dial) of the recorded ``answered_call`` session."""
    transcript = load_transcript(packaged_scenarios()["answered_call"])
    correlator = LinkedIdCorrelator()
    ctx = TranslateContext("pbx1", ZONE)
    for frame in transcript.replay_frames:
        correlator.observe(frame.message.headers)
        event = translate(frame.message.headers, ctx, correlator.linked_id_for)
        if isinstance(event, CallEnded) and event.last_application == "Dial" and event.billable_seconds > 0:
            return event
    raise RuntimeError("answered_call has no billing CDR")


def build_cdrs(n: int, accounts: int, base: CallEnded) -> list[CallEnded]:
    """``n`` distinct billing CDRs ending in the last hour (so today's tariffs apply)."""
    start0 = datetime.now(UTC) - timedelta(hours=1)
    cdrs = []
    for i in range(n):
        billable = 1 + (i * 37) % 600
        start = start0 + timedelta(milliseconds=i)
        answer = start + timedelta(seconds=5)
        unique_id = f"1795900000.{2 * i + 1}"
        channel = f"Local/{NUMBERS[i % len(NUMBERS)]}@lab-pstn-{i:08x};1"
        cdrs.append(
            dataclasses.replace(
                base,
                key=f"cdr:pbx1:{unique_id}:{channel}",
                account=f"bench{i % accounts:05d}",
                destination=NUMBERS[i % len(NUMBERS)],
                destination_channel=channel,
                duration=billable + 5,
                billable_seconds=billable,
                start=start,
                answer=answer,
                end=answer + timedelta(seconds=billable),
                unique_id=unique_id,
                linked_id=f"1795900000.{2 * i}",
            )
        )
    return cdrs


def bench_accounts(count: int) -> list[tuple[Account, int]]:
    localhost = (ipaddress.ip_network("127.0.0.1/32"),)
    return [
        (
            Account(
                code=f"bench{i:05d}",
                name=f"Bench {i}",
                email=f"bench{i}@example.ro",
                daily_limit=None,
                allowed_ips=localhost,
                max_concurrent_calls=1000,
            ),
            BALANCE,
        )
        for i in range(count)
    ]


def cdr_row(call: CallEnded, now: datetime) -> tuple[Any, ...]:
    return (
        call.key, call.system_name, call.account, call.unique_id, call.linked_id, call.sequence, call.source,
        call.destination, call.destination_context, call.channel, call.destination_channel, call.last_application,
        str(call.disposition), call.duration, call.billable_seconds, to_db(call.start),
        to_db(call.answer) if call.answer else None, to_db(call.end), str(call.origin), to_db(now),
    )  # fmt: skip


# -- the runs ------------------------------------------------------------------------------------


async def raw_baseline(path: Path, cdrs: list[CallEnded]) -> float:
    """aiosqlite, same pragmas, one transaction: executemany of the prepared rows. Seconds."""
    now = datetime.now(UTC)
    rows = [cdr_row(c, now) for c in cdrs]
    conn = aiosqlite.Connection(lambda: connect_sync(path), iter_chunk_size=64)
    await conn
    try:
        for statement in BASELINE_SCHEMA:
            await conn.execute(statement)
        placeholders = ", ".join("?" * len(rows[0]))
        sql = f"INSERT INTO cdrs_raw ({CDR_COLUMNS}) VALUES ({placeholders})"
        start = time.perf_counter()
        await conn.execute("BEGIN IMMEDIATE")
        await conn.executemany(sql, rows)
        await conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        (count,) = await (await conn.execute("SELECT COUNT(*) FROM cdrs_raw")).fetchone()  # type: ignore[misc]
        assert count == len(rows), count
    finally:
        await conn.close()
    return elapsed


@dataclasses.dataclass
class StoreRun:
    seconds: float
    commits: int
    charged: int
    recorded: int
    unrated: int
    ledger_ok: bool
    loop_cpu: float = 0.0  # CPU seconds of the event loop's thread during the timed part
    writer_cpu: float = 0.0  # of the SQLite writer's thread (its SQL included)
    process_cpu: float = 0.0  # of the whole process


def _thread_cpu(thread: threading.Thread | None) -> float:
    """CPU seconds ``thread`` has used so far (Linux: its own CPU clock); 0 if unknown."""
    if thread is None or thread.ident is None or not hasattr(time, "pthread_getcpuclockid"):
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except OSError:  # the thread ended
        return 0.0


async def store_run(
    path: Path, cdrs: list[CallEnded], accounts: int, chunk: int, on_start: Callable[[], None] = lambda: None
) -> StoreRun:
    """One timed run: a fresh store, accounts imported (not timed), then the CDRs (timed)."""
    clock = SystemClock()
    store = await SqliteStore.open(path, clock)
    store.start()
    try:
        tariffs = await asyncio.to_thread(load_tariffs, TARIFFS, timezone=ZONE)
        money = MoneyService(store, clock, MoneySettings(tariffs=tariffs, zone=ZONE))
        await store.write(import_unit(bench_accounts(accounts)))
        processor = EventProcessor(store, await store.went_live_at(), money)
        commits = store.commits
        writer = getattr(store._writer, "_thread", None)  # aiosqlite's thread: the store's only writer
        on_start()
        cpu = (time.thread_time(), _thread_cpu(writer), time.process_time())
        start = time.perf_counter()
        await feed(processor, cdrs, chunk)
        elapsed = time.perf_counter() - start
        loop_cpu, writer_cpu, process_cpu = (
            time.thread_time() - cpu[0],
            _thread_cpu(writer) - cpu[1],
            time.process_time() - cpu[2],
        )
        commits = store.commits - commits
    finally:
        await store.close()
    return StoreRun(
        elapsed,
        commits,
        money.charged,
        processor.applied["cdr"],
        money.unrated,
        ledger_matches(path),
        loop_cpu,
        writer_cpu,
        process_cpu,
    )


async def feed(processor: EventProcessor, cdrs: list[CallEnded], window: int) -> None:
    """Hand the CDRs to the processor as the ingest worker does: groups of ``GROUP`` through
    :meth:`EventProcessor.handle_many`, each in its own task, at most ``window`` CDRs in flight
    (the worker's ``max_in_flight``): the next groups are rated while the writer commits."""
    room = asyncio.Semaphore(max(1, window // GROUP))
    tasks = []

    async def group(calls: list[CallEnded]) -> None:
        try:
            await processor.handle_many(calls)
        finally:
            room.release()

    for start in range(0, len(cdrs), GROUP):
        await room.acquire()
        tasks.append(asyncio.create_task(group(cdrs[start : start + GROUP])))
    await asyncio.gather(*tasks)


def ledger_matches(path: Path) -> bool:
    """Consistency check after the run: every account's ledger sums to its cached balance."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ledger = dict(conn.execute("SELECT account, SUM(amount) FROM ledger GROUP BY account").fetchall())
        balances = dict(conn.execute("SELECT account, balance FROM balances").fetchall())
    finally:
        conn.close()
    return ledger == balances


def sql_floor(store_db: Path, path: Path) -> tuple[float, int]:
    """The SQL alone: the rows that charging N CDRs wrote (taken from a finished store run), written
    again with plain sqlite3 into a fresh database with the real schema, one executemany per table,
    one transaction, no Python per row. Every CDR also upserts its account's balance and day (as a
    batch of distinct accounts does). Returns (seconds, rows written)."""
    src = sqlite3.connect(f"file:{store_db}?mode=ro", uri=True)
    try:
        tables = {
            "processed_events": src.execute("SELECT key, kind, processed_at FROM processed_events").fetchall(),
            "cdrs": src.execute(f"SELECT {CDR_COLUMNS} FROM cdrs").fetchall(),
            "ledger": src.execute(
                "SELECT account, amount, kind, ref, reason, created_at FROM ledger WHERE kind = 'call'"
            ).fetchall(),
            "rated_calls": src.execute("SELECT * FROM rated_calls").fetchall(),
        }
        per_cdr = src.execute("SELECT account, day, cost FROM rated_calls").fetchall()
    finally:
        src.close()
    balances = [(account, -cost) for account, _day, cost in per_cdr]
    spend = [(account, day, cost) for account, day, cost in per_cdr]
    conn = connect_sync(path)
    try:
        sqlite_store.migrate(conn, datetime.now(UTC), path)
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO processed_events VALUES (?, ?, ?)", tables["processed_events"])
        conn.executemany(f"INSERT INTO cdrs ({CDR_COLUMNS}) VALUES ({', '.join('?' * 20)})", tables["cdrs"])
        conn.executemany(
            "INSERT INTO ledger (account, amount, kind, ref, reason, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            tables["ledger"],
        )
        conn.executemany(f"INSERT INTO rated_calls VALUES ({', '.join('?' * 11)})", tables["rated_calls"])
        conn.executemany(
            "INSERT INTO balances (account, balance) VALUES (?, ?)"
            " ON CONFLICT (account) DO UPDATE SET balance = excluded.balance",
            balances,
        )
        conn.executemany(
            "INSERT INTO daily_spend (account, day, spent) VALUES (?, ?, ?)"
            " ON CONFLICT (account, day) DO UPDATE SET spent = excluded.spent",
            spend,
        )
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return elapsed, sum(len(rows) for rows in tables.values()) + len(balances) + len(spend)


# -- profile -------------------------------------------------------------------------------------


def _where(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin: {method 'execute' of 'sqlite3.Connection' objects}
    for root in (str(REPO) + os.sep, sys.prefix + os.sep, sys.base_prefix + os.sep):
        filename = filename.removeprefix(root)
    return f"{filename}:{line}:{name}"


def _top(profile: cProfile.Profile, n: int, label: str) -> None:
    stats = pstats.Stats(profile)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values()) or 1.0
    print(f"  {label}: {total:.2f} s profiled; top {n} by own time (tottime), with cumulative time")
    for func, (_, calls, tt, ct, _) in sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]:
        print(f"    {100 * tt / total:5.1f}%  own {tt:6.3f} s  cum {ct:6.3f} s  {calls:8d} calls  {_where(func)}")


_MULTI_ROW = re.compile(r"VALUES \([?, ]*\)(,\([?, ]*\))+")


class TimedConnection:
    """Wraps the writer's sqlite3 connection during the profiled run: wall time per statement."""

    def __init__(self, conn: sqlite3.Connection, seconds: defaultdict[str, float], calls: defaultdict[str, int]):
        self._conn = conn
        self._seconds = seconds
        self._calls = calls

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        start = time.perf_counter()
        try:
            return self._conn.execute(sql, params)
        finally:
            key = _MULTI_ROW.sub("VALUES [multi-row]", " ".join(sql.split()))  # the flush's chunks, one line
            self._seconds[key] += time.perf_counter() - start
            self._calls[key] += 1

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        """The batch's deferred rows: one call per table per batch, shown as ``[many]``."""
        start = time.perf_counter()
        try:
            return self._conn.executemany(sql, rows)
        finally:
            key = "[many] " + " ".join(sql.split())
            self._seconds[key] += time.perf_counter() - start
            self._calls[key] += 1


def profile_run(path: Path, cdrs: list[CallEnded], accounts: int, chunk: int) -> float:
    """One store run with cProfile on the loop thread and, separately, on the writer thread.

    Relies on the store's private ``_run_batch(conn, jobs, now, ...)``; if its shape changes, only the
    per-statement table is lost.
    """
    loop_profile, writer_profile = cProfile.Profile(), cProfile.Profile()
    seconds: defaultdict[str, float] = defaultdict(float)
    calls: defaultdict[str, int] = defaultdict(int)
    original = sqlite_store._run_batch
    started = threading.Event()  # set once the accounts are imported: only the CDRs are profiled

    def profiled_batch(conn: Any, *rest: Any, **options: Any) -> Any:  # runs on the writer's thread
        if not started.is_set():
            return original(conn, *rest, **options)
        if isinstance(conn, sqlite3.Connection):
            conn = TimedConnection(conn, seconds, calls)
        writer_profile.enable()
        try:
            return original(conn, *rest, **options)
        finally:
            writer_profile.disable()

    def on_start() -> None:
        started.set()
        loop_profile.enable()

    sqlite_store._run_batch = profiled_batch  # type: ignore[assignment]
    try:
        run = asyncio.run(store_run(path, cdrs, accounts, chunk, on_start))
        loop_profile.disable()
    finally:
        sqlite_store._run_batch = original  # type: ignore[assignment]
    n = len(cdrs)
    print(f"profiled run: {n} CDRs, {n / run.seconds:.0f} CDR/s under cProfile (slower than unprofiled)")
    _top(loop_profile, 14, "event loop thread (from the first CDR; store close included)")
    _top(writer_profile, 14, "SQLite writer thread (_run_batch: the units of work + BEGIN/COMMIT)")
    if seconds:
        total = sum(seconds.values())
        print(
            f"  SQL statements on the writer thread: {sum(calls.values()) / n:.1f} per CDR,"
            f" {1e6 * total / n:.0f} us per CDR (wall time, waits for the GIL included; the timer is"
            " bench/rating.py's TimedConnection.execute above)"
        )
        for sql, spent in sorted(seconds.items(), key=lambda kv: kv[1], reverse=True)[:12]:
            text = sql if len(sql) <= 72 else sql[:69] + "..."
            print(f"    {1e6 * spent / n:6.1f} us/CDR  {calls[sql] / n:5.2f}/CDR  {text}")
    return run.seconds


def phases_run(path: Path, cdrs: list[CallEnded], accounts: int, batch_size: int = 250) -> dict[str, float]:
    """The work of one CDR, phase by phase, on ONE thread (no event loop, no GIL contention):
    CPU microseconds per CDR of the loop's part (plan: rate and build the units; encode: the rows)
    and of the writer's (BEGIN with the claims read ahead, the units, the flush of the deferred
    rows, COMMIT), in batches of ``batch_size`` as the store makes them.

    Relies on the store's private pieces (``_WriterCache``, ``_Batch``, ``_run_unit``, ``_encode``)
    and the processor's ``_plan``; if their shapes change, only this breakdown is lost.
    """

    async def setup() -> None:
        store = await SqliteStore.open(path, SystemClock())
        store.start()
        try:
            await store.write(import_unit(bench_accounts(accounts)))
        finally:
            await store.close()

    asyncio.run(setup())
    tariffs = load_tariffs(TARIFFS, timezone=ZONE)
    money = MoneyService(cast(Any, None), SystemClock(), MoneySettings(tariffs=tariffs, zone=ZONE))
    processor = EventProcessor(cast(Any, None), datetime(2000, 1, 1, tzinfo=UTC), money)
    conn = connect_sync(path)
    cache = sqlite_store._WriterCache()
    spent = dict.fromkeys(("plan", "encode", "begin", "units", "flush", "commit"), 0.0)
    clock = time.thread_time
    try:
        for start in range(0, len(cdrs), batch_size):
            events = cdrs[start : start + batch_size]
            t = clock()
            units, _planned, records = processor._plan(events, [False] * len(events))
            spent["plan"] += clock() - t
            t = clock()
            encoded = sqlite_store._encode(records)
            spent["encode"] += clock() - t
            now = datetime.now(UTC)
            t = clock()
            conn.execute("BEGIN IMMEDIATE")
            cache.validate(conn)
            batch = sqlite_store._Batch(cache, now)
            batch.prefetch_claims(conn, [e.key for e in events])
            batch.encoded.update(encoded)
            spent["begin"] += clock() - t
            t = clock()
            for unit in units:
                sqlite_store._run_unit(conn, now, batch, unit)
            spent["units"] += clock() - t
            t = clock()
            batch.flush(conn)
            spent["flush"] += clock() - t
            t = clock()
            conn.execute("COMMIT")
            spent["commit"] += clock() - t
    finally:
        conn.close()
    return {phase: 1e6 * seconds / len(cdrs) for phase, seconds in spent.items()}


def _fs_type(path: Path) -> str:
    """The file system holding ``path``, from /proc/mounts (tmpfs would make fsync free)."""
    best, kind = "", "file system unknown"
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cdrs", type=int, default=10_000, help="billing CDRs per run (default 10000)")
    parser.add_argument("--accounts", type=int, default=1000, help="accounts, used round robin (default 1000)")
    parser.add_argument("--chunk", type=int, default=1000, help="most CDRs in flight at once (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, alternating (default 3)")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto", help="auto: if goal missed")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--phases", action="store_true", help="also time each phase of a CDR's work on one thread (no GIL contention)"
    )
    args = parser.parse_args()
    if min(args.cdrs, args.accounts, args.chunk, args.runs) < 1:
        parser.error("--cdrs, --accounts, --chunk and --runs must be >= 1")
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        configure_logging(level=args.log_level, fmt="json", stream=devnull)
        _bench(args)


def _bench(args: argparse.Namespace) -> None:
    cdrs = build_cdrs(args.cdrs, args.accounts, template())
    base_times: list[float] = []
    runs: list[StoreRun] = []
    floors: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs):
            gc.collect()
            base_times.append(asyncio.run(raw_baseline(Path(d) / f"raw{i}.db", cdrs)))
            gc.collect()
            runs.append(asyncio.run(store_run(Path(d) / f"store{i}.db", cdrs, args.accounts, args.chunk)))
            gc.collect()
            floors.append(sql_floor(Path(d) / f"store{i}.db", Path(d) / f"floor{i}.db"))
        n = args.cdrs
        base = n / statistics.median(base_times)
        ours = n / statistics.median(r.seconds for r in runs)
        commits = statistics.median(r.commits for r in runs)
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, SQLite {sqlite3.sqlite_version};"
            f" WAL, synchronous=FULL; temp dir in {os.path.dirname(d)} ({_fs_type(Path(d))})"
        )
        print(
            f"{n} billing CDRs per run over {args.accounts} accounts, groups of {GROUP} through handle_many,"
            f" at most {args.chunk} in flight;"
            f" {args.runs} runs of each, alternating; medians; log level {args.log_level} (JSON to /dev/null)"
        )
        print(f"baseline aiosqlite executemany, 1 txn, cdrs-like rows: {base:9.0f} rows/s  (1.00x)")
        print(
            f"EventProcessor.handle_many + MoneyService, batched  : {ours:9.0f} CDR/s   ({ours / base:.3f}x baseline;"
            f" {commits:.0f} commits, {n / commits:.0f} CDRs/commit, MAX_BATCH {MAX_BATCH})"
        )
        floor = n / statistics.median(t for t, _ in floors)
        rows_per_cdr = floors[-1][1] / n
        print(
            f"the SQL alone, plain sqlite3, 1 txn ({rows_per_cdr:.0f} rows per CDR):"
            f" {floor:9.0f} CDR/s   (the ceiling for this schema; store = {ours / floor:.2f}x of it)"
        )
        print(
            "runs: baseline rows/s "
            + ", ".join(f"{n / t:.0f}" for t in base_times)
            + " | store CDR/s "
            + ", ".join(f"{n / r.seconds:.0f} ({r.commits} commits)" for r in runs)
            + " | SQL alone CDR/s "
            + ", ".join(f"{n / t:.0f}" for t, _ in floors)
        )
        loop_us = 1e6 * statistics.median(r.loop_cpu for r in runs) / n
        writer_us = 1e6 * statistics.median(r.writer_cpu for r in runs) / n
        process_us = 1e6 * statistics.median(r.process_cpu for r in runs) / n
        wall_us = 1e6 / ours
        if writer_us > 0:
            print(
                f"CPU per CDR (medians): event loop thread {loop_us:.0f} us, SQLite writer thread {writer_us:.0f} us"
                f" (its SQL included), process {process_us:.0f} us; wall {wall_us:.0f} us."
                f" The writer thread alone, busy 100% of one core, would stop at {1e6 / writer_us:.0f} CDR/s;"
                f" both threads' Python runs under one GIL (process CPU {process_us / wall_us:.2f}x wall)"
            )
        last = runs[-1]
        print(
            f"check (last run): {last.recorded} CDRs recorded, {last.charged} charged, {last.unrated} unrated;"
            f" ledger sums equal balances: {last.ledger_ok}"
        )
        held = ours >= GOAL
        print(f"goal >= {GOAL} CDR/s: {'HELD' if held else 'MISSED'} ({ours:.0f} CDR/s)")
        if args.phases:
            runs_phases = [phases_run(Path(d) / f"phases{i}.db", cdrs, args.accounts) for i in range(args.runs)]
            phases = {k: statistics.median(p[k] for p in runs_phases) for k in runs_phases[0]}
            loop_side = phases["plan"] + phases["encode"]
            writer_side = phases["begin"] + phases["units"] + phases["flush"] + phases["commit"]
            print(
                "one thread, CPU us per CDR (medians of "
                f"{args.runs}): loop's part {loop_side:.0f} (plan {phases['plan']:.0f}, encode {phases['encode']:.0f});"
                f" writer's part {writer_side:.0f} (BEGIN + claims {phases['begin']:.0f}, units {phases['units']:.0f},"
                f" flush {phases['flush']:.0f}, COMMIT {phases['commit']:.0f}); both on one core:"
                f" {1e6 / (loop_side + writer_side):.0f} CDR/s"
            )
        if args.profile == "always" or (args.profile == "auto" and not held):
            profile_run(Path(d) / "profile.db", cdrs[: min(n, 5000)], args.accounts, args.chunk)


if __name__ == "__main__":
    main()
