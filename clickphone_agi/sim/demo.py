"""``clickphone-agi demo``: the real daemon against a simulated Asterisk and a local mail sink.

Everything runs in one process on loopback: the AMI replay server plays call scenarios
recorded from a real Asterisk 22, an aiosmtpd sink writes each mail as an ``.eml`` file, and
the daemon — the same :class:`~clickphone_agi.app.Daemon` that systemd runs — uses a throwaway
database in the output folder. At the end it prints what happened and where it went.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import shutil
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clickphone_agi import dialplan_vars as dv
from clickphone_agi.adapters import control
from clickphone_agi.adapters.accounts_file import load_accounts
from clickphone_agi.adapters.logging import configure_logging
from clickphone_agi.adapters.storage import reports
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.codec import account_to_json
from clickphone_agi.app import Daemon
from clickphone_agi.clock import ShiftedClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.domain.money import format_ron
from clickphone_agi.sim.agi_client import agi_call
from clickphone_agi.sim.ami_server import AmiReplayServer, Transcript, load_transcript, packaged_scenarios
from clickphone_agi.sim.master_csv import csv_record
from clickphone_agi.sim.smtp_sink import SmtpSink

SCENARIOS = ("answered_call", "missed_call", "busy_call", "voicemail", "fax", "fax_failed", "user_event")
GAP_SCENARIO = "long_call"  # happens while the AMI link is down: only Master.csv knows it
# The recorded calls took place on 2026-11-28; the demo's database "went live" before them.
DEMO_GO_LIVE = datetime(2026, 11, 27, tzinfo=UTC)
# ... and the daemon runs as of a few minutes after them (16:25 in Bucharest), whatever today's
# date: the day's spend, the 80 % warning and the daily-limit denial belong to that day.
DEMO_NOW = datetime(2026, 11, 28, 14, 25, tzinfo=UTC)
DEMO_SECRET = "demo-secret"  # noqa: S105 - the simulator's own throwaway secret


DEMO_TARIFFS = """# The demo's tariffs (RON): Bucharest fixed, Romanian mobile, a blocked premium range.
currency: RON
tariffs:
  - {prefix: "+4021", name: Bucharest fixed, class: national, rate_per_minute: "0.03", increments: 60/1,
     effective_from: 2026-01-01}
  - {prefix: "+407", name: Romania mobile, class: mobile, rate_per_minute: "0.05", increments: 60/1,
     effective_from: 2026-01-01}
  - {prefix: "+40900", name: Premium, class: premium, rate_per_minute: "3.00", increments: 60/60,
     effective_from: 2026-01-01}
"""
DEMO_ACCOUNTS = """# The demo's subscribers (invented). acct1001 is nearly out of budget on purpose.
accounts:
  - code: acct1001
    name: Ion Popescu
    email: ion.popescu@example.ro
    daily_limit: "0.08"
    low_balance_threshold: "0.15"
    allowed_ips: ["127.0.0.1"]
    dids: ["+40212345678"]
    mailboxes: [{box: 100@default}]
    blocked_classes: [premium]
    opening_balance: "0.20"
  - code: acct1002
    name: Maria Ionescu
    email: maria.ionescu@example.ro
    language: en
    allowed_ips: ["127.0.0.1"]
    opening_balance: "25.00"
"""


def _config_text(out: Path, ami_port: int, smtp_port: int, socket_path: Path, agi_port: int) -> str:
    return f"""# Written by `clickphone-agi demo`: the daemon's configuration for this run.
ami:
  host: 127.0.0.1
  port: {ami_port}
  secret_file: {out / "ami-secret"}
  ping_interval: 5
  backoff_initial: 0.2
  backoff_max: 1
smtp:
  host: 127.0.0.1
  port: {smtp_port}
database:
  path: {out / "demo.db"}
agi:
  enabled: true
  port: {agi_port}
billing:
  tariffs_file: {out / "tariffs.yaml"}
  billing_cdr:
    destination_contexts: [lab-outbound]
notifications:
  inbound_contexts: [lab-inbound]
  missed_call_grace: 0.5
asterisk:
  system_name: demo-pbx
  voicemail_spool: {out / "spool" / "voicemail"}
  fax_spool: {out / "spool" / "fax"}
  master_csv: {out / "cdr-csv" / "Master.csv"}
  reconcile_interval: 30
logging:
  level: info
  format: json
