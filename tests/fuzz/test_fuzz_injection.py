"""The caller-ID injection corpus end to end: hostile names in AMI events → the real daemon → a
real mail at a real SMTP sink, with 0 injected headers and 0 extra recipients.

tests/test_injection.py drives the renderer and ``build_message`` directly with the payload list
(and a hypothesis property); this runs the same payloads, plus a generated corpus, through
everything in between: the recorded missed call from Asterisk 22 is replayed by the fake AMI
server once per name, with the name written the way Asterisk writes it (``ast_escape_quoted``
in the Cdr ``CallerID``, ``ast_escape_c`` in the channel snapshots), the daemon parses, translates,
correlates, decides the missed call, renders and queues it, and the sender delivers it.

Checked per mail: the SMTP envelope has exactly the account's address as recipient; the header
block is exactly the headers the daemon writes, each once, without defects, CR/LF or encoded
words after decoding; one ``To`` address; and no mail is lost or doubled (one per call).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.app import Daemon
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.loader import load_config
from clickphone_agi.domain.accounts import Account
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript, packaged_scenarios
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.fuzz.budget import is_long
from tests.test_injection import HOSTILE_NAMES

pytestmark = pytest.mark.slow

ACCOUNT = "ion.popescu@example.ro"
HEADERS = {
    "from", "to", "subject", "date", "message-id", "auto-submitted", "mime-version", "content-type",
    "x-clickphone-kind",
}  # fmt: skip
_PIECES = [
    "\r\n", "\n", "\r", "\r\nBcc: attacker@evil.example", "\nCc: a@evil.example", "=?UTF-8?Q?=0A?=",
    "=?UTF-8?B?CkJjYzogYUBldmlsLmV4YW1wbGU=?=", "==??", "Bcc: x@evil.example", "To: boss@evil.example",
    "attacker@evil.example, ", '"', '\\"', "\\", "<", ">", "<a@evil.example>", ",", ";", ":", "\x00", "\x1b[31m",
    "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u2066", "\u200b", "\ufeff", "Ștefan", "Ion", " ", "\t",
    "%0d%0a", "&#13;&#10;", "<script>",
]  # fmt: skip


def generated_names(count: int, seed: int = 7) -> list[str]:
    """A reproducible corpus: hostile pieces joined at random, some of them long."""
    rng = random.Random(seed)
    names = []
    for _ in range(count):
        name = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 7)))
        if rng.random() < 0.1:
            name *= rng.randint(20, 200)
        names.append(name)
    return names


def escape_quoted(name: str) -> str:
    """Asterisk's Cdr CallerID name: a backslash before '"', '\\' and every control character."""
    return "".join("\\" + c if c in '"\\' or ord(c) < 32 else c for c in name)


_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", "\\": "\\\\",
              "'": "\\'", '"': '\\"', "?": "\\?"}  # fmt: skip


def escape_c(name: str) -> str:
    """Asterisk's channel-snapshot fields (ast_escape_c)."""
    return "".join(_C_ESCAPES.get(c, c) for c in name)


TEMPLATE = packaged_scenarios()["missed_call"].read_bytes()
_IDS = re.compile(rb"1795882897\.(?=[0-9])")


def variant(index: int, name: str, directory: Path) -> Path:
    """The recorded missed call with fresh ids (a call of its own) and ``name`` as the caller."""
    data = _IDS.sub(f"{1795890000 + index}.".encode(), TEMPLATE)
    data = data.replace(b'"Vasile Ionescu" <0744123456>', f'"{escape_quoted(name)}" <0744123456>'.encode())
    data = data.replace(b"Vasile Ionescu", escape_c(name).encode())
    path = directory / f"missed_{index}.ami"
    path.write_bytes(data)
    return path


@pytest.fixture
async def running(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> AsyncIterator[tuple[Daemon, AmiReplayServer]]:
    """The real daemon, in this process, with the fake Asterisk and the SMTP sink."""
    async with AmiReplayServer("clickphone", "labsecret") as ami:
        (short_tmp / "vm").mkdir()
        (short_tmp / "fax").mkdir()
        cfg = write_config(
            ami_port=ami.port,
            smtp_port=smtp_sink.port,
            ami_enabled=True,
            extra=(
                f"asterisk:\n  system_name: pbx1\n  voicemail_spool: {short_tmp / 'vm'}\n"
                f"  fax_spool: {short_tmp / 'fax'}\n  master_csv: null\n"
                "notifications:\n  inbound_contexts: [lab-inbound]\n  missed_call_grace: 0.2\n  scan_interval: 3600\n"
            ),
        )
        loaded = load_config(cfg)
        conn = db.connect_sync(loaded.config.database.path)
        db.migrate(conn, datetime(2026, 11, 28, tzinfo=UTC))  # go live before the recorded calls
        conn.close()
        store = await SqliteStore.open(loaded.config.database.path, FakeClock())
        store.start()
        account = Account(code="acct1001", name="Ion Popescu", email=ACCOUNT, dids=("40212345679",))
        await store.write(import_unit([(account, 1000)]))
        await store.close()
        d = Daemon(loaded, config_path=cfg, install_signal_handlers=False)
        task = asyncio.create_task(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await ami.wait_for_login(10)
        try:
            yield d, ami
        finally:
            d.request_stop()
            assert await task == 0


def assert_nothing_injected(raw: bytes) -> EmailMessage:
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"\n" not in head.replace(b"\r\n", b""), "bare LF in the header block"
    assert b"\r" not in head.replace(b"\r\n", b""), "bare CR in the header block"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    names = sorted(k.lower() for k in msg)
    assert names == sorted(HEADERS), names
    for name, value in msg.items():
        text = str(value)
        assert "\r" not in text, name
        assert "\n" not in text, name
        assert "=?" not in text, f"{name}: an encoded word survived decoding"
    assert [a.addr_spec for a in msg["To"].addresses] == [ACCOUNT]
    assert not [c for c in str(msg["Subject"]) if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    for part in msg.walk():
        assert not part.defects
    return msg


@pytest.mark.timeout(180)
async def test_hostile_caller_ids_through_the_daemon_inject_no_header_and_no_recipient(
    running: tuple[Daemon, AmiReplayServer], smtp_sink: SmtpSink, short_tmp: Path
) -> None:
    daemon, ami = running
    names = [n for n in HOSTILE_NAMES if n] + generated_names(300 if is_long() else 30)
    for index, name in enumerate(names):
        await ami.play(load_transcript(variant(index, name, short_tmp)))
    await smtp_sink.wait_for(len(names), timeout=120)
    await asyncio.sleep(0.5)  # a duplicate or a stray mail would arrive by now

    assert len(smtp_sink.messages) == len(names)  # one mail per call: none lost, none doubled
    message_ids, subjects = set(), []
    for received in smtp_sink.messages:
        assert received.rcpt_tos == (ACCOUNT,)  # the envelope: no extra recipient
        msg = assert_nothing_injected(received.data)
        assert msg["X-ClickPhone-Kind"] == "missed_call"
        message_ids.add(str(msg["Message-ID"]))
        subjects.append(str(msg["Subject"]))
    assert len(message_ids) == len(names)
    # the hostile text did arrive, as harmless text inside the one Subject header
    assert sum("Bcc: " in s for s in subjects) >= 5
    status = await daemon._cmd_status({})
    assert status["translate_errors"] == 0
    assert status["notices"]["errors"] == 0
