"""The composition root: the one place that builds every adapter and wires them together.

Nothing is created at import time. :class:`Daemon` owns the lifecycle: writer lock → storage
(migrated) → control socket → AMI/ingest/sender tasks → READY=1; SIGTERM/SIGINT drain within
``daemon.drain_timeout``; SIGHUP reloads the configuration, keeping the old one if the new one
is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from clickphone_agi import __version__
from clickphone_agi.adapters.ami.client import AmiClient
from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.adapters.control import CommandError, CommandTable, ControlServer
from clickphone_agi.adapters.logging import configure_logging
from clickphone_agi.adapters.mail import build_test_mail, parse_address
from clickphone_agi.adapters.smtp import OutboxSender
from clickphone_agi.adapters.storage.sqlite import SqliteStore, WriterLock
from clickphone_agi.adapters.systemd import SdNotifier
from clickphone_agi.clock import Clock, SystemClock
from clickphone_agi.config.loader import ConfigError, LoadedConfig, load_config
from clickphone_agi.config.schema import Config, SmtpConfig
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.domain.keys import cdr_key
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.ports import Store, WriteTx

log = structlog.get_logger(__name__)

# Sections a running daemon can adopt on SIGHUP; the rest are bound to sockets, files or tasks
# created at start and need a restart.
LIVE_SECTIONS = frozenset({"logging", "smtp", "notifications", "billing", "privacy"})


def configure_from(config: Config) -> None:
    configure_logging(
        level=config.logging.level,
        fmt=config.logging.format,
        mask_personal_data=config.logging.mask_personal_data,
    )


async def enqueue_test_mail(store: Store, clock: Clock, smtp: SmtpConfig, to: str) -> str:
    """The ``mail-test`` unit of work: render first, then one transaction that enqueues it."""
    try:
        recipient = parse_address(to)
    except ValueError as exc:
        raise CommandError(f"to: {exc}") from None
    key = f"mailtest:{uuid.uuid4().hex}"
    now = clock.now()
    mime = build_test_mail(
        sender=smtp.from_address,
        to=str(recipient),
        message_id=message_id(key, smtp.message_id_domain),
        now=now,
    )
    message = OutboxMessage.build(
        key=key,
        kind="mail_test",
        recipient=recipient.addr_spec,
        account=None,
        mime=mime,
        now=now,
        lifetime=timedelta(hours=1),
    )
    await store.write(lambda tx: tx.enqueue(message))
    return key


class Ingest:
    """Takes AMI messages from the reader (which only enqueues) and records their effects.

    At this stage every CDR is recorded under its idempotency key, so a replayed or duplicated
    CDR is stored once; later issues hang rating and notices on the same path.
    """

    def __init__(self, store: Store, system_name: str) -> None:
        self._store = store
        self._system = system_name
        self._queue: asyncio.Queue[AmiMessage | None] = asyncio.Queue()
        self.events: Counter[str] = Counter()
        self.cdrs_recorded = 0
        self.cdrs_duplicate = 0
        self.errors = 0
        self.high_water = 0

    def offer(self, message: AmiMessage) -> None:
        """The reader's callback: never blocks, never drops."""
        self._queue.put_nowait(message)
        self.high_water = max(self.high_water, self._queue.qsize())

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """No more input: :meth:`run` returns once everything queued so far is recorded."""
        self._queue.put_nowait(None)

    async def run(self) -> None:
        while (message := await self._queue.get()) is not None:
            try:
                await self._handle(message)
            except Exception:
                self.errors += 1
                log.exception("ingest.failed", ami_event=message.event)

    async def _handle(self, message: AmiMessage) -> None:
        name = message.event
        if name is None:
            return
        self.events[name] += 1
        if name != "Cdr":
            return
        key = cdr_key(self._system, message.get("UniqueID") or "", message.get("DestinationChannel") or "")

        def record(tx: WriteTx) -> bool:
            return tx.claim_event(key, "cdr")

        if await self._store.write(record):
            self.cdrs_recorded += 1
            log.info(
                "cdr.recorded",
                key=key,
                account=message.get("AccountCode"),
                src=message.get("Source"),
                dst=message.get("Destination"),
                disposition=message.get("Disposition"),
                billsec=message.get("BillableSeconds"),
            )
        else:
            self.cdrs_duplicate += 1
            log.info("cdr.duplicate", key=key)