daemon:
  control_socket: {socket_path}
  drain_timeout: 5
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _settle(daemon: Daemon, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the daemon has processed everything it received (backlog empty twice)."""
    quiet = 0
    async with asyncio.timeout(timeout):
        while quiet < 3:
            status = await daemon._cmd_status({})
            quiet = quiet + 1 if status["ingest_backlog"] == 0 else 0
            await asyncio.sleep(0.05)
    return status


def _write_secret(path: Path, text: str) -> None:
    """Mode 0600 from the start, whatever the umask, also over a file left by an older run: the
    loader refuses a secret file every local user can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _prepare(output: Path) -> Path:
    """A clean output folder (previous demo files removed) holding the simulator's secret."""
    out = output.resolve()
    for stale in (
        "mail",
        "cdr-csv",
        "spool",
        "tariffs.yaml",
        "accounts.yaml",
        "demo.db",
        "demo.db-wal",
        "demo.db-shm",
        "demo.db.lock",
        "daemon.log",
        "report.json",
    ):
        target = out / stale
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_secret(out / "ami-secret", DEMO_SECRET + "\n")
    (out / "tariffs.yaml").write_text(DEMO_TARIFFS, encoding="utf-8")
    (out / "accounts.yaml").write_text(DEMO_ACCOUNTS, encoding="utf-8")
    # the voicemail message and the fax Asterisk recorded in the lab, where the daemon reads them
    shutil.copytree(Path(__file__).parent / "spool", out / "spool")
    (out / "cdr-csv").mkdir()
    (out / "cdr-csv" / "Master.csv").write_bytes(b"")
    conn = db.connect_sync(out / "demo.db")
    try:
        db.migrate(conn, DEMO_GO_LIVE, out / "demo.db")
    finally:
        conn.close()
    return out


def _write_csv(out: Path, transcript: Transcript) -> None:
    """Asterisk's cdr_csv writes every CDR to Master.csv too."""
    with (out / "cdr-csv" / "Master.csv").open("ab") as fh:
        fh.writelines(csv_record(f.message) for f in transcript.replay_frames if f.message.event == "Cdr")


async def _script(out: Path, daemon: Daemon, ami: AmiReplayServer, sink: SmtpSink) -> dict[str, Any]:
    """What the simulated Asterisk and operator do, narrated as it happens."""
    # generous bounds: the demo also runs on loaded CI machines; each one only stops a hang
    await asyncio.wait_for(daemon.ready.wait(), 30)
    await ami.wait_for_login(30)
    print(f"  daemon ready; logged in to the AMI as 'clickphone' (events: {daemon.config.ami.events})")
    items = await asyncio.to_thread(load_accounts, out / "accounts.yaml")
    payload = {"items": [{"account": account_to_json(i.account), "opening": i.opening_balance} for i in items]}
    imported = await asyncio.to_thread(control.call, daemon.config.daemon.control_socket, "accounts.import", payload)
    print(f"  'accounts import accounts.yaml' through the control socket: created {', '.join(imported['created'])}")
    scenarios = {name: load_transcript(path) for name, path in packaged_scenarios().items()}
    for name in SCENARIOS:
        frames = await ami.play(scenarios[name])
        await _settle(daemon)
        _write_csv(out, scenarios[name])
        print(f"  replayed {name:<14} {frames:3d} AMI frames")
    first = await _settle(daemon)
    frames = await ami.play(scenarios["answered_call"])
    again = await _settle(daemon)
    print(
        f"  replayed answered_call again ({frames} frames): "
        f"{again['cdrs']['duplicates'] - first['cdrs']['duplicates']} CDRs recognised as duplicates, "
        f"{again['cdrs']['recorded'] - first['cdrs']['recorded']} recorded twice"
    )
    queued = await asyncio.to_thread(
        control.call, daemon.config.daemon.control_socket, "mail-test", {"to": "ion.popescu@example.ro"}
    )
    await sink.wait_for(1, timeout=30)
    print(f"  'clickphone-agi mail-test' went through the control socket: {queued['queued']}")
    await ami.play(scenarios["shutdown"])
    _write_csv(out, scenarios[GAP_SCENARIO])
    print(f"  Asterisk said 'Shutdown' and closed the link; meanwhile a {GAP_SCENARIO} ended (only in Master.csv)")
    await ami.wait_for_login(45, logins=2)
    before = first["reconcile"]["recovered"]
    async with asyncio.timeout(45):
        while (status := await _settle(daemon))["reconcile"]["recovered"] == before:  # noqa: ASYNC110 - polls status
            await asyncio.sleep(0.05)
    print(
        "  the daemon reconnected and reconciled Master.csv: "
        f"{status['reconcile']['recovered'] - before} CDRs recovered, none counted twice"
    )
    await _authorizations(daemon)
    await sink.wait_for(10, timeout=60)
    return await _settle(daemon)


async def _authorizations(daemon: Daemon) -> None:
    """The dialplan asks before each call: AGI(agi://127.0.0.1:PORT/authorize,account,number,ip)."""
    port = daemon.config.agi.port
    asks = [
        ("acct1002", "0721000001", "127.0.0.1", "demo.1"),
        ("acct1001", "0212345678", "127.0.0.1", "demo.2"),
        ("acct1001", "0212345678", "203.0.113.7", "demo.3"),
        ("acct1001", "0900123456", "127.0.0.1", "demo.4"),
    ]
    for account, number, ip, uid in asks:
        result = await agi_call("127.0.0.1", port, "authorize", [account, number, ip], {"uniqueid": uid})
        v = result.variables
        verdict = v.get(dv.AUTH, "?")
        detail = f"MAXSEC={v.get(dv.MAXSEC)}" if verdict == dv.ALLOW else f"reason={v.get(dv.REASON)}"
        print(f"  FastAGI authorize {account} -> {number} from {ip}: {verdict} {detail}")


def _report(out: Path, code: int, status: dict[str, Any], db_path: Path, sink: SmtpSink) -> None:
    info = db.info(db_path)
    events = dict(sorted(status["events"].items()))
    translated = dict(sorted(status["translated"].items()))
    report = {
        "exit_code": code,
        "ami": status["ami"],
        "events_by_type": events,
        "domain_events": translated,
        "reconcile": status["reconcile"],
        "cdrs": status["cdrs"],
        "money": status["money"],
        "accounts": reports.list_accounts(db_path),
        "database": info,
        "mail": [str(m.path) for m in sink.messages],
        "log": str(out / "daemon.log"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print()
    print(f"Events seen: {sum(events.values())} ({', '.join(f'{k} {v}' for k, v in events.items())})")
    print(f"Domain events: {', '.join(f'{k} {v}' for k, v in translated.items())}")
    rec = status["reconcile"]
    print(
        f"CDRs stored once each: {status['cdrs']['recorded']} ({rec['recovered']} recovered from Master.csv);"
        f" duplicates ignored: {status['cdrs']['duplicates']} (AMI replays and Master.csv twins)"
    )
    print(
        f"Database: {info['path']} (schema v{info['schema_version']}, WAL, went live {info['went_live_at']},"
        f" outbox {info['outbox']})"
    )
    money = status["money"] or {}
    print(
        f"Money: {money.get('charged', 0)} calls charged, authorisations allowed {money.get('allowed', 0)},"
        f" denied {money.get('denied', {})}"
    )
    for acct in reports.list_accounts(db_path):
        print(f"  {acct['code']}: balance {format_ron(acct['balance'])}")
    print(f"E-mails written: {len(sink.messages)} in {out / 'mail'}")
    for m in sink.messages:
        subject = email.message_from_bytes(m.data, policy=email.policy.default)["Subject"]
        print(f"  {m.path}  to {', '.join(m.rcpt_tos)}: {subject}")
    print(f"Daemon log (JSON, personal data masked): {out / 'daemon.log'}")
    print(f"Report: {out / 'report.json'}")
    print(f"Demo finished; daemon exit code {code}. Output in {out}")


async def run_demo(output: Path) -> int:
    out = await asyncio.to_thread(_prepare, output)
    runtime = Path(tempfile.mkdtemp(prefix="cpagi-demo-"))
    with (out / "daemon.log").open("w", encoding="utf-8") as log_file:
        configure_logging(level="info", fmt="json", mask_personal_data=True, stream=log_file)
        sink = SmtpSink(out / "mail")
        ami = AmiReplayServer("clickphone", DEMO_SECRET)
        await sink.start()
        await ami.start()
        config_file = out / "clickphone-agi.yaml"
        agi_port = await asyncio.to_thread(_free_port)
        config_text = _config_text(out, ami.port, sink.port, runtime / "control.sock", agi_port)
        config_file.write_text(config_text, encoding="utf-8")
        loaded = load_config(config_file)
        daemon = Daemon(loaded, config_path=config_file, install_signal_handlers=False, clock=ShiftedClock(DEMO_NOW))
        print(f"clickphone-agi demo: simulated Asterisk on 127.0.0.1:{ami.port}, mail sink on 127.0.0.1:{sink.port}")
        run = asyncio.create_task(daemon.run())
        try:
            status = await _script(out, daemon, ami, sink)
        finally:
            daemon.request_stop()
            code = await run
            await ami.close()
            await sink.close()
            shutil.rmtree(runtime, ignore_errors=True)
    _report(out, code, status, loaded.config.database.path, sink)
    return code
