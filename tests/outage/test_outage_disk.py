"""The disk fills up under the database: a real tmpfs, filled to the last byte, then freed.

What an operator must be able to count on: while SQLite refuses every write, a mail the relay
accepted is not sent again, and once space returns it is marked sent.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from clickphone_agi.adapters.smtp import OutboxSender
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.outbox import OutboxMessage, OutboxStatus
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.full_disk import FullDisk, mounted
from tests.test_privacy import ION

TZ = ZoneInfo("Europe/Bucharest")
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 14, 0, tzinfo=UTC)


async def _truncate_wal(store: db.SqliteStore) -> None:
    """Checkpoint and truncate the WAL, so that the next write must grow it (see tests/full_disk.py)."""
    busy, _, _ = await db._call(store._writer, lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
    assert busy == 0


@pytest.fixture
async def disk(short_tmp: Path) -> AsyncIterator[FullDisk]:
    with mounted(short_tmp / "disk") as d:
        yield d


@pytest.mark.timeout(60)
async def test_a_mail_delivered_while_the_disk_is_full_goes_once_and_is_marked_sent_when_space_returns(
    disk: FullDisk, short_tmp: Path
) -> None:
    clock = FakeClock(NOW)
    store = await db.SqliteStore.open(disk.path / "mail.db", clock)
    store.start()
    sink = SmtpSink(short_tmp / "mail")
    await sink.start()
    cfg = SmtpConfig(host="127.0.0.1", port=sink.port, timeout=5, max_concurrency=2, message_id_domain="example.ro")
    sender = OutboxSender(store, clock, config=lambda: cfg, password=lambda: None)
    store.on_outbox = sender.wake
    stop = asyncio.Event()
    message = OutboxMessage.build(
        key="disk:1", kind="test", recipient=ION.email, account=ION.code, now=clock.now(),
        mime=b"From: ClickPhone <no-reply@example.ro>\r\nTo: ion.popescu@example.ro\r\nSubject: x\r\n\r\nbody\r\n",
        lifetime=timedelta(days=2),
    )  # fmt: skip
    await store.write(lambda tx: tx.enqueue(message))
    await _truncate_wal(store)
    disk.fill()
    task = asyncio.create_task(sender.run(stop))

    async def status() -> dict[str, Any]:
        return dict((await sender.metrics())["sender"])

    try:
        with capture_logs() as logs:
            await sink.wait_for(1)
            async with asyncio.timeout(10):
                while (await status())["sent_not_marked"] != 1:
                    await asyncio.sleep(0.01)
            # the hold doubles: 0.5, 1, 2, 4, 8 s; each try of the mark fails and sends nothing
            for _ in range(5):
                await clock.advance(8)
                await asyncio.sleep(0.05)
            assert len(sink.messages) == 1
            assert (await status())["storage_held"] is True
            assert [r.status for r in await store.outbox_rows(10)] == [OutboxStatus.PENDING]

            disk.free()
            await clock.advance(30)
            async with asyncio.timeout(10):
                while (await store.outbox_rows(10))[0].status is not OutboxStatus.SENT:
                    await asyncio.sleep(0.01)
            await clock.advance(3600)
            await asyncio.sleep(0.1)
        assert len(sink.messages) == 1  # delivered once in all
        assert (await status())["storage_held"] is False
        events = [e["event"] for e in logs]
        assert events.count("mail.storage_unavailable") == 1
        assert events.count("mail.marked_sent_late") == 1
        assert "mail.attempt_crashed" not in events
        assert "mail.attempt_failed" not in events
        assert sender.sent == 1
        assert sender.marks_committed_late == 1
    finally:
        stop.set()
        sender.wake()
        await asyncio.wait_for(task, 10)
        await sink.close()
        if disk.filler.exists():
            disk.free()
        await store.close()


def test_only_the_databases_own_refusals_count_as_unavailable() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorcode = 10 | (3 << 8)  # type: ignore[attr-defined]  # SQLITE_IOERR_WRITE
    syntax = sqlite3.OperationalError("near 'x': syntax error")
    syntax.sqlite_errorcode = 1  # type: ignore[attr-defined]
    assert db.is_unavailable(full)
    assert db.is_unavailable(ioerr)
    assert not db.is_unavailable(syntax)
    assert not db.is_unavailable(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not db.is_unavailable(ValueError("a unit's own bug"))
    assert db.is_unavailable(db.DatabaseUnavailable("commit failed"))
