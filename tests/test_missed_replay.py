"""Missed calls survive a SIGKILL: the Master.csv replay position (a restart re-reads from the
oldest read that fed a call whose decision was still pending) and the notifier's own record of
calls decided missed whose mail is not committed yet."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser
from clickphone_agi.adapters.cdr_csv import CsvBatch, CsvPosition, MasterCsvTailer
from clickphone_agi.adapters.storage.sqlite import SqliteStore, StorageError
from clickphone_agi.app import NotifyingProcessor
from clickphone_agi.clock import FakeClock
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.ami_translate import TranslateContext, translate
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import DomainEvent
from clickphone_agi.domain.missed import MissedCallTracker
from clickphone_agi.notices.render import Renderer
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.services.ingest import EventProcessor
from clickphone_agi.services.notices import NoticeSettings, Notifier
from clickphone_agi.services.reconcile import CURSOR_KEY, REPLAY_KEY, CdrReconciler
from clickphone_agi.sim.master_csv import csv_record
from clickphone_agi.sim.traffic import AsteriskFiles, CallFactory, load_templates

ZONE = ZoneInfo("Europe/Bucharest")
FIXTURES = Path(__file__).parent / "fixtures" / "ami"


@dataclass(frozen=True)
class Row:
    """What the reconciler reads of a Master.csv row here: its call's Linkedid."""

    linked_id: str | None


class Tailer:
    """Master.csv as a list of rows, 100 bytes each: read_new returns every row from the position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []
        self.asked: list[CsvPosition | None] = []

    def read_new(self, position: CsvPosition | None) -> CsvBatch:
        self.asked.append(position)
        start = position.offset // 100 if position else 0
        return CsvBatch(self.rows[start:], [], CsvPosition(7, 100 * len(self.rows)), True)  # type: ignore[arg-type]


class Processor:
    async def handle(self, _event: Any) -> bool:
        return False  # every row's effects were committed before: only the replay matters here


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "db.sqlite", FakeClock())
    s.start()
    yield s
    await s.close()


async def test_replay_position_follows_the_oldest_read_with_an_undecided_call(
    store: SqliteStore, tmp_path: Path
) -> None:
    (tmp_path / "Master.csv").write_bytes(b"")
    tailer = Tailer(tmp_path / "Master.csv")
    pending = {"L1", "L2", "L3"}
    reconciler = CdrReconciler(store, tailer, Processor(), FakeClock(), 60, undecided=pending.__contains__)  # type: ignore[arg-type]

    async def saved() -> tuple[str | None, str | None]:
        return await store.get_meta(CURSOR_KEY), await store.get_meta(REPLAY_KEY)

    tailer.rows += [Row("L1"), Row("L2"), Row(None)]
    await reconciler.run_once()
    assert await saved() == ("7:300", "0:0")  # L1, L2 undecided: replay from where that read began
    pending.discard("L1")
    tailer.rows.append(Row("L3"))
    await reconciler.run_once()
    assert await saved() == ("7:400", "0:0")  # L2 still undecided
    pending.discard("L2")
    await reconciler.run_once()
    assert await saved() == ("7:400", "7:300")  # the first read is done with; L3's read is not
    pending.clear()
    await reconciler.run_once()
    assert await saved() == ("7:400", "7:400")  # nothing pending: replay == cursor

    pending.add("L3")  # a late CDR of L3 starts a new decision; a crash now...
    tailer.rows.append(Row("L3"))
    await reconciler.run_once()
    assert await saved() == ("7:500", "7:400")
    restarted = CdrReconciler(store, tailer, Processor(), FakeClock(), 60)  # type: ignore[arg-type]
    tailer.asked.clear()
    await restarted.run_once()
    await restarted.run_once()
    assert tailer.asked == [CsvPosition(7, 400), CsvPosition(7, 500)]  # ...re-reads from there, once
    assert await saved() == ("7:500", "7:500")  # the restarted notifier knows nothing pending


def test_a_call_is_undecided_from_its_first_event_until_decided() -> None:
    from tests.test_missed import GRACE, MISSED, T0, lab_owner, run

    tracker = MissedCallTracker(GRACE, owner_of=lab_owner)
    assert not tracker.undecided(MISSED.linked_id)
    for event in run("missed_call"):
        tracker.observe(event, T0)
    assert tracker.undecided(MISSED.linked_id)
    assert tracker.due(T0 + GRACE) == [MISSED]
    assert not tracker.undecided(MISSED.linked_id)


class FailingOnce:
    """The store, except that the next write that queues a notice fails (a disk full, a bug)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.fail_next_queue = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def write(self, work: Any) -> Any:
        if self.fail_next_queue and "_queue" in getattr(work, "__qualname__", ""):
            self.fail_next_queue = False
            raise StorageError("commit failed: disk I/O error")
        return await self._store.write(work)


