"""PBX-side security events become notices (never carrying the secret); money UserEvents are refused."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from clickphone_agi.app import Daemon
from clickphone_agi.sim.ami_server import AmiReplayServer
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.test_notices import _daemon

pytestmark = pytest.mark.slow


def _frame(*headers: tuple[str, str]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n"


async def test_pin_and_voicemail_password_and_refused_money(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        gen = _daemon(write_config, short_tmp / "spool", ami.port, smtp_sink.port, "en")
        daemon = await anext(gen)
        try:
            await ami.wait_for_login(10)
            await smtp_sink.wait_for(1, timeout=20)  # the start-up scan mails the spool's voicemail
            with capture_logs() as logs:
                await ami.send_raw(
                    _frame(
                        ("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "ClickPhonePinCreated"),
                        ("Account", "acct1001"), ("RequestId", "ivr-42"), ("Number", "+40212345679"),
                        ("Pin", "47118935"),
                    )
                    + _frame(
                        ("Event", "VoicemailPasswordChange"), ("Privilege", "call,all"), ("Context", "default"),
                        ("Mailbox", "100"), ("NewPassword", "s3cr3t-9876"),
                    )
                    + _frame(
                        ("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "ClickPhoneTopup"),
                        ("Account", "acct1001"), ("Amount", "1000.00"),
                    )
                    + _frame(
                        ("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "ClickPhonePayment"),
                        ("Account", "acct1001"), ("Amount", "50.00"), ("Reference", "INV-77"),
                    )
                    # the same box changes its password again: a second notice (the event has no id)
                    + _frame(
                        ("Event", "VoicemailPasswordChange"), ("Privilege", "call,all"), ("Context", "default"),
                        ("Mailbox", "100"), ("NewPassword", "n3w-s3cr3t-5555"),
                    )
                )  # fmt: skip
                await smtp_sink.wait_for(4, timeout=20)
                await _settled(daemon)
            status = await daemon._cmd_status({})
            await daemon._running().store.checkpoint()
            raw = _raw(daemon.config.database.path)
        finally:
            await anext(gen, None)
    mails = [email.message_from_bytes(m.data, policy=email.policy.default) for m in smtp_sink.messages]
    kinds = sorted(str(m["X-ClickPhone-Kind"]) for m in mails)
    assert kinds == ["password_changed", "password_changed", "pin_created", "voicemail"]
    # a PIN of 8 digits: 4 could occur by chance in a timestamp's microseconds or a MIME boundary
    secrets = (b"47118935", b"s3cr3t-9876", b"n3w-s3cr3t-5555")
    for m in smtp_sink.messages:
        assert not [s for s in secrets if s in m.data]  # the PIN and the passwords are never mailed...
    assert not [s for s in secrets if s in raw]  # ...nor stored (database file and its -wal)
    assert b"INV-77" not in raw  # the refused payment left nothing either
    pwd = [m for m in mails if m["X-ClickPhone-Kind"] == "password_changed"]
    assert {m["To"] for m in pwd} == {"ion.popescu@example.ro"}
    refused = [e for e in logs if e["event"] == "security.money_user_event_refused"]
    assert [e["user_event"] for e in refused] == ["ClickPhoneTopup", "ClickPhonePayment"]
    assert all(e["log_level"] == "error" for e in refused)
    assert not [e for e in logs if any(s.decode() in repr(e) for s in secrets)]  # ...nor logged
    assert status["money"] is None or status["money"]["charged"] == 0


async def test_two_alike_password_changes_without_an_id_get_two_notices_a_retried_request_one(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """Regression: a ClickPhonePasswordChanged without RequestId or ActionID (a dialplan or a sender
    that sets neither) was keyed by its content alone, so the second change of the same user
    shared the first one's notice key and its notice was dropped. A RequestId sent twice is the
    sender retrying one change: one notice."""
    changed = _frame(
        ("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "ClickPhonePasswordChanged"),
        ("Account", "acct1001"), ("Username", "ion.popescu"), ("ChangedBy", "ivr"),
    )  # fmt: skip
    retried = _frame(
        ("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "ClickPhonePinChanged"),
        ("Account", "acct1001"), ("RequestId", "ivr-43"), ("Number", "+40212345679"),
    )  # fmt: skip
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        gen = _daemon(write_config, short_tmp / "spool", ami.port, smtp_sink.port, "en")
        daemon = await anext(gen)
        try:
            await ami.wait_for_login(10)
            await smtp_sink.wait_for(1, timeout=20)  # the start-up scan mails the spool's voicemail
            await ami.send_raw(changed + retried)
            await smtp_sink.wait_for(3, timeout=20)
            await ami.send_raw(changed + retried)  # later: the user changes it again; the IVR retries
            await smtp_sink.wait_for(4, timeout=20)
            await asyncio.sleep(0.3)  # anything extra would arrive now
            await _settled(daemon)
        finally:
            await anext(gen, None)
    kinds = sorted(
        str(email.message_from_bytes(m.data, policy=email.policy.default)["X-ClickPhone-Kind"])
        for m in smtp_sink.messages
    )
    assert kinds == ["password_changed", "password_changed", "pin_created", "voicemail"]


async def _settled(daemon: Daemon) -> None:
    """Every mail that is going to be sent was sent (the sink saw the 250s before the rows were updated)."""
    async with asyncio.timeout(20):
        while (await daemon._cmd_status({}))["mail"]["pending"]:
            await asyncio.sleep(0.05)


def _raw(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
