"""Why rating stops near 6,000 CDR/s: a SQLite thread beside a busy Python thread (the GIL convoy).

The store's writer is one thread running SQLite; the event loop is another thread of the same
process, rating CDRs in Python. ``sqlite3`` releases the GIL while a statement runs, and must take
it back to return. If the other thread is running Python at that moment, it keeps the GIL until
its switch interval (``sys.getswitchinterval()``, 5 ms by default) runs out. A thread that makes
many short statements therefore waits up to 5 ms after each one, however short the statement was.

This script measures it without the daemon:

- **sql alone**: a thread inserts rows in the shape of a CDR (multi-row INSERTs of 32 rows, eight
  per transaction, WAL, synchronous=FULL, in a temp dir);
- **python alone**: the main thread runs a pure-Python loop (dict and str churn);
- **together**: both at once, at the default switch interval and at shorter ones.

Figures are from this run only (2 shared, noisy cores): compare the ratios within a run.
Nothing fails on timing.

Usage: python bench/gil_convoy.py [--seconds S] [--intervals 0.005,0.001,0.0002]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import threading
import time

ROWS = 32  # rows per INSERT, as the store's flush uses for the 20-column cdrs rows
STATEMENTS = 8  # INSERTs per transaction


class SqlWriter:
    """Inserts CDR-shaped rows for a given time; counts them."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(
            "CREATE TABLE cdrs (key TEXT PRIMARY KEY, account TEXT, billsec INTEGER, end_at TEXT, channel TEXT)"
            " WITHOUT ROWID"
        )
        self.conn.execute("CREATE INDEX cdrs_account_end ON cdrs (account, end_at)")
        self.sql = "INSERT INTO cdrs VALUES " + ",".join(["(?,?,?,?,?)"] * ROWS)
        self.next_id = 0
        self.rows = 0

    def run(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        rows = 0
        while time.perf_counter() < end:
            self.conn.execute("BEGIN IMMEDIATE")
            for _ in range(STATEMENTS):
                params: list[object] = []
                for _ in range(ROWS):
                    self.next_id += 1
                    i = self.next_id
                    params += [f"cdr:pbx1:{i:012d}", f"acct{i % 1000:04d}", i % 600, "2026-11-29T10:00:00Z", "Local/x"]
                self.conn.execute(self.sql, params)
                rows += ROWS
            self.conn.execute("COMMIT")
        self.rows = rows


def python_loop(seconds: float, out: list[int]) -> None:
    """Pure-Python work, as the event loop's rating is: counts iterations."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        for _ in range(1000):
            _ = {"account": n, "cost": str(n)}
            n += 1
    out.append(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    parser.add_argument("--intervals", default="0.005,0.001,0.0002", help="switch intervals to try, seconds")
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",") if x]
    seconds = args.seconds
    default = sys.getswitchinterval()
    with tempfile.TemporaryDirectory() as d:
        writer = SqlWriter(os.path.join(d, "convoy.db"))
        writer.run(seconds)
        sql_alone = writer.rows / seconds
        counts: list[int] = []
        python_loop(seconds, counts)
        py_alone = counts[0] / seconds
        version = sys.version.split()[0]
        print(f"python {version}, {os.cpu_count()} CPUs, SQLite {sqlite3.sqlite_version}; {seconds:g} s each")
        print(f"sql alone    : {sql_alone:9.0f} rows/s  (1.00x)")
        print(f"python alone : {py_alone:9.0f} it/s    (1.00x)")
        for interval in intervals:
            sys.setswitchinterval(interval)
            counts = []
            thread = threading.Thread(target=writer.run, args=(seconds,))
            thread.start()
            python_loop(seconds, counts)
            thread.join()
            sys.setswitchinterval(default)
            print(
                f"together, switch interval {1000 * interval:5.2f} ms: sql {writer.rows / seconds:9.0f} rows/s"
                f" ({writer.rows / seconds / sql_alone:.2f}x), python {counts[0] / seconds:9.0f} it/s"
                f" ({counts[0] / seconds / py_alone:.2f}x)"
            )
        writer.conn.close()


if __name__ == "__main__":
    main()
