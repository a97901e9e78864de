"""The event-driven notices: voicemail, fax received/sent/failed, missed calls.

Each notice is rendered to MIME bytes *before* its transaction (reading a 3 MB voicemail or
converting a 20-page fax runs in a thread, never on the event loop), then committed as an outbox
row together with the claim of its idempotency key, so a notice is queued once and only once:
``vm:<system>:<box>:<msg_id>``, ``fax:<system>:<uniqueid>:<direction>``, ``missed:<system>:<linkedid>``.
The spool and the fax directory are also scanned at start-up and periodically, so what arrived
while the daemon or the AMI link was down is still mailed; nothing older than the go-live
baseline ever is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from clickphone_agi.adapters.fax import FaxConverter, FaxFileError, FaxSidecar, scan_fax_spool
from clickphone_agi.adapters.spool import SpoolError, SpoolMessageMoved, VoicemailMessage, VoicemailSpool
from clickphone_agi.clock import Clock, wait_any
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.domain.events import (
    AccountEvent,
    CallEnded,
    DialOutcome,
    DomainEvent,
    EventSource,
    FaxReceived,
    FaxResult,
    FaxSent,
    VoicemailPasswordChanged,
    VoicemailRecorded,
    VoicemailWaiting,
)
from clickphone_agi.domain.missed import Decision, MissedCall, MissedCallTracker
from clickphone_agi.domain.money import format_ron  # noqa: F401 - re-exported for templates' callers
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.faults import crash_point
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.notices.render import Attachment, Renderer, build_message
from clickphone_agi.ports import STORAGE_RETRY_MAX, StorageRetry, StorageUnavailable, Store, WriteTx

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NoticeSettings:
    system_name: str
    sender: str
    message_id_domain: str
    voicemail_root: Path
    fax_root: Path
    audio_format: str = "wav"
    max_attachment_bytes: int = 10 * 1024 * 1024
    inbound_contexts: tuple[str, ...] = ()
    missed_call_grace: timedelta = timedelta(seconds=30)
    scan_interval: float = 60.0
    maxmsg_warn_at: int = 90  # voicemail.conf maxmsg defaults to 100


class Notifier:
    """Decides the event-driven notices and commits each with its key (see module doc)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        renderer: Renderer,
        settings: NoticeSettings,
        went_live_at: datetime,
        *,
        fax_converter: FaxConverter | None = None,
    ) -> None:
        self._store = store
        # a fax is converted in a process of its own (adapters.fax); the owner closes it
        self.fax_converter = fax_converter or FaxConverter()
        self._clock = clock
        self._renderer = renderer
        self.settings = settings
        self._went_live_at = went_live_at
        self._spool = VoicemailSpool(
            settings.voicemail_root, audio_format=settings.audio_format,
            max_attachment_bytes=settings.max_attachment_bytes,
        )  # fmt: skip
        self._tracker = MissedCallTracker(settings.missed_call_grace, owner_of=self._owner_of)
        # decided, the key not claimed yet (by Linkedid): still "undecided" for the reconciler
        self._missed_due: dict[str, Decision] = {}
        self._fax_files: OrderedDict[str, FaxReceived | FaxSent] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._boxes_due: set[tuple[str, str]] = set()
        # set by the composition root with notifications.voicemail_remove_after_send: called for a
        # message still in the spool whose mail was delivered (a removal that failed or never ran)
        self.remove_delivered: Callable[[str, dict[str, str]], Awaitable[None]] | None = None
        self.remove_enabled: Callable[[], bool] = lambda: False
        self._changes = itertools.count(1)  # tells apart security events that arrive in the same microsecond
        self.queued: dict[str, int] = {}
        self.boxes_nearly_full: dict[str, int] = {}
        self.errors = 0

    def wake(self) -> None:
        """Make the next pass now (the database takes writes again after a full disk)."""
        self._wake.set()

    # ---- event intake (called by the ingest worker; never blocks) ------------------------------

    def observe(self, event: DomainEvent) -> None:
        now = self._clock.now()
        if isinstance(event, CallEnded) and event.origin is not EventSource.AMI and event.end < self._went_live_at:
            pass  # recovered history before the baseline (the ingest's rule): its key may be purged
        elif isinstance(event, CallEnded | DialOutcome | VoicemailWaiting | VoicemailRecorded):
            self._tracker.observe(event, now)
        if isinstance(event, VoicemailWaiting | VoicemailRecorded):
            self._boxes_due.add((event.context, event.mailbox))
            self._wake.set()
        elif isinstance(event, FaxReceived | FaxSent):
            self._fax_files[event.unique_id] = event
            while len(self._fax_files) > 1000:
                self._fax_files.popitem(last=False)
        elif isinstance(event, FaxResult):
            self._spawn(self._fax_from_event(event))
        elif isinstance(event, VoicemailPasswordChanged | AccountEvent):
            self._spawn(self._security(event))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- security notices from the PBX side (IVR PIN, voicemail password) -------------------------

    async def _security(self, event: VoicemailPasswordChanged | AccountEvent) -> None:
        """A password or PIN changed on the PBX: tell the subscriber (never the secret itself)."""
        key = f"notice:{event.key}"  # the event's own key is claimed by the ingest processor
        if not event.identified:
            # nothing in the event (no RequestId, no Timestamp) tells two alike changes apart, and
            # AMI delivers an event once and never replays it, so each one seen is a change of its
            # own: scope the notice's key by its arrival (once: a retry keeps it)
            key = f"{key}:{self._clock.now():%Y%m%dT%H%M%S.%fZ}:{next(self._changes)}"
        await self._while_unavailable("security", event.key, lambda: self._security_notice(event, key))

    async def _while_unavailable(self, what: str, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` until the database takes its writes: the event behind it came once, over
        AMI, and is nowhere else to be read again. Tried again with backoff while the database
        refuses every write (a full disk: :class:`StorageUnavailable`); any other failure is
        ``work``'s own to log."""
        retry = StorageRetry()
        while True:
            try:
                await work()
                return
            except StorageUnavailable as exc:
                self.errors += 1
                log.warning("notices.storage_unavailable", what=what, key=key, error=str(exc), retry_in=retry.delay)
            try:
                await self._clock.sleep(retry.take())
            except asyncio.CancelledError:
                log.error("notices.held_notice_lost", what=what, key=key, note="the daemon stopped first")
                raise

    async def _security_notice(self, event: VoicemailPasswordChanged | AccountEvent, key: str) -> None:
        try:
            if await self._store.has_event(key):
                return
            if isinstance(event, VoicemailPasswordChanged):
                box = event.box
                account = await self._store.write(lambda tx: tx.account_for_mailbox(box))
                kind, data = "password_changed", {"source_ip": "", "at": self._clock.now()}
            else:
                account = await self._store.write(lambda tx: tx.get_account(event.account))
                if event.name == "PasswordChanged":
                    kind, data = (
                        "password_changed",
                        {"source_ip": event.fields.get("SourceIP", ""), "at": self._clock.now()},
                    )
                else:  # PinCreated / PinChanged
                    number = event.fields.get("Number") or (f"+{account.dids[0]}" if account and account.dids else "")
                    kind, data = "pin_created", {"number": number, "at": self._clock.now()}
            if account is None:
                log.warning("notices.security_unknown_account", key=event.key)
                return
            await self._queue(kind, key, account, account.email, {"name": account.name, **data})
        except StorageUnavailable:
            raise
        except Exception:
            self.errors += 1
            log.exception("notices.security_failed", key=event.key)

    def apply_settings(self, settings: NoticeSettings) -> None:
        """A SIGHUP reload: the next scan, decision and mail use ``settings`` (the spool reader
        holds no state of its own; the pending missed calls keep their place)."""
        spool = VoicemailSpool(
            settings.voicemail_root, audio_format=settings.audio_format,
            max_attachment_bytes=settings.max_attachment_bytes,
        )  # fmt: skip
        self._tracker.grace = settings.missed_call_grace
        self._spool = spool
        self.settings = settings

    def raise_baseline(self, moment: datetime) -> None:
        """Never mail spool messages or faxes older than ``moment``, nor decide calls recovered
        from Master.csv that ended before it (the retention's key floor: their keys may be gone,
        so an old message still in a box would look new)."""
        self._went_live_at = max(self._went_live_at, moment)

    def undecided(self, linked_id: str) -> bool:
        """Whether this call's decision may still be lost with the process: not decided yet, or
        decided and its key (with the mail, if missed) not committed. The reconciler keeps the
        call's Master.csv rows replayable until then."""
        return self._tracker.undecided(linked_id) or linked_id in self._missed_due

    def _owner_of(self, call: CallEnded) -> str | None:
        """Inbound calls are recognised by context: the account code alone cannot tell the
        direction (the dialplan sets it on outbound calls too). No contexts, no missed calls."""
        if call.account and call.destination_context in self.settings.inbound_contexts:
            return call.account
        return None

    # ---- background loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start-up scan, then: boxes named by events at once, missed calls after their grace,
        and a full rescan every ``scan_interval`` seconds."""
        last_scan = -1e18
        pause = min(5.0, self.settings.scan_interval)
        # a full disk: the next pass waits longer each time (one warning a wait, not one every 5 s
        # for as long as the disk stays full); a box or an event, or the disk freed, wakes it early
        deferred = StorageRetry(pause, max(pause, STORAGE_RETRY_MAX))
        while not stop.is_set():
            self._wake.clear()
            refused: str | None = None
            try:
                if self._clock.monotonic() - last_scan >= self.settings.scan_interval:
                    last_scan = self._clock.monotonic()
                    if not await self.scan_all():  # counted and logged there, box by box
                        last_scan, refused = -1e18, "a write of the spool scan was refused"  # all again next pass
                if refused is None:
                    boxes, self._boxes_due = self._boxes_due, set()
                    for context, mailbox in sorted(boxes):
                        async with self._boxes_again((context, mailbox), boxes):
                            await self.voicemail_box(context, mailbox)
                    await self._missed_calls(self._clock.now())
            except StorageUnavailable as exc:  # a full disk: what is due stays due for the next pass
                self.errors += 1
                refused = str(exc)
            except Exception:
                self.errors += 1
                log.exception("notices.pass_failed")
            if refused is None:
                deferred.reset()
                wait = pause
            else:
                wait = deferred.take()
                log.warning(
                    "notices.pass_deferred", error=refused, retry_in=wait, note="the database takes no writes now"
                )
            if stop.is_set():
                break
            await wait_any(self._clock, wait, stop, self._wake)

        # stopping: decide pending missed calls now rather than lose them with the process
        try:
            await self._missed_calls(self._clock.now() + timedelta(days=1))
        except Exception:
            self.errors += 1
            log.exception("notices.missed_flush_failed")

    async def _missed_calls(self, now: datetime) -> None:
        """Claim the key of every call decided by ``now``, with its mail if missed; one that fails
        stays due and is tried again on the next pass (the tracker has forgotten it: this is its
        only record). A call not missed has its key claimed alone: a re-read of its CDRs after a
        restart, without the MessageWaiting that decided it, could otherwise find it missed."""
        for decision in self._tracker.decisions(now):
            self._missed_due[decision.linked_id] = decision
        settled = [d for d in self._missed_due.values() if d.missed is None]
        if settled:
            await self._store.write(lambda tx: [tx.claim_event(d.key, "not_missed") for d in settled])
            for decision in settled:
                del self._missed_due[decision.linked_id]
        for linked_id, decision in list(self._missed_due.items()):
            if decision.missed is not None:
                await self._missed(decision.missed)
            del self._missed_due[linked_id]

    async def scan_all(self) -> bool:
        """Every voicemail box and the fax directory: what arrived while we were not looking.
        False if the database refused a box's writes (a full disk): that box is due again.

        One box or fax that fails is counted and logged and the scan goes on: it is tried again
        at the next scan, and must not keep every later box and every fax from being mailed."""
        writable = True
        boxes = await asyncio.to_thread(self._spool.boxes)
        for context, mailbox in boxes:
            try:
                async with self._boxes_again((context, mailbox)):
                    await self.voicemail_box(context, mailbox)
            except StorageUnavailable:
                self.errors += 1  # logged by _boxes_again; the box is due at the next pass
                writable = False
            except Exception:
                self.errors += 1
                log.exception("notices.voicemail_box_failed", box=f"{mailbox}@{context}")
            crash_point("notices.scan_item")
        faxes = await asyncio.to_thread(scan_fax_spool, self.settings.fax_root)
        for fax in faxes:
            if fax.sidecar is None or fax.written_at is None or fax.written_at < self._went_live_at:
                continue  # incomplete, or older than the go-live baseline (or the key floor)
            try:
                await self._fax(fax.sidecar, fax.path, at=fax.written_at)
            except StorageUnavailable as exc:
                self.errors += 1
                writable = False
                log.warning("notices.fax_deferred", uniqueid=fax.sidecar.uniqueid, error=str(exc))
            except Exception:
                self.errors += 1
                log.exception("notices.fax_failed", uniqueid=fax.sidecar.uniqueid)
            crash_point("notices.scan_item")
        return writable

    # ---- voicemail -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _boxes_again(self, box: tuple[str, str], more: Iterable[tuple[str, str]] = ()) -> AsyncIterator[None]:
        """While the database refuses writes (a full disk), a box whose notice could not commit,
        and ``more`` boxes due with it, are due again at the next pass (seconds away), not at the
        next full scan of the spool (``scan_interval``); the error goes on to the caller."""
        try:
            yield
        except StorageUnavailable as exc:  # counted by the caller, once per pass
            self._boxes_due.add(box)
            self._boxes_due.update(more)
            log.warning("notices.voicemail_deferred", box=f"{box[1]}@{box[0]}", error=str(exc))
            raise

    async def voicemail_box(self, context: str, mailbox: str) -> None:
        box = f"{mailbox}@{context}"
        account, erased_at = await self._store.write(lambda tx: (tx.account_for_mailbox(box), tx.box_erased_at(box)))
        if account is None:
            return
        messages = await asyncio.to_thread(self._spool.list_messages, context, mailbox)
        inbox = sum(1 for m in messages if m.folder == "INBOX")
        if inbox >= self.settings.maxmsg_warn_at:
            # with Asterisk's own mail off nobody empties the box; at maxmsg it takes no more messages
            self.boxes_nearly_full[box] = inbox
            log.warning("voicemail.box_nearly_full", box=box, messages=inbox, warn_at=self.settings.maxmsg_warn_at)
        else:
            self.boxes_nearly_full.pop(box, None)
        for msg in messages:
            if msg.meta.origtime < self._went_live_at:
                continue  # the go-live baseline: old messages are never mailed
            if erased_at is not None and msg.meta.origtime < erased_at:
                continue  # left for the box's erased owner (a box given to someone else since)
            key = f"vm:{self.settings.system_name}:{box}:{msg.meta.msg_id}"
            if await self._store.has_event(key):
                # the spool is the state: a delivered message still here is removed again (durably
                # retried at every scan, also after a crash between the 250 and the removal)
                # (never one mailed without its recording: the spool holds its only copy)
                if (
                    self.remove_delivered is not None
                    and self.remove_enabled()
                    and await self._store.outbox_status(key) == "sent"
                    and not await self._store.has_event(_kept_key(key))
                ):
                    await self.remove_delivered(key, _location(msg))
                continue
            try:
                await self._voicemail(account, box, msg, key)
            except StorageUnavailable:
                raise  # a full disk: the box's other messages would fail alike (see _boxes_again)
            except Exception:  # this message only: the box's others still go; retried next scan
                self.errors += 1
                log.exception("notices.voicemail_failed", key=key)

    async def _voicemail(self, account: Account, box: str, msg: VoicemailMessage, key: str) -> None:
        recipient = account.mailbox_email(box) or account.email
        try:
            audio = await asyncio.to_thread(self._spool.read_audio, msg)
        except SpoolMessageMoved:
            # deleted or renumbered since the box was listed: nothing is claimed, so a message
            # still in the box is found at its new number by the next scan (or its MWI event)
            log.info("notices.voicemail_moved", key=key)
            return
        except (SpoolError, OSError) as exc:
            # refused (a symlink, not a regular file) or unreadable (EACCES): the message still
            # goes, saying the recording could not be attached, as for a missing or large file
            log.warning("notices.voicemail_audio_unreadable", key=key, error=str(exc))
            audio = None
        data: dict[str, Any] = {
            "name": account.name,
            "mailbox": msg.mailbox,
            "caller_name": msg.meta.callerid_name,
            "caller_number": msg.meta.callerid_num,
            "at": msg.meta.origtime,
            "duration": msg.meta.duration,
            "attached": audio is not None,
        }
        attachments = []
        if audio is not None:
            # wav, WAV and wav49 are RIFF WAVE files (PCM, or GSM 6.10 inside); gsm is raw frames
            suffix = "gsm" if self._spool.audio_ext == "gsm" else "wav"
            ctype = "audio/x-gsm" if suffix == "gsm" else "audio/wav"
            attachments.append(Attachment(f"voicemail-{msg.meta.msg_id}.{suffix}", ctype, audio))
        # where the message sits, for the optional VoicemailRemove after the 250 (app.py); a
        # recording that did not go out with the mail (too large, missing, refused) is never
        # removed: the subscriber is told to listen to it in the box, and it exists nowhere else
        kept = audio is None
        await self._queue(
            "voicemail", key, account, recipient, data, attachments=attachments,
            payload=None if kept else {"vm_remove": _location(msg)},
            also_claim=(_kept_key(key), "voicemail_kept") if kept else None,
        )  # fmt: skip

    # ---- fax -----------------------------------------------------------------------------------

    async def _fax_from_event(self, event: FaxResult) -> None:
        await self._while_unavailable("fax", event.unique_id, lambda: self._fax_notice(event))

    async def _fax_notice(self, event: FaxResult) -> None:
        try:
            fax = self._fax_files.get(event.unique_id)
            path = event.file_path or (fax.file_path if fax is not None else "")
            sidecar = FaxSidecar(
                direction=event.direction, status=event.status, error=event.error, statusstr=event.status_text,
                pages=event.pages or (fax.pages if fax else 0), rate=event.rate, resolution="",
                local=event.local_station, remote=event.remote_station or (fax.remote_station if fax else ""),
                account=event.account, uniqueid=event.unique_id, linkedid=event.linked_id,
            )  # fmt: skip
            caller = fax.caller_id_num if fax is not None else ""
            await self._fax(sidecar, self.settings.fax_root / Path(path).name if path else None, caller)
        except StorageUnavailable:
            raise
        except Exception:
            self.errors += 1
            log.exception("notices.fax_failed", uniqueid=event.unique_id)

    async def _fax(
        self, sidecar: FaxSidecar, path: Path | None, caller: str = "", *, at: datetime | None = None
    ) -> None:
        """``at``: when the fax call ended (a sidecar found by the scan); ``None``: just now (its event)."""
        key = f"fax:{self.settings.system_name}:{sidecar.uniqueid}:{sidecar.direction}"
        if sidecar.direction == "send" and (path is None or not await asyncio.to_thread(path.is_file)):
            # confirmations are for faxes a subscriber submitted through the fax spool (the
            # dialplan's clickphone-fax-tx); any other SendFAX is not a subscriber's
            return
        if await self._store.has_event(key):
            return
        account = await self._store.write(lambda tx: tx.get_account(sidecar.account))
        if account is None:
            log.warning("notices.fax_unknown_account", account=sidecar.account, key=key)
            return
        ok = sidecar.status.upper() == "SUCCESS" and (sidecar.pages or 0) > 0
        kind = ("fax_received" if sidecar.direction == "receive" else "fax_sent") if ok else "fax_failed"
        own_number = f"+{account.dids[0]}" if account.dids else sidecar.local
        data: dict[str, Any] = {
            "name": account.name,
            "pages": sidecar.pages or 0,
            "caller_number": caller,
            "station": sidecar.remote,
            "number": own_number,
            # for a send: the far end; for a failed receive: the station that tried to send
            "destination": sidecar.remote or caller,
            "reason": sidecar.statusstr or sidecar.error or "no pages transferred",
            "at": at or self._clock.now(),
            "attached": False,
        }
        attachments = []
        if kind == "fax_received" and path is not None:
            try:
                doc = await self.fax_converter.convert(path, root=self.settings.fax_root)
            except (FaxFileError, OSError) as exc:
                log.warning("notices.fax_pdf_failed", key=key, error=str(exc))
            else:
                data["pages"] = doc.pages
                if len(doc.pdf) > self.settings.max_attachment_bytes:  # announced without it, as a voicemail
                    log.info("notices.fax_pdf_too_large", key=key, bytes=len(doc.pdf))
                else:
                    attachments.append(Attachment(f"fax-{sidecar.uniqueid}.pdf", "application/pdf", doc.pdf))
                    data["attached"] = True
        await self._queue(kind, key, account, account.email, data, attachments=attachments)

    # ---- missed calls --------------------------------------------------------------------------

    async def _missed(self, missed: MissedCall) -> None:
        if await self._store.has_event(missed.key):
            return
        account = await self._store.write(lambda tx: tx.get_account(missed.account))
        if account is None:
            return
        data: dict[str, Any] = {
            "name": account.name,
            "caller_name": missed.caller_name,
            "caller_number": missed.caller_num,
            "number": missed.called,
            "at": missed.started_at,
            "rang": missed.rang_seconds,
        }
        await self._queue("missed_call", missed.key, account, account.email, data)

    # ---- common: render off the loop, then one transaction ------------------------------------

    async def _queue(
        self, kind: str, key: str, account: Account, recipient: str, data: dict[str, Any], *,
        attachments: list[Attachment] | None = None, payload: dict[str, Any] | None = None,
        also_claim: tuple[str, str] | None = None,  # (key, kind) claimed in the same transaction
    ) -> bool:  # fmt: skip
        if kind in account.opt_out:
            log.info("notice.opted_out", key=key, kind=kind, account=account.code)
            await self._store.write(lambda tx: tx.claim_event(key, kind))
            return False
        now = self._clock.now()
        s = self.settings

        def render() -> bytes:
            rendered = self._renderer.render(kind, account.language, data)
            return build_message(
                rendered, sender=s.sender, recipient=recipient, message_id=message_id(key, s.message_id_domain),
                date=now, attachments=attachments or (), extra_headers={"X-ClickPhone-Kind": kind},
            )  # fmt: skip

        mime = await asyncio.to_thread(render)
        crash_point("notices.rendered")
        message = OutboxMessage.build(
            key=key, kind=kind, recipient=recipient, account=account.code, mime=mime, now=now,
            lifetime=KINDS[kind].lifetime, payload=payload,
        )  # fmt: skip

        def unit(tx: WriteTx) -> bool:
            if not tx.claim_event(key, kind):
                return False
            if also_claim is not None:
                tx.claim_event(*also_claim)
            return tx.enqueue(message)

        queued = await self._store.write(unit)
        if queued:
            self.queued[kind] = self.queued.get(kind, 0) + 1
            log.info("notice.queued", key=key, kind=kind, account=account.code, to=recipient, bytes=len(mime))
        return bool(queued)


def _kept_key(key: str) -> str:
    """Claimed with a voicemail notice that went without its recording: the message stays in the
    spool whatever ``voicemail_remove_after_send`` says."""
    return f"{key}:kept"


def _location(msg: VoicemailMessage) -> dict[str, str]:
    """Where a message sits now, as AMI ``VoicemailRemove`` names it."""
    return {"context": msg.context, "mailbox": msg.mailbox, "folder": str(msg.folder), "msg_id": msg.meta.msg_id}
