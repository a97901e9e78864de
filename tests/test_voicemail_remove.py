"""notifications.voicemail_remove_after_send: after the 250 the voicemail is removed through
Asterisk's own AMI action VoicemailRemove (the fake Asterisk records it); off by default; a refused
removal is logged and counted and the row stays sent. Also AmiClient.send_action on its own."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ami_fixtures import running_client
from structlog.testing import capture_logs

from clickphone_agi.adapters.ami.client import AmiNotConnectedError
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.app import Daemon
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.domain.accounts import Account, Mailbox
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.ami_server import AmiReplayServer, packaged_scenarios
from clickphone_agi.sim.smtp_sink import SmtpSink

SPOOL = Path(__file__).parent / "fixtures" / "spool"
MSG_ID = "1795882923-00000000"  # msg_id of tests/fixtures/spool/voicemail/default/100/INBOX/msg0000.txt


def _removes(ami: AmiReplayServer) -> list[dict[str, str]]:
    return [a for a in ami.actions_received if a.get("Action", "").lower() == "voicemailremove"]


async def _daemon(
    write_config: Callable[..., Path], root: Path, ami: AmiReplayServer, smtp_port: int, remove: bool | None
) -> AsyncIterator[Daemon]:
    """The real daemon with an empty voicemail spool; the test copies the message in once AMI is up."""
    vm, fax = root / "voicemail", root / "fax"
    vm.mkdir(parents=True)
    fax.mkdir()
    option = "" if remove is None else f"  voicemail_remove_after_send: {str(remove).lower()}\n"
    cfg = write_config(
        ami_port=ami.port,
        smtp_port=smtp_port,
        ami_enabled=True,
        extra=(
            f"asterisk:\n  system_name: pbx1\n  voicemail_spool: {vm}\n  fax_spool: {fax}\n  master_csv: null\n"
            f"notifications:\n  scan_interval: 3600\n{option}"
        ),
    )
    loaded = load_config(cfg)
    conn = db.connect_sync(loaded.config.database.path)
    db.migrate(conn, datetime(2026, 11, 28, tzinfo=UTC))  # go live before the recorded message
    conn.close()
    account = Account(
        code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro", language="ro",
        dids=("40212345679",), mailboxes=(Mailbox("100@default", "voicemail@example.ro"),),
    )  # fmt: skip
    d = Daemon(loaded, config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    await d._running().store.write(import_unit([(account, 1000)]))
    try:
        await ami.wait_for_login(10)
        # the message arrives while AMI is up: MessageWaiting makes the daemon read the box
        shutil.copytree(SPOOL / "voicemail", vm, dirs_exist_ok=True)
        await ami.play(packaged_scenarios()["voicemail"])
        yield d
    finally:
        d.request_stop()
        assert await task == 0


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_sent_voicemail_is_removed_once_through_ami(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        gen = _daemon(write_config, short_tmp / "spool", ami, smtp_sink.port, True)
        daemon = await anext(gen)
        try:
            with capture_logs() as logs:
                await smtp_sink.wait_for(1, timeout=20)
                await _until(lambda: daemon.voicemail_removed == 1)
                await asyncio.sleep(0.3)  # a second removal would arrive now
            status = await daemon._cmd_status({})
        finally:
            await anext(gen, None)
    (action,) = _removes(ami)
    assert {k: action[k] for k in ("Context", "Mailbox", "Folder", "ID")} == {
        "Context": "default",
        "Mailbox": "100",
        "Folder": "INBOX",
        "ID": MSG_ID,
    }
    assert action["ActionID"]
    assert status["notices"]["voicemail_removed"] == 1
    assert status["notices"]["voicemail_remove_failures"] == 0
    assert status["outbox"] == {"sent": 1}
    events = [e for e in logs if str(e["event"]).startswith("voicemail.remove")]
    assert [e["event"] for e in events] == ["voicemail.removed"]
    assert events[0]["msg_id"] == MSG_ID


@pytest.mark.slow
@pytest.mark.parametrize("remove", [None, False])
async def test_by_default_the_spool_is_never_touched(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink, remove: bool | None
) -> None:
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        gen = _daemon(write_config, short_tmp / "spool", ami, smtp_sink.port, remove)
        daemon = await anext(gen)
        try:
            await smtp_sink.wait_for(1, timeout=20)
            await asyncio.sleep(0.5)
            status = await daemon._cmd_status({})
        finally:
            await anext(gen, None)
    assert _removes(ami) == []
    assert daemon.voicemail_removed == daemon.voicemail_remove_failures == 0
    assert status["outbox"] == {"sent": 1}


@pytest.mark.slow
async def test_refused_removal_is_logged_and_counted_and_the_row_stays_sent(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        ami.voicemail_remove_error = "Permission denied"
        gen = _daemon(write_config, short_tmp / "spool", ami, smtp_sink.port, True)
        daemon = await anext(gen)
        try:
            with capture_logs() as logs:
                await smtp_sink.wait_for(1, timeout=20)
                await _until(lambda: daemon.voicemail_remove_failures == 1)
            status = await daemon._cmd_status({})
            rows = await daemon._running().store.outbox_rows()
        finally:
            await anext(gen, None)
    assert len(_removes(ami)) == 1
    assert daemon.voicemail_removed == 0
    assert status["notices"]["voicemail_remove_failures"] == 1
    (row,) = rows
    assert row.status == "sent"
    assert row.smtp_reply is not None
    assert row.smtp_reply.startswith("250")
    (failed,) = [e for e in logs if e["event"] == "voicemail.remove_failed"]
    assert failed["reason"] == "Permission denied"
    assert failed["note"] == "the AMI user needs 'write = user' in manager.conf"
    assert failed["msg_id"] == MSG_ID


@pytest.mark.slow
async def test_a_failed_removal_is_retried_by_the_spool_scan_until_asterisk_removes_it(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """The spool is the state: a delivered message still in the box is removed again at the next
    scan (also what happens after a crash between the 250 and the removal); never mailed twice."""
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        ami.voicemail_remove_error = "Permission denied"
        ami.voicemail_spool = short_tmp / "spool" / "voicemail"  # deletes the files as Asterisk does
        gen = _daemon(write_config, short_tmp / "spool", ami, smtp_sink.port, True)
        daemon = await anext(gen)
        inbox = ami.voicemail_spool / "default" / "100" / "INBOX"
        try:
            await smtp_sink.wait_for(1, timeout=20)
            await _until(lambda: daemon.voicemail_remove_failures == 1)
            assert sorted(p.suffix for p in inbox.iterdir()) == [".WAV", ".txt", ".wav"]  # still there

            await daemon._running().notifier.scan_all()  # Asterisk still refuses: retried, still there
            assert daemon.voicemail_remove_failures == 2
            assert list(inbox.iterdir())

            ami.voicemail_remove_error = None
            await daemon._running().notifier.scan_all()
            assert daemon.voicemail_removed == 1
            assert list(inbox.iterdir()) == []

            await daemon._running().notifier.scan_all()  # nothing left: no further action
            rows = await daemon._running().store.outbox_rows()
        finally:
            await anext(gen, None)
    assert len(_removes(ami)) == 3
    assert len(smtp_sink.messages) == 1  # the retries never re-send the mail
    assert [row.status for row in rows] == ["sent"]


# ---- AmiClient.send_action -------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[AmiReplayServer]:
    async with AmiReplayServer("clickphone", "labsecret") as srv:
        yield srv


FIELDS = {"Context": "default", "Mailbox": "100", "Folder": "INBOX", "ID": MSG_ID}


async def test_send_action_returns_the_response_with_its_action_id(server: AmiReplayServer) -> None:
    async with running_client(server) as h:
        await server.wait_for_login()
        await _until(lambda: h.client.state == "connected")
        first, second = await asyncio.gather(
            h.client.send_action("VoicemailRemove", FIELDS, 5.0),
            h.client.send_action("VoicemailRemove", {**FIELDS, "ID": "other"}, 5.0),
        )
    sent = _removes(server)
    assert [a["ID"] for a in sent] == [MSG_ID, "other"]
    assert first.response == second.response == "Success"
    assert first.action_id == sent[0]["ActionID"]
    assert second.action_id == sent[1]["ActionID"]
    assert first.action_id != second.action_id
    assert all(m.response is None for m in h.received)  # routed by ActionID, never to on_message


async def test_send_action_times_out_on_the_client_clock(server: AmiReplayServer) -> None:
    server.voicemail_remove_answer = False
    clock = FakeClock()
    async with running_client(server, clock=clock) as h:
        await server.wait_for_login()
        await _until(lambda: h.client.state == "connected")
        call = asyncio.create_task(h.client.send_action("VoicemailRemove", FIELDS, 3.0))
        await server.wait_until(lambda: len(_removes(server)) == 1)
        await clock.advance(2.0)
        assert not call.done()
        await clock.advance(1.5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call, 2.0)
        assert h.client.state == "connected"  # a missing answer does not drop the link


async def test_send_action_fails_fast_when_not_connected(server: AmiReplayServer) -> None:
    async with running_client(server, secret="wrong") as h:
        await _until(lambda: server.logins_failed >= 1)
        with pytest.raises(AmiNotConnectedError):
            await h.client.send_action("VoicemailRemove", FIELDS, 5.0)


async def test_send_action_refuses_action_and_action_id_fields(server: AmiReplayServer) -> None:
    async with running_client(server) as h:
        await _until(lambda: h.client.state == "connected")
        with pytest.raises(ValueError, match="actionid"):
            await h.client.send_action("VoicemailRemove", {**FIELDS, "ActionID": "x"}, 5.0)
        with pytest.raises(ValueError, match="CR or LF"):
            await h.client.send_action("VoicemailRemove", {**FIELDS, "ID": "a\r\nAction: Originate"}, 5.0)
    assert _removes(server) == []


# ---- a recording that was not mailed is never removed -------------------------------------------


@pytest.mark.parametrize("max_attachment_bytes", [10 * 1024 * 1024, 1024], ids=["attached", "too-large"])
async def test_a_message_mailed_without_its_recording_is_never_removed(
    short_tmp: Path, max_attachment_bytes: int
) -> None:
    """Regression: a recording over ``max_attachment_bytes`` was announced as "listen to it by
    calling your voicemail", and then removed from that voicemail after the 250 (by the sender's
    hook, and again by every spool scan): the only copy of a message nobody had heard was gone.
    Only a message whose recording went out with the mail may be removed."""
    from clickphone_agi.adapters.storage.sqlite import SqliteStore
    from clickphone_agi.notices.render import Renderer
    from clickphone_agi.services.notices import NoticeSettings, Notifier

    vm = short_tmp / "voicemail"
    shutil.copytree(SPOOL / "voicemail", vm)
    (short_tmp / "fax").mkdir()
    store = await SqliteStore.open(short_tmp / "db.sqlite", FakeClock())
    store.start()
    removed: list[tuple[str, dict[str, str]]] = []

    async def remove(key: str, where: dict[str, str]) -> None:
        removed.append((key, where))

    try:
        account = Account(code="acct1001", name="Ion", email="ion@example.ro", mailboxes=(Mailbox("100@default"),))
        await store.write(import_unit([(account, 1000)]))
        settings = NoticeSettings(
            system_name="pbx1", sender="ClickPhone <no-reply@clickphone.example>",
            message_id_domain="clickphone.example", voicemail_root=vm, fax_root=short_tmp / "fax",
            max_attachment_bytes=max_attachment_bytes,
        )  # fmt: skip
        notifier = Notifier(store, FakeClock(), Renderer(), settings, datetime(2026, 1, 1, tzinfo=UTC))
        notifier.remove_delivered = remove
        notifier.remove_enabled = lambda: True
        await notifier.scan_all()
        ((row, _mime),) = await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10)
        await store.write(lambda tx: tx.mark_sent(row.id, "250 2.0.0 Ok"))
        await notifier.scan_all()  # a delivered message still in the box: removed again, if it may be
    finally:
        await store.close()
    attached = max_attachment_bytes > 1024
    assert ("vm_remove" in (row.payload or {})) is attached  # what the sender's on_sent hook removes
    assert [key for key, _ in removed] == ([f"vm:pbx1:100@default:{MSG_ID}"] if attached else [])
