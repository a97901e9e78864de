"""The crash test's driver: the real daemon as a subprocess, SIGKILLed again and again while a fake
Asterisk keeps calling, and an independent account of what must have happened.

The pieces (all real, all on loopback):

* :class:`~clickphone_agi.sim.ami_server.AmiReplayServer` is Asterisk's AMI. The traffic task
  sends synthetic calls (:mod:`clickphone_agi.sim.traffic`) whether or not the daemon is there:
  while it is down the events are lost on the wire, as with a real Asterisk, and exist only in
  Master.csv, the voicemail spool and the fax sidecars.
* An aiosmtpd sink records every message (Message-ID, X-ClickPhone-Kind, recipient).
* The supervisor starts ``python -m clickphone_agi run`` and kills it: in the fixed mode it arms
  one crash point per start (``CLICKPHONE_AGI_CRASH_AT``, :mod:`clickphone_agi.faults`) and waits
  for the daemon to SIGKILL itself there; in the random mode it sends SIGKILL itself, a seeded
  0.3-1 s after each start became ready. The last start is left alone to drain.

:class:`Expected` is computed from the generated calls alone, with this file's own pricing
(:func:`price`), never with the daemon's code, and :func:`verify` compares it with the database
file and the sink after a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import os
import random
import signal
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiosmtpd.smtp import SMTP, Envelope, Session

from clickphone_agi import faults
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import SystemClock
from clickphone_agi.domain.accounts import Account, Mailbox
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.ami_server import AmiReplayServer
from clickphone_agi.sim.smtp_sink import SinkHandler, SmtpSink
from clickphone_agi.sim.traffic import AsteriskFiles, CallFactory, SynthCall, load_templates
from tests.conftest import write_secret
from tests.daemon_harness import DaemonProcess

SYSTEM = "chaos-pbx"
ZONE = ZoneInfo("Europe/Bucharest")
GO_LIVE = datetime(2026, 11, 27, tzinfo=UTC)
FIRST_CALL = datetime(2026, 12, 1, 9, 0, 0)  # naive: Asterisk's local time (Europe/Bucharest)
CALL_SPACING = timedelta(seconds=53)  # PBX time between two calls' starts: ~1,600 calls a day
MID_DOMAIN = "chaos.clickphone.example"
SECRET = "chaos-secret"

# The scenario mix: most calls are charged, and every kind of notice is represented.
MIX = (
    ("answered_call", 40),
    ("long_call", 12),
    ("busy_call", 8),
    ("missed_call", 16),
    ("voicemail", 12),
    ("fax", 6),
    ("fax_failed", 6),
)

TARIFFS = """# The crash test's tariffs (RON); longest prefix wins.
currency: RON
tariffs:
  - {prefix: "+4021", name: Bucharest fixed, class: national, rate_per_minute: "0.45", connection_fee: "0.10",
     increments: 60/1, effective_from: 2026-01-01}
  - {prefix: "+40216", name: Bucharest 6, class: national, rate_per_minute: "0.0325", increments: 1/1,
     minimum_charge: "0.05", effective_from: 2026-01-01}