@dataclass
class Daemon:
    """``clickphone-agi run``: every component under one root."""

    loaded: LoadedConfig
    config_path: Path | None = None
    overrides: tuple[str, ...] = ()
    clock: Clock = field(default_factory=SystemClock)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    install_signal_handlers: bool = True

    def __post_init__(self) -> None:
        self.notifier = SdNotifier.from_env(self.environ)
        self.stop_requested = asyncio.Event()
        self.ready = asyncio.Event()
        self.reloads = 0
        self.reload_failures = 0
        self._started = time.monotonic()
        self._store: SqliteStore | None = None
        self._ingest: Ingest | None = None
        self._sender: OutboxSender | None = None
        self._ami: AmiClient | None = None

    @property
    def config(self) -> Config:
        return self.loaded.config

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def run(self) -> int:
        cfg = self.config
        lock = WriterLock(cfg.database.path)
        lock.acquire()
        try:
            return await self._run_locked()
        finally:
            lock.release()

    async def _run_locked(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self.install_signal_handlers:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        store = self._store = await SqliteStore.open(
            cfg.database.path, self.clock, busy_timeout=cfg.database.busy_timeout
        )
        store.start()
        ingest = self._ingest = Ingest(store, cfg.asterisk.system_name)
        sender = self._sender = OutboxSender(
            store, self.clock, config=lambda: self.config.smtp, password=self.loaded.secrets.smtp_password
        )
        control = ControlServer(cfg.daemon.control_socket, self._commands())
        await control.start()

        intake_stop = asyncio.Event()
        sender_stop = asyncio.Event()
        tasks: dict[str, asyncio.Task[Any]] = {
            "ingest": asyncio.create_task(ingest.run(), name="ingest"),
            "sender": asyncio.create_task(sender.run(sender_stop), name="sender"),
        }
        if cfg.ami.enabled:
            self._ami = AmiClient(
                cfg.ami.host,
                cfg.ami.port,
                cfg.ami.username,
                self.loaded.secrets.ami_secret or "",
                cfg.ami.events,
                self.clock,
                ingest.offer,
                ping_interval=cfg.ami.ping_interval,
                ping_timeout=cfg.ami.ping_timeout,
                connect_timeout=cfg.ami.connect_timeout,
                backoff_initial=cfg.ami.backoff_initial,
                backoff_max=cfg.ami.backoff_max,
                auth_backoff=cfg.ami.auth_backoff,
            )
            tasks["ami"] = asyncio.create_task(self._ami.run(intake_stop), name="ami")
        helpers = [
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._status_loop(), name="status"),
        ]

        log.info(
            "daemon.ready",
            version=__version__,
            database=str(cfg.database.path),
            control_socket=str(cfg.daemon.control_socket),
            ami=f"{cfg.ami.host}:{cfg.ami.port}" if cfg.ami.enabled else None,
        )
        self.notifier.ready(self._status_text())
        self.ready.set()

        stop_wait = asyncio.create_task(self.stop_requested.wait())
        crashed = await self._wait_stop_or_crash(stop_wait, tasks)

        # ---- drain ------------------------------------------------------------------------
        self.notifier.stopping()
        started = time.monotonic()
        bound = cfg.daemon.drain_timeout
        log.info("daemon.stopping", backlog=ingest.backlog, drain_timeout=bound)
        intake_stop.set()
        if "ami" in tasks:
            await _bounded(tasks["ami"], bound / 4)
        ingest.close()
        ingest_done = await _bounded(tasks["ingest"], max(0.1, bound - (time.monotonic() - started)))
        sender_stop.set()
        sender.wake()
        await _bounded(tasks["sender"], max(0.1, bound - (time.monotonic() - started)))
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await control.close()
        await store.close()
        log.info(
            "daemon.stopped",
            drained=ingest_done,
            left_in_queue=ingest.backlog,
            cdrs_recorded=ingest.cdrs_recorded,
            mails_sent=sender.sent,
            seconds=round(time.monotonic() - started, 3),
        )
        return 1 if crashed else 0

    async def _wait_stop_or_crash(self, stop_wait: asyncio.Task[Any], tasks: Mapping[str, asyncio.Task[Any]]) -> bool:
        """Wait for a stop request; a component task that dies is logged and stops the daemon."""
        pending: set[asyncio.Future[Any]] = {stop_wait, *tasks.values()}
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if stop_wait in done:
            return False
        stop_wait.cancel()
        for name, task in tasks.items():
            if task in done:
                exc = task.exception() if not task.cancelled() else None
                log.error("daemon.component_died", component=name, error=repr(exc))
        return True

    def _status_text(self) -> str:
        ami = self._ami.state if self._ami else "disabled"
        ingest = self._ingest
        cdrs = ingest.cdrs_recorded if ingest else 0
        return f"AMI {ami}; {cdrs} CDRs recorded; {self._sender.sent if self._sender else 0} mails sent"

    async def _status_loop(self) -> None:
        while True:
            await self.clock.sleep(10)
            self.notifier.status(self._status_text())

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await self.clock.sleep(interval)

    async def reload(self) -> bool:
        """SIGHUP: validate the new config first; on any error keep running on the old one."""
        self.notifier.reloading(time.monotonic_ns() // 1000)
        try:
            new = await asyncio.to_thread(load_config, self.config_path, overrides=self.overrides, environ=self.environ)
        except ConfigError as exc:
            self.reload_failures += 1
            log.error("config.reload_failed", problems=exc.problems, kept="previous configuration")
            self.notifier.ready(f"reload failed, running on previous configuration; {self._status_text()}")
            return False
        old = self.config
        changed = [name for name in type(old).model_fields if getattr(old, name) != getattr(new.config, name)]
        live = [name for name in changed if name in LIVE_SECTIONS]
        restart = [name for name in changed if name not in LIVE_SECTIONS]
        # adopt only what can change live; the rest keeps its running value until a restart
        merged = old.model_copy(update={name: getattr(new.config, name) for name in live})
        self.loaded = LoadedConfig(merged, new.secrets, new.main_file, new.files, new.notes)
        if "logging" in live:
            configure_from(merged)
        self.reloads += 1
        log.info("config.reloaded", applied=live, restart_required=restart)
        self.notifier.ready(self._status_text())
        return True

    def _commands(self) -> CommandTable:
        table = CommandTable()
        table.register("status", self._cmd_status)
        table.register("mail-test", self._cmd_mail_test)
        table.register("db.migrate", self._cmd_migrate)
        return table

    def _parts(self) -> tuple[SqliteStore, Ingest, OutboxSender]:
        if self._store is None or self._ingest is None or self._sender is None:
            raise CommandError("the daemon is still starting")
        return self._store, self._ingest, self._sender

    async def _cmd_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        store, ingest, _sender = self._parts()
        ami = self._ami
        return {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started, 1),
            "database": str(store.path),
            "went_live_at": (await store.went_live_at()).isoformat(),
            "ami": None
            if ami is None
            else {
                "state": ami.state,
                "connects": ami.connects,
                "auth_failures": ami.auth_failures,
                "pings_missed": ami.pings_missed,
                "messages": ami.messages_received,
                "asterisk_version": ami.asterisk_version,
                "last_error": ami.last_error,
            },
            "events": dict(ingest.events),
            "cdrs": {"recorded": ingest.cdrs_recorded, "duplicates": ingest.cdrs_duplicate},
            "ingest_backlog": ingest.backlog,
            "outbox": await store.outbox_counts(),
            "reloads": {"ok": self.reloads, "failed": self.reload_failures},
            "storage": {"commits": store.commits, "units": store.units},
        }

    async def _cmd_mail_test(self, args: dict[str, Any]) -> dict[str, Any]:
        store, _ingest, sender = self._parts()
        to = args.get("to")
        if not isinstance(to, str):
            raise CommandError("to: expected an e-mail address")
        key = await enqueue_test_mail(store, self.clock, self.config.smtp, to)
        sender.wake()
        return {"queued": key, "by": "daemon"}

    async def _cmd_migrate(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"message": "the running daemon migrated the database when it started", "by": "daemon"}


async def _bounded(task: Awaitable[Any], seconds: float) -> bool:
    """Wait for ``task`` up to ``seconds``; cancel it after that. True if it finished in time."""
    fut = asyncio.ensure_future(task)
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout=seconds)
    except TimeoutError:
        fut.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await fut
        return False
    except Exception:
        return True
    return True
