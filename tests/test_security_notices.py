"""PBX-side security events become notices (never carrying the secret); money UserEvents are refused."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

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
                        ("Account", "acct1001"), ("RequestId", "ivr-42"), ("Number", "+40212345679"), ("Pin", "4711"),
                    )
                    + _frame(
                        ("Event", "VoicemailPasswordChange"), ("Privilege", "call,all"), ("Context", "default"),
                        ("Mailbox", "100"), ("NewPassword", "s3cr3t-9876"),
                    )
                    + _frame(
                        ("Event", "UserEvent"), ("Privilege", "user,all"), ("UserEvent", "ClickPhoneTopup"),
                        ("Account", "acct1001"), ("Amount", "1000.00"),
                    )
                )  # fmt: skip
                await smtp_sink.wait_for(3, timeout=20)
            status = await daemon._cmd_status({})
        finally:
            await anext(gen, None)
    mails = [email.message_from_bytes(m.data, policy=email.policy.default) for m in smtp_sink.messages]
    kinds = sorted(str(m["X-ClickPhone-Kind"]) for m in mails)
    assert kinds == ["password_changed", "pin_created", "voicemail"]
    for m in smtp_sink.messages:
        assert b"4711" not in m.data  # the PIN itself is never mailed
        assert b"s3cr3t-9876" not in m.data
    (pwd,) = [m for m in mails if m["X-ClickPhone-Kind"] == "password_changed"]
    assert pwd["To"] == "ion.popescu@example.ro"
    refused = [e for e in logs if e["event"] == "security.money_user_event_refused"]
    assert refused
    assert refused[0]["user_event"] == "ClickPhoneTopup"
    assert all("s3cr3t-9876" not in repr(e) for e in logs)
    assert status["money"] is None or status["money"]["charged"] == 0
