"""The outbox sender against a real aiosmtpd on loopback, on a fake clock (no wall-clock waits for
retries): delivery, Postfix-like retries, dead letters, expiry, suppression, connection reuse,
concurrency and rate limits, STARTTLS/TLS with AUTH and one SSL context, and the crash window
(the real daemon SIGKILLed) that at-least-once delivery leaves."""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from structlog.testing import capture_logs

from clickphone_agi.adapters.smtp import OutboxSender
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.bounce import VerpToken, find_tokens
from clickphone_agi.domain.delivery import RateLimiter, ensure_headers, message_id
from clickphone_agi.domain.money import Notice
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow, OutboxStatus
from clickphone_agi.domain.unsubscribe import make_token, unsubscribe_url
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.ports import WriteTx
from clickphone_agi.sim.smtp_sink import SinkHandler, SmtpSink
from tests.daemon_harness import DaemonProcess, NotifySocket, run_cli

DOMAIN = "clickphone.example"
BOUNCES = "bounces.clickphone.example"
TO = "ion.popescu@example.ro"
PLAIN = b"From: ClickPhone <no-reply@clickphone.example>\nTo: ion.popescu@example.ro\nSubject: x\n\nbody\n"


# ---- a sink that counts sessions and concurrent transactions, and can hold DATA -----------------


class CountingHandler(SinkHandler):
    def __init__(self, clock: FakeClock | None = None) -> None:
        super().__init__(None)
        self.clock = clock
        self.active = 0
        self.max_active = 0
        self.gate: asyncio.Event | None = None
        self.times: list[float] = []
        self.on_data: Callable[[], None] | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.clock is not None:
                self.times.append(self.clock.monotonic())
            reply = await super().handle_DATA(server, session, envelope)
            if self.on_data is not None and reply.startswith("250"):
                self.on_data()
            return reply
        finally:
            self.active -= 1


class CountingSink(SmtpSink):
    """:class:`SmtpSink` that counts SMTP sessions; optionally TLS, STARTTLS and AUTH."""

    def __init__(self, clock: FakeClock | None = None, **smtp_options: Any) -> None:
        super().__init__(None)
        self.handler = CountingHandler(clock)
        self.connections = 0
        self.smtp_options = smtp_options
        self.server_ssl: ssl.SSLContext | None = None

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        sink = self

        class CountingSMTP(SMTP):  # type: ignore[misc]
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if self._original_transport is None:  # called again after STARTTLS: same session
                    sink.connections += 1
                super().connection_made(transport)

        def factory() -> Any:
            return CountingSMTP(self.handler, hostname="sink.local", loop=loop, **self.smtp_options)

        self._server = await loop.create_server(factory, self.host, port, ssl=self.server_ssl)

    @property
    def handler_(self) -> CountingHandler:
        assert isinstance(self.handler, CountingHandler)
        return self.handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await _value(predicate()):
            await asyncio.sleep(0.005)


