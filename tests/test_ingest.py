"""Ingest end to end: fake Asterisk → our AMI client → bounded queue → translator → effects."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ami_fixtures import running_client, wait_for
from structlog.testing import capture_logs

from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.ami_translate import TranslateContext
from clickphone_agi.domain.events import (
    AccountEvent,
    CallEnded,
    DialOutcome,
    Disposition,
    DomainEvent,
    FaxReceived,
    FaxResult,
    VoicemailWaiting,
)
from clickphone_agi.services.ingest import EventProcessor, EventQueue, IngestWorker
from clickphone_agi.sim.ami_server import AmiReplayServer, packaged_scenarios

TZ = ZoneInfo("Europe/Bucharest")


class RecordingProcessor(EventProcessor):
    """The real processor (real SQLite), also keeping every domain event it was handed."""

    def __init__(self, store: SqliteStore) -> None:
        super().__init__(store, datetime(2026, 1, 1, tzinfo=UTC))
        self.seen: list[DomainEvent] = []

    async def handle(self, event: DomainEvent) -> bool:
        self.seen.append(event)
        return await super().handle(event)


async def _replay(server: AmiReplayServer, store: SqliteStore, names: list[str]) -> RecordingProcessor:
    processor = RecordingProcessor(store)
    queue = EventQueue(10_000, on_overflow=lambda: None)
    worker = IngestWorker(queue, processor, TranslateContext("pbx1", TZ))
    worker_task = asyncio.create_task(worker.run())
    scenarios = packaged_scenarios()
    async with running_client(server, on_message=queue.offer) as harness:
        await harness.connected()
        sent = 0
        for name in names:
            sent += await server.play(scenarios[name])
        await wait_for(lambda: sum(worker.events_by_type.values()) >= sent + 1)  # + FullyBooted
    queue.close()
    await worker_task
    assert server.slow_client_drops == 0  # the fake Asterisk drops slow readers; we never are one
    return processor


@pytest.fixture
async def store(tmp_path: Path) -> SqliteStore:
    s = await SqliteStore.open(tmp_path / "t.db", FakeClock())
    s.start()
    yield s  # type: ignore[misc]
    await s.close()


async def test_answered_call_yields_one_billable_call_ended(ami_server: AmiReplayServer, store: SqliteStore) -> None:
    proc = await _replay(ami_server, store, ["answered_call"])
    calls = [e for e in proc.seen if isinstance(e, CallEnded)]
    assert len(calls) == 3  # one CDR per Local channel half
    (dial,) = [c for c in calls if c.last_application == "Dial"]
    assert dial.account == "acct1001"
    assert dial.destination == "0040212345678"
    assert dial.billable_seconds == 3
    assert dial.disposition is Disposition.ANSWERED
    assert dial.caller_id_name == "Ion Popescu"
    assert dial.linked_id == "1795882891.0"
    assert dial.start == datetime(2026, 11, 28, 16, 21, 31, tzinfo=TZ)
    assert [c["key"] for c in await store.calls()] == sorted(c["key"] for c in await store.calls())
    assert len(await store.calls("acct1001")) == 3


async def test_every_scenario_yields_its_domain_events(ami_server: AmiReplayServer, store: SqliteStore) -> None:
    names = ["missed_call", "busy_call", "voicemail", "fax", "fax_failed", "user_event", "long_call", "full_noise"]
    proc = await _replay(ami_server, store, names)
    dial_cdrs = {
        (c.destination, c.disposition, c.billable_seconds)
        for c in proc.seen
        if isinstance(c, CallEnded) and c.last_application == "Dial"
    }
    assert ("0040216500000", Disposition.ANSWERED, 65) in dial_cdrs  # long call
    assert ("0040219999999", Disposition.BUSY, 0) in dial_cdrs
    assert ("100", Disposition.NO_ANSWER, 0) in dial_cdrs  # missed and voicemail
    assert any(isinstance(e, DialOutcome) and e.dial_status == "NOANSWER" for e in proc.seen)
    (mwi,) = [e for e in proc.seen if isinstance(e, VoicemailWaiting)]
    assert (mwi.mailbox, mwi.context, mwi.new) == ("100", "default", 1)
    faxes = [e for e in proc.seen if isinstance(e, FaxReceived)]
    assert [(f.pages, f.resolution_dpi) for f in faxes] == [(2, (204, 196)), (0, (204, 196))]
    results = sorted((e.direction, e.status) for e in proc.seen if isinstance(e, FaxResult))
    assert ("receive", "SUCCESS") in results
    assert ("receive", "FAILED") in results
    (acct,) = [e for e in proc.seen if isinstance(e, AccountEvent)]
    assert (acct.name, acct.account) == ("PasswordChanged", "acct1001")
    assert proc.applied["cdr"] == 4 + 4 + 4 + 2 + 2 + 3 + 3  # every CDR of every scenario, once


async def test_replaying_everything_twice_has_no_second_effect(ami_server: AmiReplayServer, store: SqliteStore) -> None:
    first = await _replay(ami_server, store, ["answered_call", "voicemail", "fax"])
    second = await _replay(ami_server, store, ["answered_call", "voicemail", "fax"])
    assert sum(first.applied.values()) > 0
    assert sum(second.applied.values()) == 0
    assert sum(second.duplicates.values()) == sum(first.applied.values())


def test_full_queue_drops_loudly_and_asks_for_reconciliation() -> None:
    overflows: list[int] = []
    queue = EventQueue(100, on_overflow=lambda: overflows.append(1))
    message = AmiMessage(headers=(("Event", "Cdr"),))
    with capture_logs() as logs:
        for _ in range(150):
            queue.offer(message)
    assert queue.depth == 100
    assert queue.dropped == 50
    assert len(overflows) == 50
    full = [entry for entry in logs if entry["event"] == "ami.queue_full"]
    assert len(full) == 1  # loud, but rate-limited
    assert full[0]["log_level"] == "error"
