"""The outbox sender: delivers committed rows over SMTP and marks them sent after the 250.

At-least-once: a row is marked sent only after the server accepted it, so a crash between the
250 and the update re-sends; the Message-ID derived from the idempotency key makes that
duplicate traceable. The window is kept short: the update is queued the moment the 250 arrives.

How it runs (one task, :meth:`OutboxSender.run`):

* A commit that enqueued mail calls :meth:`~OutboxSender.wake`; otherwise the loop sleeps until
  the next row falls due (on the injected clock), so there is no polling delay.
* Each due row becomes an attempt task. Attempts share a pool of at most ``max_concurrency``
  SMTP connections, reused (most recently used first) for up to ``connection_reuse`` messages
  and closed after :data:`IDLE_CLOSE` seconds unused. One pre-built ``ssl.SSLContext`` serves
  every STARTTLS/TLS connection. ``rate_limit_per_second`` spaces the sends of bulk kinds
  (broadcasts, policy notices) evenly; a bulk row waits for its slot before it takes a
  connection. Service mail is not rate-limited and is read even when bulk rows fill the window
  (it has a window of its own), so a broadcast never holds back a voicemail.
* 4xx replies, timeouts and dropped connections defer the row Postfix-style
  (:mod:`clickphone_agi.domain.delivery`); 5xx on MAIL/RCPT/DATA dead-letters it at once. DATA has
  its own long ``data_timeout`` (RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final "."):
  a timeout there is ambiguous (the relay may have queued the mail), so the row is deferred by
  the longest gap and logged as ambiguous; at-least-once means a possible duplicate, not a loss. A
  failure to connect, say hello, start TLS or log in is the relay's problem, not the message's:
  it defers (never dead-letters) and holds further connection attempts for a short while, so an
  outage costs one cheap deferral per due row and never blocks anything else.
* Before sending: an expired row is marked ``expired``; a suppressed recipient's row is marked
  ``dead`` with ``last_error`` ``suppressed: …`` (the outbox CHECK constraint has no
  'suppressed' status and SQLite cannot alter it). Neither is sent. Both are checked when the row
  is read and again right before the send, after any wait for a connection or a rate slot:
  an offer's consent and suppression always (an unsubscribe stops offers already queued), other
  mail's suppression only after a wait of :data:`RECHECK_AFTER` or more.

This module also holds the units of work behind ``clickphone-agi outbox retry|purge`` and
``clickphone-agi bounce``, shared by the daemon's control socket and the CLI's local writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import aiosmtplib
import structlog

from clickphone_agi.adapters.control import CommandError
from clickphone_agi.clock import Clock
from clickphone_agi.config.loader import unsafe_secret
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.bounce import DeliveryReport, Verdict, is_bad_mailbox, verp_address
from clickphone_agi.domain.delivery import DueMail, RateLimiter, RetryPolicy, after_failure, ensure_headers, message_id
from clickphone_agi.domain.outbox import OutboxRow
from clickphone_agi.domain.retention import PURGE_AFTER_SEND
from clickphone_agi.faults import crash_point
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.notices.render import InvalidHeader, Renderer, build_message
from clickphone_agi.ports import StorageRetry, StorageUnavailable, Store, WriteTx

log = structlog.get_logger(__name__)

IDLE_CLOSE = 10.0  # seconds an unused pooled connection stays open
RELAY_HOLD = 30.0  # after a connection failure, no new connection for this long (at most retry_min)
SAFETY_POLL = 60.0  # the loop looks at the outbox at least this often, whatever happens
# rows taken per connection (at least IN_FLIGHT_MIN in all): while one row's 250 is being
# committed (an fsync) and the next rows read, the connection already carries the following one
IN_FLIGHT_PER_CONNECTION = 4
IN_FLIGHT_MIN = 8
PURGEABLE = ("sent", "dead", "expired", "bounced")
# a row that waited this long (seconds) for a connection or a rate slot has its recipient's
# suppression asked again before it is sent; offers always do
RECHECK_AFTER = 1.0
# seconds between looks (one stat) at smtp.verp_key_file: a changed, replaced or repaired key file
# is used within this long, and an unreadable one is tried again (not given up on until a restart)
KEY_RECHECK = 5.0


def render_row(row: OutboxRow, cfg: SmtpConfig, renderer: Renderer) -> bytes:
    """The one place a payload-only row (a notice decided inside a transaction) becomes MIME:
    the same templates as every other notice, in the account's language from the payload."""
    assert row.payload is not None
    language = str(row.payload.get("language", "ro"))
    rendered = renderer.render(row.kind, language, row.payload)
    return build_message(
        rendered,
        sender=cfg.from_address,
        recipient=row.recipient,
        message_id=message_id(row.idempotency_key, cfg.message_id_domain),
        date=row.created_at,
        extra_headers={"X-ClickPhone-Kind": row.kind, **unsubscribe_headers(row.kind, row.payload)},
    )