async def test_a_missed_call_whose_mail_failed_to_commit_stays_pending_and_is_retried(
    store: SqliteStore, tmp_path: Path
) -> None:
    """The tracker forgets a call once decided; until its mail is committed the notifier is its
    only record, so it must keep it (retry) and keep reporting it undecided (the replay position)."""
    from tests.test_missed import MISSED, run

    await store.write(import_unit([(Account(code="acct1001", name="Ion Popescu", email="ion@example.ro"), 0)]))
    clock = FakeClock()
    settings = NoticeSettings(
        system_name="lab", sender="ClickPhone <no-reply@clickphone.example>", message_id_domain="clickphone.example",
        voicemail_root=tmp_path / "vm", fax_root=tmp_path / "fax", inbound_contexts=("lab-inbound",),
        missed_call_grace=timedelta(seconds=30),
    )  # fmt: skip
    flaky = FailingOnce(store)
    notifier = Notifier(flaky, clock, Renderer(), settings, datetime(2026, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]
    for event in run("missed_call"):
        notifier.observe(event)
    later = clock.now() + timedelta(seconds=31)
    with pytest.raises(StorageError):
        await notifier._missed_calls(later)
    assert notifier.undecided(MISSED.linked_id)  # decided, not committed: still at risk
    assert await store.outbox_rows() == []
    await notifier._missed_calls(later)  # the next pass
    assert not notifier.undecided(MISSED.linked_id)
    (row,) = await store.outbox_rows()
    assert (row.idempotency_key, row.kind, row.recipient) == (MISSED.key, "missed_call", "ion@example.ro")


async def test_a_master_csv_backlog_shares_commits_instead_of_one_per_row(store: SqliteStore, tmp_path: Path) -> None:
    """Rows are handed to the processor many at a time, so their units share the writer's batches.
    One commit per row capped recovery at the disk's fsync rate (~70 rows/s on the CI machine), and
    the long crash test's last start could not catch up with its backlog (regression)."""
    factory = CallFactory(load_templates(), zone=ZONE)
    files = AsteriskFiles(tmp_path / "Master.csv", tmp_path / "vm", tmp_path / "fax")
    calls = [factory.call(i, "answered_call", "acct1001", datetime(2026, 12, 1, 9, i % 60)) for i in range(200)]
    for call in calls:
        files.append_csv(b"".join(r for r, _ in call.segments()))
    files.close()
    tailer = MasterCsvTailer(files.master_csv, system_name="pbx1", timezone=ZONE)
    processor = EventProcessor(store, datetime(2026, 1, 1, tzinfo=UTC))
    reconciler = CdrReconciler(store, tailer, processor, FakeClock(), 60)
    before = store.commits
    rows = sum(len(c.cdrs) for c in calls)
    assert await reconciler.run_once() == rows == 600
    assert await store.event_count("cdr") == rows
    assert store.commits - before <= rows // 50  # 600 rows: a handful of batches, not 600 commits


def recorded(scenario: str, *, renamed: bytes = b"") -> tuple[list[DomainEvent], bytes]:
    """A transcript's domain events (as the ingest worker makes them) and its Master.csv with
    ``newcdrcolumns=yes`` (the recording's Cdr events lack the LinkedID/Sequence mappings: the
    correlator's Linkedid is written). ``renamed``: the VoiceMail CDR's LastApplication after a
    hangup handler ran."""
    raw = (FIXTURES / f"{scenario}.ami").read_bytes()
    if renamed:
        raw = raw.replace(b"LastApplication: VoiceMail", b"LastApplication: " + renamed)
    correlator, events, rows = LinkedIdCorrelator(), [], []
    for message in FrameParser().feed(raw):
        if isinstance(message, AmiMessage) and message.is_event:
            correlator.observe(message.headers)
            event = translate(message.headers, TranslateContext("lab", ZONE), correlator.linked_id_for)
            if event is not None:
                events.append(event)
            if message.event == "Cdr":
                linked_id = correlator.linked_id_for(message.get("UniqueID") or "") or ""
                rows.append(csv_record(message).rstrip(b"\n") + f',"","{linked_id}",{len(rows)}\n'.encode())
    return events, b"".join(rows)


async def notifying(store: SqliteStore, clock: FakeClock, tmp_path: Path, went_live: datetime) -> NotifyingProcessor:
    settings = NoticeSettings(
        system_name="lab", sender="ClickPhone <no-reply@clickphone.example>", message_id_domain="clickphone.example",
        voicemail_root=tmp_path / "vm", fax_root=tmp_path / "fax", inbound_contexts=("lab-inbound",),
        missed_call_grace=timedelta(seconds=30),
    )  # fmt: skip
    await store.write(import_unit([(Account(code="acct1001", name="Ion Popescu", email="ion@example.ro"), 0)]))
    processor = NotifyingProcessor(store, went_live)
    processor.notifier = Notifier(store, clock, Renderer(), settings, went_live)
    return processor


@pytest.mark.parametrize("last_app", [b"Return", b"VoiceMail"], ids=["hangup-handler", "plain"])
async def test_a_voicemail_call_gets_no_missed_call_mail_when_master_csv_brings_its_cdrs_again(
    store: SqliteStore, tmp_path: Path, last_app: bytes
) -> None:
    """Regression: the reconcile pass re-read the call's CDRs (claimed keys) after its MWI had decided
    it, the tracker opened a new group without the MWI, found it missed, and mailed. The shipped
    voicemail snippet's hangup handler leaves ``Return`` as the VoiceMail CDR's LastApplication."""
    events, rows = recorded("voicemail", renamed=last_app)
    clock = FakeClock()
    processor = await notifying(store, clock, tmp_path, datetime(2026, 1, 1, tzinfo=UTC))
    notifier = processor.notifier
    assert notifier is not None
    await processor.handle_many(events)
    assert await store.event_count("cdr") == 4
    await clock.advance(31)
    await notifier._missed_calls(clock.now())
    assert await store.has_event("missed:lab:1795882906.12")  # claimed although nothing was mailed
    assert not notifier.undecided("1795882906.12")

    (tmp_path / "Master.csv").write_bytes(rows)  # cdr_csv writes the same CDRs a moment later
    tailer = MasterCsvTailer(tmp_path / "Master.csv", system_name="lab", timezone=ZONE)
    reconciler = CdrReconciler(store, tailer, processor, clock, 60, undecided=notifier.undecided)
    assert await reconciler.run_once() == 0  # every row a duplicate
    assert reconciler.rows_seen == 4
    await clock.advance(31)
    await notifier._missed_calls(clock.now() + timedelta(hours=5))
    assert await store.outbox_rows() == []

    # a restart replays the rows (a read shared with a call still pending): the claimed key holds
    again = await notifying(store, clock, tmp_path, datetime(2026, 1, 1, tzinfo=UTC))
    assert again.notifier is not None
    await again.handle_many(tailer.read_new(None).events)
    await again.notifier._missed_calls(clock.now() + timedelta(hours=5))
    assert await store.outbox_rows() == []


async def test_a_voicemail_call_gets_no_missed_call_mail_after_a_crash_before_its_decision(
    store: SqliteStore, tmp_path: Path
) -> None:
    """The daemon dies inside the grace: the MWI was committed, the call not decided yet. The
    restart reads the CDRs again from Master.csv, without the MWI, and the VoiceMail CDR renamed
    by the shipped hangup handler: the CDRs alone say "missed". The MWI settled the call's
    missed-call key when it was committed, so nothing is mailed."""
    events, rows = recorded("voicemail", renamed=b"Return")
    clock = FakeClock()
    processor = await notifying(store, clock, tmp_path, datetime(2026, 1, 1, tzinfo=UTC))
    await processor.handle_many(events)
    assert await store.has_event("missed:lab:1795882906.12")  # settled with the MWI, before any decision
    # SIGKILL here: the notifier's memory of the MWI is gone

    (tmp_path / "Master.csv").write_bytes(rows)
    tailer = MasterCsvTailer(tmp_path / "Master.csv", system_name="lab", timezone=ZONE)
    again = await notifying(store, clock, tmp_path, datetime(2026, 1, 1, tzinfo=UTC))
    assert again.notifier is not None
    await again.handle_many(tailer.read_new(None).events)
    decisions = again.notifier._tracker.decisions(clock.now() + timedelta(hours=5))
    assert [d.missed is not None for d in decisions] == [True]  # the CDRs alone would mail it
    again.notifier._missed_due.update((d.linked_id, d) for d in decisions)
    await again.notifier._missed_calls(clock.now() + timedelta(hours=5))
    assert await store.outbox_rows() == []


async def test_master_csv_history_before_go_live_is_not_mailed_as_missed(store: SqliteStore, tmp_path: Path) -> None:
    """At the first start the reconciler reads Master.csv from its start: a call missed before the
    daemon went live is history (the ingest records nothing of it), not a notice; live, it is."""
    events, rows = recorded("missed_call")
    (tmp_path / "Master.csv").write_bytes(rows)
    tailer = MasterCsvTailer(tmp_path / "Master.csv", system_name="lab", timezone=ZONE)
    clock = FakeClock()
    went_live = datetime(2026, 11, 28, 15, tzinfo=UTC)  # after the call (14:21 UTC)
    processor = await notifying(store, clock, tmp_path, went_live)
    assert processor.notifier is not None
    await processor.handle_many(tailer.read_new(None).events)
    await processor.notifier._missed_calls(clock.now() + timedelta(hours=5))
    assert await store.outbox_rows() == []
    await processor.handle_many(events)  # the same call live on AMI
    await processor.notifier._missed_calls(clock.now() + timedelta(hours=5))
    (row,) = await store.outbox_rows()
    assert (row.idempotency_key, row.kind) == ("missed:lab:1795882897.4", "missed_call")
