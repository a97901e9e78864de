"""The operator's mail verbs as subprocesses: ``outbox list|show|retry|purge`` and ``bounce`` (the
MTA pipe), through the running daemon or, when it is down, as the writer under the lock."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from clickphone_agi.adapters.storage.sqlite import SqliteStore, WriterLock
from clickphone_agi.cli import EX_DATAERR, EX_TEMPFAIL, EX_USAGE
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.bounce import verp_address
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.ports import WriteTx
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.conftest import write_secret
from tests.daemon_harness import DaemonProcess, NotifySocket, run_cli

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "dsn"
TO = "ion.popescu@example.ro"
MIME = (
    b"From: ClickPhone <no-reply@clickphone.example>\r\nTo: ion.popescu@example.ro\r\n"
    b"Subject: Mesaj vocal nou\r\nMessage-ID: <abc@clickphone.example>\r\n"
    b"Auto-Submitted: auto-generated\r\n\r\nAveti un mesaj vocal nou.\r\n"
)


async def run_cli_input(*args: str, data: bytes, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clickphone_agi",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
    )
    out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def with_smtp(cfg: Path, **settings: Any) -> Path:
    """Add keys to the ``smtp:`` section the ``write_config`` fixture wrote."""
    lines = "".join(f"  {k}: {v}\n" for k, v in settings.items())
    cfg.write_text(cfg.read_text().replace("smtp:\n", "smtp:\n" + lines, 1))
    return cfg


def db_path(cfg: Path) -> Path:
    return cfg.parent / "db" / "test.db"


def rows(cfg: Path) -> dict[int, dict[str, Any]]:
    conn = sqlite3.connect(db_path(cfg))
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY id")}
    finally:
        conn.close()


async def seed(cfg: Path) -> dict[str, int]:
    """Rows in every state: most 40 days old, one recent."""
    old = FakeClock(datetime.now(UTC) - timedelta(days=40))
    store = await SqliteStore.open(db_path(cfg), old)
    store.start()
    ids: dict[str, int] = {}

    def add(name: str, kind: str, to: str, clock: FakeClock) -> Callable[[WriteTx], int]:
        message = OutboxMessage.build(
            key=f"key:{name}",
            kind=kind,
            recipient=to,
            account="acct1001",
            mime=MIME,
            now=clock.now(),
            lifetime=timedelta(days=400),
        )

        def unit(tx: WriteTx) -> int:
            tx.enqueue(message)
            conn = tx._conn  # type: ignore[attr-defined]  # the id the INSERT assigned
            found = conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?", (message.idempotency_key,))
            return int(found.fetchone()[0])

        return unit

    try:
        for name, kind, to in [
            ("sent", "voicemail", TO),
            ("dead", "voicemail", TO),
            ("pending", "fax", TO),
            ("expired", "low_balance", TO),
            ("suppressed", "marketing_offer", "gone@example.net"),
        ]:
            ids[name] = await store.write(add(name, kind, to, old))
        await store.write(lambda tx: tx.mark_sent(ids["sent"], "250 2.0.0 Ok: queued"))
        await store.write(
            lambda tx: tx.mark_failed(ids["dead"], "550 5.7.1 spam", old.now(), dead=True, smtp_reply="550 5.7.1 spam")
        )
        await store.write(lambda tx: tx.mark_expired(ids["expired"]))
        await store.write(lambda tx: tx.count_hard_bounce("gone@example.net", "5.1.1 user unknown", 1))
        await store.write(
            lambda tx: tx.mark_failed(ids["suppressed"], "suppressed: 5.1.1", old.now(), dead=True, count_attempt=False)
        )
    finally:
        await store.close()
    recent = FakeClock(datetime.now(UTC))
    store = await SqliteStore.open(db_path(cfg), recent)
    store.start()
    try:
        ids["recent"] = await store.write(add("recent", "voicemail", TO, recent))
        await store.write(lambda tx: tx.mark_sent(ids["recent"], "250 ok"))
    finally:
        await store.close()
    return ids


async def test_list_show_retry_purge_with_the_daemon_stopped(write_config: Callable[..., Path]) -> None:
    cfg = write_config()
    ids = await seed(cfg)
    c = ("-c", str(cfg))

    code, out, err = await run_cli("outbox", "list", "--status", "dead", *c)
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)] == [ids["suppressed"], ids["dead"]]
    code, out, _ = await run_cli("outbox", "list", "--kind", "voicemail", "--limit", "1", *c)
    assert [r["id"] for r in json.loads(out)] == [ids["recent"]]

    code, out, _ = await run_cli("outbox", "show", str(ids["dead"]), *c)
    shown = json.loads(out)
    assert shown["headers"]["Subject"] == "Mesaj vocal nou"
    assert shown["headers"]["Message-ID"] == "<abc@clickphone.example>"
    assert (shown["status"], shown["attempts"], shown["last_error"], shown["smtp_reply"]) == (
        "dead",
        1,
        "550 5.7.1 spam",
        "550 5.7.1 spam",
    )
    assert "body" not in shown
    code, out, _ = await run_cli("outbox", "show", str(ids["dead"]), "--body", *c)
    assert "Aveti un mesaj vocal nou." in json.loads(out)["body"]
    code, _, err = await run_cli("outbox", "show", "999", *c)
    assert code == EX_DATAERR
    assert "no outbox row 999" in err

    code, _, err = await run_cli("outbox", "retry", *c)
    assert code == EX_USAGE
    code, out, err = await run_cli("outbox", "retry", "--all-dead", *c)
    assert code == 0, err
    result = json.loads(out)
    assert result["retried"] == [ids["dead"]]
    assert "suppressed" in result["skipped"][str(ids["suppressed"])]
    code, out, _ = await run_cli("outbox", "retry", str(ids["sent"]), *c)
    assert "only dead letters" in json.loads(out)["skipped"][str(ids["sent"])]
    now = rows(cfg)
    assert now[ids["dead"]]["status"] == "pending"
    assert now[ids["dead"]]["last_error"].startswith("retried by operator at ")
    assert now[ids["dead"]]["last_error"].endswith("before: 550 5.7.1 spam")  # history kept
    assert now[ids["dead"]]["retried_at"] is not None

    code, out, err = await run_cli("outbox", "purge", "--older-than", "30", "--bodies-only", *c)
    assert code == 0, err
    assert json.loads(out)["purged"] == 3  # sent, expired, suppressed; the retried row is pending again
    after = rows(cfg)
    assert len(after) == 6
    assert after[ids["sent"]]["message"] is None
    assert after[ids["pending"]]["message"] is not None  # pending mail is never purged
    assert after[ids["recent"]]["message"] is not None  # younger than 30 days

    code, out, err = await run_cli("outbox", "purge", "--older-than", "30", "--status", "sent", *c)
    assert json.loads(out)["purged"] == 1
    code, out, err = await run_cli("outbox", "purge", "--older-than", "30", *c)
    assert json.loads(out)["purged"] == 2
    assert sorted(rows(cfg)) == sorted([ids["dead"], ids["pending"], ids["recent"]])


async def test_retry_through_the_daemon_delivers_at_once(
    write_config: Callable[..., Path], smtp_sink: SmtpSink, short_tmp: Path
) -> None:
    cfg = write_config(smtp_port=smtp_sink.port)
    smtp_sink.handler.scripted_replies.append("554 5.7.1 rejected by policy")
    notify = NotifySocket(short_tmp / "notify")
    daemon = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    await daemon.start()
    try:
        await notify.wait_for("READY=1")
        code, _, err = await run_cli("mail-test", TO, "-c", str(cfg))
        assert code == 0, err
        await daemon.wait_log(lambda e: e.get("event") == "mail.dead")
        (row_id,) = rows(cfg)
        code, out, err = await run_cli("outbox", "retry", str(row_id), "-c", str(cfg))
        assert code == 0, err
        assert json.loads(out) == {"retried": [row_id], "skipped": {}, "by": "daemon"}
        await smtp_sink.wait_for(1)
        await daemon.wait_log(lambda e: e.get("event") == "mail.sent")
        code, out, _ = await run_cli("status", "--json", "-c", str(cfg))
        mail = json.loads(out)["mail"]
        assert (mail["sent"], mail["dead"], mail["pending"]) == (1, 0, 0)
        assert mail["by_kind"]["mail_test"]["sent"] == 1
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()
        notify.close()


async def test_bounce_pipe_through_the_daemon_marks_bounced_and_suppresses(
    write_config: Callable[..., Path], smtp_sink: SmtpSink, short_tmp: Path
) -> None:
    cfg = with_smtp(
        write_config(smtp_port=smtp_sink.port), bounce_domain="bounces.clickphone.example", hard_bounce_limit=1
    )
    notify = NotifySocket(short_tmp / "notify")
    daemon = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    await daemon.start()
    try:
        await notify.wait_for("READY=1")
        code, _, err = await run_cli("mail-test", TO, "-c", str(cfg))
        assert code == 0, err
        await smtp_sink.wait_for(1)
        envelope = smtp_sink.messages[0].mail_from
        assert envelope.startswith("bounce+")
        assert envelope.endswith("@bounces.clickphone.example")

        raw = (FIXTURES / "postfix_5.1.1_user_unknown.eml").read_bytes().replace(b"@@VERP@@", envelope.encode())
        code, out, err = await run_cli_input("bounce", "--recipient", envelope, "-c", str(cfg), data=raw)
        assert code == 0, err
        result = json.loads(out)
        assert (result["outcome"], result["verdict"], result["suppressed"], result["by"]) == (
            "bounced",
            "hard",
            True,
            "daemon",
        )
        (row,) = rows(cfg).values()
        assert (row["status"], row["envelope_from"]) == ("bounced", envelope)
        assert row["bounced_at"] is not None

        junk = (FIXTURES / "not_a_dsn_out_of_office.eml").read_bytes().replace(b"@@VERP@@", envelope.encode())
        code, out, _ = await run_cli_input("bounce", "-c", str(cfg), data=junk)
        assert (code, json.loads(out)["outcome"]) == (0, "ignored")
        await daemon.wait_log(lambda e: e.get("event") == "bounce.ignored")  # in the daemon's journal

        code, _, err = await run_cli("mail-test", TO, "-c", str(cfg))  # the address is suppressed now
        assert code == 0, err
        await daemon.wait_log(lambda e: e.get("event") == "mail.suppressed")
        code, out, _ = await run_cli("status", "--json", "-c", str(cfg))
        mail = json.loads(out)["mail"]
        assert (mail["bounced"], mail["suppressed"], mail["suppressed_addresses"]) == (1, 1, 1)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await daemon.kill()
        notify.close()
    assert len(smtp_sink.messages) == 1


async def test_bounce_pipe_without_the_daemon_with_a_key_file(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    key_file = short_tmp / "verp-key"
    write_secret(key_file, "a secret VERP key, long enough\n")
    cfg = with_smtp(write_config(), bounce_domain="bounces.clickphone.example", verp_key_file=key_file)
    ids = await seed(cfg)
    envelope = verp_address(ids["sent"], "key:sent", b"a secret VERP key, long enough", "bounces.clickphone.example")
    raw = (FIXTURES / "postfix_5.1.1_user_unknown.eml").read_bytes().replace(b"@@VERP@@", envelope.encode())
    code, out, err = await run_cli_input("bounce", "-c", str(cfg), data=raw)
    assert code == 0, err
    assert json.loads(out)["outcome"] == "bounced"
    assert rows(cfg)[ids["sent"]]["status"] == "bounced"

    for junk in (
        (FIXTURES / "forged_token.eml").read_bytes(),
        b"\x00\xff" * 1000,
        b"",
        (FIXTURES / "postfix_4.4.1_delayed.eml").read_bytes(),  # no token at all: placeholder left empty
    ):
        code, out, err = await run_cli_input("bounce", "-c", str(cfg), data=junk.replace(b"@@VERP@@", b""))
        assert code == 0, err
        assert json.loads(out)["outcome"] == "ignored"


async def test_bounce_pipe_exits_75_when_the_database_is_busy_or_unreachable(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    cfg = write_config()
    ids = await seed(cfg)
    envelope = verp_address(ids["sent"], "key:sent", b"k" * 32, "bounces.clickphone.example")
    raw = (FIXTURES / "postfix_5.1.1_user_unknown.eml").read_bytes().replace(b"@@VERP@@", envelope.encode())
    with WriterLock(db_path(cfg)):  # another writer (not a daemon with a socket) holds the database
        code, _, err = await run_cli_input("bounce", "-c", str(cfg), data=raw)
    assert code == EX_TEMPFAIL
    assert "the MTA should retry" in err

    blocker = short_tmp / "not-a-directory"
    blocker.write_text("")
    cfg.write_text(cfg.read_text().replace(str(db_path(cfg)), str(blocker / "test.db")))
    code, _, err = await run_cli_input("bounce", "-c", str(cfg), data=raw)
    assert code == EX_TEMPFAIL, err
