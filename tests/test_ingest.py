"""Ingest end to end: fake Asterisk → our AMI client → bounded queue → translator → effects."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast
from zoneinfo import ZoneInfo

import pytest
from ami_fixtures import running_client, wait_for
from structlog.testing import capture_logs

from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.ami_translate import (
    HANDLED_EVENTS,
    TranslateContext,
    TranslateError,
    cdr_clock_skew,
    translate,
)
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import (
    AccountEvent,
    AsteriskLifecycle,
    CallEnded,
    DialOutcome,
    Disposition,
    DomainEvent,
    FaxReceived,
    FaxResult,
    VoicemailWaiting,
)
from clickphone_agi.services import ingest
from clickphone_agi.services.ingest import EventProcessor, EventQueue, IngestWorker
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript, packaged_scenarios

TZ = ZoneInfo("Europe/Bucharest")


class RecordingProcessor(EventProcessor):
    """The real processor (real SQLite), also keeping every domain event it was handed."""

    def __init__(self, store: SqliteStore) -> None:
        super().__init__(store, datetime(2026, 1, 1, tzinfo=UTC))
        self.seen: list[DomainEvent] = []

    def observe(self, event: DomainEvent) -> None:
        self.seen.append(event)


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


# --- queue and worker, without sockets ----------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "ami"


class ListProcessor:
    """Stands in for EventProcessor: keeps every domain event in the order handle() started."""

    def __init__(self) -> None:
        self.seen: list[DomainEvent] = []

    async def handle(self, event: DomainEvent) -> bool:
        self.seen.append(event)
        await asyncio.sleep(0)  # like a real store write, it suspends
        return True

    async def handle_many(self, events: list[DomainEvent]) -> list[bool | Exception]:
        self.seen.extend(events)  # started together, in order, as EventProcessor.handle_many does
        await asyncio.sleep(0)
        return [True] * len(events)


def _all_event_messages() -> list[AmiMessage]:
    out: list[AmiMessage] = []
    for path in sorted(FIXTURES.glob("*.ami")):
        out += [m for m in FrameParser().feed(path.read_bytes()) if isinstance(m, AmiMessage)]
    return out


def _straightforward(messages: list[AmiMessage], ctx: TranslateContext) -> tuple[list[DomainEvent], int]:
    """What the worker did before its fast paths: every event's headers parsed, observed and
    translated, one after the other; lifecycle events not handed on."""
    correlator = LinkedIdCorrelator()
    out: list[DomainEvent] = []
    booted = 0
    for message in messages:
        if message.event is None:
            continue
        headers = list(message.headers)
        correlator.observe(headers)
        try:
            event = translate(headers, ctx, correlator.linked_id_for)
        except TranslateError:
            continue
        if isinstance(event, AsteriskLifecycle):
            booted += event.state == "booted"
        elif event is not None:
            out.append(event)
    return out, booted


async def test_worker_hands_on_exactly_what_the_straightforward_path_gives_in_order() -> None:
    ctx = TranslateContext("pbx1", TZ)
    messages = _all_event_messages() * 3
    expected, booted = _straightforward(_all_event_messages() * 3, ctx)
    processor = ListProcessor()
    connected: list[int] = []
    queue = EventQueue(100_000, on_overflow=lambda: None)
    worker = IngestWorker(
        queue, cast(EventProcessor, processor), ctx, on_connected=lambda: connected.append(1), max_in_flight=8
    )
    for message in messages:
        queue.offer(message)
    queue.close()
    await worker.run()
    assert processor.seen == expected  # identical events, started in stream order
    assert len(expected) > 100
    # the same Linkedids with the correlator ending channels at their Hangup or Cdr (the
    # straightforward path never forgets), and it keeps nothing once every call has ended
    assert sum(isinstance(e, CallEnded) and e.linked_id is not None for e in expected) > 30
    assert worker.correlation() == {"live": 0, "ended": worker.correlation()["ended"], "evicted": 0, "forgotten": 0}
    assert worker.correlation()["ended"] > 20  # every channel of the recordings
    assert len(connected) == booted > 0  # FullyBooted still reports the (re)connect
    assert sum(worker.events_by_type.values()) == sum(m.is_event for m in messages)
    assert worker.effect_errors == 0
    # the frames the worker does not act on were never decoded beyond their Event name
    skipped = [m for m in messages if m.event not in HANDLED_EVENTS and m.frame is not None]
    assert skipped
    assert all(m._headers is None for m in skipped if m.event is not None)


async def test_worker_yields_to_the_reader_while_working_off_a_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "_SLICE", 0.0)  # every message uses up the slice
    queue = EventQueue(1_000, on_overflow=lambda: None)
    worker = IngestWorker(queue, cast(EventProcessor, ListProcessor()), TranslateContext("pbx1", TZ))
    frame = b"Event: Newexten\r\nUniqueid: 1.1\r\nLinkedid: 1.0\r\n\r\n"
    for message in FrameParser(expect_banner=False).feed(frame * 50):
        assert isinstance(message, AmiMessage)
        queue.offer(message)
    progress: list[int] = []

    async def reader() -> None:
        for _ in range(10):
            progress.append(sum(worker.events_by_type.values()))
            await asyncio.sleep(0)
        queue.close()

    await asyncio.gather(worker.run(), reader())
    assert sum(worker.events_by_type.values()) == 50
    assert progress[0] < progress[-1] < 50  # the "reader" ran while the backlog was worked off


async def test_worker_counts_untranslatable_frames_and_effect_errors_and_goes_on() -> None:
    class Failing(ListProcessor):
        async def handle_many(self, events: list[DomainEvent]) -> list[bool | Exception]:
            await super().handle_many(events)
            raise RuntimeError("store down")

    queue = EventQueue(100, on_overflow=lambda: None)
    processor = Failing()
    worker = IngestWorker(queue, cast(EventProcessor, processor), TranslateContext("pbx1", TZ))
    raw = (
        b"Event: Cdr\r\nUniqueID: 1.1\r\nBillableSeconds: abc\r\n\r\n"
        b"Event: MessageWaiting\r\nMailbox: 100@default\r\nNew: 1\r\nOld: 0\r\n\r\n"
    )
    for message in FrameParser(expect_banner=False).feed(raw):
        assert isinstance(message, AmiMessage)
        queue.offer(message)
    queue.close()
    with capture_logs() as logs:
        await worker.run()
    assert worker.translate_errors == 1
    assert worker.effect_errors == 1
    assert [type(e) for e in processor.seen] == [VoicemailWaiting]
    assert {e["event"] for e in logs} >= {"ami.untranslatable", "ingest.effect_failed"}


def test_offer_never_awaits_and_the_queue_stays_bounded() -> None:
    overflows: list[int] = []
    queue = EventQueue(3, on_overflow=lambda: overflows.append(1))
    message = AmiMessage(headers=(("Event", "Cdr"),))
    # no event loop is running here: offer() is plain synchronous code
    for _ in range(5):
        queue.offer(message)  # returns at once, whether queued or dropped
    assert (queue.depth, queue.dropped, len(overflows), queue.high_water) == (3, 2, 2, 3)
    assert queue.get_nowait() is message
    queue.offer(message)
    assert queue.depth == 3
    assert queue.dropped == 2


async def test_get_waits_for_an_offer_and_returns_none_once_closed() -> None:
    queue = EventQueue(10, on_overflow=lambda: None)
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    first = AmiMessage(headers=(("Event", "A"),))
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.offer(first)
    assert await waiting is first
    # a cancelled get() loses nothing
    cancelled = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    second = AmiMessage(headers=(("Event", "B"),))
    queue.offer(second)
    queue.close()
    assert queue.depth == 2  # the end marker counts, as before
    assert await queue.get() is second
    assert await queue.get() is None


def test_cdr_clock_skew_is_a_zone_sized_gap_between_a_cdrs_end_and_its_arrival() -> None:
    end = datetime(2026, 11, 28, 14, 21, 50, tzinfo=UTC)
    assert cdr_clock_skew(end, end + timedelta(seconds=3)) is None  # posted at the hangup
    assert cdr_clock_skew(end, end + timedelta(minutes=29)) is None  # cdr.conf batch, a backlog
    assert cdr_clock_skew(end, end + timedelta(hours=2)) == timedelta(hours=2)  # Asterisk on UTC
    assert cdr_clock_skew(end, end - timedelta(hours=5, minutes=30)) == -timedelta(hours=5, minutes=30)
    assert cdr_clock_skew(end, end + timedelta(days=2)) is None  # history replayed, not a zone


async def test_worker_says_once_an_hour_when_cdr_times_are_read_in_the_wrong_zone() -> None:
    """Asterisk in a container on UTC, the daemon on Europe/Bucharest (seen: tests/asterisk_live):
    the recorded Cdrs end 16:21 wall time; arriving at 16:21Z they were UTC, not Bucharest."""
    cdrs = [
        f.raw for f in load_transcript(packaged_scenarios()["answered_call"]).frames if f.raw.startswith(b"Event: Cdr")
    ]
    assert len(cdrs) >= 2
    arrival = [datetime(2026, 11, 28, 16, 21, 52, tzinfo=UTC)]

    async def feed(frames: list[bytes]) -> IngestWorker:
        queue = EventQueue(100, on_overflow=lambda: None)
        worker = IngestWorker(
            queue, cast(EventProcessor, ListProcessor()), TranslateContext("pbx1", TZ), now=lambda: arrival[0]
        )
        for message in FrameParser(expect_banner=False).feed(b"".join(frames)):
            assert isinstance(message, AmiMessage)
            queue.offer(message)
        queue.close()
        await worker.run()
        return worker

    with capture_logs() as logs:
        worker = await feed(cdrs)
    skews = [e for e in logs if e["event"] == "ami.cdr_clock_skew"]
    assert len(skews) == 1  # once for all the Cdrs of the hour
    assert skews[0]["skew_hours"] == 2.0
    assert skews[0]["timezone"] == "Europe/Bucharest"
    assert worker.cdr_clock_skew is not None
    assert 7150 < worker.cdr_clock_skew < 7250

    arrival[0] = datetime(2026, 11, 28, 14, 21, 52, tzinfo=UTC)  # the zones agree
    with capture_logs() as logs:
        worker = await feed(cdrs)
    assert worker.cdr_clock_skew is None
    assert not [e for e in logs if e["event"] == "ami.cdr_clock_skew"]
    arrival[0] = datetime(2026, 12, 5, tzinfo=UTC)  # a week-old recording replayed: not a zone
    with capture_logs() as logs:
        worker = await feed(cdrs)
    assert worker.cdr_clock_skew is None
    assert not [e for e in logs if e["event"] == "ami.cdr_clock_skew"]
