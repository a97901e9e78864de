"""The event-driven notices end to end: recorded calls replayed through the fake Asterisk, the real
spool samples, the real daemon, a real SMTP sink — exactly one correct mail per event, ro and en."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.app import Daemon
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.domain.accounts import Account, Mailbox
from clickphone_agi.notices.render import Renderer
from clickphone_agi.ports import WriteTx
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.services.notices import NoticeSettings, Notifier
from clickphone_agi.sim.ami_server import AmiReplayServer, packaged_scenarios
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.daemon_harness import in_process
from tests.test_missed_replay import FailingOnce

SPOOL = Path(__file__).parent / "fixtures" / "spool"
pytestmark = pytest.mark.slow


def _spool(root: Path) -> tuple[Path, Path]:
    vm = root / "voicemail"
    fax = root / "fax"
    shutil.copytree(SPOOL / "voicemail", vm)
    fax.mkdir()
    # the fax scenario's ReceiveFAX wrote rx-<uniqueid>.tif; the daemon looks for that name under its root
    shutil.copy(SPOOL / "fax" / "received-g3.tif", fax / "rx-1795882939.18.tif")
    return vm, fax


async def _daemon(
    write_config: Callable[..., Path], root: Path, ami_port: int, smtp_port: int, language: str,
    sidecars: dict[str, str] | None = None, prepare: Callable[[Path, Path], None] | None = None,
) -> AsyncIterator[Daemon]:  # fmt: skip
    vm, fax = _spool(root)
    for name, text in (sidecars or {}).items():  # written by the dialplan while the daemon was down
        (fax / name).write_text(text)
    if prepare is not None:  # what else happened to the spool (voicemail, fax) before the start
        prepare(vm, fax)
    cfg = write_config(
        ami_port=ami_port or 5038,
        smtp_port=smtp_port,
        ami_enabled=ami_port != 0,
        extra=(
            f"asterisk:\n  system_name: pbx1\n  voicemail_spool: {vm}\n  fax_spool: {fax}\n  master_csv: null\n"
            "notifications:\n  inbound_contexts: [lab-inbound]\n  missed_call_grace: 0.2\n  scan_interval: 3600\n"
            "  voicemail_maxmsg_warn_at: 1\n"
        ),
    )
    loaded = load_config(cfg)
    conn = db.connect_sync(loaded.config.database.path)
    db.migrate(conn, datetime(2026, 11, 28, tzinfo=UTC))  # go live before the recorded calls
    conn.close()
    account = Account(
        code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro", language=language,  # type: ignore[arg-type]
        dids=("40212345679",), mailboxes=(Mailbox("100@default", "voicemail@example.ro"),),
    )  # fmt: skip
    # provisioned before the daemon starts, as an operator would: its start-up scan must see the account
    store = await SqliteStore.open(loaded.config.database.path, FakeClock())
    store.start()
    await store.write(import_unit([(account, 1000)]))
    await store.close()
    async with in_process(loaded, cfg) as d:
        yield d


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _kind(msg: EmailMessage) -> str:
    return str(msg["X-ClickPhone-Kind"])


@pytest.mark.parametrize("language", ["ro", "en"])
async def test_missed_voicemail_fax_and_failed_fax_one_mail_each(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink, language: str
) -> None:
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        gen = _daemon(write_config, short_tmp / "spool", ami.port, smtp_sink.port, language)
        await anext(gen)
        try:
            await ami.wait_for_login(10)
            scenarios = packaged_scenarios()
            for name in ("missed_call", "voicemail", "fax", "fax_failed"):
                await ami.play(scenarios[name])
            # the start-up scan already mails the voicemail found in the spool; MessageWaiting must not double it
            await smtp_sink.wait_for(4, timeout=20)
            await asyncio.sleep(0.5)  # anything extra would arrive now
        finally:
            await anext(gen, None)
    mails = [_parse(m.data) for m in smtp_sink.messages]
    kinds = sorted(_kind(m) for m in mails)
    assert kinds == ["fax_failed", "fax_received", "missed_call", "voicemail"]
    by_kind = {_kind(m): m for m in mails}

    vm = by_kind["voicemail"]
    assert vm["To"] == "voicemail@example.ro"  # the box's own address
    (audio,) = list(vm.iter_attachments())
    assert audio.get_content_type() == "audio/wav"
    assert audio.get_content() == (SPOOL / "voicemail/default/100/INBOX/msg0000.wav").read_bytes()
    body = vm.get_body(("plain",))
    assert body is not None
    assert "0744123456" in body.get_content()

    fax = by_kind["fax_received"]
    (pdf,) = list(fax.iter_attachments())
    data = pdf.get_content()
    assert pdf.get_content_type() == "application/pdf"
    assert data.startswith(b"%PDF-")
    assert b"/Count 2" in data  # two pages

    missed = by_kind["missed_call"]
    text = missed.get_body(("plain",))
    assert text is not None
    assert "0744123456" in text.get_content() or "Vasile" in text.get_content()
    assert missed["To"] == "ion.popescu@example.ro"
    for m in mails:
        assert m["Auto-Submitted"] == "auto-generated"
        assert m["Message-ID"].endswith("@clickphone.example>")
        assert ("Bună ziua" if language == "ro" else "Hello") in m.get_body(("plain",)).get_content()  # type: ignore[union-attr]


async def test_voicemail_left_while_stopped_is_mailed_at_start(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    gen = _daemon(write_config, short_tmp / "spool", 0, smtp_sink.port, "ro")
    daemon = await anext(gen)
    try:
        await smtp_sink.wait_for(1, timeout=20)
        status = await daemon._cmd_status({})
        # one message with the warning at 1: the operator is told the box is filling up
        assert status["notices"]["voicemail_boxes_nearly_full"] == {"100@default": 1}
    finally:
        await anext(gen, None)
    (only,) = [_parse(m.data) for m in smtp_sink.messages]
    assert _kind(only) == "voicemail"


FAILED_RX_SIDECAR = """direction=receive
status=FAILED
error=The call dropped prematurely
statusstr=The call dropped prematurely
pages=0
rate=14400
resolution=8031x7700
local=+40212345679
remote=+40212345678
account=acct1001
uniqueid=1795882966.20
linkedid=1795882966.19
end=1
"""


async def test_failed_fax_received_while_stopped_is_mailed_at_start_from_its_lone_sidecar(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """A reception that failed before the first page leaves no TIFF, only the sidecar (regression:
    the scan looked for TIFFs only, so this notice was lost when it happened during a downtime)."""
    sidecars = {"rx-1795882966.20.tif.result": FAILED_RX_SIDECAR}
    gen = _daemon(write_config, short_tmp / "spool", 0, smtp_sink.port, "en", sidecars)
    await anext(gen)
    try:
        await smtp_sink.wait_for(2, timeout=20)  # the spool's voicemail and the failed fax
        await asyncio.sleep(0.3)  # anything extra would arrive now
    finally:
        await anext(gen, None)
    mails = {_kind(m): m for m in (_parse(m.data) for m in smtp_sink.messages)}
    assert sorted(mails) == ["fax_failed", "voicemail"]
    text = mails["fax_failed"].get_body(("plain",))
    assert text is not None
    assert "The call dropped prematurely" in text.get_content()


def _symlinked_audio(vm: Path, _fax: Path) -> None:
    wav = vm / "default/100/INBOX/msg0000.wav"
    wav.unlink()
    wav.symlink_to("msg0000.WAV")  # even pointing inside the spool: refused (O_NOFOLLOW)


def _fifo_audio(vm: Path, _fax: Path) -> None:
    wav = vm / "default/100/INBOX/msg0000.wav"
    wav.unlink()
    os.mkfifo(wav)


@pytest.mark.parametrize("prepare", [_symlinked_audio, _fifo_audio], ids=["symlink", "fifo"])
async def test_a_refused_voicemail_recording_is_mailed_without_it_and_the_scan_goes_on(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink, prepare: Callable[[Path, Path], None]
) -> None:
    """Regression: read_audio's refusal escaped the scan, so the message was never mailed (its
    notice was documented to go without the recording) and nothing after it, the faxes included,
    ever was: every scan stopped at the same file."""
    sidecars = {"rx-1795882966.20.tif.result": FAILED_RX_SIDECAR}
    gen = _daemon(write_config, short_tmp / "spool", 0, smtp_sink.port, "en", sidecars, prepare)
    daemon = await anext(gen)
    try:
        await smtp_sink.wait_for(2, timeout=20)
        await asyncio.sleep(0.3)  # anything extra would arrive now
        status = await daemon._cmd_status({})
    finally:
        await anext(gen, None)
    mails = {_kind(m): m for m in (_parse(m.data) for m in smtp_sink.messages)}
    assert sorted(mails) == ["fax_failed", "voicemail"]
    assert list(mails["voicemail"].iter_attachments()) == []
    text = mails["voicemail"].get_body(("plain",))
    assert text is not None
    assert "The recording could not be attached" in text.get_content()
    assert status["notices"]["errors"] == 0


async def test_a_message_whose_notice_fails_is_retried_at_the_next_scan_and_the_others_still_go(
    short_tmp: Path,
) -> None:
    """One message's failure (here its commit: a disk error) is counted and logged; the scan goes
    on to the fax, and the next scan mails the message."""
    vm, fax = _spool(short_tmp / "spool")
    (fax / "rx-1795882966.20.tif.result").write_text(FAILED_RX_SIDECAR)
    store = await SqliteStore.open(short_tmp / "db.sqlite", FakeClock())
    store.start()
    try:
        account = Account(
            code="acct1001", name="Ion Popescu", email="ion@example.ro", mailboxes=(Mailbox("100@default"),)
        )
        await store.write(import_unit([(account, 1000)]))
        settings = NoticeSettings(
            system_name="pbx1", sender="ClickPhone <no-reply@clickphone.example>",
            message_id_domain="clickphone.example", voicemail_root=vm, fax_root=fax,
        )  # fmt: skip
        flaky = FailingOnce(store)
        notifier = Notifier(flaky, FakeClock(), Renderer(), settings, datetime(2026, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]
        await notifier.scan_all()
        assert notifier.errors == 1
        assert [r.kind for r in await store.outbox_rows()] == ["fax_failed"]
        await notifier.scan_all()
        assert sorted(r.kind for r in await store.outbox_rows()) == ["fax_failed", "voicemail"]
        assert notifier.errors == 1
    finally:
        await store.close()


def _before_go_live(_vm: Path, fax: Path) -> None:
    """The failed fax and the received one ended the day before the daemon went live."""
    (fax / "rx-1795882939.18.tif.result").write_text(FAILED_RX_SIDECAR.replace("1795882966.20", "1795882939.18"))
    (fax / "rx-1795882966.20.tif.result").write_text(FAILED_RX_SIDECAR)
    day_before = datetime(2026, 11, 27, 12, tzinfo=UTC).timestamp()
    for name in ("rx-1795882939.18.tif", "rx-1795882939.18.tif.result", "rx-1795882966.20.tif.result"):
        os.utime(fax / name, (day_before, day_before))


async def test_faxes_older_than_the_go_live_baseline_are_not_mailed_at_the_first_start(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """Regression: the fax scan ignored the baseline the voicemail scan keeps, so the first start
    mailed every fax still in the spool, however old."""
    gen = _daemon(write_config, short_tmp / "spool", 0, smtp_sink.port, "en", prepare=_before_go_live)
    await anext(gen)
    try:
        await smtp_sink.wait_for(1, timeout=20)  # the spool's voicemail, left after go-live
        await asyncio.sleep(0.5)  # anything extra would arrive now
    finally:
        await anext(gen, None)
    assert [_kind(_parse(m.data)) for m in smtp_sink.messages] == ["voicemail"]


async def test_a_fax_older_than_the_key_floor_is_not_mailed_again_once_its_key_is_purged(short_tmp: Path) -> None:
    """The retention job raises the notifier's baseline to the key floor, then purges the keys: a
    fax still in the spool, its key and its sent row gone (``outbox purge``), must not look new."""
    vm, fax = _spool(short_tmp / "spool")
    shutil.rmtree(vm / "default")
    (fax / "rx-1795882966.20.tif.result").write_text(FAILED_RX_SIDECAR)
    ended = datetime(2026, 11, 28, 9, 59, tzinfo=UTC)
    os.utime(fax / "rx-1795882966.20.tif.result", (ended.timestamp(), ended.timestamp()))
    store = await SqliteStore.open(short_tmp / "db.sqlite", FakeClock())
    store.start()
    try:
        await store.write(import_unit([(Account(code="acct1001", name="Ion Popescu", email="ion@example.ro"), 0)]))
        settings = NoticeSettings(
            system_name="pbx1", sender="ClickPhone <no-reply@clickphone.example>",
            message_id_domain="clickphone.example", voicemail_root=vm, fax_root=fax,
        )  # fmt: skip
        notifier = Notifier(store, FakeClock(), Renderer(), settings, datetime(2026, 1, 1, tzinfo=UTC))
        await notifier.scan_all()
        (row,) = await store.outbox_rows()
        assert (row.idempotency_key, row.kind) == ("fax:pbx1:1795882966.20:receive", "fax_failed")

        later = ended + timedelta(days=400)
        notifier.raise_baseline(ended + timedelta(minutes=1))  # the floor, raised before any key goes

        def purge(tx: WriteTx) -> None:
            tx.mark_sent(row.id, "250 2.0.0 Ok")
            tx.purge_outbox(later, ("sent",), keep_rows=False)
            tx.purge_window("processed_events", later, None, 100)

        await store.write(purge)
        assert not await store.has_event(row.idempotency_key)
        await notifier.scan_all()
        assert await store.outbox_rows() == []
    finally:
        await store.close()


RX_SIDECAR = """direction=receive
status=SUCCESS
error=
statusstr=OK
pages=2
rate=14400
resolution=8031x7700
local=+40212345679
remote=+40212345678
account=acct1001
uniqueid=1795882939.18
linkedid=1795882939.17
end=1
"""


@contextlib.asynccontextmanager
async def _scanning(
    short_tmp: Path, vm: Path, fax: Path, clock: FakeClock | None = None, language: str = "ro", **settings: Any
) -> AsyncIterator[tuple[SqliteStore, Notifier]]:
    """A real store with acct1001 (box 100@default, mail in ``language``) and a Notifier on the
    spool ``vm``/``fax``."""
    store = await SqliteStore.open(short_tmp / "db.sqlite", FakeClock())
    store.start()
    try:
        account = Account(
            code="acct1001", name="Ion", email="ion@example.ro", language=language, mailboxes=(Mailbox("100@default"),)
        )
        await store.write(import_unit([(account, 1000)]))
        config = NoticeSettings(
            system_name="pbx1", sender="ClickPhone <no-reply@clickphone.example>",
            message_id_domain="clickphone.example", voicemail_root=vm, fax_root=fax, **settings,
        )  # fmt: skip
        yield store, Notifier(store, clock or FakeClock(), Renderer(), config, datetime(2026, 1, 1, tzinfo=UTC))
    finally:
        await store.close()


async def _fax_mail(
    short_tmp: Path,
    max_attachment_bytes: int = 10 * 1024 * 1024,
    *,
    arrived: datetime | None = None,
    clock: FakeClock | None = None,
) -> EmailMessage:
    """The received-fax notice the start-up scan queues for the real G3 fax and its sidecar
    (written at ``arrived``, when given), with the daemon's clock at ``clock``."""
    vm, fax = _spool(short_tmp / "spool")
    sidecar = fax / "rx-1795882939.18.tif.result"
    sidecar.write_text(RX_SIDECAR)
    if arrived is not None:
        os.utime(sidecar, (arrived.timestamp(), arrived.timestamp()))
    async with _scanning(short_tmp, vm, fax, clock, "en", max_attachment_bytes=max_attachment_bytes) as (
        store,
        notifier,
    ):
        await notifier.scan_all()
        rows = await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10)
    (mime,) = [m for row, m in rows if row.kind == "fax_received"]
    return _parse(mime)


