"""Minimal outbox sender: delivers committed rows over SMTP, marks them sent after the 250.

At-least-once: a row is marked sent only after the server accepted it, so a crash between the
250 and the update re-sends (the stable Message-ID makes that duplicate traceable). The Email
issue grows this into the full sender (TLS, AUTH, bounces, rate limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable

import aiosmtplib
import structlog

from clickphone_agi.clock import Clock
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.delivery import RetryPolicy, after_failure
from clickphone_agi.domain.outbox import OutboxRow
from clickphone_agi.notices.plain import render_notice
from clickphone_agi.ports import Store, WriteTx

log = structlog.get_logger(__name__)


class OutboxSender:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        config: Callable[[], SmtpConfig],
        password: str | None,
        policy: RetryPolicy | None = None,
        batch: int = 50,
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config
        self._password = password
        self._policy = policy or RetryPolicy()
        self._batch = batch
        self._wake = asyncio.Event()
        self._tls = ssl.create_default_context()
        self.sent = 0
        self.failed = 0

    def wake(self) -> None:
        """Called after a commit that enqueued mail: deliver now, not at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            delivered_any = await self.deliver_due()
            if delivered_any:
                continue
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            sleeper = asyncio.ensure_future(self._clock.sleep(30))
            try:
                await asyncio.wait({waiter, stopper, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (waiter, stopper, sleeper):
                    fut.cancel()

    async def deliver_due(self) -> bool:
        cfg = self._config()
        if not cfg.enabled:
            return False
        due = await self._store.due_outbox(self._clock.now(), self._batch)
        if not due:
            return False
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            use_tls=cfg.security == "tls",
            start_tls=cfg.security == "starttls",
            tls_context=self._tls if cfg.security != "none" else None,
        )
        try:
            await smtp.connect()
            if cfg.username and self._password:
                await smtp.login(cfg.username, self._password)
        except (aiosmtplib.SMTPException, OSError) as exc:
            code = getattr(exc, "code", None)
            for row, _ in due:
                await self._failed(row, code if isinstance(code, int) and code >= 400 else None, str(exc))
            return False
        try:
            for row, mime in due:
                await self._deliver(smtp, row, mime)
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
        return True

    async def _deliver(self, smtp: aiosmtplib.SMTP, row: OutboxRow, mime: bytes) -> None:
        now = self._clock.now()
        if not mime and row.payload is not None:
            cfg = self._config()
            mime = render_notice(
                row.kind,
                row.payload,
                key=row.idempotency_key,
                sender=cfg.from_address,
                recipient=row.recipient,
                domain=cfg.message_id_domain,
                now=row.created_at,
            )
            rendered = mime
            await self._store.write(lambda tx: tx.set_message(row.id, rendered))
        if now >= row.expires_at:
            await self._store.write(lambda tx: tx.mark_expired(row.id))
            log.info("mail.expired", key=row.idempotency_key, kind=row.kind)
            return
        sender = self._config().from_address
        try:
            _errors, reply = await smtp.sendmail(_bare(sender), [row.recipient], mime)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0] if exc.recipients else None
            await self._failed(row, first.code if first else 550, str(exc))
            return
        except aiosmtplib.SMTPResponseException as exc:
            await self._failed(row, exc.code, exc.message)
            return
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self._failed(row, None, str(exc))
            return

        def done(tx: WriteTx) -> None:
            tx.mark_sent(row.id, reply)

        await self._store.write(done)
        self.sent += 1
        log.info("mail.sent", key=row.idempotency_key, kind=row.kind, to=row.recipient, reply=reply)

    async def _failed(self, row: OutboxRow, code: int | None, error: str) -> None:
        decision = after_failure(self._policy, now=self._clock.now(), created_at=row.created_at, code=code)
        self.failed += 1

        def record(tx: WriteTx) -> None:
            tx.mark_failed(row.id, f"{code or ''} {error}".strip(), decision.next_attempt_at, dead=decision.dead)

        await self._store.write(record)
        log.warning(
            "mail.failed",
            key=row.idempotency_key,
            kind=row.kind,
            code=code,
            error=error,
            attempt=row.attempts + 1,
            dead=decision.dead,
        )


def _bare(mailbox: str) -> str:
    from email.utils import parseaddr

    return parseaddr(mailbox)[1]
