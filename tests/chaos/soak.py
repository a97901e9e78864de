"""The soak: a long stream of AMI events through the running daemon, its memory sampled each second.

The fake Asterisk sends synthetic calls (:mod:`clickphone_agi.sim.traffic`) at a fixed event rate:
mostly the ``full_noise`` recording (VarSet, Newexten, Newstate, bridges, RTCP… around one CDR that
is charged), plus plain answered, long and busy calls; every CDR also goes to Master.csv, which the
daemon re-reads every few seconds as it would in production. The daemon's RSS is read from
``/proc/<pid>/status`` (VmRSS) once a second. At the end: the peak, the growth over the second half
of the stream, the ingest queue's high-water mark and drops, Asterisk-side slow-client drops, and
every billing CDR charged exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import sqlite3
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from clickphone_agi.adapters import control
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.domain.accounts import Account
from clickphone_agi.sim.ami_server import AmiReplayServer
from clickphone_agi.sim.traffic import AsteriskFiles, CallFactory, SynthCall, load_templates
from tests.chaos.driver import FIRST_CALL, SECRET, SYSTEM, TARIFFS, ZONE, price, provision
from tests.conftest import write_secret
from tests.daemon_harness import DaemonProcess

# ~80 % of the events are the noise recording; every call has exactly one charged CDR but busy ones
SOAK_MIX = (("full_noise", 70), ("answered_call", 12), ("long_call", 8), ("busy_call", 10))
GOAL_EVENTS = 1_000_000  # the soak the memory goals are stated for
ACCOUNTS = tuple(f"acct40{n:02d}" for n in range(1, 21))


@dataclass
class SoakReport:
    events_target: int
    events_sent: int = 0
    lost_on_wire: int = 0
    calls: int = 0
    cpu_seconds: float = 0.0  # the daemon's, when sampling stopped
    rate: float = 0.0  # events per second asked for
    seconds: float = 0.0  # sending time
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, RSS KiB)
    queue: dict[str, Any] = field(default_factory=dict)
    slow_client_drops: int = 0
    billing_cdrs: int = 0
    charged: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def peak_mb(self) -> float:
        return max((kib for _, kib in self.samples), default=0) / 1024

    def _sending(self) -> list[int]:
        return [kib for t, kib in self.samples if t <= self.seconds]

    @property
    def mid_mb(self) -> float:
        """RSS at half the stream (median of the three samples around it)."""
        sending = self._sending()
        if not sending:
            return 0.0
        mid = len(sending) // 2
        return statistics.median(sending[max(0, mid - 1) : mid + 2]) / 1024

    @property
    def end_mb(self) -> float:
        """RSS at the end of the stream (median of the last three samples)."""
        sending = self._sending()
        return statistics.median(sending[-3:]) / 1024 if sending else 0.0

    @property
    def growth_percent(self) -> float:
        """Growth over the second half of the stream: end against mid."""
        return (self.end_mb - self.mid_mb) / self.mid_mb * 100 if self.mid_mb else 0.0

    def summary(self) -> str:
        # the goals are for 1,000,000 events: a shorter run ends while the bounded
        # structures (the missed-call grace, the ended channels) are still filling
        scope = "" if self.events_target >= GOAL_EVENTS else f", judged on {GOAL_EVENTS:,} events only"
        return (
            f"soak events={self.events_sent} calls={self.calls} at {self.rate:.0f} ev/s in {self.seconds:.1f}s:"
            f" RSS peak {self.peak_mb:.1f} MB, mid {self.mid_mb:.1f} MB, end {self.end_mb:.1f} MB,"
            f" growth over the second half {self.growth_percent:+.1f}%"
            f" (goals < 100 MB: {'met' if self.peak_mb < 100 else 'NOT met'},"
            f" < 5 %: {'met' if self.growth_percent < 5 else 'NOT met'}{scope}); daemon CPU {self.cpu_seconds:.0f}s;"
            f" queue high water {self.queue.get('high_water')}/{self.queue.get('max')},"
            f" dropped {self.queue.get('dropped')}; Asterisk slow-client drops {self.slow_client_drops};"
            f" billing CDRs {self.billing_cdrs}, charged {self.charged}; problems {len(self.problems)}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "events_target": self.events_target,
            "events_sent": self.events_sent,
            "calls": self.calls,
            "rate_events_per_second": self.rate,
            "sending_seconds": round(self.seconds, 1),
            "rss_mb": {
                "peak": round(self.peak_mb, 1),
                "mid": round(self.mid_mb, 1),
                "end": round(self.end_mb, 1),
                "growth_second_half_percent": round(self.growth_percent, 2),
            },
            "rss_samples_kib": self.samples,
            "daemon_cpu_seconds": round(self.cpu_seconds, 1),
            "lost_on_wire": self.lost_on_wire,
            "queue": self.queue,
            "slow_client_drops": self.slow_client_drops,
            "billing_cdrs": self.billing_cdrs,
            "charged": self.charged,
            "problems": self.problems,
        }


def soak_calls(factory: CallFactory, seed: int) -> Iterator[SynthCall]:
    rng = random.Random(seed)
    names = [n for n, _ in SOAK_MIX]
    weights = [w for _, w in SOAK_MIX]
    for index in itertools.count():
        scenario = rng.choices(names, weights)[0]
        start = FIRST_CALL + index * timedelta(seconds=7)
        yield factory.call(index, scenario, rng.choice(ACCOUNTS), start, billsec=rng.randint(1, 900))


class Soak:
    def __init__(self, workdir: Path, events: int, rate: float, seed: int = 11) -> None:
        self.dir = workdir
        self.report = SoakReport(events_target=events, rate=rate)
        self.calls = soak_calls(CallFactory(load_templates(), zone=ZONE), seed)
        self.files = AsteriskFiles(workdir / "cdr-csv" / "Master.csv", workdir / "voicemail", workdir / "fax")
        self.db_path = workdir / "db" / "soak.db"
        self.billing: dict[str, int] = {}  # cdr key → cost, by this test's own pricing

    def _config(self, ami_port: int) -> Path:
        write_secret(self.dir / "ami-secret", SECRET + "\n")
        (self.dir / "tariffs.yaml").write_text(TARIFFS)
        path = self.dir / "clickphone-agi.yaml"
        path.write_text(
            f"""# the soak's daemon
