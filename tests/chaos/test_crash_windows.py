"""Single crash windows, each a regression the crash test found, replayed alone and quickly."""

from __future__ import annotations

import contextlib
import email
import email.policy
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clickphone_agi import faults
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import SystemClock
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.smtp_sink import SmtpSink
from clickphone_agi.sim.traffic import AsteriskFiles, CallFactory, load_templates
from tests.daemon_harness import DaemonProcess

pytestmark = pytest.mark.slow
ZONE = ZoneInfo("Europe/Bucharest")
GO_LIVE = datetime(2026, 11, 27, tzinfo=UTC)


async def test_missed_call_undecided_when_the_master_csv_cursor_moved_is_mailed_after_a_kill(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """A missed call is decided in memory after its grace, long after its CDRs committed and the
    Master.csv cursor moved past them. SIGKILL in between used to lose the notice for good (the
    cursor was past the rows, AMI never resends); the saved replay position now brings it back."""
    files = AsteriskFiles(short_tmp / "cdr" / "Master.csv", short_tmp / "vm", short_tmp / "fax")
    call = CallFactory(load_templates(), zone=ZONE).call(0, "missed_call", "acct1001", datetime(2026, 12, 1, 9, 0))
    for records, _frames in call.segments():  # the call ended while nothing listened on AMI
        files.append_csv(records)
    files.close()
    config = write_config(
        smtp_port=smtp_sink.port,
        extra=f"""
asterisk:
  system_name: pbx1
  master_csv: {files.master_csv}
  voicemail_spool: {files.voicemail_root}
  fax_spool: {files.fax_root}
notifications:
  inbound_contexts: [lab-inbound]
  missed_call_grace: 0.5
  scan_interval: 1
""",
    )
    db_path = short_tmp / "db" / "test.db"
    conn = db.connect_sync(db_path)
    db.migrate(conn, GO_LIVE, db_path)
    conn.close()
    store = await SqliteStore.open(db_path, SystemClock())
    store.start()
    await store.write(import_unit([(Account(code="acct1001", name="Ion Popescu", email="ion@example.ro"), 1000)]))
    await store.close()

    first = DaemonProcess(config, env={faults.ENV_VAR: "reconcile.cursor_saved:1"})
    await first.start()
    assert await first.wait(30) == -9  # killed right after the pass that read the call saved its cursor
    assert any(e.get("event") == "fault.crash_point" for e in first.lines)
    with contextlib.closing(db.connect_sync(db_path, readonly=True)) as ro:
        assert ro.execute("SELECT COUNT(*) FROM cdrs").fetchone()[0] == len(call.cdrs)  # committed
        assert ro.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0  # not decided yet

    second = DaemonProcess(config)
    await second.start()
    try:
        await smtp_sink.wait_for(1, timeout=30)
        await second.wait_log(lambda e: e.get("event") == "reconcile.replaying")
    finally:
        await second.kill()
    (mail,) = smtp_sink.messages
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert parsed["X-ClickPhone-Kind"] == "missed_call"
    assert parsed["Message-ID"] == message_id(f"missed:pbx1:{call.linked_id}", "clickphone.example")
    assert mail.rcpt_tos == ("ion@example.ro",)