def unsubscribe_headers(kind: str, payload: Mapping[str, Any]) -> dict[str, str]:
    """RFC 8058 one-click headers for a marketing mail, on the account's own signed link from the
    payload (a marketing row without one is refused: it must never go out without an unsubscribe)."""
    spec = KINDS.get(kind)
    if spec is None or spec.category != "marketing":
        return {}
    url = payload.get("unsubscribe_url")
    if not isinstance(url, str) or not url.startswith("https://") or any(c in url for c in ' <>"\r\n'):
        raise InvalidHeader(f"{kind}: a marketing mail needs an https unsubscribe_url")
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


# st_dev, st_ino, st_size, st_mtime_ns, and who may read it: a chmod o+r is seen like a new file
_FileStamp = tuple[int, int, int, int, int, int, int]  # ... st_mode, st_uid, st_gid


def load_verp_key(path: Path) -> bytes:
    """The VERP HMAC key from ``smtp.verp_key_file`` (blocking; run it in a thread)."""
    return _read_verp_key(path)[0]


def _read_verp_key(path: Path) -> tuple[bytes, _FileStamp]:
    """The key and the stamp of the very file it was read from (blocking). A file other local
    users can read or replace is refused as at start-up: it is re-read when it changes, and a
    key others know lets them forge the bounces that suppress a subscriber's mail."""
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        unsafe = unsafe_secret(path, st)
        if unsafe:
            raise ValueError(unsafe)
        stamp = _stamp(st)
        key = f.read().strip()
    if len(key) < 16:
        raise ValueError(f"{path}: VERP key too short ({len(key)} bytes): use 32 or more random bytes")
    return key, stamp


def _file_stamp(path: Path) -> _FileStamp | None:
    """What tells a replaced or rewritten file apart (blocking); None if it cannot be looked at."""
    try:
        return _stamp(path.stat())
    except OSError:
        return None


def _stamp(st: os.stat_result) -> _FileStamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid)


def _is_marketing(kind: str) -> bool:
    spec = KINDS.get(kind)
    return spec is not None and spec.category == "marketing"


def _is_bulk(kind: str) -> bool:
    spec = KINDS.get(kind)
    return spec is not None and spec.bulk


@functools.lru_cache(maxsize=8)
def _bare(mailbox: str) -> str:
    return parseaddr(mailbox)[1]


@dataclass
class _Conn:
    """One pooled SMTP connection."""

    smtp: aiosmtplib.SMTP | None = None
    params: tuple[Any, ...] = ()
    used: int = 0
    last_used: float = 0.0


class _Pool:
    """At most ``limit`` connections busy at once; the most recently used idle one is handed out first."""

    def __init__(self) -> None:
        self.idle: list[_Conn] = []
        self.busy = 0
        self._changed = asyncio.Condition()

    async def acquire(self, limit: Callable[[], int]) -> _Conn:
        async with self._changed:
            await self._changed.wait_for(lambda: self.busy < limit())
            self.busy += 1
            return self.idle.pop() if self.idle else _Conn()

    async def release(self, conn: _Conn) -> None:
        async with self._changed:
            self.busy -= 1
            self.idle.append(conn)
            self._changed.notify()


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    reply: str
    code: int | None = None
    stage: str = "data"  # connect | mail | rcpt | data
    ambiguous: bool = False  # no reply to the end of data: the relay may have queued the mail


@dataclass(frozen=True)
class _KeyCache:
    """The VERP key in use: from which file (and which version of it), and when that was last checked."""

    path: Path | None
    stamp: _FileStamp | None
    key: bytes | None
    checked: float


@dataclass(frozen=True)
class _Stop:
    """Why a row read as sendable must not go out after all: it expired, or its recipient is suppressed."""

    reason: str
    expired: bool = False


class _ConnectFailed(Exception):
    pass