ami:
  port: {ami_port}
  secret_file: {self.dir / "ami-secret"}
  backoff_initial: 0.05
  backoff_max: 0.3
smtp:
  enabled: false
database:
  path: {self.db_path}
billing:
  tariffs_file: {self.dir / "tariffs.yaml"}
  billing_cdr:
    destination_contexts: [lab-outbound]
notifications:
  inbound_contexts: [lab-inbound]
asterisk:
  system_name: {SYSTEM}
  voicemail_spool: {self.dir / "voicemail"}
  fax_spool: {self.dir / "fax"}
  master_csv: {self.files.master_csv}
  reconcile_interval: 5
logging:
  level: info
  format: json
daemon:
  control_socket: {self.dir / "control.sock"}
  drain_timeout: 30
"""
        )
        return path

    async def _provision(self) -> None:
        await provision(
            self.db_path,
            [(Account(code=c, name=f"Abonat {c}", email=f"{c}@mail.example", billing="postpaid"), 0) for c in ACCOUNTS],
        )

    async def run(self) -> SoakReport:
        # Asterisk's writetimeout is 100 ms; 1 s here, so that a scheduling hiccup of this shared
        # 2-core machine is not taken for a reader that blocks (which would still be caught)
        async with AmiReplayServer("clickphone", SECRET, write_timeout=1.0) as ami:
            config = self._config(ami.port)
            await self._provision()
            daemon = DaemonProcess(config)
            await daemon.start()
            try:
                await daemon.wait_log(lambda e: e.get("event") == "daemon.ready", timeout=60)
                await ami.wait_for_login(30)
                assert daemon.proc is not None
                began = time.monotonic()
                sampler = asyncio.create_task(self._sample(daemon.proc.pid, began))
                try:
                    await self._send(ami)
                    self.report.seconds = time.monotonic() - began
                    await self._settle()
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                self.report.queue = await self._status()
                self.report.slow_client_drops = ami.slow_client_drops
                daemon.signal(signal.SIGTERM)
                code = await daemon.wait(120)
                if code != 0:
                    self.report.problems.append(f"the daemon exited {code}")
            finally:
                await daemon.kill()
                (self.dir / "daemon.log").write_text("\n".join(daemon.raw) + "\n")
                self.files.close()
        if any(e.get("event") == "ami.queue_full" for e in daemon.lines):
            self.report.problems.append("the daemon logged ami.queue_full")
        self._verify()
        return self.report

    async def _send(self, ami: AmiReplayServer) -> None:
        """Calls until the event target, paced to the event rate; each call in one write."""
        report = self.report
        began = time.monotonic()
        while report.events_sent < report.events_target:
            call: SynthCall = next(self.calls)
            self.files.append_csv(b"".join(r for r, _ in call.segments()))
            try:
                await ami.send_raw(b"".join(call.frames))
            except LookupError:  # the daemon is not logged in (it reconnects): a finding, and lost
                report.lost_on_wire += call.events
            report.events_sent += call.events
            report.calls += 1
            for cdr in call.cdrs:
                if cdr.get("LastApplication") == "Dial" and cdr.get("Disposition") == "ANSWERED":
                    key = f"cdr:{SYSTEM}:{cdr.get('UniqueID')}:{cdr.get('DestinationChannel') or ''}"
                    self.billing[key] = price(cdr.get("Destination") or "", int(cdr.get("BillableSeconds") or 0))
            ahead = report.events_sent / report.rate - (time.monotonic() - began)
            await asyncio.sleep(max(0.0, ahead))  # yields even when behind: Pings get answered

    async def _sample(self, pid: int, began: float) -> None:
        """VmRSS every second, and the daemon's CPU time (utime + stime) for the report."""
        status, stat = Path(f"/proc/{pid}/status"), Path(f"/proc/{pid}/stat")
        ticks = os.sysconf("SC_CLK_TCK")
        while True:
            text = await asyncio.to_thread(status.read_text)
            kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:"))
            fields = (await asyncio.to_thread(stat.read_text)).rsplit(")", 1)[1].split()
            self.report.cpu_seconds = (int(fields[11]) + int(fields[12])) / ticks
            self.report.samples.append((round(time.monotonic() - began, 2), kib))
            await asyncio.sleep(1.0)

    async def _settle(self, timeout: float = 300.0) -> None:
        """Until every CDR sent is recorded (the daemon may still be working off its queue)."""
        wanted = len(self.billing)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self._charged_count) >= wanted:
                return
            await asyncio.sleep(0.5)
        self.report.problems.append(f"not every billing CDR was charged within {timeout:.0f} s")

    def _charged_count(self) -> int:
        with contextlib.closing(db.connect_sync(self.db_path, readonly=True)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM ledger WHERE kind = 'call'").fetchone()[0])

    async def _status(self) -> dict[str, Any]:
        status = await asyncio.to_thread(control.call, self.dir / "control.sock", "status", {})
        return dict(status["queue"])

    def _verify(self) -> None:
        report = self.report
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT ref, amount FROM ledger WHERE kind = 'call'").fetchall()
            refs = Counter(r for r, _ in rows)
            balances = dict(conn.execute("SELECT account, balance FROM balances").fetchall())
            sums = dict(conn.execute("SELECT account, SUM(amount) FROM ledger GROUP BY account").fetchall())
            check = conn.execute("PRAGMA integrity_check").fetchall()
        report.billing_cdrs = len(self.billing)
        report.charged = len(refs)
        if set(refs) != set(self.billing):
            lost, extra = set(self.billing) - set(refs), set(refs) - set(self.billing)
            report.problems.append(f"charged CDRs differ: {len(lost)} lost, {len(extra)} unexpected")
        wrong = sum(1 for ref, amount in rows if -amount != self.billing.get(ref, -amount))
        if wrong:
            report.problems.append(f"{wrong} CDRs charged a wrong amount")
        doubled = sum(1 for n in refs.values() if n > 1)
        if doubled:
            report.problems.append(f"{doubled} CDRs charged more than once")
        if balances != sums:
            report.problems.append("a cached balance differs from its ledger sum")
        if check != [("ok",)]:
            report.problems.append(f"integrity_check: {check[:3]}")
        if report.queue.get("dropped"):
            report.problems.append(f"the ingest queue dropped {report.queue['dropped']} events")
        if report.lost_on_wire:
            report.problems.append(f"{report.lost_on_wire} events sent while the daemon was not logged in")
        if report.slow_client_drops:
            report.problems.append(f"Asterisk (the simulator) dropped the daemon {report.slow_client_drops} times")