"""


def price(destination: str, billsec: int) -> int:
    """This test's own reading of :data:`TARIFFS`, in bani: integer arithmetic only."""
    if billsec <= 0:
        return 0
    if destination.startswith("0040216"):  # 3.25 bani/min, 1/1, minimum 5 bani
        return max(5, -(-325 * billsec // 6000))
    billed = max(60, billsec)  # 60/1: the first minute whole, then per second
    return 10 + -(-45 * billed // 60)  # 45 bani/min rounded up once, plus the 10 bani fee


# ---- the traffic plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountPlan:
    code: str
    email: str
    language: str
    billing: str
    opening: int
    threshold: int
    daily_limit: int | None

    @property
    def mailbox(self) -> str:
        return self.code.removeprefix("acct")

    def account(self) -> Account:
        return Account(
            code=self.code,
            name=f"Abonat {self.code}",
            email=self.email,
            language="en" if self.language == "en" else "ro",
            billing="postpaid" if self.billing == "postpaid" else "prepaid",
            daily_limit=self.daily_limit,
            low_balance_threshold=self.threshold,
            mailboxes=(Mailbox(f"{self.mailbox}@default"),),
        )


CODES = ("acct3001", "acct3002", "acct3003", "acct3004", "acct3005", "acct3006")


def call_plan(seed: int) -> Iterator[tuple[str, str, int]]:
    """An endless, seeded sequence of (scenario, account, billable seconds)."""
    rng = random.Random(seed)
    names = [name for name, _ in MIX]
    weights = [w for _, w in MIX]
    while True:
        scenario = rng.choices(names, weights)[0]
        yield scenario, rng.choice(CODES), rng.randint(1, 600)


def make_calls(factory: CallFactory, seed: int) -> Iterator[SynthCall]:
    for index, (scenario, code, billsec) in enumerate(call_plan(seed)):
        start = FIRST_CALL + index * CALL_SPACING
        yield factory.call(index, scenario, code, start, billsec=billsec, mailbox=code.removeprefix("acct"))


def plan_accounts(first_calls: list[SynthCall]) -> list[AccountPlan]:
    """Limits and balances sized on the first calls so that thresholds are really crossed: two tight
    daily limits (80 % and 100 % fire), a looser one (80 % on the busiest day only), none for the
    other three; balances that run below their threshold for four prepaid accounts, one that
    stays above, and a postpaid account (below its threshold, but postpaid gets no such mail)."""
    expected = Expected.of(first_calls, [])
    per_day: dict[str, int] = {}
    for (code, _day), spent in expected.spend.items():
        per_day[code] = max(per_day.get(code, 0), spent)
    total = {code: expected.charged.get(code, 0) for code in CODES}
    plans = []
    for n, code in enumerate(CODES):
        day_max = max(per_day.get(code, 0), 100)
        spend = max(total[code], 100)
        limit = {0: day_max // 2, 1: day_max * 11 // 10, 2: day_max // 3}.get(n)
        opening = spend * 2 if n == 4 else spend // 2 + 1000  # acct3005 never runs low
        threshold = 1000
        billing = "postpaid" if n == 5 else "prepaid"
        plans.append(
            AccountPlan(code, f"{code}@mail.example", "en" if n % 2 else "ro", billing, opening, threshold, limit)
        )
    return plans


# ---- what must have happened -----------------------------------------------------------------


@dataclass
class Expected:
    """Everything the daemon must end with, from the generated calls and :func:`price` alone."""

    cdr_keys: set[str] = field(default_factory=set)
    billing: dict[str, tuple[str, int]] = field(default_factory=dict)  # cdr key → (account, cost)
    charged: dict[str, int] = field(default_factory=dict)  # account → total cost
    spend: dict[tuple[str, str], int] = field(default_factory=dict)  # (account, local day) → cost
    balances: dict[str, int] = field(default_factory=dict)
    mails: dict[str, tuple[str, str]] = field(default_factory=dict)  # key → (kind, recipient)
    low_balance: dict[str, set[str]] = field(default_factory=dict)  # account → the keys it may carry

    @classmethod
    def of(cls, calls: list[SynthCall], accounts: list[AccountPlan]) -> Expected:
        exp = cls()
        emails = {a.code: a.email for a in accounts}
        for call in calls:
            for cdr in call.cdrs:
                key = f"cdr:{SYSTEM}:{cdr.get('UniqueID')}:{cdr.get('DestinationChannel') or ''}"
                exp.cdr_keys.add(key)
                billsec = int(cdr.get("BillableSeconds") or 0)
                is_billing = (
                    cdr.get("LastApplication") == "Dial"
                    and cdr.get("Disposition") == "ANSWERED"
                    and cdr.get("DestinationContext") == "lab-outbound"
                    and billsec > 0
                )
                if is_billing:
                    cost = price(cdr.get("Destination") or "", billsec)
                    code = cdr.get("AccountCode") or ""
                    day = (cdr.get("AnswerTime") or "")[:10]  # Asterisk's zone is the billing zone
                    exp.billing[key] = (code, cost)
                    exp.charged[code] = exp.charged.get(code, 0) + cost
                    exp.spend[(code, day)] = exp.spend.get((code, day), 0) + cost
            to = emails.get(call.account, "")
            if call.scenario == "missed_call":
                exp.mails[f"missed:{SYSTEM}:{call.linked_id}"] = ("missed_call", to)
            elif call.voicemail is not None:
                vm = call.voicemail
                exp.mails[f"vm:{SYSTEM}:{vm.mailbox}@{vm.context}:{vm.msg_id}"] = ("voicemail", to)
            elif call.fax is not None:
                kind = "fax_received" if call.fax.status == "SUCCESS" else "fax_failed"
                exp.mails[f"fax:{SYSTEM}:{call.fax.unique_id}:receive"] = (kind, to)
        for plan in accounts:
            exp.balances[plan.code] = plan.opening - exp.charged.get(plan.code, 0)
            if plan.daily_limit is not None:
                for (code, day), spent in exp.spend.items():
                    for pct in (80, 100):
                        if code == plan.code and spent >= -(-plan.daily_limit * pct // 100):
                            exp.mails[f"limit:{code}:{day}:{pct}"] = ("daily_limit", plan.email)
            if plan.billing == "prepaid" and exp.balances[plan.code] < plan.threshold:
                refs = {k for k, (code, cost) in exp.billing.items() if code == plan.code and cost > 0}
                exp.low_balance[plan.code] = {f"lowbal:{plan.code}:{ref}" for ref in refs}
        return exp


# ---- running it ------------------------------------------------------------------------------


@dataclass
class ChaosConfig:
    min_calls: int
    calls_per_second: float
    schedule: tuple[str, ...] = ()  # crash specs, one per start (fixed mode)
    random_kills: int = 0  # random mode: this many SIGKILLs from outside
    kill_delay: tuple[float, float] = (0.3, 1.0)
    seed: int = 7
    point_timeout: float = 90.0  # a fixed point not reached by then is a failure
    drain_timeout: float = 120.0


@dataclass
class Kill:
    spec: str
    how: str  # "crash_point" (the daemon killed itself there) or "external"
    after: float  # seconds since that start
    calls_sent: int


@dataclass
class Report:
    mode: str
    seed: int
    kills: list[Kill] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    calls: int = 0
    events_sent: int = 0
    events_lost_on_wire: int = 0
    elapsed: float = 0.0
    mails_expected: int = 0
    mails_received: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    duplicate_causes: dict[str, int] = field(default_factory=dict)  # kill spec → duplicates it caused
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    final_exit: int | None = None
    workdir: str = ""

    @property
    def duplicate_count(self) -> int:
        return sum(self.duplicates.values())

    def summary(self) -> str:
        return (
            f"chaos[{self.mode}] seed={self.seed} kills={len(self.kills)} calls={self.calls}"
            f" events={self.events_sent} (lost on the wire while down: {self.events_lost_on_wire})"
            f" mails expected={self.mails_expected} received={self.mails_received}"
            f" duplicates={self.duplicate_count} missing={len(self.missing)} unexpected={len(self.unexpected)}"
            f" problems={len(self.problems)} elapsed={self.elapsed:.1f}s"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "mode": self.mode,
            "seed": self.seed,
            "kills": [k.__dict__ for k in self.kills],
            "unreached": self.unreached,
            "calls": self.calls,
            "events_sent": self.events_sent,
            "events_lost_on_wire": self.events_lost_on_wire,
            "elapsed_seconds": round(self.elapsed, 1),
            "mails": {
                "expected": self.mails_expected,
                "received": self.mails_received,
                "duplicates": self.duplicates,
                "duplicate_causes": self.duplicate_causes,
                "missing": self.missing[:50],
                "unexpected": self.unexpected[:50],
            },
            "problems": self.problems[:50],
            "final_exit": self.final_exit,
            "workdir": self.workdir,
        }


class _Sink(SinkHandler):
    """The sink's handler, also noting which daemon start was running when each message came."""

    def __init__(self) -> None:
        super().__init__()
        self.start = 0
        self.starts: list[int] = []  # parallel to ``messages``
        self.times: list[float] = []  # wall clock of each 250, parallel to ``messages``

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.starts.append(self.start)
        self.times.append(time.time())
        return reply


class ChaosRun:
    """One crash-test run in ``workdir`` (a short path: it holds the control socket)."""

    def __init__(self, workdir: Path, cfg: ChaosConfig, mode: str) -> None:
        self.dir = workdir
        self.cfg = cfg
        self.report = Report(mode=mode, seed=cfg.seed, workdir=str(workdir))
        self.sent: list[SynthCall] = []
        self.kills_done = asyncio.Event()
        self.traffic_done = asyncio.Event()
        self.factory = CallFactory(load_templates(), zone=ZONE)
        self.calls = make_calls(self.factory, cfg.seed)
        # the accounts are sized on the calls the run makes at least; they are made now, sent later
        self.queued = [next(self.calls) for _ in range(cfg.min_calls)]
        self.accounts = plan_accounts(self.queued)
        self.db_path = workdir / "db" / "chaos.db"
        self.files = AsteriskFiles(workdir / "cdr-csv" / "Master.csv", workdir / "voicemail", workdir / "fax")

    # -- setting up ----------------------------------------------------------------------------

    def _write_config(self, ami_port: int, smtp_port: int) -> Path:
        write_secret(self.dir / "ami-secret", SECRET + "\n")
        (self.dir / "tariffs.yaml").write_text(TARIFFS)
        path = self.dir / "clickphone-agi.yaml"
        path.write_text(
            f"""# the crash test's daemon
ami:
  port: {ami_port}
  secret_file: {self.dir / "ami-secret"}
  ping_interval: 5
  backoff_initial: 0.05
  backoff_max: 0.3
smtp:
  port: {smtp_port}
  message_id_domain: {MID_DOMAIN}
  retry_min: 1
  retry_max: 2
  timeout: 10
database:
  path: {self.db_path}
billing:
  tariffs_file: {self.dir / "tariffs.yaml"}
  billing_cdr:
    destination_contexts: [lab-outbound]
notifications:
  inbound_contexts: [lab-inbound]
  missed_call_grace: 0.5
  scan_interval: 2
  voicemail_maxmsg_warn_at: 10000
asterisk:
  system_name: {SYSTEM}
  voicemail_spool: {self.dir / "voicemail"}
  fax_spool: {self.dir / "fax"}
  master_csv: {self.files.master_csv}
  reconcile_interval: 2
logging:
  level: info
  format: json
daemon:
  control_socket: {self.dir / "control.sock"}
  drain_timeout: 10
"""
        )
        return path

    async def _provision(self) -> None:
        await provision(self.db_path, [(a.account(), a.opening) for a in self.accounts])

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> Report:
        started = time.monotonic()
        sink = SmtpSink()
        sink.handler = self.sink = _Sink()
        ami = AmiReplayServer("clickphone", SECRET)
        await sink.start()
        await ami.start()
        try:
            config = self._write_config(ami.port, sink.port)
            await self._provision()
            traffic = asyncio.create_task(self._traffic(ami))
            final = DaemonProcess(config)
            try:
                await self._supervise(config)
                self.sink.start = len(self.report.kills)
                await final.start()  # the last start is left alone: it catches up, then drains
            finally:
                self.kills_done.set()
                await traffic
            self.report.calls = len(self.sent)
            expected = Expected.of(self.sent, self.accounts)
            try:
                await self._drain(expected, sink)
            finally:
                if final.proc is not None and final.proc.returncode is None:
                    final.signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        self.report.final_exit = await final.wait(60)
                await final.kill()
                self._save_log(final, "final")
            self.report.elapsed = time.monotonic() - started
            verify(self.db_path, expected, self.accounts, sink, self.report)
        finally:
            self.files.close()
            await ami.close()
            await sink.close()
        return self.report

    async def _traffic(self, ami: AmiReplayServer) -> None:
        """Calls at a steady pace, through Asterisk's three channels, until the supervisor is done
        and at least ``min_calls`` were made; events sent while no daemon listens are lost."""
        interval = 1.0 / self.cfg.calls_per_second
        next_at = time.monotonic()
        while not (self.kills_done.is_set() and not self.queued):
            call = self.queued.pop(0) if self.queued else next(self.calls)
            await asyncio.to_thread(self.files.spool, call)
            for n, (records, frames) in enumerate(call.segments()):
                self.files.append_csv(records)
                count = frames.count(b"\r\n\r\n")
                self.report.events_sent += count
                # the first run of frames goes in two writes cut mid-frame, as TCP segments cut them
                cut = len(frames) // 2 if n == 0 else len(frames)
                try:
                    await ami.send_raw(frames[:cut])
                    if cut < len(frames):
                        await asyncio.sleep(0.002)
                        await ami.send_raw(frames[cut:])
                except LookupError:  # nobody logged in: gone, as with a real Asterisk
                    self.report.events_lost_on_wire += count
            self.sent.append(call)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        self.traffic_done.set()

    async def _supervise(self, config: Path) -> None:
        if self.cfg.random_kills:
            await self._random_kills(config)
            return
        for n, spec in enumerate(self.cfg.schedule):
            faults.parse(spec)  # a typo fails here, not as a point that never fires
            self.sink.start = n
            daemon = DaemonProcess(config, env={faults.ENV_VAR: spec})
            began = time.monotonic()
            await daemon.start()
            try:
                code = await daemon.wait(self.cfg.point_timeout)
            except TimeoutError:
                self.report.unreached.append(spec)
                await daemon.kill()
                code = -signal.SIGKILL
                how = "external"
            else:
                fired = any(e.get("event") == "fault.crash_point" and e.get("point") for e in daemon.lines)
                how = "crash_point" if fired else f"exit {code}"
            self._save_log(daemon, f"{n:02d}")
            if code != -signal.SIGKILL:
                self.report.problems.append(f"start {n} ({spec}) ended with exit code {code}, not SIGKILL")
            self.report.kills.append(Kill(spec, how, round(time.monotonic() - began, 2), len(self.sent)))

    async def _random_kills(self, config: Path) -> None:
        rng = random.Random(self.cfg.seed)
        low, high = self.cfg.kill_delay
        for n in range(self.cfg.random_kills):
            self.sink.start = n
            daemon = DaemonProcess(config)
            began = time.monotonic()
            await daemon.start()
            try:
                await daemon.wait_log(lambda e: e.get("event") == "daemon.ready", timeout=60)
            except AssertionError as exc:  # it exited on its own: that is a finding
                self.report.problems.append(f"start {n}: {exc}")
            delay = rng.uniform(low, high)
            await asyncio.sleep(delay)
            if daemon.proc is not None and daemon.proc.returncode is None:
                daemon.proc.send_signal(signal.SIGKILL)
            code = await daemon.wait(30)
            self._save_log(daemon, f"{n:03d}")
            if code != -signal.SIGKILL:
                self.report.problems.append(f"start {n} ended with exit code {code} before its kill")
            self.report.kills.append(
                Kill(f"random {delay:.2f}s after ready", "external", round(time.monotonic() - began, 2), len(self.sent))
            )

    async def _drain(self, expected: Expected, sink: SmtpSink) -> None:
        """Let the last daemon finish: every CDR recorded, the outbox empty, every expected mail
        in the sink (or ``drain_timeout``, after which :func:`verify` says what is missing)."""
        wanted = {message_id(k, MID_DOMAIN) for k in expected.mails}
        got: set[str] = set()
        seen = 0
        deadline = time.monotonic() + self.cfg.drain_timeout
        while time.monotonic() < deadline:
            arrived = sink.messages[seen:]
            seen += len(arrived)
            got.update(_header(m.data, "Message-ID") for m in arrived)
            if wanted <= got and await asyncio.to_thread(_settled, self.db_path, len(expected.cdr_keys)):
                await asyncio.sleep(1.0)  # a last look for stragglers (duplicates)
                return
            await asyncio.sleep(0.5)

    def _save_log(self, daemon: DaemonProcess, name: str) -> None:
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "logs" / f"daemon-{name}.log").write_text("\n".join(daemon.raw) + "\n")


def _settled(path: Path, cdrs: int) -> bool:
    with contextlib.closing(db.connect_sync(path, readonly=True)) as conn:
        pending = conn.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0]
        recorded = conn.execute("SELECT COUNT(*) FROM cdrs").fetchone()[0]
    return bool(pending == 0 and recorded >= cdrs)


def _header(data: bytes, name: str) -> str:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return str(message.get(name, "")).strip()


# ---- the checks ------------------------------------------------------------------------------


def verify(path: Path, exp: Expected, accounts: list[AccountPlan], sink: SmtpSink, report: Report) -> None:
    """Compare the database file and the sink with :class:`Expected`; every difference becomes a
    line in ``report.problems`` / ``missing`` / ``unexpected`` / ``duplicates``."""
    problems = report.problems
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            problems.append(f"integrity_check: {check[:5]}")
        balances = dict(conn.execute("SELECT account, balance FROM balances").fetchall())
        ledger = dict(conn.execute("SELECT account, SUM(amount) FROM ledger GROUP BY account").fetchall())
        spend = {(a, d): s for a, d, s in conn.execute("SELECT account, day, spent FROM daily_spend")}
        calls = conn.execute("SELECT ref, account, amount FROM ledger WHERE kind = 'call'").fetchall()
        cdrs = {k for (k,) in conn.execute("SELECT key FROM cdrs")}
        outbox = dict(conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall())
    for plan in accounts:
        code = plan.code
        if balances.get(code) != exp.balances[code]:
            problems.append(f"{code}: balance {balances.get(code)} != expected {exp.balances[code]}")
        if ledger.get(code) != balances.get(code):
            problems.append(f"{code}: ledger sum {ledger.get(code)} != cached balance {balances.get(code)}")
    if spend != exp.spend:
        diff = {
            k: (spend.get(k), exp.spend.get(k)) for k in set(spend) | set(exp.spend) if spend.get(k) != exp.spend.get(k)
        }
        problems.append(f"daily spend differs (got, expected): {dict(list(diff.items())[:10])}")
    refs = Counter(ref for ref, _, _ in calls)
    doubled = [ref for ref, n in refs.items() if n > 1]
    if doubled:
        problems.append(f"{len(doubled)} CDRs charged more than once: {doubled[:5]}")
    charged = {ref: (acct, -amount) for ref, acct, amount in calls}
    if charged != exp.billing:
        lost = sorted(set(exp.billing) - set(charged))
        extra = sorted(set(charged) - set(exp.billing))
        wrong = sorted(k for k in set(charged) & set(exp.billing) if charged[k] != exp.billing[k])
        problems.append(
            f"charges: {len(lost)} lost {lost[:3]}, {len(extra)} unexpected {extra[:3]}, {len(wrong)} wrong {wrong[:3]}"
        )
    if cdrs != exp.cdr_keys:
        problems.append(
            f"CDRs: {len(exp.cdr_keys - cdrs)} lost {sorted(exp.cdr_keys - cdrs)[:3]},"
            f" {len(cdrs - exp.cdr_keys)} unexpected {sorted(cdrs - exp.cdr_keys)[:3]}"
        )
    if set(outbox) - {"sent"}:
        problems.append(f"outbox not all sent at the end: {outbox}")
    _verify_mail(exp, sink, report)


def _verify_mail(exp: Expected, sink: SmtpSink, report: Report) -> None:
    by_mid: dict[str, tuple[str, str, str]] = {}  # Message-ID → (key, kind, recipient)
    for key, (kind, to) in exp.mails.items():
        by_mid[message_id(key, MID_DOMAIN)] = (key, kind, to)
    plans = exp.low_balance
    low_mids: dict[str, tuple[str, str]] = {}
    for code, keys in plans.items():
        for key in keys:
            low_mids[message_id(key, MID_DOMAIN)] = (code, key)
    received: Counter[str] = Counter()
    low_seen: dict[str, set[str]] = {}
    starts = sink.handler.starts if isinstance(sink.handler, _Sink) else [0] * len(sink.messages)
    first_start: dict[str, int] = {}
    for m, start in zip(sink.messages, starts, strict=True):
        mid = _header(m.data, "Message-ID")
        kind = _header(m.data, "X-ClickPhone-Kind")
        rcpts = ",".join(m.rcpt_tos)
        if mid in by_mid:
            key, want_kind, want_to = by_mid[mid]
            if (kind, rcpts) != (want_kind, want_to):
                report.unexpected.append(f"{key}: got {kind} to {rcpts}, expected {want_kind} to {want_to}")
        elif mid in low_mids and kind == "low_balance":
            code, key = low_mids[mid]
            low_seen.setdefault(code, set()).add(key)
        else:
            key = ""
        if key:
            received[key] += 1
            first_start.setdefault(key, start)
        else:
            report.unexpected.append(f"{kind} to {rcpts} Message-ID {mid}")
    report.mails_expected = len(exp.mails) + len(plans)
    report.mails_received = len(sink.messages)
    report.missing = sorted(k for k in exp.mails if received[k] == 0)
    for code in plans:
        seen = low_seen.get(code, set())
        if not seen:
            report.missing.append(f"lowbal:{code}:*")
        elif len(seen) > 1:
            report.unexpected.append(f"{code}: {len(seen)} different low-balance notices: {sorted(seen)}")
    report.duplicates = {k: n - 1 for k, n in received.items() if n > 1}
    for key in report.duplicates:  # the copy sent before a kill: that kill's window caused it
        start = first_start[key]
        cause = report.kills[start].spec if start < len(report.kills) else "final start"
        report.duplicate_causes[cause] = report.duplicate_causes.get(cause, 0) + 1


def write_report(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")


def report_dir() -> Path:
    """Where the JSON reports go: ``CLICKPHONE_CHAOS_REPORT_DIR``, else a folder in the system's
    temporary directory that outlives the run's work directory."""
    out = Path(os.environ.get("CLICKPHONE_CHAOS_REPORT_DIR") or Path(tempfile.gettempdir()) / "clickphone-chaos")
    out.mkdir(parents=True, exist_ok=True)
    return out


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "yes", "true", "on")


async def provision(db_path: Path, accounts: list[tuple[Account, int]]) -> None:
    """Go-live baseline before the calls, then the accounts (with opening balances), before any daemon runs."""
    conn = db.connect_sync(db_path)
    try:
        db.migrate(conn, GO_LIVE, db_path)
    finally:
        conn.close()
    store = await SqliteStore.open(db_path, SystemClock())
    store.start()
    try:
        await store.write(import_unit(accounts))
    finally:
        await store.close()
