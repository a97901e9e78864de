"""Storage throughput: the batching writer vs. one commit per unit, against a raw-sqlite3 baseline.

Prints figures measured in this run only (the machine is shared and noisy): compare ratios,
not absolute numbers. Usage: python bench/bench_storage.py [UNITS]
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from clickphone_agi.adapters.storage.sqlite import SqliteStore, configure_connection
from clickphone_agi.clock import SystemClock


def raw_baseline(path: Path, units: int) -> float:
    """Plain sqlite3, same pragmas, one INSERT + COMMIT per unit, no event loop."""
    conn = sqlite3.connect(path, isolation_level=None)
    configure_connection(conn)
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, kind TEXT, at TEXT)")
    start = time.perf_counter()
    for i in range(units):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, 'cdr', 'x')", (f"k{i}",))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


async def store_sequential(path: Path, units: int) -> tuple[float, int]:
    store = await SqliteStore.open(path, SystemClock())
    store.start()
    start = time.perf_counter()
    for i in range(units):
        await store.write(lambda tx, i=i: tx.claim_event(f"s{i}", "cdr"))
    elapsed = time.perf_counter() - start
    commits = store.commits
    await store.close()
    return elapsed, commits


async def store_concurrent(path: Path, units: int) -> tuple[float, int]:
    store = await SqliteStore.open(path, SystemClock())
    store.start()
    start = time.perf_counter()
    await asyncio.gather(*(store.write(lambda tx, i=i: tx.claim_event(f"c{i}", "cdr")) for i in range(units)))
    elapsed = time.perf_counter() - start
    commits = store.commits
    await store.close()
    return elapsed, commits


def main() -> None:
    units = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as d:
        base = raw_baseline(Path(d) / "raw.db", units)
        seq, seq_commits = asyncio.run(store_sequential(Path(d) / "seq.db", units))
        conc, conc_commits = asyncio.run(store_concurrent(Path(d) / "conc.db", units))
    print(f"units per run: {units} (WAL, synchronous=FULL)")
    print(f"baseline raw sqlite3, 1 commit/unit : {units / base:9.0f} units/s  (1.00x)")
    print(
        f"store, awaited one by one           : {units / seq:9.0f} units/s  ({base / seq:.2f}x baseline,"
        f" {seq_commits} commits)"
    )
    print(
        f"store, concurrent (batched)         : {units / conc:9.0f} units/s  ({base / conc:.2f}x baseline,"
        f" {conc_commits} commits)"
    )


if __name__ == "__main__":
    main()
