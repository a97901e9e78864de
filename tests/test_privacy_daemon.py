"""Data rights end to end: recorded calls through the fake Asterisk into the real daemon, then
``privacy export`` and ``privacy erase`` as an operator runs them — a CLI process talking to the
running daemon's control socket — and a search of the raw database and -wal bytes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.app import Daemon
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.dialplan_vars import Reason
from clickphone_agi.domain.accounts import Account
from clickphone_agi.services.accounts import adjust_unit, import_unit
from clickphone_agi.sim.ami_server import AmiReplayServer, packaged_scenarios
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.conftest import REPO
from tests.daemon_harness import run_cli
from tests.test_notices import _spool
from tests.test_privacy import ION

pytestmark = pytest.mark.slow

NEEDLES = {
    "name": "Ion Popescu",
    "email": "ion.popescu@example.ro",
    "mailbox email": "voicemail.ion@example.ro",
    "DID": "40721000001",
    "DID as dialled (the caller number of his calls)": "0721000001",
    "allowed IP": "198.51.100.77",
    "called number": "0040212345678",
    "caller number": "0744123456",
    "caller name": "Vasile Ionescu",
    "consent evidence": "203.0.113.9",
    "adjustment reason": "goodwill after the outage",
}


def _raw(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def _totals(path: Path) -> tuple[Any, ...]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (
            conn.execute("SELECT balance FROM balances WHERE account = 'acct1001'").fetchone(),
            conn.execute("SELECT SUM(amount), COUNT(*) FROM ledger WHERE account = 'acct1001'").fetchone(),
            conn.execute("SELECT SUM(spent) FROM daily_spend WHERE account = 'acct1001'").fetchone(),
        )
    finally:
        conn.close()


async def _until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def _seed(db_path: Path) -> None:
    """Provisioned before the daemon starts, as an operator would; consent rows as the consent API writes them."""
    conn = db.connect_sync(db_path)
    db.migrate(conn, datetime(2026, 11, 28, tzinfo=UTC))  # go live before the recorded calls
    conn.close()
    store = await SqliteStore.open(db_path, FakeClock())
    store.start()
    await store.write(import_unit([(ION, 5000), (Account("acct2002", "Maria Dobre", "maria.dobre@example.org"), 100)]))
    await store.write(adjust_unit("acct1001", 250, "goodwill after the outage", "adjust:seed"))
    await store.close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "INSERT INTO consent_records (account, granted, recorded_at, source, policy_version, evidence)"
            " VALUES ('acct1001', 1, '2026-11-01T10:00:00.000000Z', 'api', 'v1', '{\"ip\": \"203.0.113.9\"}')"
        )
        conn.execute(
            "INSERT INTO marketing_suppressions (address, reason, created_at)"
            " VALUES ('ion.popescu@example.ro', 'unsubscribe', '2026-11-02T10:00:00.000000Z')"
        )
    conn.close()


@pytest.mark.timeout(120)
async def test_export_then_erase_through_the_running_daemon(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    vm, fax = _spool(short_tmp / "spool")
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        cfg = write_config(
            ami_port=ami.port,
            smtp_port=smtp_sink.port,
            ami_enabled=True,
            extra=(
                f"asterisk:\n  system_name: pbx1\n  voicemail_spool: {vm}\n  fax_spool: {fax}\n  master_csv: null\n"
                "notifications:\n  inbound_contexts: [lab-inbound]\n  missed_call_grace: 0.2\n  scan_interval: 3600\n"
                f"billing:\n  tariffs_file: {REPO / 'etc' / 'tariffs.yaml'}\n"
                "  billing_cdr:\n    destination_contexts: [lab-outbound]\n"
            ),
        )
        db_path = load_config(cfg).config.database.path
        await _seed(db_path)
        daemon = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False)
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        try:
            await ami.wait_for_login(10)
            scenarios = packaged_scenarios()
            for name in ("answered_call", "missed_call", "voicemail"):
                await ami.play(scenarios[name])

            async def settled() -> bool:
                status = await daemon._cmd_status({})
                mail = status["mail"]
                return bool(status["cdrs"]["recorded"] >= 11 and mail["pending"] == 0 and mail["sent"] >= 2)

            await _until(settled)
            money = _totals(db_path)
            assert money[1][0] == money[0][0]
            assert money[2][0] > 0

            out = short_tmp / "export.json"
            code, stdout, stderr = await run_cli("privacy", "export", "acct1001", "--out", str(out), "-c", str(cfg))
            assert code == 0, stderr
            assert "written to" in stdout
            assert stat.S_IMODE(out.stat().st_mode) == 0o600
            exported = out.read_text(encoding="utf-8")
            assert [what for what, needle in NEEDLES.items() if needle not in exported] == []
            assert {m["kind"] for m in json.loads(exported)["outbox"]} >= {"missed_call", "voicemail"}

            code, stdout, stderr = await run_cli("privacy", "erase", "acct1001", "-c", str(cfg))
            assert code == 2
            assert "--yes" in stderr
            code, stdout, stderr = await run_cli("privacy", "erase", "acct1001", "--yes", "-c", str(cfg))
            assert code == 0, stderr
            result = json.loads(stdout)
            assert result["by"] == "daemon"
            assert result["wal_checkpoint"]["complete"] is True

            raw = _raw(db_path)
            assert [what for what, needle in NEEDLES.items() if needle.encode() in raw] == []
            assert _totals(db_path) == money

            # the erased account in the running daemon: calls denied, its calls replayed change nothing
            parts = daemon._running()
            assert parts.money is not None
            decision = await parts.money.authorize("acct1001", "0040212345678", "198.51.100.77", "after.1")
            assert decision.reason is Reason.DISABLED
            cdr_events = (await daemon._cmd_status({}))["events"].get("Cdr", 0)
            await ami.play(scenarios["answered_call"])

            async def replayed() -> bool:
                status = await daemon._cmd_status({})
                return bool(status["events"].get("Cdr", 0) >= cdr_events + 3 and status["queue"]["depth"] == 0)

            await _until(replayed)
            await parts.store.checkpoint()
            assert _totals(db_path) == money
            assert b"0040212345678" not in _raw(db_path)

            code, stdout, stderr = await run_cli("privacy", "export", "nobody", "-c", str(cfg))
            assert code == 65
            assert "no account" in stderr
        finally:
            daemon.request_stop()
            assert await task == 0
    # with the daemon stopped the export reads the database itself
    code, stdout, stderr = await run_cli("privacy", "export", "acct1001", "-c", str(cfg))
    assert code == 0, stderr
    after = json.loads(stdout)
    assert after["account"]["settings"]["erased"] is True
    assert [what for what, needle in NEEDLES.items() if needle in stdout] == []
