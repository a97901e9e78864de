"""AMI outages against the real daemon, on the injected clock.

The daemon runs in this process with a FakeClock (``Daemon(clock=...)``), against the fake
Asterisk on loopback and a real Master.csv. Each case: a call arrives normally; then the link
breaks in one of four ways; calls made meanwhile exist only in Master.csv (as with a real
Asterisk, whose cdr_csv keeps writing); the link comes back; one more call arrives. Checked:

* detected within two ping intervals of the injected clock (``ami.ping_interval`` 20 s):
  a cut link or a Shutdown at once, a half-open link (socket up, Pings unanswered) by the
  Ping watchdog after at most ``ping_interval + ping_timeout``;
* backed off: no reconnection before the backoff, each delay within the capped exponential
  bound (full jitter); after a refused login, nothing for ``ami.auth_backoff`` (300 s), much
  longer than ``ami.backoff_max`` — so fail2ban never sees a storm of failed logins;
* recovered: logged in again (a restarted Asterisk's new banner is read), and a call after
  the outage is recorded from AMI;
* nothing lost, nothing doubled: the calls made during the outage are recovered from
  Master.csv by the reconciliation that every (re)connection starts, and every CDR is in
  the database exactly once.

tests/test_ami_client.py tests the same client mechanisms one by one against the bare client;
tests/test_gapfree_cdrs.py a mid-frame kill with a logrotate, on the wall clock.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from clickphone_agi.adapters.ami.client import AmiClient
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.app import Daemon
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.domain.keys import cdr_key
from clickphone_agi.sim.ami_server import AmiReplayServer, Transcript, load_transcript, packaged_scenarios
from clickphone_agi.sim.master_csv import csv_record

pytestmark = pytest.mark.slow

SECRET = "labsecret"
PING_INTERVAL, PING_TIMEOUT = 20.0, 10.0
BACKOFF_INITIAL, BACKOFF_MAX, AUTH_BACKOFF = 1.0, 8.0, 300.0
TEMPLATE = packaged_scenarios()["answered_call"].read_bytes()
_IDS = re.compile(rb"1795882891\.(?=[0-9])")


def call(number: int, directory: Path) -> Transcript:
    """The recorded answered call (three CDRs) with ids of its own."""
    path = directory / f"call_{number}.ami"
    path.write_bytes(_IDS.sub(f"{1795900000 + number}.".encode(), TEMPLATE))
    return load_transcript(path)


def cdr_keys(transcript: Transcript) -> set[str]:
    cdrs = [f.message for f in transcript.replay_frames if f.message.event == "Cdr"]
    return {cdr_key("pbx1", c.get("UniqueID") or "", c.get("DestinationChannel") or "") for c in cdrs}


@dataclass
class World:
    daemon: Daemon
    clock: FakeClock
    master: Path
    directory: Path
    port: int
    server: AmiReplayServer
    calls: list[Transcript] = field(default_factory=list)

    @property
    def ami(self) -> AmiClient:
        client = self.daemon._running().ami
        assert client is not None
        return client

    async def restart_server(self, *, secret: str = SECRET, banner: bytes | None = None) -> None:
        """Asterisk comes back on the same port (optionally with another secret or banner)."""
        await self.server.close()
        options = {} if banner is None else {"banner": banner}
        self.server = AmiReplayServer("clickphone", secret, port=self.port, **options)  # type: ignore[arg-type]
        await self.server.start()

    def write_csv(self, transcript: Transcript) -> None:
        """What cdr_csv appends to Master.csv for this call, AMI link or not."""
        with self.master.open("ab") as fh:
            for frame in transcript.replay_frames:
                if frame.message.event == "Cdr":
                    fh.write(csv_record(frame.message))

    async def call_over_ami(self) -> None:
        transcript = call(len(self.calls), self.directory)
        self.calls.append(transcript)
        await self.server.play(transcript)
        # its Master.csv rows are written once AMI delivered it: on a busy machine a reconcile pass
        # could read them first, and count the call as recovered (still once, but not over AMI)
        async with asyncio.timeout(15):
            while not cdr_keys(transcript) <= set(database_keys(self.daemon)):
                await asyncio.sleep(0.01)
        self.write_csv(transcript)

    def call_during_outage(self) -> None:
        transcript = call(len(self.calls), self.directory)
        self.calls.append(transcript)
        self.write_csv(transcript)

    async def recorded(self) -> int:
        return int((await self.daemon._cmd_status({}))["cdrs"]["recorded"])

    async def until_recorded(self, count: int) -> None:
        async with asyncio.timeout(15):
            while await self.recorded() < count:
                await asyncio.sleep(0.01)

    async def real(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait on loopback I/O, not on the fake clock (which does not move meanwhile)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.003)

    async def advance_while_waiting(self, until: Callable[[], bool], *, step: float = 0.25) -> float:
        """Move the fake clock only while the client waits on it (backoff, auth backoff, a Ping
        due), and let it do its I/O in real time otherwise, until ``until()`` holds. Returns
        the fake seconds that passed: the client's own waits, whatever the machine's speed."""
        start = self.clock.monotonic()
        async with asyncio.timeout(30):  # a hang guard only
            while not until():
                if self.ami.state in ("backoff", "auth_failed", "connected"):
                    await self._step(until, step)
                await asyncio.sleep(0.003)
        return self.clock.monotonic() - start

    async def _step(self, until: Callable[[], bool], step: float) -> None:
        """Advance by ``step``, or only up to the next sleeper's deadline when that comes first;
        a sleeper woken that way gets real time to act (connect, log in, sleep again) before the
        clock moves on, so a loaded machine does not add fake seconds to what is measured."""
        deadline = self.clock.next_deadline()
        now = self.clock.monotonic()
        if deadline is None or deadline - now > step:
            await self.clock.advance(step)
            return
        waiting = self.clock.sleepers
        await self.clock.advance(max(0.0, deadline - now))
        for _ in range(200):  # up to ~1 s of real time
            if until() or self.clock.sleepers >= waiting or self.ami.state not in ("backoff", "auth_failed"):
                return
            await asyncio.sleep(0.005)


@pytest.fixture
async def world(write_config: Callable[..., Path], short_tmp: Path) -> AsyncIterator[World]:
    csv_dir = short_tmp / "cdr-csv"
    csv_dir.mkdir()
    master = csv_dir / "Master.csv"
    master.write_bytes(b"")
    server = AmiReplayServer("clickphone", SECRET)
    await server.start()
    cfg = write_config(
        ami_port=server.port,
        ami_enabled=True,
        extra=(
            f"asterisk:\n  system_name: pbx1\n  master_csv: {master}\n  reconcile_interval: 3600\n"
            f"  voicemail_spool: {short_tmp}\n  fax_spool: {short_tmp}\n"
        ),
    )
    # the harness' fast wall-clock backoff, replaced by the documented shape on the fake clock
    text = re.sub(r"^  (backoff_initial|backoff_max): .*\n", "", cfg.read_text(), flags=re.MULTILINE)
    text = text.replace(
        "ami:\n",
        f"ami:\n  ping_interval: {PING_INTERVAL}\n  ping_timeout: {PING_TIMEOUT}\n"
        f"  backoff_initial: {BACKOFF_INITIAL}\n  backoff_max: {BACKOFF_MAX}\n  auth_backoff: {AUTH_BACKOFF}\n"
        "  connect_timeout: 10\n",
        1,
    )
    cfg.write_text(text)
    loaded = load_config(cfg)
    conn = db.connect_sync(loaded.config.database.path)
    db.migrate(conn, datetime(2026, 11, 28, tzinfo=UTC))  # go live before the recorded calls
    conn.close()
    clock = FakeClock()
    daemon = Daemon(loaded, config_path=cfg, clock=clock, install_signal_handlers=False)
    task = asyncio.create_task(daemon.run())
    w = World(daemon, clock, master, short_tmp, server.port, server)
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        await server.wait_for_login(10)
        await w.real(lambda: w.ami.state == "connected")
        yield w
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
        await w.server.close()


def database_keys(daemon: Daemon) -> list[str]:
    conn = sqlite3.connect(daemon.config.database.path)
    try:
        return [k for (k,) in conn.execute("SELECT key FROM cdrs")]
    finally:
        conn.close()


async def finish(world: World, connects_before: int) -> None:
    """After recovery: one more call over AMI, then the accounting of every CDR."""
    assert world.ami.state == "connected"
    assert world.ami.connects == connects_before + 1
    await world.call_over_ami()
    expected = set().union(*(cdr_keys(t) for t in world.calls))
    await world.until_recorded(len(expected))
    await asyncio.sleep(0.1)
    status = await world.daemon._cmd_status({})
    outage_calls = world.calls[1:-1]
    assert status["reconcile"]["recovered"] == sum(len(cdr_keys(t)) for t in outage_calls)  # from Master.csv
    assert status["reconcile"]["gaps_suspected"] == 0
    assert status["cdrs"]["recorded"] == len(expected)
    keys = database_keys(world.daemon)
    assert len(keys) == len(set(keys))  # nothing doubled
    assert set(keys) == expected  # nothing lost


def backoff_delays(logs: list[dict[str, object]]) -> list[float]:
    return [float(e["seconds"]) for e in logs if e["event"] == "ami.backoff"]  # type: ignore[arg-type]


def assert_capped_full_jitter(delays: list[float]) -> None:
    for attempt, delay in enumerate(delays):
        assert 0 <= delay <= min(BACKOFF_MAX, BACKOFF_INITIAL * 2**attempt), delays


@pytest.mark.timeout(120)
async def test_a_cut_link_is_detected_at_once_backed_off_and_recovered(world: World) -> None:
    await world.call_over_ami()
    await world.until_recorded(3)
    connects, before = world.ami.connects, world.clock.monotonic()
    with capture_logs() as logs:
        assert await world.server.drop_clients() == 1  # Asterisk's side of the socket is gone
        await world.real(lambda: world.ami.state == "backoff")
        assert world.clock.monotonic() == before  # detected at once: EOF, no clock time needed
        world.call_during_outage()
        world.call_during_outage()
        waited = await world.advance_while_waiting(lambda: world.ami.connects > connects)
    (delay,) = backoff_delays(logs)
    assert 0 <= delay <= BACKOFF_INITIAL  # the first step of the backoff, fully jittered
    assert waited <= delay + 0.25  # reconnected as soon as the backoff allowed
    assert world.ami.disconnects == 1
    await finish(world, connects)


@pytest.mark.timeout(120)
async def test_a_half_open_link_is_detected_by_the_ping_watchdog_within_two_intervals(world: World) -> None:
    await world.call_over_ami()
    await world.until_recorded(3)
    connects = world.ami.connects
    world.server.answer_pings = False  # the socket stays open; nothing comes back
    world.call_during_outage()  # a half-open link carries no events either
    with capture_logs() as logs:
        detected = await world.advance_while_waiting(lambda: world.ami.state != "connected", step=1.0)
        world.server.answer_pings = True  # the next link is healthy
        world.call_during_outage()
        await world.advance_while_waiting(lambda: world.ami.connects > connects)
    assert PING_TIMEOUT <= detected <= PING_INTERVAL + PING_TIMEOUT + 1 <= 2 * PING_INTERVAL, detected
    assert world.ami.pings_missed == 1
    assert any(e["event"] == "ami.ping_timeout" for e in logs)
    assert_capped_full_jitter(backoff_delays(logs))
    await finish(world, connects)


@pytest.mark.timeout(120)
async def test_an_asterisk_restart_is_detected_at_its_shutdown_and_the_new_banner_is_read(world: World) -> None:
    await world.call_over_ami()
    await world.until_recorded(3)
    connects, before = world.ami.connects, world.clock.monotonic()
    assert world.ami.asterisk_version == "11.0.0"
    with capture_logs() as logs:
        await world.server.play("shutdown")  # Event: Shutdown, then Asterisk closes the link
        await world.real(lambda: world.ami.state == "backoff")
        assert world.clock.monotonic() == before  # detected at once
        await world.server.close()  # and is gone for a while: connections refused
        world.call_during_outage()
        await world.advance_while_waiting(lambda: len(backoff_delays(logs)) >= 6)
        world.call_during_outage()
        await world.restart_server(banner=b"Asterisk Call Manager/12.0.0\r\n")
        await world.advance_while_waiting(lambda: world.ami.connects > connects)
    assert any(e["event"] == "ami.asterisk_shutdown" for e in logs)
    assert_capped_full_jitter(backoff_delays(logs))  # it kept trying, backing off, capped at backoff_max
    assert world.ami.asterisk_version == "12.0.0"  # the new banner
    await finish(world, connects)


@pytest.mark.timeout(120)
async def test_a_wrong_secret_backs_off_for_auth_backoff_then_recovers(world: World) -> None:
    await world.call_over_ami()
    await world.until_recorded(3)
    connects = world.ami.connects
    with capture_logs() as logs:
        # Asterisk restarts with a rotated secret the daemon does not have
        await world.restart_server(secret="rotated-secret")
        detected = await world.advance_while_waiting(lambda: world.ami.state == "auth_failed")
        assert detected <= 2 * PING_INTERVAL
        assert world.server.logins_failed == 1
        world.call_during_outage()
        # nothing for auth_backoff: far longer than backoff_max, so no storm of failed logins
        refused_at = world.clock.monotonic()
        # the clock must not move before the client's auth backoff sleep has begun
        await world.real(lambda: world.clock.sleeps_until(refused_at + AUTH_BACKOFF))
        await world.advance_while_waiting(lambda: world.clock.monotonic() - refused_at >= AUTH_BACKOFF - 5, step=5.0)
        await asyncio.sleep(0.1)
        assert world.server.connections_accepted == 1
        assert world.ami.state == "auth_failed"
        # the operator puts the right secret back; the next try, after auth_backoff, succeeds
        await world.restart_server(secret=SECRET)
        world.call_during_outage()
        await world.advance_while_waiting(lambda: world.ami.state != "auth_failed", step=1.0)
        waited = world.clock.monotonic() - refused_at
        await world.real(lambda: world.ami.connects > connects)
    assert AUTH_BACKOFF <= waited <= AUTH_BACKOFF + 1
    assert AUTH_BACKOFF > BACKOFF_MAX
    assert world.ami.auth_failures == 1
    assert [e["seconds"] for e in logs if e["event"] == "ami.auth_retry_wait"] == [AUTH_BACKOFF]
    assert "rotated-secret" not in repr(logs)  # no secret in any log line
    assert SECRET not in repr(logs)
    await finish(world, connects)
