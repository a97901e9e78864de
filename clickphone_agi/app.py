"""The composition root: the one place that builds every adapter and wires them together.

Nothing is created at import time. :class:`Daemon` owns the lifecycle: writer lock → storage
(migrated) → control socket → AMI/ingest/sender tasks → READY=1; SIGTERM/SIGINT drain within
``daemon.drain_timeout``; SIGHUP reloads the configuration, keeping the old one if the new one
is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from clickphone_agi import __version__, faults
from clickphone_agi.adapters.agi import FastAgiServer
from clickphone_agi.adapters.ami.client import AmiClient, AmiNotConnectedError
from clickphone_agi.adapters.cdr_csv import MasterCsvTailer
from clickphone_agi.adapters.control import CommandError, CommandTable, ControlServer
from clickphone_agi.adapters.http_api import ApiServices, HttpApi
from clickphone_agi.adapters.logging import configure_logging
from clickphone_agi.adapters.mail import build_test_mail, parse_address
from clickphone_agi.adapters.smtp import OutboxSender, bounce_command, purge_command, retry_command
from clickphone_agi.adapters.storage.codec import account_from_json
from clickphone_agi.adapters.storage.sqlite import SqliteStore, WriterLock
from clickphone_agi.adapters.systemd import SdNotifier, ip_fence_probe
from clickphone_agi.adapters.tariff_file import load_tariffs
from clickphone_agi.clock import Clock, SystemClock
from clickphone_agi.config.loader import ConfigError, LoadedConfig, load_config
from clickphone_agi.config.schema import BillingConfig, Config, SmtpConfig
from clickphone_agi.domain.ami_translate import TranslateContext
from clickphone_agi.domain.charging import BillingRule, Numbering
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.domain.events import DomainEvent
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow
from clickphone_agi.domain.retention import RetentionPolicy
from clickphone_agi.domain.tariffs import TariffTable
from clickphone_agi.domain.thresholds import day_bounds, local_day
from clickphone_agi.notices.render import Renderer
from clickphone_agi.ports import Store
from clickphone_agi.services import privacy
from clickphone_agi.services.accounts import ImportRefused, UnknownAccount, adjust_unit, import_unit
from clickphone_agi.services.agi_routes import build_router
from clickphone_agi.services.broadcasts import BroadcastService, BroadcastSettings
from clickphone_agi.services.consent import ConsentService, ConsentSettings
from clickphone_agi.services.health import health
from clickphone_agi.services.ingest import EventProcessor, EventQueue, IngestWorker
from clickphone_agi.services.intake import ApiError, Intake, IntakeSettings, Reply, body_hash, check_key
from clickphone_agi.services.money import MoneyService, MoneySettings
from clickphone_agi.services.notices import NoticeSettings, Notifier
from clickphone_agi.services.policies import PolicyService, PolicySettings, policy_json
from clickphone_agi.services.reconcile import CdrReconciler
from clickphone_agi.services.retention import RetentionJob, RetentionSettings

log = structlog.get_logger(__name__)

# Sections a running daemon can adopt on SIGHUP; the rest are bound to sockets, files or tasks
# created at start and need a restart.
LIVE_SECTIONS = frozenset({"logging", "smtp", "notifications", "billing", "privacy"})
# Secrets the components receive once at start, by the key that names their file.
SECRETS_AT_START = (
    ("ami.secret_file", "ami_secret"),
    ("api.token_file", "api_token"),
    ("api.unsubscribe_secret_file", "unsubscribe_secret"),
)
# keys of live sections that the mail renderer takes once, at start: a change waits for a restart
RENDERER_AT_START: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("notifications.templates_dir", lambda c: c.notifications.templates_dir),
    ("billing.timezone", lambda c: c.billing.timezone),
)
VOICEMAIL_REMOVE_TIMEOUT = 10.0  # seconds for Asterisk to answer a VoicemailRemove


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


def tariff_table(billing: BillingConfig, path: Path | None = None) -> TariffTable:
    """The tariff file (``billing.tariffs_file`` unless ``path``) read as the daemon reads it: times
    in the billing zone, prefixes in the configured numbering plan (blocking)."""
    file = path or billing.tariffs_file
    assert file is not None
    return load_tariffs(
        file,
        timezone=ZoneInfo(billing.timezone),
        country_code=billing.country_code,
        national_prefix=billing.national_prefix,
        international_prefix=billing.international_prefix,
    )


def money_settings(config: Config) -> MoneySettings:
    """Read the tariff file and the billing section (blocking: run it in a thread)."""
    billing = config.billing
    zone = ZoneInfo(billing.timezone)
    rule = billing.billing_cdr
    return MoneySettings(
        tariffs=tariff_table(billing),
        zone=zone,
        numbering=Numbering(billing.country_code, billing.national_prefix, billing.international_prefix),
        rule=BillingRule(rule.last_application, rule.destination_contexts, rule.destination_channel_pattern),
        limit_percents=tuple(sorted(set(billing.daily_limit_warn_at))),
        insufficient_funds_period=timedelta(seconds=billing.insufficient_funds_every),
        ip_alert_period=timedelta(seconds=billing.ip_alert_every),
        emergency_numbers=billing.emergency_numbers,
        reservation_margin=timedelta(seconds=billing.reservation_margin),
    )


@dataclass
class Components:
    """Everything the running daemon built, for status, drain and reload."""

    store: SqliteStore
    queue: EventQueue
    processor: EventProcessor
    worker: IngestWorker
    sender: OutboxSender
    reconciler: CdrReconciler | None
    ami: AmiClient | None
    money: MoneyService | None
    agi: FastAgiServer | None
    notifier: Notifier
    retention: RetentionJob | None = None


class NotifyingProcessor(EventProcessor):
    """The event processor, also showing every domain event to the notifier (which only
    records what it needs in memory and never blocks)."""

    notifier: Notifier | None = None

    def observe(self, event: DomainEvent) -> None:
        if self.notifier is not None:
            self.notifier.observe(event)


def retention_settings(config: Config) -> RetentionSettings:
    p = config.privacy
    return RetentionSettings(
        policy=RetentionPolicy(
            outbox_body_days=p.outbox_body_retention_days,
            processed_event_days=p.processed_event_retention_days,
            cdr_days=p.cdr_retention_days,
            api_request_days=p.api_request_retention_days,
        ),
        zone=ZoneInfo(config.billing.timezone),
        hour=p.retention_hour,
        batch=p.retention_batch,
    )


def numbering(config: Config) -> Numbering:
    b = config.billing
    return Numbering(b.country_code, b.national_prefix, b.international_prefix)


def notice_settings(config: Config) -> NoticeSettings:
    n, a = config.notifications, config.asterisk
    return NoticeSettings(
        system_name=a.system_name,
        sender=config.smtp.from_address,
        message_id_domain=config.smtp.message_id_domain,
        voicemail_root=a.voicemail_spool,
        fax_root=a.fax_spool,
        audio_format=n.voicemail_format,
        max_attachment_bytes=n.max_attachment_bytes,
        inbound_contexts=n.inbound_contexts,
        missed_call_grace=timedelta(seconds=n.missed_call_grace),
        scan_interval=n.scan_interval,
        maxmsg_warn_at=n.voicemail_maxmsg_warn_at,
    )


@dataclass
class Daemon:
    """``clickphone-agi run``: every component under one root."""

    loaded: LoadedConfig
    config_path: Path | None = None
    overrides: tuple[str, ...] = ()
    clock: Clock = field(default_factory=SystemClock)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    install_signal_handlers: bool = True
    #: Move everything built at startup out of the garbage collector's reach (``gc.freeze``), so
    #: that a full collection no longer walks tariffs, accounts and modules: at a thousand FastAGI
    #: sessions a second its pauses were the echo route's p99 (8-25 ms against 3 ms without).
    #: The CLI's ``run`` sets it; in-process test daemons leave the test runner's heap alone.
    freeze_heap: bool = False

    def __post_init__(self) -> None:
        self.notifier = SdNotifier.from_env(self.environ)
        self.stop_requested = asyncio.Event()
        self.ready = asyncio.Event()
        self.reloads = 0
        self.reload_failures = 0
        #: sections changed in the file that the running daemon has not adopted (until a restart)
        self.restart_required: list[str] = []
        self.started = self.loaded  # what the components built at start were given
        self._started = time.monotonic()
        self._parts: Components | None = None
        self.voicemail_removed = 0
        self.voicemail_remove_failures = 0
        self._api: IntakeServices | None = None

    @property
    def config(self) -> Config:
        return self.loaded.config

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def run(self) -> int:
        cfg = self.config
        spec = self.environ.get(faults.ENV_VAR)
        faults.arm(spec)  # test-only (tests/chaos): inert unless the variable is set
        if spec:
            log.warning(
                "faults.armed", crash_at=spec, note="test-only fault injection: this process will SIGKILL itself"
            )
        lock = WriterLock(cfg.database.path)
        lock.acquire()
        try:
            return await self._run_locked()
        finally:
            lock.release()

    async def _build(self, store: SqliteStore) -> Components:
        cfg = self.config
        zone = ZoneInfo(cfg.asterisk.timezone)
        money = None
        if cfg.billing.tariffs_file is not None:
            money = MoneyService(store, self.clock, await asyncio.to_thread(money_settings, cfg))
        went_live = await store.went_live_at()
        renderer = Renderer(cfg.notifications.templates_dir, timezone=cfg.billing.timezone)
        processor = NotifyingProcessor(store, went_live, money)
        notifier = Notifier(store, self.clock, renderer, notice_settings(cfg), went_live)
        notifier.remove_delivered = self._remove_delivered_voicemail
        notifier.remove_enabled = lambda: self.config.notifications.voicemail_remove_after_send  # SIGHUP-live
        processor.notifier = notifier
        reconciler = None
        if cfg.asterisk.master_csv is not None:
            tailer = MasterCsvTailer(
                cfg.asterisk.master_csv,
                system_name=cfg.asterisk.system_name,
                timezone=zone,
                gmt=cfg.asterisk.master_csv_gmt,
            )
            reconciler = CdrReconciler(
                store, tailer, processor, self.clock, cfg.asterisk.reconcile_interval, undecided=notifier.undecided
            )

        def gap(reason: str) -> None:
            if reconciler is not None:
                reconciler.request(reason)

        def storage_recovered() -> None:
            gap("the database takes writes again")  # events the full queue dropped meanwhile
            notifier.wake()  # voicemail and missed calls held back by the full disk: now, not at its next pass

        queue = EventQueue(cfg.ami.queue_size, on_overflow=lambda: gap("ingest queue overflow"))
        worker = IngestWorker(
            queue,
            processor,
            TranslateContext(cfg.asterisk.system_name, zone),
            on_connected=lambda: gap("AMI connected"),
            on_storage_recovered=storage_recovered,
        )
        sender = OutboxSender(
            store,
            self.clock,
            config=lambda: self.config.smtp,
            password=lambda: self.loaded.secrets.smtp_password,  # SIGHUP re-reads the password file
            renderer=renderer,
            on_sent=self._remove_voicemail,
        )
        store.on_outbox = sender.wake
        ami = None
        if cfg.ami.enabled:
            ami = AmiClient(
                cfg.ami.host,
                cfg.ami.port,
                cfg.ami.username,
                self.loaded.secrets.ami_secret or "",
                cfg.ami.events,
                self.clock,
                queue.offer,
                ping_interval=cfg.ami.ping_interval,
                ping_timeout=cfg.ami.ping_timeout,
                connect_timeout=cfg.ami.connect_timeout,
                backoff_initial=cfg.ami.backoff_initial,
                backoff_max=cfg.ami.backoff_max,
                auth_backoff=cfg.ami.auth_backoff,
            )
        agi = None
        if cfg.agi.enabled:
            agi = FastAgiServer(
                build_router(money),
                host=cfg.agi.host,
                port=cfg.agi.port,
                max_connections=cfg.agi.max_connections,
                allowed_peers=cfg.agi.allowed_peers,
            )
        return Components(store, queue, processor, worker, sender, reconciler, ami, money, agi, notifier)

    async def _remove_voicemail(self, row: OutboxRow) -> None:
        """The sender's ``on_sent`` hook: with ``notifications.voicemail_remove_after_send``, a
        delivered voicemail is removed from the spool by Asterisk (AMI ``VoicemailRemove``). A
        failure leaves the message where it is (the mail was delivered anyway); the spool scan
        finds it again and retries (:meth:`_remove_delivered_voicemail`)."""
        if row.kind != "voicemail":
            return
        where = (row.payload or {}).get("vm_remove")
        if isinstance(where, dict):  # None: a row queued before this option existed, or not from the spool
            await self._remove_delivered_voicemail(row.idempotency_key, where)

    async def _remove_delivered_voicemail(self, key: str, where: dict[str, Any]) -> None:
        """``VoicemailRemove`` for a message whose mail got its 250; logged and counted either way."""
        ami = self._parts.ami if self._parts is not None else None
        if not self.config.notifications.voicemail_remove_after_send:
            return
        fields = {"Context": "context", "Mailbox": "mailbox", "Folder": "folder", "ID": "msg_id"}
        if ami is None or not all(isinstance(where.get(k), str) and where[k] for k in fields.values()):
            return
        args = {name: str(where[key_]) for name, key_ in fields.items()}
        box = f"{args['Mailbox']}@{args['Context']}"
        reason: str | None
        try:
            reply = await ami.send_action("VoicemailRemove", args, VOICEMAIL_REMOVE_TIMEOUT)
        except (AmiNotConnectedError, TimeoutError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            ok = (reply.response or "").lower() == "success"
            reason = None if ok else (reply.get("Message") or reply.response or "no reason given")
        if reason is None:
            self.voicemail_removed += 1
            log.info("voicemail.removed", key=key, box=box, folder=args["Folder"], msg_id=args["ID"])
        else:
            self.voicemail_remove_failures += 1
            # Asterisk checks an action against the user's write classes: VoicemailRemove is 'user'
            hint = (
                "the AMI user needs 'write = user' in manager.conf" if "permission denied" in reason.lower() else None
            )
            log.warning(
                "voicemail.remove_failed", key=key, box=box, folder=args["Folder"],
                msg_id=args["ID"], reason=reason, failures=self.voicemail_remove_failures, note=hint,
            )  # fmt: skip

    @staticmethod
    def _start_tasks(
        parts: Components, intake_stop: asyncio.Event, background_stop: asyncio.Event
    ) -> dict[str, asyncio.Task[Any]]:
        """The daemon's long-running tasks: intake (AMI) stops first on SIGTERM, the rest after the drain."""
        tasks: dict[str, asyncio.Task[Any]] = {
            "ingest": asyncio.create_task(parts.worker.run(), name="ingest"),
            "sender": asyncio.create_task(parts.sender.run(background_stop), name="sender"),
        }
        if parts.reconciler is not None:
            tasks["reconcile"] = asyncio.create_task(parts.reconciler.run(background_stop), name="reconcile")
        tasks["notices"] = asyncio.create_task(parts.notifier.run(background_stop), name="notices")
        if parts.retention is not None:
            tasks["retention"] = asyncio.create_task(parts.retention.run(background_stop), name="retention")
        if parts.ami is not None:
            tasks["ami"] = asyncio.create_task(parts.ami.run(intake_stop), name="ami")
        return tasks

    async def _start_servers(self, store: SqliteStore) -> tuple[Components, ControlServer, HttpApi | None]:
        """Everything built on the started store, up to the listening servers."""
        parts = self._parts = await self._build(store)
        self._api = self._build_api_services(store, parts)
        parts.retention = await self._build_retention(parts)
        control = ControlServer(self.config.daemon.control_socket, self._commands())
        await control.start()
        try:
            api = await self._start_api(store)
            if parts.agi is not None:
                await parts.agi.start()
        except BaseException:
            await control.close()  # no socket left behind that answers nothing
            raise
        return parts, control, api

    async def _run_locked(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if self.install_signal_handlers:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        store = await SqliteStore.open(cfg.database.path, self.clock, busy_timeout=cfg.database.busy_timeout)
        store.start()
        try:
            parts, control, api = await self._start_servers(store)
        except BaseException:
            # a tariff file, a socket or a port refused: the store's writer thread is running and
            # the interpreter would wait for it forever instead of exiting with the error
            await store.close()
            raise

        intake_stop = asyncio.Event()
        background_stop = asyncio.Event()
        tasks = self._start_tasks(parts, intake_stop, background_stop)
        helpers = [
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._status_loop(), name="status"),
        ]
        if self.freeze_heap:
            gc.collect()
            gc.freeze()
        log.info(
            "daemon.ready",
            version=__version__,
            database=str(cfg.database.path),
            control_socket=str(cfg.daemon.control_socket),
            ami=f"{cfg.ami.host}:{cfg.ami.port}" if cfg.ami.enabled else None,
            master_csv=str(cfg.asterisk.master_csv) if cfg.asterisk.master_csv else None,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        self._check_ip_fence()
        self.notifier.ready(self._status_text())
        self.ready.set()

        stop_wait = asyncio.create_task(self.stop_requested.wait())
        crashed = await self._wait_stop_or_crash(stop_wait, tasks)

        # ---- drain: stop intake, finish what was received, then the background tasks -------
        self.notifier.stopping()
        started = time.monotonic()
        bound = cfg.daemon.drain_timeout

        def left() -> float:
            return max(0.1, bound - (time.monotonic() - started))

        log.info("daemon.stopping", backlog=parts.queue.depth, drain_timeout=bound)
        intake_stop.set()
        await self._stop_accepting(api, parts)
        if "ami" in tasks:
            await _bounded(tasks["ami"], bound / 4)
        parts.queue.close()
        drained = await _bounded(tasks["ingest"], left())
        background_stop.set()
        parts.sender.wake()
        for name in ("notices", "sender", "reconcile", "retention"):
            if name in tasks:
                await _bounded(tasks[name], left())
        parts.notifier.fax_converter.close()
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await control.close()
        await store.close()
        log.info(
            "daemon.stopped",
            drained=drained,
            left_in_queue=parts.queue.depth,
            cdrs_recorded=parts.processor.applied["cdr"],
            mails_sent=parts.sender.sent,
            seconds=round(time.monotonic() - started, 3),
        )
        return 1 if crashed else 0

    async def _build_retention(self, parts: Components) -> RetentionJob:
        """The retention job, with the key floor of earlier runs applied before anything can replay."""
        job = RetentionJob(
            parts.store,
            self.clock,
            lambda: retention_settings(self.config),  # privacy and billing follow a reload
            baselines=(parts.processor.raise_baseline, parts.notifier.raise_baseline),
        )
        await job.apply_saved_floor()
        return job

    async def _stop_accepting(self, api: HttpApi | None, parts: Components) -> None:
        """The drain's first step: the intake API and FastAGI take no new requests."""
        if api is not None:
            await api.close()  # in-flight requests finish their units first
        if parts.agi is not None:
            await parts.agi.close()  # stop accepting; in-flight authorisations finish

    async def _start_api(self, store: SqliteStore) -> HttpApi | None:
        """The HTTP intake API when ``api.enabled`` (started after the control socket)."""
        cfg = self.config
        if not cfg.api.enabled:
            return None

        services = self._intake_services()
        api = HttpApi(
            services.intake,
            self.loaded.secrets.api_token,
            host=cfg.api.host,
            port=cfg.api.port,
            max_body_bytes=cfg.api.max_body_bytes,
            status=lambda: self._cmd_status({}),
            services=ApiServices(store, services.consent, services.broadcasts, services.policies, self._figures),
            max_policy_bytes=cfg.api.max_policy_bytes,
            trusted_proxies=cfg.api.trusted_proxies,
        )
        await api.start()
        return api

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

    def _check_ip_fence(self) -> None:
        """As a systemd service, say if the unit's IP fence does not hold here (see ip_fence_probe):
        systemd drops IPAddressDeny= without a word where it cannot enforce it."""
        if not self.environ.get("INVOCATION_ID"):
            return
        probe = ip_fence_probe()
        if probe is not None and not probe[1]:
            log.warning(
                "systemd.ip_filter_not_enforced",
                address=probe[0],
                note="a datagram to this host's own address was not refused: the unit's IPAddressDeny="
                " is not enforced here (systemd needs unified cgroups and bpf(): not on a legacy or"
                " hybrid host, nor in a container that refuses bpf()), or a drop-in allows this"
                " address; FastAGI still refuses peers outside agi.allowed_peers",
            )

    def _status_text(self) -> str:
        parts = self._parts
        if parts is None:
            return "starting"
        ami = parts.ami.state if parts.ami else "disabled"
        pending = f"; restart required ({', '.join(self.restart_required)})" if self.restart_required else ""
        return (
            f"AMI {ami}; {parts.processor.applied['cdr']} CDRs recorded; queue {parts.queue.depth};"
            f" {parts.sender.sent} mails sent{pending}"
        )

    async def _status_loop(self) -> None:
        """STATUS= for systemctl status, and housekeeping: expired reservations stop counting."""
        while True:
            await self.clock.sleep(10)
            self.notifier.status(self._status_text())
            if self._parts is not None and self._parts.money is not None:
                try:
                    await self._parts.store.write(lambda tx: tx.purge_expired_reservations())
                except Exception:
                    log.exception("reservations.purge_failed")

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
        # the AMI login, the API token and the unsubscribe key are handed over at start (only the
        # SMTP password is re-read per connection): a rotated one is not in use before a restart
        restart += [
            key for key, attr in SECRETS_AT_START if getattr(self.started.secrets, attr) != getattr(new.secrets, attr)
        ]
        # the mail renderer's template directory and zone (mail times) are set at start too
        restart += [key for key, value in RENDERER_AT_START if value(self.started.config) != value(new.config)]
        # adopt only what can change live; the rest keeps its running value until a restart
        merged = old.model_copy(update={name: getattr(new.config, name) for name in live})
        # the tariff file first (it may change without the config): a broken one refuses the whole
        # reload, so nothing of the new configuration is half-adopted beside the previous tariffs
        tariffs_loaded, settings = await self._reload_tariffs(merged)
        if not tariffs_loaded:  # counted and shown like a rejected config: not a silent "ready"
            self.reload_failures += 1
            log.error("config.reload_failed", problems=["tariff file refused"], kept="previous configuration")
            self.notifier.ready(f"reload failed, running on previous tariffs; {self._status_text()}")
            return False
        self.loaded = LoadedConfig(merged, new.secrets, new.main_file, new.files, new.notes)
        if "logging" in live:
            configure_from(merged)
        if self._parts is not None:  # notifications and smtp.from_address/message_id_domain
            self._parts.notifier.apply_settings(notice_settings(merged))
            if settings is not None and self._parts.money is not None:
                self._parts.money.settings = settings
                log.info("tariffs.reloaded", entries=len(settings.tariffs.entries))
        self.restart_required = restart  # against the running values: a reverted change clears it
        log.info("config.reloaded", applied=live, restart_required=restart)
        self.reloads += 1
        self.notifier.ready(self._status_text())
        return True

    async def _reload_tariffs(self, config: Config) -> tuple[bool, MoneySettings | None]:
        """SIGHUP re-reads the tariff file; a broken one is (False, None) and changes nothing."""
        parts = self._parts
        if parts is None or parts.money is None or config.billing.tariffs_file is None:
            return True, None
        try:
            return True, await asyncio.to_thread(money_settings, config)
        except Exception as exc:
            log.error("tariffs.reload_failed", error=str(exc), kept="previous tariffs")
            return False, None

    def _commands(self) -> CommandTable:
        table = CommandTable()
        table.register("accounts.import", self._cmd_accounts_import)
        table.register("accounts.adjust", self._cmd_accounts_adjust)
        table.register("status", self._cmd_status)
        table.register("mail-test", self._cmd_mail_test)
        table.register("db.migrate", self._cmd_migrate)
        table.register("outbox.retry", self._cmd_outbox_retry)
        table.register("outbox.purge", self._cmd_outbox_purge)
        table.register("bounce", self._cmd_bounce)
        self._register_intake_commands(table)
        table.register("privacy.export", self._cmd_privacy_export)
        table.register("privacy.erase", self._cmd_privacy_erase)
        return table

    def _running(self) -> Components:
        if self._parts is None:
            raise CommandError("the daemon is still starting")
        return self._parts

    async def _cmd_status(self, _args: dict[str, Any]) -> dict[str, Any]:
        parts = self._running()
        ami, worker, proc, rec = parts.ami, parts.worker, parts.processor, parts.reconciler
        last = worker.last_event_monotonic
        ami_status = None if ami is None else {**ami.snapshot(), "connected": ami.state == "connected"}
        mail = await parts.sender.metrics()
        return {
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started, 1),
            "database": str(parts.store.path),
            "went_live_at": (await parts.store.went_live_at()).isoformat(),
            "ami": ami_status,
            "last_event_age_seconds": None if last is None else round(time.monotonic() - last, 3),
            "events": dict(worker.events_by_type),
            "translated": dict(worker.translated),
            "translate_errors": worker.translate_errors,
            "cdr_clock_skew_seconds": worker.cdr_clock_skew,
            "correlation": worker.correlation(),
            "effects": {"applied": dict(proc.applied), "duplicates": dict(proc.duplicates)},
            "cdrs": {"recorded": proc.applied["cdr"], "duplicates": proc.duplicates["cdr"]},
            "queue": {
                "depth": parts.queue.depth,
                "high_water": parts.queue.high_water,
                "max": parts.queue.maxsize,
                "dropped": parts.queue.dropped,
            },
            "ingest_backlog": parts.queue.depth,
            "storage_outage": worker.storage_outage(),
            "held_for_storage": {
                "held": worker.held,
                "outages": worker.storage_outages,
                "retries": worker.storage_retries,
                "lost_at_stop": worker.held_lost,
            },
            "reconcile": None
            if rec is None
            else {
                "passes": rec.passes,
                "rows_seen": rec.rows_seen,
                "recovered": rec.recovered,
                "row_errors": rec.row_errors,
                "gaps_suspected": rec.gaps_suspected,
                "last_error": rec.last_error,
            },
            "money": None
            if parts.money is None
            else {
                "allowed": parts.money.allowed,
                "denied": parts.money.denied,
                "charged": parts.money.charged,
                "unrated": parts.money.unrated,
            },
            "agi": None if parts.agi is None else parts.agi.stats(),
            "notices": {
                "queued": dict(parts.notifier.queued),
                "errors": parts.notifier.errors,
                "voicemail_boxes_nearly_full": dict(parts.notifier.boxes_nearly_full),
                "voicemail_removed": self.voicemail_removed,
                "voicemail_remove_failures": self.voicemail_remove_failures,
            },
            "outbox": await parts.store.outbox_counts(),
            "mail": mail,
            "reloads": {"ok": self.reloads, "failed": self.reload_failures},
            "restart_required": list(self.restart_required),
            "storage": parts.store.stats(),
            **await self._status_extra(parts, ami_status, mail),
        }

    async def _cmd_accounts_import(self, args: dict[str, Any]) -> Any:
        parts = self._running()
        try:
            items = [(account_from_json(i["account"]), int(i["opening"])) for i in args["items"]]
            wheres = [str(i.get("where", "")) for i in args["items"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CommandError(f"items: malformed account list: {exc}") from None
        try:
            return {**await parts.store.write(import_unit(items, wheres)), "by": "daemon"}
        except ImportRefused as exc:
            return {"refused": [str(exc)], "by": "daemon"}

    async def _cmd_accounts_adjust(self, args: dict[str, Any]) -> Any:
        parts = self._running()
        try:
            amount = args["amount"]
            if type(amount) is not int:  # bani: 12.5 must not book 12, nor True book 1
                raise ValueError(f"amount: expected whole bani, got {amount!r}")
            unit = adjust_unit(str(args["code"]), amount, str(args["reason"]), str(args["ref"]))
        except (KeyError, ValueError) as exc:
            raise CommandError(f"malformed adjustment: {exc}") from None
        try:
            return {**await parts.store.write(unit), "by": "daemon"}
        except UnknownAccount as exc:
            raise CommandError(str(exc)) from None

    async def _cmd_mail_test(self, args: dict[str, Any]) -> dict[str, Any]:
        parts = self._running()
        to = args.get("to")
        if not isinstance(to, str):
            raise CommandError("to: expected an e-mail address")
        key = await enqueue_test_mail(parts.store, self.clock, self.config.smtp, to)
        parts.sender.wake()
        return {"queued": key, "by": "daemon"}

    async def _cmd_migrate(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"message": "the running daemon migrated the database when it started", "by": "daemon"}

    async def _cmd_outbox_retry(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**await retry_command(self._running().store, args), "by": "daemon"}

    async def _cmd_outbox_purge(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**await purge_command(self._running().store, self.clock, args), "by": "daemon"}

    async def _cmd_bounce(self, args: dict[str, Any]) -> dict[str, Any]:
        return {**await bounce_command(self._running().store, self.config.smtp, args), "by": "daemon"}

    # ---- the intake services: HTTP API and CLI verbs share them ---------------------------------

    def _build_api_services(self, store: SqliteStore, parts: Components) -> IntakeServices:
        """Intake, consent, broadcasts and policies: built whether or not the HTTP API listens,
        since the CLI verbs reach the same services through the control socket."""
        cfg = self.config
        secret = self.loaded.secrets.unsubscribe_secret
        secret_bytes = secret.encode("utf-8") if secret else None

        def intake_settings() -> IntakeSettings:
            c = self.config  # smtp and billing follow a reload
            return IntakeSettings(
                c.smtp.from_address, c.smtp.message_id_domain, c.billing.timezone, c.notifications.default_language
            )

        def consent_settings() -> ConsentSettings:
            return ConsentSettings(self.config.billing.timezone, secret_bytes)

        def broadcast_settings() -> BroadcastSettings:
            c = self.config
            return BroadcastSettings(c.billing.timezone, c.api.public_base_url, secret_bytes, c.api.broadcast_chunk)

        def policy_settings() -> PolicySettings:
            return PolicySettings(self.config.api.public_base_url, self.config.api.broadcast_chunk)

        renderer = Renderer(cfg.notifications.templates_dir, timezone=cfg.billing.timezone)
        return IntakeServices(
            intake=Intake(store, self.clock, renderer, intake_settings),
            consent=ConsentService(store, consent_settings),
            broadcasts=BroadcastService(store, self.clock, renderer, broadcast_settings),
            policies=PolicyService(store, self.clock, policy_settings),
        )

    def _figures(self) -> dict[str, Any]:
        """Counters for /metrics that the status command does not carry."""
        out: dict[str, Any] = {}
        parts, api = self._parts, self._api
        if parts is not None and parts.agi is not None:
            out["agi_latency"] = parts.agi.latency.snapshot()
        if api is not None:
            out["broadcasts"] = dict(api.broadcasts.broadcasts)
            out["broadcast_mails"] = {**api.broadcasts.mails, "policy_changed": api.policies.mails}
            out["consent_changes"] = dict(api.consent.changes)
            out["unsubscribes"] = api.consent.unsubscribes
            out["unsubscribes_refused"] = api.consent.unsubscribe_refused
            out["policies_published"] = api.policies.published
        return out

    def _register_intake_commands(self, table: CommandTable) -> None:
        table.register("intake.event", self._cmd_intake_event)
        table.register("intake.consent", self._cmd_intake_consent)
        table.register("intake.broadcast", self._cmd_intake_broadcast)
        table.register("intake.policy.publish", self._cmd_policy_publish)
        table.register("intake.policy.list", self._cmd_policy_list)
        table.register("intake.policy.show", self._cmd_policy_show)

    def _intake_services(self) -> IntakeServices:
        self._running()
        if self._api is None:
            raise CommandError("the daemon is still starting")
        return self._api

    async def _cmd_intake_event(self, args: dict[str, Any]) -> dict[str, Any]:
        code, key, body = _request_args(args)
        digest = body_hash("POST", f"/v1/accounts/{code}/events", body)
        return await _as_reply(self._intake_services().intake.post_event(key, digest, code, body, ""))

    async def _cmd_intake_consent(self, args: dict[str, Any]) -> dict[str, Any]:
        code, key, body = _request_args(args)
        digest = body_hash("PUT", f"/v1/accounts/{code}/consent", body)
        consent = self._intake_services().consent
        return await _as_reply(consent.put_consent(key, digest, code, body, "", source="cli"))

    async def _cmd_intake_broadcast(self, args: dict[str, Any]) -> dict[str, Any]:
        _, key, body = _request_args(args, code=False)
        digest = body_hash("POST", "/v1/broadcasts", body)
        return await _as_reply(self._intake_services().broadcasts.post(key, digest, body))

    async def _cmd_policy_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        return await _as_reply(self._intake_services().policies.publish(args.get("body")))

    async def _cmd_policy_list(self, _args: dict[str, Any]) -> dict[str, Any]:
        return await _as_reply(self._intake_services().policies.list())

    async def _cmd_policy_show(self, args: dict[str, Any]) -> dict[str, Any]:
        policies = self._intake_services().policies

        async def show() -> Reply:
            return Reply(200, policy_json(await policies.get(str(args.get("version"))), text=True))

        return await _as_reply(show())

    async def _status_extra(
        self, parts: Components, ami: dict[str, Any] | None, mail: dict[str, Any]
    ) -> dict[str, Any]:
        """Health (the same computation as /healthz), today's charges, the retention job."""
        zone = ZoneInfo(self.config.billing.timezone)
        day = local_day(self.clock.now(), zone)
        calls, amount = await parts.store.charges_between(*day_bounds(day, zone))
        return {
            "health": await health(parts.store, ami, mail, parts.worker.storage_outage()),
            "charges_today": {"day": day.isoformat(), "calls": calls, "bani": amount},
            "retention": None if parts.retention is None else parts.retention.snapshot(),
        }

    async def _cmd_privacy_export(self, args: dict[str, Any]) -> dict[str, Any]:
        code = _code_arg(args)
        try:
            return await privacy.export_account(self._running().store, self.clock, code, numbering(self.config))
        except privacy.UnknownAccount as exc:
            raise CommandError(str(exc)) from None

    async def _cmd_privacy_erase(self, args: dict[str, Any]) -> dict[str, Any]:
        code = _code_arg(args)
        try:
            return {**await privacy.erase_account(self._running().store, code, numbering(self.config)), "by": "daemon"}
        except privacy.UnknownAccount as exc:
            raise CommandError(str(exc)) from None


@dataclass(frozen=True)
class IntakeServices:
    intake: Intake
    consent: ConsentService
    broadcasts: BroadcastService
    policies: PolicyService


def _request_args(args: dict[str, Any], *, code: bool = True) -> tuple[str, str, Any]:
    """(account code, Idempotency-Key, body) of a CLI request, the key checked as the API checks it."""
    account = args.get("code") if code else ""
    if not isinstance(account, str):
        raise CommandError("code: expected an account code")
    try:
        key = check_key(args.get("key"))
    except ApiError as exc:
        raise CommandError(f"--key: {exc.message}") from None
    return account, key, args.get("body")


async def _as_reply(pending: Awaitable[Reply]) -> dict[str, Any]:
    """The service's answer as the HTTP API would give it: ``{"status": ..., "body": ...}``."""
    try:
        reply = await pending
    except ApiError as exc:
        return {"status": exc.status, "body": {"error": exc.message, "field": exc.field}}
    return {"status": reply.status, "body": reply.body}


def _code_arg(args: dict[str, Any]) -> str:
    code = args.get("code")
    if not isinstance(code, str) or not code:
        raise CommandError("code: expected an account code")
    return code


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
