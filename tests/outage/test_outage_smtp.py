"""SMTP outage, on the injected clock: the relay is down for an hour, then answers 421 for a
while (at the greeting, then to MAIL), then comes back refusing a few recipients with 550.

The outbox sender, a real SQLite store and a real loopback relay (nothing listening, then a raw
socket that greets with 421, then aiosmtpd) all run on one FakeClock: no test step waits for
wall-clock time to pass, and every attempt is checked against the documented retry policy
(README "Delivery, bounces and the outbox"; NOTES.md on Postfix): the gap before the next attempt
is the message's age clamped to ``smtp.retry_min``…``smtp.retry_max`` (300 s…4020 s), 4xx
replies, refused connections and dropped links are retried until ``smtp.lifetime``, a 5xx is a
dead letter at once, with its reply kept.

At the end every retryable mail was delivered exactly once (counted at the relay), each 550 is
dead-lettered with the relay's words, and nothing more happens however long the clock runs.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from clickphone_agi.adapters.smtp import OutboxSender
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow, OutboxStatus
from clickphone_agi.sim.smtp_sink import SinkHandler

DOMAIN = "clickphone.example"
GOOD = [f"client{i}@example.ro" for i in range(9)]
GONE = [f"gone{i}@example.ro" for i in range(3)]
REFUSED = "550 5.1.1 <{}>: Recipient address rejected: User unknown in local recipient table"
RETRY_MIN, RETRY_MAX = 300, 4020  # the shipped defaults


def documented_schedule(count: int) -> list[int]:
    """Attempt times (seconds after creation) by the documented rule, not by the code's function."""
    times = [0]
    while len(times) < count:
        age = times[-1]
        times.append(age + min(max(age, RETRY_MIN), RETRY_MAX))
    return times


SCHEDULE = documented_schedule(9)  # 0, 300, 600, 1200, 2400, 4800, 8820, 12840, 16860
# the relay's state over simulated time (seconds), each phase spanning some attempts
PHASES = [(0, "down"), (3600, "greets 421"), (9000, "421 to MAIL"), (14000, "up")]