@pytest.mark.parametrize("max_attachment_bytes", [10 * 1024 * 1024, 1024], ids=["fits", "too-large"])
async def test_a_fax_pdf_over_the_attachment_cap_is_announced_without_it(
    short_tmp: Path, max_attachment_bytes: int
) -> None:
    """Regression: ``notifications.max_attachment_bytes`` ("a larger voicemail or fax is announced
    without the file") was applied to voicemail only; a fax's PDF was attached whatever its size."""
    msg = await _fax_mail(short_tmp, max_attachment_bytes)
    pdfs = [a for a in msg.iter_attachments() if a.get_content_type() == "application/pdf"]
    text = msg.get_body(("plain",))
    assert text is not None
    if max_attachment_bytes > 1024:
        assert len(pdfs) == 1
        assert "is attached" in text.get_content()
    else:
        assert pdfs == []
        assert "could not be attached" in text.get_content()
        assert "2 pages" in str(msg["Subject"])  # the sidecar's count still says what arrived


@pytest.mark.parametrize(
    ("audio_format", "filename", "content_type"),
    [
        ("wav", "voicemail-1795882923-00000000.wav", "audio/wav"),
        ("WAV", "voicemail-1795882923-00000000.wav", "audio/wav"),
        ("wav49", "voicemail-1795882923-00000000.wav", "audio/wav"),  # GSM 6.10 in a RIFF WAVE file
        ("gsm", "voicemail-1795882923-00000000.gsm", "audio/x-gsm"),  # raw GSM frames: not a WAV
    ],
)
async def test_the_recording_is_attached_under_a_name_and_type_that_match_its_format(
    short_tmp: Path, audio_format: str, filename: str, content_type: str
) -> None:
    """Regression: the attachment was always ``audio/wav`` and named after the config value, so
    ``voicemail_format: wav49`` mailed ``voicemail-….wav49`` (no player opens that) and ``gsm``
    mailed raw GSM frames labelled as a WAV file."""
    vm, fax = _spool(short_tmp / "spool")
    inbox = vm / "default" / "100" / "INBOX"
    (inbox / "msg0000.gsm").write_bytes(b"\xd8" + bytes(32))  # one GSM frame
    async with _scanning(short_tmp, vm, fax, audio_format=audio_format) as (store, notifier):
        await notifier.scan_all()
        ((_row, mime),) = await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10)
    (part,) = _parse(mime).iter_attachments()
    assert (part.get_filename(), part.get_content_type()) == (filename, content_type)