async def _value(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


# ---- the rig: store + sender + sink on one fake clock ------------------------------------------


class Rig:
    def __init__(self, store: SqliteStore, clock: FakeClock, sink: CountingSink, cfg: SmtpConfig) -> None:
        self.store, self.clock, self.sink, self.cfg = store, clock, sink, cfg
        self.sender: OutboxSender | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop = asyncio.Event()

    def start(self, *, password: str | None = None, tls_context: ssl.SSLContext | None = None) -> OutboxSender:
        self.sender = OutboxSender(
            self.store, self.clock, config=lambda: self.cfg, password=lambda: password, tls_context=tls_context
        )
        self.store.on_outbox = self.sender.wake
        self.task = asyncio.create_task(self.sender.run(self.stop))
        return self.sender

    async def close(self) -> None:
        if self.task is not None:
            self.stop.set()
            await asyncio.wait_for(self.task, 10)

    async def enqueue(
        self,
        key: str,
        *,
        to: str = TO,
        kind: str = "test",
        mime: bytes = PLAIN,
        lifetime: timedelta = timedelta(days=2),
        created: timedelta = timedelta(0),
    ) -> int:
        message = OutboxMessage.build(
            key=key,
            kind=kind,
            recipient=to,
            account="acct1001",
            mime=mime,
            now=self.clock.now() - created,
            lifetime=lifetime,
        )

        def unit(tx: WriteTx) -> int:
            tx.enqueue(message)
            return int(sqlite_id(tx, key))

        return await self.store.write(unit)

    async def row(self, row_id: int) -> OutboxRow:
        rows = {r.id: r for r in await self.store.outbox_rows(1000)}
        return rows[row_id]

    async def status(self, row_id: int) -> OutboxStatus:
        return (await self.row(row_id)).status

    def column(self, row_id: int, name: str) -> Any:
        conn = sqlite3.connect(self.store.path)
        try:
            return conn.execute(f"SELECT {name} FROM outbox WHERE id = ?", (row_id,)).fetchone()[0]
        finally:
            conn.close()


def sqlite_id(tx: WriteTx, key: str) -> int:
    conn = tx._conn  # type: ignore[attr-defined]  # the test reads the id the INSERT assigned
    return int(conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()[0])


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    sink = CountingSink(clock)
    await sink.start()
    store = await SqliteStore.open(tmp_path / "t.db", clock)
    store.start()
    cfg = SmtpConfig(host="127.0.0.1", port=sink.port, timeout=5, bounce_domain=BOUNCES, message_id_domain=DOMAIN)
    r = Rig(store, clock, sink, cfg)
    try:
        yield r
    finally:
        await r.close()
        await store.close()
        await sink.close()


# ---- pure pieces --------------------------------------------------------------------------------


def test_ensure_headers_adds_auto_submitted_and_message_id_only_when_missing() -> None:
    out = ensure_headers(PLAIN, "<abc@clickphone.example>")
    msg = email.message_from_bytes(out, policy=default_policy)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"] == "<abc@clickphone.example>"
    assert ensure_headers(out, "<other@x.example>") == out  # already there: untouched
    # a header-looking line in the body does not count
    body_only = b"Subject: x\r\n\r\nAuto-Submitted: no\r\nMessage-ID: <fake@x>\r\n"
    assert ensure_headers(body_only, "<m@x.example>").startswith(b"Auto-Submitted: auto-generated\r\nMessage-ID:")


def test_rate_limiter_books_evenly_spaced_slots() -> None:
    limiter = RateLimiter()
    assert [limiter.reserve(0.0, 4) for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert limiter.reserve(10.0, 4) == 0.0  # idle for a while: no debt carried over
    assert limiter.reserve(10.0, None) == 0.0


# ---- delivery -----------------------------------------------------------------------------------


async def test_delivered_at_once_with_stable_message_id_auto_submitted_and_verp_envelope(rig: Rig) -> None:
    rig.start()
    row_id = await rig.enqueue("vm:100@default:1")
    await rig.sink.wait_for(1)
    assert rig.clock.monotonic() == 0  # woken by the commit, not by a poll
    got = rig.sink.messages[0]
    msg = email.message_from_bytes(got.data, policy=default_policy)
    assert msg["Message-ID"] == message_id("vm:100@default:1", DOMAIN)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert got.rcpt_tos == (TO,)
    tokens = find_tokens([got.mail_from])
    assert got.mail_from.endswith(f"@{BOUNCES}")
    assert [t.row_id for t in tokens] == [row_id]
    await until(lambda: _is(rig.status(row_id), OutboxStatus.SENT))
    row = await rig.row(row_id)
    assert row.smtp_reply == "250 2.0.0 Ok: queued"
    assert row.attempts == 1
    assert rig.column(row_id, "envelope_from") == got.mail_from
    # the VERP key was created once and kept in the database: the token verifies with it
    key = await rig.store.write(lambda tx: tx.verp_key(None))
    assert key is not None
    assert VerpToken(row_id, tokens[0].mac).verify(key, "vm:100@default:1")


async def test_the_verp_key_file_is_retried_after_a_failure_and_reread_when_it_changes(
    rig: Rig, tmp_path: Path
) -> None:
    """The key used to be cached by path for good: one unreadable read meant no VERP until a
    restart, and a rotated file was never seen (while the bounce verb read the new one)."""
    key_file = tmp_path / "verp-key"
    rig.cfg = rig.cfg.model_copy(update={"verp_key_file": key_file})
    rig.start()
    with capture_logs() as logs:
        await rig.enqueue("k1")
        await rig.sink.wait_for(1)
    assert rig.sink.messages[0].mail_from == "no-reply@clickphone.example"  # no key: no VERP, still sent
    assert sum(1 for e in logs if e["event"] == "mail.verp_key_unreadable") == 1

    old, new = b"o" * 32, b"n" * 40
    key_file.write_bytes(old)
    key_file.chmod(0o600)
    await rig.clock.advance(5)
    second = await rig.enqueue("k2")
    await rig.sink.wait_for(2)
    (token,) = find_tokens([rig.sink.messages[1].mail_from])
    assert token.row_id == second
    assert token.verify(old, "k2")

    key_file.write_bytes(new)  # rotated: what `clickphone-agi bounce` will verify with from now on
    await rig.clock.advance(5)
    third = await rig.enqueue("k3")
    await rig.sink.wait_for(3)
    (token,) = find_tokens([rig.sink.messages[2].mail_from])
    assert token.row_id == third
    assert token.verify(new, "k3")


async def test_a_verp_key_file_others_can_read_is_refused_also_when_it_changes_after_start(
    rig: Rig, tmp_path: Path
) -> None:
    """Start-up and reload refuse such a file; the mailer re-reads it when it changes, and used to
    take it as it was: a key other local users know lets them forge the DSNs that suppress mail."""
    key_file = tmp_path / "verp-key"
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o600)
    rig.cfg = rig.cfg.model_copy(update={"verp_key_file": key_file})
    rig.start()
    await rig.enqueue("k1")
    await rig.sink.wait_for(1)
    assert find_tokens([rig.sink.messages[0].mail_from])  # a good file: VERP

    key_file.chmod(0o644)  # same bytes, same mtime: only the mode tells
    await rig.clock.advance(5)
    with capture_logs() as logs:
        await rig.enqueue("k2")
        await rig.sink.wait_for(2)
    assert rig.sink.messages[1].mail_from == "no-reply@clickphone.example"  # refused: no VERP, still sent
    (refusal,) = [e for e in logs if e["event"] == "mail.verp_key_unreadable"]
    assert "readable by every local user (mode 0644)" in refusal["error"]
    assert f"chmod 0600 {key_file}" in refusal["error"]

    key_file.chmod(0o640)
    await rig.clock.advance(5)
    await rig.enqueue("k3")
    await rig.sink.wait_for(3)
    assert find_tokens([rig.sink.messages[2].mail_from])


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_payload_notice_is_rendered_once_and_its_message_id_is_the_keys_hash(rig: Rig) -> None:
    rig.start()
    notice = Notice(
        key="lowbal:acct1001:1",
        kind="low_balance",
        recipient=TO,
        account="acct1001",
        payload={"name": "Ion", "balance": "0,13 lei", "threshold": "5,00 lei", "language": "ro"},
    )
    await rig.store.write(lambda tx: tx.enqueue_notice(notice))
    await rig.sink.wait_for(1)
    msg = email.message_from_bytes(rig.sink.messages[0].data, policy=default_policy)
    assert msg["Message-ID"] == message_id("lowbal:acct1001:1", DOMAIN)
    assert "0,13 lei" in str(msg["Subject"])
    conn = sqlite3.connect(rig.store.path)
    stored = conn.execute("SELECT message FROM outbox WHERE idempotency_key = 'lowbal:acct1001:1'").fetchone()[0]
    conn.close()
    assert stored is not None  # rendered body kept: a retry sends the same bytes


async def test_a_notice_that_cannot_be_rendered_is_dead_lettered_not_retried_in_a_loop(rig: Rig) -> None:
    rig.start()
    notice = Notice(key="x:1", kind="no_such_kind", recipient=TO, account="acct1001", payload={"name": "Ion"})
    with capture_logs() as logs:
        await rig.store.write(lambda tx: tx.enqueue_notice(notice))
        (row,) = await rig.store.outbox_rows()
        await until(lambda: _is(rig.status(row.id), OutboxStatus.DEAD))
        await asyncio.sleep(0.1)
    assert (await rig.row(row.id)).last_error == "cannot render the no_such_kind notice: UnknownKind('no_such_kind')"
    assert sum(1 for e in logs if e["event"] == "mail.render_failed") == 1
    assert rig.sink.messages == []


@pytest.mark.parametrize("reply", ["421 4.3.0 Service not available, try later", "451 4.7.1 Greylisted, retry"])
async def test_4xx_is_retried_after_the_postfix_backoff_then_delivered(rig: Rig, reply: str) -> None:
    rig.sink.handler.scripted_replies.append(reply)
    rig.start()
    row_id = await rig.enqueue("k1")
    await until(lambda: _attempts(rig, row_id, 1))
    row = await rig.row(row_id)
    assert row.status is OutboxStatus.PENDING
    assert row.last_error == reply
    assert row.next_attempt_at - row.created_at == timedelta(seconds=300)  # age 0 clamped up to retry_min
    await rig.clock.advance(299)
    await asyncio.sleep(0.05)
    assert rig.sink.messages == []
    await rig.clock.advance(1)
    await rig.sink.wait_for(1)
    await until(lambda: _is(rig.status(row_id), OutboxStatus.SENT))
    assert (await rig.row(row_id)).attempts == 2


async def _attempts(rig: Rig, row_id: int, n: int) -> bool:
    return (await rig.row(row_id)).attempts >= n


async def test_550_is_dead_lettered_at_once_with_the_reply_stored(rig: Rig) -> None:
    rig.sink.handler.scripted_replies.append("550 5.7.1 Message rejected as spam")
    rig.start()
    with capture_logs() as logs:
        row_id = await rig.enqueue("k1")
        await until(lambda: _is(rig.status(row_id), OutboxStatus.DEAD))
        await until(lambda: any(e["event"] == "mail.dead" for e in logs))  # logged after the commit
    row = await rig.row(row_id)
    assert row.last_error == row.smtp_reply == "550 5.7.1 Message rejected as spam"
    assert row.attempts == 1
    assert [e["event"] for e in logs if e["event"].startswith("mail.")] == ["mail.dead"]
    # a 5xx for the *content* is no evidence against the address: nothing counted toward suppression
    assert await rig.store.write(lambda tx: tx.suppression(TO)) is None


async def test_rcpt_5_1_1_counts_a_hard_bounce_toward_suppression(rig: Rig) -> None:
    class Refusing(CountingHandler):
        async def handle_RCPT(
            self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
        ) -> str:
            return "550 5.1.1 <ion.popescu@example.ro>: Recipient address rejected: User unknown"

    rig.sink.handler = Refusing()
    await rig.sink.close()
    await rig.sink.start(rig.cfg.port)
    rig.cfg = rig.cfg.model_copy(update={"hard_bounce_limit": 2})
    rig.start()
    first = await rig.enqueue("k1")
    await until(lambda: _is(rig.status(first), OutboxStatus.DEAD))
    assert await rig.store.write(lambda tx: tx.suppression(TO)) is None  # 1 of 2
    second = await rig.enqueue("k2")
    await until(lambda: _is(rig.status(second), OutboxStatus.DEAD))
    assert "5.1.1" in (await rig.store.write(lambda tx: tx.suppression(TO)) or "")


def _slow_final_reply(rig: Rig, seconds: float) -> None:
    """The relay queues the message, then takes ``seconds`` to answer the final "." (a before-queue
    content filter scanning a large voicemail, say)."""
    handler = rig.sink.handler_
    accept = CountingHandler.handle_DATA

    async def slow(server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await accept(handler, server, session, envelope)
        await asyncio.sleep(seconds)
        return reply

    handler.handle_DATA = slow  # type: ignore[method-assign]


async def test_a_slow_reply_to_the_end_of_data_waits_for_data_timeout_not_timeout(rig: Rig) -> None:
    """One smtp.timeout used to cover the reply to the final ".": a relay slower than that had
    queued the mail, the sender deferred it and sent it again at every retry."""
    _slow_final_reply(rig, 1.5)
    rig.cfg = rig.cfg.model_copy(update={"timeout": 1, "data_timeout": 5})  # 30 s / 600 s, scaled down
    rig.start()
    row_id = await rig.enqueue("vm:slow", kind="voicemail")
    await until(lambda: _is(rig.status(row_id), OutboxStatus.SENT))
    assert len(rig.sink.messages) == 1
    assert (await rig.row(row_id)).attempts == 1


async def test_no_reply_to_the_end_of_data_is_an_ambiguous_deferral_after_the_longest_gap(rig: Rig) -> None:
    """The relay may have queued it: retried (never lost), but after retry_max, and logged as ambiguous."""
    _slow_final_reply(rig, 1.5)
    rig.cfg = rig.cfg.model_copy(update={"data_timeout": 0.5})
    rig.start()
    with capture_logs() as logs:
        row_id = await rig.enqueue("vm:slow", kind="voicemail")
        await until(lambda: _attempts(rig, row_id, 1))
    row = await rig.row(row_id)
    assert row.status is OutboxStatus.PENDING
    assert (row.last_error or "").startswith("ambiguous: no reply to DATA within 0.5 s")
    assert row.next_attempt_at - row.created_at == timedelta(seconds=rig.cfg.retry_max)  # not retry_min
    (deferred,) = [e for e in logs if e["event"] == "mail.deferred"]
    assert deferred["ambiguous"] is True
    await rig.sink.wait_for(1)  # the relay did queue it
    await rig.clock.advance(rig.cfg.retry_min)
    await asyncio.sleep(0.1)
    assert len(rig.sink.messages) == 1  # no second copy at the usual 300 s retry


async def test_server_down_stays_pending_and_is_delivered_when_it_is_back(rig: Rig) -> None:
    port = free_port()  # nothing listens here yet
    rig.cfg = rig.cfg.model_copy(update={"port": port})
    rig.start()
    with capture_logs() as logs:
        row_id = await rig.enqueue("k1")
        await until(lambda: _attempts(rig, row_id, 1))
    row = await rig.row(row_id)
    assert row.status is OutboxStatus.PENDING
    assert "Connect" in (row.last_error or "")
    assert any(e["event"] == "mail.relay_unavailable" for e in logs)
    await rig.sink.close()
    await rig.sink.start(port)
    await rig.clock.advance(300)
    await rig.sink.wait_for(1)
    await until(lambda: _is(rig.status(row_id), OutboxStatus.SENT))


async def test_an_outage_costs_one_connection_attempt_not_one_per_message(rig: Rig) -> None:
    rig.cfg = rig.cfg.model_copy(update={"port": free_port(), "max_concurrency": 1})
    rig.start()
    with capture_logs() as logs:
        ids = [await rig.enqueue(f"k{i}") for i in range(10)]
        for row_id in ids:
            await until(lambda row_id=row_id: _attempts(rig, row_id, 1))
        # the sender logs after its write commits: the last line may come a turn after the row
        await until(lambda: sum(1 for e in logs if e["event"] == "mail.deferred") >= 10)
    assert sum(1 for e in logs if e["event"] == "mail.relay_unavailable") == 1
    assert sum(1 for e in logs if e["event"] == "mail.deferred") == 10
    errors = [(await rig.row(row_id)).last_error or "" for row_id in ids]
    assert sum("relay unavailable" in e for e in errors) == 9  # deferred without a connection attempt


async def test_lifetime_exceeded_is_dead_lettered(rig: Rig) -> None:
    rig.cfg = rig.cfg.model_copy(update={"lifetime": 600})
    rig.sink.handler.scripted_replies.extend(["451 4.3.0 later"] * 5)
    rig.start()
    row_id = await rig.enqueue("k1")
    await until(lambda: _attempts(rig, row_id, 1))
    await rig.clock.advance(300)
    await until(lambda: _attempts(rig, row_id, 2))
    assert await rig.status(row_id) is OutboxStatus.PENDING
    await rig.clock.advance(300)  # age 600 s = lifetime: the next 4xx is final
    await until(lambda: _is(rig.status(row_id), OutboxStatus.DEAD))
    row = await rig.row(row_id)
    assert (row.attempts, row.last_error) == (3, "451 4.3.0 later")
    assert rig.sink.messages == []


async def test_expired_rows_are_not_sent_and_are_audited_as_expired(rig: Rig) -> None:
    rig.sink.handler.scripted_replies.append("451 4.3.0 later")
    rig.start()
    with capture_logs() as logs:
        stale = await rig.enqueue("old", lifetime=timedelta(hours=1), created=timedelta(hours=2))
        await until(lambda: _is(rig.status(stale), OutboxStatus.EXPIRED))
        # deferred past its expiry: it comes due at the expiry and is recorded as expired then
        short = await rig.enqueue("short", lifetime=timedelta(seconds=120))
        await until(lambda: _attempts(rig, short, 1))
        assert (await rig.row(short)).next_attempt_at == (await rig.row(short)).expires_at
        await rig.clock.advance(120)
        await until(lambda: _is(rig.status(short), OutboxStatus.EXPIRED))
    assert rig.sink.messages == []
    assert sum(1 for e in logs if e["event"] == "mail.expired") == 2


async def test_suppressed_address_is_not_sent_whatever_the_kind(rig: Rig) -> None:
    await rig.store.write(lambda tx: tx.count_hard_bounce(TO, "5.1.1 user unknown", 1))
    rig.start()
    marketing = await rig.enqueue("offer:1", kind="marketing_offer", to="Ion.Popescu@Example.RO")
    service = await rig.enqueue("vm:1", kind="voicemail")
    for row_id in (marketing, service):
        await until(lambda row_id=row_id: _is(rig.status(row_id), OutboxStatus.DEAD))
        row = await rig.row(row_id)
        assert (row.last_error or "").startswith("suppressed: 5.1.1")
        assert row.attempts == 0
    assert rig.sink.messages == []
    metrics = await rig.store.mail_metrics(rig.clock.now())
    assert (metrics["suppressed"], metrics["dead"], metrics["suppressed_addresses"]) == (2, 0, 1)


async def _settle(rig: Rig, seconds: int) -> None:
    """Let the fake clock run ``seconds`` one second at a time, giving the sender time to act."""
    for _ in range(seconds):
        await rig.clock.advance(1.0)
        await asyncio.sleep(0.005)


async def test_an_unsubscribe_stops_offers_already_waiting_behind_the_rate_limiter(rig: Rig) -> None:
    """Consent was checked when a row was read: offers in the sender's hands (waiting for a rate
    slot) still went out minutes after the subscriber's one-click unsubscribe."""
    rig.cfg = rig.cfg.model_copy(update={"rate_limit_per_second": 0.1, "max_concurrency": 1})
    rig.start()
    await rig.store.write(lambda tx: tx.record_consent("acct1001", True, "api", "1", None))
    url = unsubscribe_url("https://cont.clickphone.ro", make_token(b"k" * 32, "acct1001"))
    payload = {**KINDS["offer"].sample, "unsubscribe_url": url, "language": "ro", "valid_until": "2026-12-31"}
    notices = [Notice(f"bc:{i}:acct1001", "offer", TO, "acct1001", payload) for i in range(20)]
    for notice in notices:
        await rig.store.write(lambda tx, notice=notice: tx.enqueue_notice(notice))
    await rig.sink.wait_for(1)
    assert rig.sender is not None
    assert len(rig.sender._inflight) > 1  # more offers already read, waiting for their slots
    await rig.store.write(lambda tx: tx.record_consent("acct1001", False, "unsubscribe", "1", None))
    with capture_logs() as logs:
        await _settle(rig, 300)
    assert len(rig.sink.messages) == 1
    rows = await rig.store.outbox_rows(100)
    assert sorted(str(r.status) for r in rows) == ["dead"] * 19 + ["sent"]
    assert {r.last_error for r in rows if r.status is OutboxStatus.DEAD} == {"suppressed: no marketing consent"}
    assert sum(1 for e in logs if e["event"] == "mail.suppressed") == 19


async def test_a_row_that_expires_while_waiting_for_its_rate_slot_is_expired_not_sent(rig: Rig) -> None:
    rig.cfg = rig.cfg.model_copy(update={"rate_limit_per_second": 0.1})
    rig.start()
    first = await rig.enqueue("bc:1", kind="tariff_change")
    late = await rig.enqueue("bc:2", kind="tariff_change", lifetime=timedelta(seconds=5))
    await rig.sink.wait_for(1)
    await _settle(rig, 15)  # its slot comes 10 s after the first send, 5 s after its expiry
    assert await rig.status(first) is OutboxStatus.SENT
    assert await rig.status(late) is OutboxStatus.EXPIRED
    assert len(rig.sink.messages) == 1


async def test_service_mail_that_waited_for_a_connection_is_checked_for_suppression_again(rig: Rig) -> None:
    handler = rig.sink.handler_
    handler.gate = asyncio.Event()
    rig.cfg = rig.cfg.model_copy(update={"max_concurrency": 1})
    rig.start()
    held = await rig.enqueue("vm:1", kind="voicemail")
    await until(lambda: handler.active == 1)
    waiting = await rig.enqueue("vm:2", kind="voicemail")  # read now, waits for the one connection
    await asyncio.sleep(0.05)
    await rig.store.write(lambda tx: tx.count_hard_bounce(TO, "5.1.1 user unknown", 1))
    await rig.clock.advance(2)  # longer than RECHECK_AFTER
    handler.gate.set()
    await until(lambda: _is(rig.status(waiting), OutboxStatus.DEAD))
    assert await rig.status(held) is OutboxStatus.SENT
    assert (await rig.row(waiting)).last_error == "suppressed: 5.1.1 user unknown"
    assert len(rig.sink.messages) == 1


async def test_connections_are_reused_up_to_connection_reuse(rig: Rig) -> None:
    rig.cfg = rig.cfg.model_copy(update={"max_concurrency": 1})
    rig.start()
    for i in range(5):
        await rig.enqueue(f"k{i}")
    await rig.sink.wait_for(5)
    assert rig.sink.connections == 1
    await rig.close()

    rig.cfg = rig.cfg.model_copy(update={"connection_reuse": 2})
    rig.stop = asyncio.Event()
    rig.start()
    for i in range(5, 10):
        await rig.enqueue(f"k{i}")
    await rig.sink.wait_for(10)
    assert rig.sink.connections == 1 + 3  # 2 + 2 + 1 messages


async def test_concurrency_cap_is_honoured(rig: Rig) -> None:
    rig.cfg = rig.cfg.model_copy(update={"max_concurrency": 2})
    handler = rig.sink.handler_
    handler.gate = asyncio.Event()
    rig.start()
    for i in range(6):
        await rig.enqueue(f"k{i}")
    await until(lambda: handler.active == 2)
    await asyncio.sleep(0.2)
    assert handler.max_active == 2
    assert rig.sink.connections == 2
    handler.gate.set()
    await rig.sink.wait_for(6)
    assert handler.max_active == 2


async def test_rate_limit_spreads_bulk_sends_on_the_clock(rig: Rig) -> None:
    rig.cfg = rig.cfg.model_copy(update={"rate_limit_per_second": 2.0})
    rig.start()
    for i in range(5):
        await rig.enqueue(f"k{i}", kind="tariff_change")
    await rig.sink.wait_for(1)
    await asyncio.sleep(0.2)
    assert len(rig.sink.messages) == 1  # the others wait for their slots, on the fake clock
    for _ in range(12):
        await rig.clock.advance(0.25)
        await asyncio.sleep(0.02)
    await rig.sink.wait_for(5)
    times = rig.sink.handler_.times
    assert all(t - times[0] >= i * 0.5 for i, t in enumerate(times))
    assert times[-1] - times[0] < 3.0


async def test_a_rate_limited_broadcast_does_not_hold_back_a_voicemail(rig: Rig) -> None:
    """Bulk rows waiting for their rate slots filled the in-flight window and held every
    connection: a voicemail queued after a broadcast went out as mail #18, 85 s later."""
    rig.cfg = rig.cfg.model_copy(update={"rate_limit_per_second": 0.2, "max_concurrency": 4})
    rig.start()
    opened = rig.clock.monotonic()
    for i in range(100):
        await rig.enqueue(f"bc:{i}", kind="tariff_change")
    await rig.sink.wait_for(1)
    assert rig.sender is not None
    assert len(rig.sender._inflight) >= 16  # the window is full of bulk rows waiting for slots
    started = rig.clock.monotonic()
    await rig.enqueue("vm:urgent", kind="voicemail")
    await rig.sink.wait_for(2)
    ids = [email.message_from_bytes(m.data)["Message-ID"] for m in rig.sink.messages]
    assert ids[1] == message_id("vm:urgent", DOMAIN)
    assert rig.clock.monotonic() == started  # no rate slot waited for
    rig.cfg = rig.cfg.model_copy(update={"enabled": False})  # no more reads: the rows in hand drain
    await _settle(rig, 100)
    times = rig.sink.handler_.times
    assert len(times) > 10
    bulk_times = times[:1] + times[2:]
    # the broadcast keeps its rate: the n-th send's slot is 5n s after the first, and a mail is
    # received at or after its slot (later on a busy machine: the clock may run on meanwhile)
    assert all(t - opened >= 5.0 * n for n, t in enumerate(bulk_times))


async def test_server_closing_an_idle_connection_costs_no_retry(rig: Rig) -> None:
    rig.sink.smtp_options = {"timeout": 0.2}  # the server hangs up idle sessions quickly
    await rig.sink.close()
    await rig.sink.start(rig.cfg.port)
    rig.start()
    await rig.enqueue("k1")
    await rig.sink.wait_for(1)
    await asyncio.sleep(0.5)
    with capture_logs() as logs:
        row_id = await rig.enqueue("k2")
        await rig.sink.wait_for(2)
        await until(lambda: _is(rig.status(row_id), OutboxStatus.SENT))
    assert (await rig.row(row_id)).attempts == 1
    assert not [e for e in logs if e["event"] in ("mail.deferred", "mail.dead")]


async def test_cancelled_mid_send_leaves_the_row_pending_and_closes_its_sockets(rig: Rig) -> None:
    """What the daemon's drain bound does to a sender stuck on a slow server: cancel it."""
    handler = rig.sink.handler_
    handler.gate = asyncio.Event()
    rig.start()
    row_id = await rig.enqueue("k1")
    await until(lambda: handler.active == 1)
    assert rig.task is not None
    rig.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rig.task
    rig.task = None
    assert rig.sender is not None
    assert all(c.smtp is None for c in rig.sender._pool.idle)
    assert await rig.status(row_id) is OutboxStatus.PENDING  # at-least-once: sent again after a restart
    handler.gate.set()


async def test_metrics_by_kind(rig: Rig) -> None:
    rig.sink.handler.scripted_replies.extend(["550 5.7.1 no", "451 4.3.0 later"])
    rig.cfg = rig.cfg.model_copy(update={"max_concurrency": 1})
    rig.start()
    dead = await rig.enqueue("a", kind="voicemail")
    await until(lambda: _is(rig.status(dead), OutboxStatus.DEAD))
    retried = await rig.enqueue("b", kind="voicemail")
    await until(lambda: _attempts(rig, retried, 1))
    sent = await rig.enqueue("c", kind="low_balance")
    await until(lambda: _is(rig.status(sent), OutboxStatus.SENT))
    await rig.clock.advance(60)
    assert rig.sender is not None
    m = await rig.sender.metrics()
    assert (m["pending"], m["sent"], m["dead"], m["retried"]) == (1, 1, 1, 1)
    assert m["oldest_pending_age_seconds"] == 60.0
    assert m["by_kind"]["voicemail"]["dead"] == 1
    assert m["by_kind"]["voicemail"]["pending"] == 1
    assert m["by_kind"]["low_balance"]["sent"] == 1
    assert m["sender"]["since_start"]["deferred"] == 1


# ---- what the relay receives --------------------------------------------------------------------


async def test_an_offers_one_click_headers_reach_the_relay_as_plain_urls(rig: Rig) -> None:
    """The bytes the relay gets carry ``List-Unsubscribe: <https://…>`` on one line, not the RFC 2047
    encoded words email.policy.SMTP folds a long URL into (receivers cannot parse those: RFC 8058)."""
    rig.start()
    await rig.store.write(lambda tx: tx.record_consent("acct1001", True, "api", "1", None))
    url = unsubscribe_url("https://cont.clickphone.ro", make_token(b"k" * 32, "acct1001"))
    assert len(f"List-Unsubscribe: <{url}>") > 78
    payload = {**KINDS["offer"].sample, "unsubscribe_url": url, "language": "ro", "valid_until": "2026-12-31"}
    notice = Notice(key="bc:1:acct1001", kind="offer", recipient=TO, account="acct1001", payload=payload)
    await rig.store.write(lambda tx: tx.enqueue_notice(notice))
    await rig.sink.wait_for(1)
    lines = rig.sink.messages[0].data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert f"List-Unsubscribe: <{url}>".encode() in lines
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines
    assert f"Message-ID: {message_id('bc:1:acct1001', DOMAIN)}".encode() in lines
    unsubscribe = [line for line in lines if line.lower().startswith(b"list-unsubscribe:")]
    assert unsubscribe == [f"List-Unsubscribe: <{url}>".encode()]


# ---- TLS and AUTH --------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:  # the cryptography package is not installed here either
        pytest.skip("neither the cryptography package nor the openssl command is available")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class CountingContext(ssl.SSLContext):
    """A client context that counts the TLS sessions it wraps."""

    wraps = 0

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        type(self).wraps += 1
        return super().wrap_bio(*args, **kwargs)


def _client_context(cert: Path) -> CountingContext:
    ctx = CountingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cert))
    CountingContext.wraps = 0
    return ctx


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_tls_with_auth_uses_one_prebuilt_ssl_context(
    rig: Rig, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, security: str
) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"s3cret", handled=False)

    await rig.sink.close()
    if security == "starttls":
        rig.sink.smtp_options = {"tls_context": server_ctx, "require_starttls": True, "authenticator": authenticator}
    else:
        rig.sink.server_ssl = server_ctx
        rig.sink.smtp_options = {"authenticator": authenticator, "auth_require_tls": False}
    await rig.sink.start(rig.cfg.port)
    rig.cfg = rig.cfg.model_copy(
        update={"security": security, "username": "clickphone", "connection_reuse": 1, "max_concurrency": 1}
    )
    client_ctx = _client_context(cert)
    sender = rig.start(password="s3cret", tls_context=client_ctx)

    def no_new_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        raise AssertionError("an SSL context was built per connection")

    monkeypatch.setattr(ssl, "create_default_context", no_new_context)
    for i in range(3):
        await rig.enqueue(f"k{i}")
    await rig.sink.wait_for(3)
    assert sender.tls_context is client_ctx
    assert rig.sink.connections == 3
    assert CountingContext.wraps == 3  # every connection's TLS session came from the one context
    assert logins == [(b"clickphone", b"s3cret")] * 3