def phase_at(t: float) -> str:
    return [name for start, name in PHASES if start <= t][-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayHandler(SinkHandler):
    """aiosmtpd handler: 421 to every MAIL while ``busy``; 550 for the GONE recipients."""

    def __init__(self) -> None:
        super().__init__(None)
        self.busy = False
        self.sessions: list[str] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.busy:
            return "421 4.7.0 Too many connections, try again later"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in GONE:
            return REFUSED.format(address)
        envelope.rcpt_tos.append(address)
        return "250 OK"


class Relay:
    """The relay on one loopback port: absent, greeting with 421, or aiosmtpd."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = RelayHandler()
        self.greetings_421 = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def set(self, phase: str) -> None:
        await self.stop()
        loop = asyncio.get_running_loop()
        if phase == "down":
            return
        if phase == "greets 421":

            async def greet(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                self.greetings_421 += 1
                writer.write(b"421 4.3.2 System not accepting network messages\r\n")
                await writer.drain()
                writer.close()

            self._server = await asyncio.start_server(greet, "127.0.0.1", self.port)
            return
        self.handler.busy = phase == "421 to MAIL"
        relay = self

        class CountingSMTP(SMTP):  # type: ignore[misc]
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                relay.connections += 1
                super().connection_made(transport)

        def factory() -> Any:
            return CountingSMTP(self.handler, hostname="relay.local", loop=loop)

        self._server = await loop.create_server(factory, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


class Rig:
    def __init__(self, store: SqliteStore, clock: FakeClock, relay: Relay) -> None:
        self.store, self.clock, self.relay = store, clock, relay
        cfg = SmtpConfig(host="127.0.0.1", port=relay.port, timeout=5, max_concurrency=2, message_id_domain=DOMAIN)
        self.sender = OutboxSender(store, clock, config=lambda: cfg, password=lambda: None)
        store.on_outbox = self.sender.wake
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def rows(self) -> list[OutboxRow]:
        return sorted(await self.store.outbox_rows(1000), key=lambda r: r.id)

    async def until(self, predicate: Callable[[list[OutboxRow]], bool], timeout: float = 15.0) -> list[OutboxRow]:
        """Wait (a hang guard only) for the attempts started at this instant to be recorded."""
        async with asyncio.timeout(timeout):
            while not predicate(rows := await self.rows()):
                await asyncio.sleep(0.01)
        return rows


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    store = await SqliteStore.open(tmp_path / "outage.db", clock)
    store.start()
    relay = Relay(free_port())
    r = Rig(store, clock, relay)
    try:
        yield r
    finally:
        r.stop.set()
        if r.task is not None:
            await asyncio.wait_for(r.task, 10)
        await relay.stop()
        await store.close()


def mime(to: str) -> bytes:
    return f"From: ClickPhone <no-reply@{DOMAIN}>\r\nTo: {to}\r\nSubject: outage\r\n\r\nbody\r\n".encode()


@pytest.mark.timeout(120)
async def test_an_hour_down_then_421_storms_then_550s_delivers_each_retryable_mail_once(rig: Rig) -> None:
    created = rig.clock.now()
    for to in GOOD + GONE:
        message = OutboxMessage.build(
            key=f"outage:{to}", kind="test", recipient=to, account="acct1001", mime=mime(to), now=created,
            lifetime=timedelta(days=2),
        )  # fmt: skip
        await rig.store.write(lambda tx, m=message: tx.enqueue(m))
    await rig.relay.set("down")
    rig.task = asyncio.create_task(rig.sender.run(rig.stop))

    errors_by_phase: dict[str, set[str]] = {}
    for attempt, due in enumerate(SCHEDULE, start=1):
        now = rig.clock.monotonic()
        for start, name in PHASES:  # the relay changes state between attempts
            if now < start <= due:
                await rig.clock.advance(start - rig.clock.monotonic())
                await rig.relay.set(name)
        if due > rig.clock.monotonic():
            # one second early: nobody is attempted before the policy says so
            await rig.clock.advance(due - 1 - rig.clock.monotonic())
            await asyncio.sleep(0.1)
            assert [r.attempts for r in await rig.rows()] == [attempt - 1] * 12, f"attempt {attempt} came early"
            await rig.clock.advance(1)
        pending_before = {r.id for r in await rig.rows() if r.status is OutboxStatus.PENDING}
        rows = await rig.until(
            lambda rows, a=attempt, ids=pending_before: all(r.attempts == a for r in rows if r.id in ids)
        )
        phase = phase_at(due)
        for row in rows:
            if row.id not in pending_before:
                continue
            if row.status is OutboxStatus.PENDING:
                # the documented schedule: the next attempt at the next step, counted from creation
                assert row.next_attempt_at - row.created_at == timedelta(seconds=SCHEDULE[attempt]), (attempt, row)
                errors_by_phase.setdefault(phase, set()).add(row.last_error or "")
        if phase != "up":
            assert all(r.status is OutboxStatus.PENDING for r in rows), phase  # a relay problem is never fatal

    # down: one refused connection, the other rows deferred without hammering the relay
    down = errors_by_phase["down"]
    assert any("Connect" in e or "refused" in e for e in down), down
    assert all("Connect" in e or "refused" in e or e.startswith("relay unavailable") for e in down), down
    assert all(e.startswith(("421 4.3.2", "relay unavailable: 421 4.3.2")) for e in errors_by_phase["greets 421"])
    assert errors_by_phase["421 to MAIL"] == {"421 4.7.0 Too many connections, try again later"}
    assert rig.relay.greetings_421 >= 2  # two attempts fell in the greeting storm

    rows = await rig.rows()
    sent = {r.recipient: r for r in rows if r.status is OutboxStatus.SENT}
    dead = {r.recipient: r for r in rows if r.status is OutboxStatus.DEAD}
    assert set(sent) == set(GOOD)
    assert set(dead) == set(GONE)
    for to, row in dead.items():
        assert row.smtp_reply == REFUSED.format(to)  # the relay's own words, kept
        assert row.attempts == len(SCHEDULE)
    assert all(row.attempts == len(SCHEDULE) for row in sent.values())

    # exactly once at the relay, each with the Message-ID of its key
    delivered = rig.relay.handler.messages
    assert sorted(m.rcpt_tos for m in delivered) == sorted((to,) for to in GOOD)
    ids = [email.message_from_bytes(m.data, policy=email.policy.default)["Message-ID"] for m in delivered]
    assert sorted(ids) == sorted(message_id(f"outage:{to}", DOMAIN) for to in GOOD)

    # and nothing more, however long the clock runs
    for _ in range(12):
        await rig.clock.advance(3600)
    await asyncio.sleep(0.2)
    assert len(rig.relay.handler.messages) == len(GOOD)
    assert [r.status for r in await rig.rows()].count(OutboxStatus.PENDING) == 0
