"""Read-only queries for the CLI (safe while the daemon writes: WAL readers never block it)."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path
from typing import Any

from clickphone_agi.adapters.storage.codec import account_from_json
from clickphone_agi.adapters.storage.sqlite import connect_sync, to_db


def _conn(path: Path) -> Any:
    return connect_sync(path, readonly=True)


def list_accounts(path: Path) -> list[dict[str, Any]]:
    conn = _conn(path)
    try:
        rows = conn.execute(
            "SELECT a.data, COALESCE(b.balance, 0) FROM accounts a LEFT JOIN balances b ON b.account = a.code"
            " ORDER BY a.code"
        ).fetchall()
    finally:
        conn.close()
    out = []
    for data, balance in rows:
        acct = account_from_json(data)
        out.append(
            {
                "code": acct.code,
                "name": acct.name,
                "billing": acct.billing,
                "balance": balance,
                "daily_limit": acct.daily_limit,
                "enabled": acct.enabled,
            }
        )
    return out


def show_account(path: Path, code: str, now: datetime, day: str) -> dict[str, Any] | None:
    conn = _conn(path)
    try:
        row = conn.execute("SELECT data, created_at, updated_at FROM accounts WHERE code = ?", (code,)).fetchone()
        if row is None:
            return None
        balance = conn.execute("SELECT balance FROM balances WHERE account = ?", (code,)).fetchone()
        spent = conn.execute("SELECT spent FROM daily_spend WHERE account = ? AND day = ?", (code, day)).fetchone()
        held = conn.execute(
            "SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM reservations WHERE account = ? AND expires_at > ?",
            (code, to_db(now)),
        ).fetchone()
        ledger = conn.execute(
            "SELECT created_at, kind, amount, ref, reason FROM ledger WHERE account = ? ORDER BY id DESC LIMIT 20",
            (code,),
        ).fetchall()
    finally:
        conn.close()
    acct = account_from_json(row[0])
    return {
        "account": {
            **{
                k: v
                for k, v in vars(acct).items()
                if k not in ("allowed_ips", "mailboxes", "blocked_classes", "opt_out")
            },
            "allowed_ips": [str(n) for n in acct.allowed_ips],
            "mailboxes": [{"box": m.box, "email": m.email} for m in acct.mailboxes],
            "blocked_classes": sorted(acct.blocked_classes),
            "opt_out": sorted(acct.opt_out),
        },
        "created_at": row[1],
        "updated_at": row[2],
        "balance": balance[0] if balance else 0,
        "today": {"day": day, "spent": spent[0] if spent else 0},
        "reservations": {"held": held[0], "calls": held[1]},
        "ledger_last_20": [dict(zip(("at", "kind", "amount", "ref", "reason"), r, strict=True)) for r in ledger],
    }


def check_balances(path: Path) -> list[dict[str, Any]]:
    """Accounts whose cached balance differs from the sum of their ledger (should be none)."""
    conn = _conn(path)
    try:
        rows = conn.execute(
            "SELECT b.account, b.balance, COALESCE(SUM(l.amount), 0) AS total FROM balances b"
            " LEFT JOIN ledger l ON l.account = b.account GROUP BY b.account HAVING b.balance != total"
        ).fetchall()
    finally:
        conn.close()
    return [{"account": a, "cached": c, "ledger_sum": t} for a, c, t in rows]


EXPORT_COLUMNS = (
    "key", "account", "destination", "prefix", "tariff", "class", "answered_at", "day", "billable", "billed_seconds",
    "cost",
)  # fmt: skip


def export_calls(path: Path, start: datetime, end: datetime) -> str:
    """Rated calls answered in [start, end) as CSV (amounts in bani) for the billing system."""
    conn = _conn(path)
    try:
        rows = conn.execute(
            "SELECT key, account, destination, prefix, tariff, class, answered_at, day, billable, billed_seconds, cost"
            " FROM rated_calls WHERE answered_at >= ? AND answered_at < ? ORDER BY answered_at, key",
            (to_db(start), to_db(end)),
        ).fetchall()
    finally:
        conn.close()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()