async def test_a_message_renumbered_while_its_box_is_mailed_goes_out_once_with_its_own_recording(
    short_tmp: Path,
) -> None:
    """The box is listed, then the subscriber deletes msg0000 and Asterisk moves msg0001 down to
    its number before the notices are built. The deleted message's notice must not carry the other
    caller's recording, and the moved one must not be mailed (and its key claimed) as having no
    recording: it waits for the next scan, which finds it at its new number."""
    vm, fax = _spool(short_tmp / "spool")
    inbox = vm / "default" / "100" / "INBOX"
    (inbox / "msg0001.wav").write_bytes(b"RIFF the second caller")
    (inbox / "msg0001.txt").write_text(
        (inbox / "msg0000.txt").read_text().replace("1795882923-00000000", "1795883000-00000001")
    )
    async with _scanning(short_tmp, vm, fax) as (store, notifier):
        spool = notifier._spool
        listed = spool.list_messages("default", "100")

        def stale(context: str, mailbox: str) -> list[object]:
            for name in ("msg0000.wav", "msg0000.WAV", "msg0000.txt"):
                (inbox / name).unlink()  # deleted by the subscriber…
            for name in ("msg0001.wav", "msg0001.txt"):  # …and the next one moved down
                (inbox / name).rename(inbox / name.replace("msg0001", "msg0000"))
            del spool.list_messages  # back to the real method for the next scan
            return list(listed)

        spool.list_messages = stale  # type: ignore[method-assign]
        await notifier.voicemail_box("default", "100")
        assert await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10) == []
        await notifier.voicemail_box("default", "100")
        mails = await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10)
    assert [row.idempotency_key for row, _ in mails] == ["vm:pbx1:100@default:1795883000-00000001"]
    (part,) = _parse(mails[0][1]).iter_attachments()
    assert part.get_content() == b"RIFF the second caller"
    assert notifier.errors == 0


async def test_a_fax_found_by_the_start_up_scan_is_dated_when_it_arrived_not_when_it_was_found(
    short_tmp: Path,
) -> None:
    """Regression: every fax notice said "Date and time: <now>", so a fax received at 03:10 while
    the daemon was down was announced as received at the restart hours later. The sidecar's
    mtime (written at the fax call's hangup) is when it arrived."""
    arrived = datetime(2026, 11, 29, 1, 10, tzinfo=UTC)  # 03:10 in Bucharest
    back = FakeClock(datetime(2026, 11, 29, 7, 45, tzinfo=UTC))  # the daemon is back at 09:45
    text = (await _fax_mail(short_tmp, arrived=arrived, clock=back)).get_body(("plain",))
    assert text is not None
    assert "Date and time: 29 Nov 2026, 03:10" in text.get_content()