async def test_wrong_password_defers_never_dead_letters(rig: Rig, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    await rig.sink.close()
    rig.sink.smtp_options = {
        "tls_context": server_ctx,
        "require_starttls": True,
        "authenticator": lambda *a: AuthResult(success=False, handled=False),
    }
    await rig.sink.start(rig.cfg.port)
    rig.cfg = rig.cfg.model_copy(update={"security": "starttls", "username": "clickphone"})
    rig.start(password="wrong", tls_context=_client_context(cert))
    row_id = await rig.enqueue("k1")
    await until(lambda: _attempts(rig, row_id, 1))
    row = await rig.row(row_id)
    assert row.status is OutboxStatus.PENDING  # our configuration's fault, not the message's
    assert "535" in (row.last_error or "")


# ---- the crash window, with the real daemon --------------------------------------------------------


def _db(cfg: Path) -> Path:
    return cfg.parent / "db" / "test.db"


def _outbox(cfg: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(_db(cfg))
    try:
        return conn.execute("SELECT status, attempts FROM outbox ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest.mark.slow
async def test_killed_while_smtp_is_down_then_sent_exactly_once_after_restart(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    port = free_port()
    cfg = write_config("", smtp_port=port)
    cfg.write_text(cfg.read_text().replace("smtp:\n", "smtp:\n  retry_min: 0.2\n  retry_max: 0.4\n", 1))
    notify = NotifySocket(short_tmp / "notify")
    daemon = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    await daemon.start()
    try:
        await notify.wait_for("READY=1")
        code, _, err = await run_cli("mail-test", TO, "-c", str(cfg))
        assert code == 0, err
        await daemon.wait_log(lambda e: e.get("event") == "mail.deferred")
        daemon.signal(signal.SIGKILL)
        await daemon.wait()
    finally:
        await daemon.kill()
    assert _outbox(cfg)[0][0] == "pending"

    sink = CountingSink()
    await sink.start(port)
    again = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    await again.start()
    try:
        await sink.wait_for(1, timeout=20)
        await again.wait_log(lambda e: e.get("event") == "mail.sent")
        await asyncio.sleep(1.0)  # a second copy would have arrived by now (retries every 0.2-0.4 s)
        again.signal(signal.SIGTERM)
        assert await again.wait() == 0
    finally:
        await again.kill()
        await sink.close()
        notify.close()
    assert len(sink.messages) == 1
    assert _outbox(cfg)[0][0] == "sent"


@pytest.mark.slow
async def test_kill_between_250_and_the_update_duplicates_once_with_the_same_message_id(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """The only duplicate at-least-once allows: the server accepted, the daemon died before recording it."""
    sink = CountingSink()
    await sink.start()
    cfg = write_config("", smtp_port=sink.port)
    daemon = DaemonProcess(cfg)

    def kill_daemon() -> None:  # the message is accepted; the daemon dies before it hears the 250
        assert daemon.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.proc.pid, signal.SIGKILL)

    sink.handler_.on_data = kill_daemon
    await daemon.start()
    try:
        ready = await daemon.wait_log(lambda e: e.get("event") == "daemon.ready")
        assert ready["event_loop"] == "uvloop"  # the configured default, as systemd runs it
        code, _, err = await run_cli("mail-test", TO, "-c", str(cfg))
        assert code == 0, err
        await sink.wait_for(1)
        assert await daemon.wait() == -signal.SIGKILL
    finally:
        await daemon.kill()
    assert _outbox(cfg) == [("pending", 0)]  # never recorded as sent

    sink.handler_.on_data = None
    again = DaemonProcess(cfg)
    await again.start()
    try:
        await sink.wait_for(2, timeout=20)
        await again.wait_log(lambda e: e.get("event") == "mail.sent")
        await asyncio.sleep(0.5)
        again.signal(signal.SIGTERM)
        assert await again.wait() == 0
    finally:
        await again.kill()
        await sink.close()
    assert len(sink.messages) == 2  # exactly one duplicate, not more
    ids = {email.message_from_bytes(m.data, policy=default_policy)["Message-ID"] for m in sink.messages}
    assert len(ids) == 1  # ... and it is traceable: the same Message-ID
    assert _outbox(cfg) == [("sent", 1)]
