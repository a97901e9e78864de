"""Building MIME messages safely: addresses via ``email.headerregistry``, never f-strings."""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr


def parse_address(text: str) -> Address:
    """A single bare or display-name address; raises ValueError for anything header-unsafe."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text) or "=?" in text:
        raise ValueError("address contains control characters or encoded words")
    name, addr = parseaddr(text)
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or "," in text.replace(name, "", 1):
        raise ValueError(f"not a single e-mail address: {text!r}")
    return Address(display_name=name, username=local, domain=domain)


def build_test_mail(*, sender: str, to: str, message_id: str, now: datetime) -> bytes:
    """The operator's 'does mail reach people?' message (``clickphone-agi mail-test``)."""
    msg = EmailMessage()
    msg["From"] = parse_address(sender)
    msg["To"] = parse_address(to)
    msg["Subject"] = "clickphone-agi: mesaj de test / test message"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        "Acesta este un mesaj de test trimis de clickphone-agi.\nThis is a test message sent by clickphone-agi.\n"
    )
    return msg.as_bytes()