class OutboxSender:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        config: Callable[[], SmtpConfig],
        password: Callable[[], str | None],
        policy: RetryPolicy | None = None,
        tls_context: ssl.SSLContext | None = None,
        renderer: Renderer | None = None,
        on_sent: Callable[[OutboxRow], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        # called after a row's mark_sent committed; its errors are logged, the row stays sent
        self._on_sent = on_sent
        self._renderer = renderer or Renderer()
        self._clock = clock
        self._config = config
        # read at each login, like the config: a SIGHUP that loaded a rotated secret applies at once
        self._password = password
        self._policy = policy
        # built once: aiosmtplib would otherwise build (and load the CA store into) one per connection
        self.tls_context = tls_context or ssl.create_default_context()
        self._wake = asyncio.Event()
        self._pool = _Pool()
        self._limiter = RateLimiter()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._bulk_inflight: set[int] = set()  # the ids in _inflight of bulk kinds (broadcasts)
        # rows whose attempt ended while a due-row read was running: that read may predate their update
        self._finished_during_read: set[int] = set()
        self._hold_until = -math.inf
        self._hold_reason = ""
        self._local_hostname: str | None = None
        self._key_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._key_cache: _KeyCache | None = None
        # counters since start (the durable figures come from the outbox: :meth:`metrics`)
        self.sent = 0
        self.deferred = 0
        self.dead = 0
        self.expired = 0
        self.suppressed = 0
        self.connections = 0
        self.on_sent_errors = 0
        self.marks_committed_late = 0
        # the database refusing writes (a full disk): rows delivered (250) whose "sent" mark did not
        # commit are kept here and never attempted again; no attempt starts before _storage_until
        self._unmarked: dict[int, tuple[OutboxRow, Callable[[WriteTx], None]]] = {}
        self._storage_down = False
        self._storage_until = -math.inf  # monotonic
        self._storage_retry = StorageRetry()

    # ---- lifecycle ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Called after a commit that enqueued mail: deliver now, not at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        graceful = False
        try:
            while not stop.is_set():
                self._wake.clear()
                now = self._clock.now()
                wall_deadline: datetime | None = None
                try:
                    await self._dispatch(now)
                    if not self._inflight:  # otherwise the attempts' completion wakes the loop
                        wall_deadline = await self._store.next_due_after(now)
                except Exception:  # e.g. a database read failing: count, log, keep running
                    log.exception("mail.dispatch_failed")
                    wall_deadline = now + timedelta(seconds=5)
                if self._storage_down:  # try again when the hold ends
                    resume = now + timedelta(seconds=max(0.0, self._storage_until - self._clock.monotonic()))
                    wall_deadline = resume if wall_deadline is None else min(wall_deadline, resume)
                await self._reap_idle()
                await self._wait(stop, wall_deadline)
            if self._inflight:  # attempts under way finish (the daemon bounds the drain)
                await asyncio.gather(*self._inflight.values(), return_exceptions=True)
            if self._unmarked:
                await self._flush_marks()
            graceful = True
        finally:
            if not graceful:  # cancelled: stop the attempts, let them hand their connections back
                tasks = list(self._inflight.values())
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if self._unmarked:
                log.error(
                    "mail.marks_lost", mails=len(self._unmarked),
                    keys=[row.idempotency_key for row, _ in list(self._unmarked.values())[:10]],
                    note="delivered, but the database never took their 'sent' marks: they go again after a restart",
                )  # fmt: skip
            await self._close_all(graceful)

    async def _wait(self, stop: asyncio.Event, wall_deadline: datetime | None) -> None:
        idle = [c.last_used + IDLE_CLOSE for c in self._pool.idle if c.smtp is not None]
        mono_deadline = min(idle) if idle else None

        async def sleep() -> None:
            # computed when the sleep starts, so a clock moved meanwhile is taken into account
            waits = [SAFETY_POLL]
            if wall_deadline is not None:
                waits.append((wall_deadline - self._clock.now()).total_seconds())
            if mono_deadline is not None:
                waits.append(mono_deadline - self._clock.monotonic())
            await self._clock.sleep(max(0.0, min(waits)))

        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(sleep()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waiters:
                fut.cancel()

    async def _dispatch(self, now: datetime) -> None:
        cfg = self._config()
        if not cfg.enabled:
            return
        if self._storage_down and self._clock.monotonic() < self._storage_until:
            return  # the database refuses writes: a mail sent now could not be marked sent
        if self._unmarked and not await self._flush_marks():
            return
        # Service mail has a window of its own: bulk rows waiting for their rate slots may fill
        # the shared one, and a voicemail must not wait for them to leave it.
        window = self._window()
        room = window - (len(self._inflight) - len(self._bulk_inflight))
        if room <= 0:
            return
        bulk_room = max(0, window - len(self._inflight))
        self._finished_during_read.clear()
        exclude = set(self._inflight) | self._unmarked.keys()
        for mail in await self._store.due_mail(now, room, exclude=exclude, bulk_limit=bulk_room):
            if mail.row.id in exclude or mail.row.id in self._finished_during_read:
                continue  # finished while the read ran: the read may predate its update
            task = asyncio.create_task(self._attempt(mail), name=f"mail-{mail.row.id}")
            self._inflight[mail.row.id] = task
            if _is_bulk(mail.row.kind):
                self._bulk_inflight.add(mail.row.id)
            task.add_done_callback(functools.partial(self._finished, mail.row.id))

    def _finished(self, row_id: int, task: asyncio.Task[None]) -> None:
        self._inflight.pop(row_id, None)
        self._bulk_inflight.discard(row_id)
        self._finished_during_read.add(row_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("mail.attempt_crashed", row=row_id, error=repr(task.exception()))
        if len(self._inflight) <= self._window() // 2:
            self._wake.set()  # half the window drained: refill it with one read (a commit wakes at once)

    def _window(self) -> int:
        """How many rows the sender holds at most: a few per connection, queued behind it."""
        return max(IN_FLIGHT_MIN, self._config().max_concurrency * IN_FLIGHT_PER_CONNECTION)

    # ---- one attempt -------------------------------------------------------------------------

    async def _attempt(self, mail: DueMail) -> None:
        """One row's attempt; a bug here defers the row (backoff), it never spins on it. While the
        database refuses writes (a full disk), attempts pause: the row stays due and goes later."""
        try:
            try:
                await self._attempt_row(mail)
            except StorageUnavailable:
                raise
            except Exception as exc:
                log.exception("mail.attempt_failed", key=mail.row.idempotency_key, kind=mail.row.kind)
                await self._failed(mail, _Outcome(False, f"internal error: {exc!r}"[:300], None, "internal"), None)
        except StorageUnavailable as exc:
            self._storage_refused(exc, mail.row)
        else:
            if self._storage_down and not self._unmarked:  # its writes went through
                self._storage_back()

    def _storage_refused(self, exc: StorageUnavailable, row: OutboxRow) -> None:
        """A write of ``row``'s attempt did not commit: hold every attempt for a while (doubling)."""
        if not self._storage_down:
            log.error(
                "mail.storage_unavailable", key=row.idempotency_key, error=str(exc), retry_in=self._storage_retry.delay,
                action="no mail is sent until the database takes writes again",
            )  # fmt: skip
        self._storage_down = True
        self._storage_until = self._clock.monotonic() + self._storage_retry.take()

    def _storage_back(self) -> None:
        log.warning("mail.storage_recovered", marks_committed_late=self.marks_committed_late)
        self._storage_down = False
        self._storage_until = -math.inf
        self._storage_retry.reset()

    async def _flush_marks(self) -> bool:
        """Commit the "sent" marks the database refused, oldest first; True once none is left."""
        for row_id, (row, unit) in list(self._unmarked.items()):
            try:
                await self._store.write(unit, urgent=True)
            except StorageUnavailable as exc:
                self._storage_refused(exc, row)
                return False
            del self._unmarked[row_id]
            self.marks_committed_late += 1
            log.info("mail.marked_sent_late", key=row.idempotency_key, kind=row.kind)
            await self._after_sent(row)
        if self._storage_down:
            self._storage_back()
        return True

    async def _attempt_row(self, mail: DueMail) -> None:
        row = mail.row
        cfg = self._config()
        read_at = self._clock.monotonic()
        if self._clock.now() >= row.expires_at:
            await self._expire(row)
            return
        if mail.suppressed is not None:
            await self._suppress(row, mail.suppressed)
            return
        mime = await self._body(mail, cfg)
        if mime is None:
            return
        mime = ensure_headers(mime, message_id(row.idempotency_key, cfg.message_id_domain))
        envelope = await self._envelope(row, cfg)

        await self._rate_slot(row, cfg)
        conn = await self._pool.acquire(lambda: self._config().max_concurrency)
        stop: _Stop | None = None
        try:
            stop = await self._stop_now(row, self._clock.monotonic() - read_at)
            if stop is not None:
                outcome = _Outcome(False, stop.reason)
            elif self._clock.monotonic() < self._hold_until:
                outcome = _Outcome(False, f"relay unavailable: {self._hold_reason}", None, "connect")
            else:
                outcome = await self._transact(conn, cfg, envelope, row.recipient, mime)
        finally:
            await self._pool.release(conn)
        if stop is not None and stop.expired:
            await self._expire(row)
        elif stop is not None:
            await self._suppress(row, stop.reason)
        elif outcome.ok:
            await self._sent(row, outcome, envelope)
        else:
            await self._failed(mail, outcome, envelope)

    async def _body(self, mail: DueMail, cfg: SmtpConfig) -> bytes | None:
        """The stored MIME, or the payload rendered now (and stored); None once a row without one is dead."""
        row = mail.row
        if mail.mime:
            return mail.mime
        now = self._clock.now()
        if row.payload is None:
            await self._store.write(lambda tx: tx.mark_failed(row.id, "no message body", now, dead=True))
            self.dead += 1
            log.error("mail.no_body", key=row.idempotency_key, kind=row.kind)
            return None
        try:
            # off the loop: a broadcast queues thousands of these
            mime = await asyncio.to_thread(render_row, row, cfg, self._renderer)
        except Exception as exc:  # permanent for this payload: a dead letter to replay once fixed
            error = f"cannot render the {row.kind} notice: {exc!r}"[:300]
            await self._store.write(lambda tx: tx.mark_failed(row.id, error, now, dead=True))
            self.dead += 1
            log.exception("mail.render_failed", key=row.idempotency_key, kind=row.kind)
            return None
        await self._store.write(lambda tx: tx.set_message(row.id, mime))
        return mime

    async def _sent(self, row: OutboxRow, outcome: _Outcome, envelope: str) -> None:
        crash_point("smtp.after_250")
        unit = _finishing(row, lambda tx: tx.mark_sent(row.id, outcome.reply, envelope_from=envelope))
        try:
            await self._store.write(unit, urgent=True)  # urgent: a crash before this commits sends the mail again
        except StorageUnavailable as exc:
            # delivered all the same: never attempted again in this process; marked once the
            # database takes writes (:meth:`_flush_marks`), and its after-send hook runs then
            self._unmarked[row.id] = (row, unit)
            self._storage_refused(exc, row)
            self.sent += 1
            log.error("mail.mark_deferred", key=row.idempotency_key, kind=row.kind, error=str(exc))
            return
        crash_point("smtp.after_mark_sent")
        self.sent += 1
        log.info(
            "mail.sent",
            key=row.idempotency_key,
            kind=row.kind,
            to=row.recipient,
            attempt=row.attempts + 1,
            reply=outcome.reply,
        )
        await self._after_sent(row)

    async def _rate_slot(self, row: OutboxRow, cfg: SmtpConfig) -> None:
        """A bulk row's wait for its ``rate_limit_per_second`` slot, before it takes a connection.

        Only bulk mail is limited (a broadcast is what would swamp the relay or its quota): service
        mail never queues behind a broadcast's slots, nor finds every connection held by a sleeper.
        Waiting before the connection means a relay slow to free one can bunch up to
        ``max_concurrency`` sends; the average rate holds.
        """
        if not _is_bulk(row.kind):
            return
        wait = self._limiter.reserve(self._clock.monotonic(), cfg.rate_limit_per_second)
        if wait > 0:
            await self._clock.sleep(wait)

    async def _stop_now(self, row: OutboxRow, waited: float) -> _Stop | None:
        """Asked right before the send: has the row expired, or must its recipient not get it?

        An offer always asks the database again (an unsubscribe while it waited behind the rate
        limiter must stop it: consent is checked when sent, not when read); other mail only when
        it waited at least :data:`RECHECK_AFTER` seconds for a connection or a rate slot, so
        service mail sent at once costs nothing extra.
        """
        if self._clock.now() >= row.expires_at:
            return _Stop("expired", expired=True)
        if _is_marketing(row.kind) or waited >= RECHECK_AFTER:
            reason = await self._store.send_stop(row.id)
            return None if reason is None else _Stop(reason)
        return None

    async def _expire(self, row: OutboxRow) -> None:
        await self._store.write(_finishing(row, lambda tx: tx.mark_expired(row.id)))
        self.expired += 1
        log.info("mail.expired", key=row.idempotency_key, kind=row.kind, expired_at=row.expires_at.isoformat())

    async def _suppress(self, row: OutboxRow, why: str) -> None:
        """Not sent, not to be retried: stored as dead with ``suppressed: …`` (see the module docstring)."""
        reason = f"suppressed: {why}"
        now = self._clock.now()
        await self._store.write(lambda tx: tx.mark_failed(row.id, reason, now, dead=True, count_attempt=False))
        self.suppressed += 1
        log.warning("mail.suppressed", key=row.idempotency_key, kind=row.kind, to=row.recipient, reason=reason)

    async def _after_sent(self, row: OutboxRow) -> None:
        """The ``on_sent`` hook; the mail was delivered, so nothing it does can change the row."""
        if self._on_sent is None:
            return
        try:
            await self._on_sent(row)
        except Exception as exc:
            self.on_sent_errors += 1
            log.exception("mail.on_sent_failed", key=row.idempotency_key, kind=row.kind, error=repr(exc))

    async def _failed(self, mail: DueMail, outcome: _Outcome, envelope: str | None) -> None:
        row = mail.row
        cfg = self._config()
        now = self._clock.now()
        policy = self._policy or RetryPolicy.from_seconds(cfg.retry_min, cfg.retry_max, cfg.lifetime)
        decision = after_failure(
            policy, now=now, created_at=mail.lifetime_start, code=outcome.code, ambiguous=outcome.ambiguous
        )
        # an expiring kind comes due again at its expiry, so it is recorded as expired on time
        next_at = decision.next_attempt_at if decision.dead else min(decision.next_attempt_at, row.expires_at)
        bad_mailbox = outcome.stage == "rcpt" and is_bad_mailbox(outcome.code, outcome.reply)
        reply = outcome.reply if outcome.code is not None else None

        def record(tx: WriteTx) -> bool:
            tx.mark_failed(row.id, outcome.reply, next_at, dead=decision.dead, smtp_reply=reply, envelope_from=envelope)
            return bad_mailbox and tx.count_hard_bounce(row.recipient, outcome.reply, cfg.hard_bounce_limit, row.id)

        now_suppressed = await self._store.write(record)
        fields: dict[str, Any] = {
            "key": row.idempotency_key,
            "kind": row.kind,
            "to": row.recipient,
            "attempt": row.attempts + 1,
            "code": outcome.code,
            "stage": outcome.stage,
            "error": outcome.reply,
        }
        if outcome.ambiguous:
            fields["ambiguous"] = True  # a duplicate is possible: the same Message-ID traces it
        if decision.dead:
            self.dead += 1
            log.warning("mail.dead", **fields, suppressed_now=now_suppressed or None)
        else:
            self.deferred += 1
            log.warning(
                "mail.deferred",
                **fields,
                retry_at=next_at.isoformat(),
                gives_up_at=(mail.lifetime_start + policy.lifetime).isoformat(),
            )

    # ---- SMTP --------------------------------------------------------------------------------

    async def _transact(self, conn: _Conn, cfg: SmtpConfig, envelope: str, rcpt: str, mime: bytes) -> _Outcome:
        try:
            reused = await self._ensure_connected(conn, cfg)
        except _ConnectFailed as exc:
            hold = min(RELAY_HOLD, cfg.retry_min)
            self._hold_until = self._clock.monotonic() + hold
            self._hold_reason = str(exc)
            log.error("mail.relay_unavailable", relay=f"{cfg.host}:{cfg.port}", error=str(exc), hold_seconds=hold)
            return _Outcome(False, str(exc), None, "connect")
        stage = "mail"
        try:
            smtp = conn.smtp
            assert smtp is not None
            conn.used += 1
            try:
                await smtp.mail(envelope)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # the server dropped an idle connection: nothing was sent yet, so open a new one
                await self._close(conn)
                await self._ensure_connected(conn, cfg)
                smtp = conn.smtp
                assert smtp is not None
                conn.used += 1
                await smtp.mail(envelope)
            stage = "rcpt"
            await smtp.rcpt(rcpt)
            stage = "data"
            crash_point("smtp.before_data")
            # aiosmtplib applies one timeout to both DATA replies; the long one is meant for the
            # second (a relay scanning the message), the first comes at once from any live relay
            response = await smtp.data(mime, timeout=cfg.data_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(conn)
            return _Outcome(False, f"{exc.code} {exc.message}", exc.code, stage)
        except aiosmtplib.SMTPTimeoutError as exc:
            await self._close(conn)
            if stage != "data":
                return _Outcome(False, f"{type(exc).__name__}: {exc}", None, stage)
            reply = f"ambiguous: no reply to DATA within {cfg.data_timeout:g} s; the relay may have queued it"
            return _Outcome(False, reply, None, stage, ambiguous=True)
        except (aiosmtplib.SMTPException, OSError, _ConnectFailed) as exc:
            # timeouts and dropped connections count as a 451: the message may be retried
            await self._close(conn)
            return _Outcome(False, f"{type(exc).__name__}: {exc}", None, stage)
        conn.last_used = self._clock.monotonic()
        return _Outcome(True, f"{response.code} {response.message}", response.code, stage)

    async def _ensure_connected(self, conn: _Conn, cfg: SmtpConfig) -> bool:
        """Connect (EHLO, STARTTLS, AUTH) unless ``conn`` can carry one more message; True if reused."""
        params = (cfg.host, cfg.port, cfg.security, cfg.username, cfg.timeout)
        smtp = conn.smtp
        if smtp is not None:
            if smtp.is_connected and conn.params == params and conn.used < cfg.connection_reuse:
                return True
            await self._close(conn)
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            use_tls=cfg.security == "tls",
            start_tls=cfg.security == "starttls",
            tls_context=self.tls_context if cfg.security != "none" else None,
            local_hostname=self._local_hostname,
        )
        try:
            await smtp.connect()
            if cfg.username:
                await smtp.login(cfg.username, self._password() or "")
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _ConnectFailed(f"{exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        except BaseException:  # cancelled mid-handshake: never leave the socket open
            smtp.close()
            raise
        self.connections += 1
        self._hold_until = -math.inf
        conn.smtp, conn.params, conn.used = smtp, params, 0
        conn.last_used = self._clock.monotonic()
        return False

    async def _reset(self, conn: _Conn) -> None:
        """After a refused transaction: RSET so the connection can carry the next one, else drop it."""
        smtp = conn.smtp
        if smtp is None or not smtp.is_connected:
            await self._close(conn)
            return
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            await self._close(conn)
        else:
            conn.last_used = self._clock.monotonic()

    async def _close(self, conn: _Conn, *, polite: bool = True) -> None:
        smtp, conn.smtp = conn.smtp, None
        if smtp is None:
            return
        try:
            if polite and smtp.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await smtp.quit(timeout=2)
        finally:
            smtp.close()

    async def _reap_idle(self) -> None:
        """Close idle and surplus connections; the QUITs run aside so dispatching never waits on them."""
        now = self._clock.monotonic()
        limit = self._config().max_concurrency
        for index, conn in enumerate(list(self._pool.idle)):
            surplus = index < len(self._pool.idle) - limit  # the pool shrank on reload
            if conn.smtp is not None and (surplus or now - conn.last_used >= IDLE_CLOSE):
                parked = _Conn(conn.smtp)
                conn.smtp = None
                task = asyncio.create_task(self._close(parked))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_all(self, polite: bool) -> None:
        for conn in self._pool.idle:
            await self._close(conn, polite=polite)
        if self._closing:
            if not polite:
                for task in self._closing:
                    task.cancel()  # _close still closes the socket when cancelled
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ---- envelope ----------------------------------------------------------------------------

    async def _envelope(self, row: OutboxRow, cfg: SmtpConfig) -> str:
        """``bounce+<id>-<mac>@bounce_domain`` (VERP), or the From address without bounce tracking."""
        if cfg.bounce_domain is None:
            return _bare(cfg.from_address)
        key = await self.verp_key(cfg)
        if key is None:
            return _bare(cfg.from_address)
        return verp_address(row.id, row.idempotency_key, key, cfg.bounce_domain)

    async def verp_key(self, cfg: SmtpConfig) -> bytes | None:
        """From ``verp_key_file``, else a random key stored in the database at first use.

        The file is looked at again (a stat) every :data:`KEY_RECHECK` seconds and re-read when it
        changed, as the ``bounce`` verb reads it afresh each time; a failure is retried after that
        same delay, never kept until a restart. The database key never changes: read once.
        """
        path = cfg.verp_key_file
        async with self._key_lock:
            now = self._clock.monotonic()
            cache = self._key_cache
            if cache is not None and cache.path == path:
                if path is None or now - cache.checked < KEY_RECHECK:
                    return cache.key
                if cache.key is not None and await asyncio.to_thread(_file_stamp, path) == cache.stamp:
                    self._key_cache = replace(cache, checked=now)
                    return cache.key
            key: bytes | None
            stamp: _FileStamp | None = None
            if path is not None:
                try:
                    key, stamp = await asyncio.to_thread(_read_verp_key, path)
                except (OSError, ValueError) as exc:
                    log.error(
                        "mail.verp_key_unreadable",
                        error=str(exc),
                        envelope="from_address, no bounce tracking",
                        retry_in_seconds=KEY_RECHECK,
                    )
                    key = None
                else:
                    if cache is not None and cache.path == path and cache.key is not None and cache.key != key:
                        log.info("mail.verp_key_changed", file=str(path))
            else:
                key = await self._store.write(lambda tx: tx.verp_key(secrets.token_bytes(32)))
            self._key_cache = _KeyCache(path, stamp, key, now)
            return key

    # ---- status ------------------------------------------------------------------------------

    async def metrics(self) -> dict[str, Any]:
        """The status command's ``mail`` figures: durable ones from the outbox, live ones from here."""
        figures = await self._store.mail_metrics(self._clock.now())
        figures["sender"] = {
            "in_flight": len(self._inflight),
            "connections_open": sum(1 for c in self._pool.idle if c.smtp is not None) + self._pool.busy,
            "connections_opened": self.connections,
            "relay_held": self._clock.monotonic() < self._hold_until,
            "storage_held": self._storage_down,
            "sent_not_marked": len(self._unmarked),
            "since_start": {
                "sent": self.sent,
                "deferred": self.deferred,
                "dead": self.dead,
                "expired": self.expired,
                "suppressed": self.suppressed,
            },
        }
        return figures


def _finishing(row: OutboxRow, mark: Callable[[WriteTx], None]) -> Callable[[WriteTx], None]:
    """The unit that marks ``row`` sent or expired; for a reset link or payment details it also drops
    the body, in the same transaction (``domain.retention.PURGE_AFTER_SEND``)."""

    def unit(tx: WriteTx) -> None:
        mark(tx)
        if row.kind in PURGE_AFTER_SEND:
            tx.drop_body(row.id)

    return unit


# ---- operator verbs and bounce intake (units shared by the control socket and the local CLI) -------


async def retry_command(store: Store, args: dict[str, Any]) -> dict[str, Any]:
    """``outbox retry ID…|--all-dead``: dead letters back to pending, due now; history kept in last_error."""
    if args.get("all_dead") is True:
        ids: list[int] | None = None
    else:
        raw = args.get("ids")
        if not isinstance(raw, list) or not raw or not all(isinstance(i, int) and i > 0 for i in raw):
            raise CommandError("ids: expected a non-empty list of outbox row ids (or all_dead: true)")
        ids = raw
    result: dict[str, Any] = await store.write(lambda tx: tx.retry_outbox(ids))
    log.info("outbox.retried", retried=len(result["retried"]), skipped=len(result["skipped"]))
    return result


async def purge_command(store: Store, clock: Clock, args: dict[str, Any]) -> dict[str, Any]:
    """``outbox purge``: finished rows (never pending ones) older than N days, or just their bodies."""
    days = args.get("older_than_days")
    statuses = args.get("statuses")
    keep_rows = args.get("keep_rows", False)
    if not isinstance(days, int | float) or isinstance(days, bool) or days < 0:
        raise CommandError("older_than_days: expected a number of days >= 0")
    if not isinstance(statuses, list) or not statuses or not set(statuses) <= set(PURGEABLE):
        raise CommandError(f"statuses: expected some of {', '.join(PURGEABLE)} (pending mail is never purged)")
    if not isinstance(keep_rows, bool):
        raise CommandError("keep_rows: expected true or false")
    before = clock.now() - timedelta(days=days)
    wanted = tuple(statuses)
    count = await store.write(lambda tx: tx.purge_outbox(before, wanted, keep_rows=keep_rows))
    log.info("outbox.purged", rows=count, before=before.isoformat(), statuses=list(wanted), bodies_only=keep_rows)
    return {"purged": count, "created_before": before.isoformat(), "statuses": list(wanted), "bodies_only": keep_rows}


def bounce_unit(report: DeliveryReport, file_key: bytes | None, limit: int) -> Callable[[WriteTx], dict[str, Any]]:
    """Attribute a DSN to its row by the VERP token, mark it bounced, count a hard bounce."""

    def unit(tx: WriteTx) -> dict[str, Any]:
        key = file_key if file_key is not None else tx.verp_key(None)
        if key is None:
            return {"outcome": "ignored", "reason": "no VERP key yet: nothing was sent with a VERP envelope"}
        row = None
        for token in report.tokens:
            candidate = tx.outbox_row(token.row_id)
            if candidate is not None and token.verify(key, candidate.idempotency_key):
                row = candidate
                break
        if row is None:
            return {"outcome": "ignored", "reason": "no valid VERP token (forged, foreign, or its row was purged)"}
        primary = report.primary
        assert primary is not None  # parse_dsn only returns reports with recipients
        verdict = report.verdict
        result: dict[str, Any] = {
            "row": row.id,
            "kind": row.kind,
            "verdict": str(verdict),
            "action": primary.action,
            "status": primary.status,
        }
        if verdict in (Verdict.DELAYED, Verdict.OTHER):
            return {**result, "outcome": "noted"}  # the relay still tries (or delivered): nothing to record
        first = tx.mark_bounced(row.id, f"bounced: {primary.summary()}")
        suppressed = (
            verdict is Verdict.HARD and first and tx.count_hard_bounce(row.recipient, primary.summary(), limit, row.id)
        )
        return {**result, "outcome": "bounced" if first else "duplicate", "suppressed": suppressed}

    return unit


async def bounce_command(store: Store, cfg: SmtpConfig, args: dict[str, Any]) -> dict[str, Any]:
    """``clickphone-agi bounce``: record one parsed DSN (the CLI parses; only the facts travel).

    ``{"ignored": {...}}`` is the CLI telling the daemon it dropped junk, for the daemon's log.
    """
    if isinstance(args.get("ignored"), dict):
        ignored = args["ignored"]
        log.warning(
            "bounce.ignored",
            reason=str(ignored.get("reason"))[:300],
            bytes=ignored.get("bytes"),
            truncated=ignored.get("truncated"),
        )
        return {"outcome": "ignored", "logged": True}
    try:
        report = DeliveryReport.from_json(args["report"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CommandError(f"report: {exc}") from None
    file_key = None
    if cfg.verp_key_file is not None:
        try:
            file_key = await asyncio.to_thread(load_verp_key, cfg.verp_key_file)
        except (OSError, ValueError) as exc:
            raise CommandError(f"smtp.verp_key_file: {exc}") from None
    result = await store.write(bounce_unit(report, file_key, cfg.hard_bounce_limit))
    if result["outcome"] == "ignored":
        log.warning("bounce.ignored", reason=result["reason"], tokens=len(report.tokens))
    else:
        log.info("bounce.recorded", **result)
    return result
