"""Master.csv reconciliation: row translation (domain) and tailing across rotations (adapter).

Rows are written the way ``cdr/cdr_csv.c`` writes them: every string field in double quotes with
inner quotes doubled and nothing else escaped (a CR/LF from a caller name stays raw),
duration/billsec/sequence as bare integers, an unset time as a bare empty field, one ``\\n`` per
record, appended in one write. Values come from the recorded ``answered_call`` Cdr events.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from clickphone_agi.adapters.cdr_csv import CsvBatch, CsvPosition, MasterCsvTailer
from clickphone_agi.domain.ami_translate import TranslateContext, parse_caller_id, translate
from clickphone_agi.domain.cdr_csv import BASE_COLUMNS, EXTENDED_COLUMNS, CsvRowError, call_ended_from_csv
from clickphone_agi.domain.events import CallEnded, Disposition, EventSource
from clickphone_agi.domain.keys import cdr_key

SYSTEM = "pbx1"
TZ = ZoneInfo("Europe/Bucharest")
FIXTURES = Path(__file__).parent / "fixtures" / "ami"


@dataclass(frozen=True)
class Row:
    """One CDR as cdr_csv sees it (defaults: the billing CDR of the recorded answered call)."""

    accountcode: str = "acct1001"
    src: str = "0721000001"
    dst: str = "0040212345678"
    dcontext: str = "lab-outbound"
    clid: str = '"Ion Popescu" <0721000001>'
    channel: str = "Local/0040212345678@lab-outbound-00000000;2"
    dstchannel: str = "Local/0040212345678@lab-pstn-00000001;1"
    lastapp: str = "Dial"
    lastdata: str = "Local/0040212345678@lab-pstn/n,30"
    start: str = "2026-11-28 16:21:31"
    answer: str = "2026-11-28 16:21:31"
    end: str = "2026-11-28 16:21:35"
    duration: int = 3
    billsec: int = 3
    disposition: str = "ANSWERED"
    amaflags: str = "DOCUMENTATION"
    uniqueid: str = "1795882891.1"
    userfield: str = ""
    peeraccount: str = ""
    linkedid: str = "1795882891.0"
    sequence: int = 7

    def fields(self, *, extended: bool = False) -> list[str]:
        names = EXTENDED_COLUMNS if extended else BASE_COLUMNS
        return [str(getattr(self, name)) for name in names]

    def line(self, *, extended: bool = False) -> bytes:
        """Byte-for-byte what cdr_csv's build_csv_record produces."""

        def text(value: str) -> str:
            return '"' + value.replace('"', '""') + '"'

        def when(value: str) -> str:
            return text(value) if value else ""

        parts = [text(getattr(self, name)) for name in BASE_COLUMNS[:9]]
        parts += [when(self.start), when(self.answer), when(self.end), str(self.duration), str(self.billsec)]
        parts += [text(self.disposition), text(self.amaflags), text(self.uniqueid), text(self.userfield)]
        if extended:
            parts += [text(self.peeraccount), text(self.linkedid), str(self.sequence)]
        return (",".join(parts) + "\n").encode("utf-8")


ANSWERED = Row()
NO_ANSWER = Row(
    dst="100",
    dcontext="lab-ext",
    dstchannel="Local/100@lab-phones-00000005;1",
    lastdata="Local/100@lab-phones/n,4",
    answer="",
    duration=4,
    billsec=0,
    disposition="NO ANSWER",
    uniqueid="1795882900.5",
)
BUSY = Row(
    dst="0040219999999",
    dstchannel="Local/0040219999999@lab-pstn-00000009;1",
    answer="",
    end="2026-11-28 16:21:32",
    duration=1,
    billsec=0,
    disposition="BUSY",
    uniqueid="1795882910.9",
)
NEWLINE_NAME = Row(clid='"Ion\nPopescu" <0721000001>', uniqueid="1795882920.1")
MULTIBYTE = Row(clid='"Ștefan Țurcanu" <0744123456>', src="0744123456", uniqueid="1795882930.1")
RING_A = Row(dstchannel="PJSIP/101-0000000a", lastdata="PJSIP/101&PJSIP/102,20", uniqueid="1795882940.3")
RING_B = replace(RING_A, dstchannel="PJSIP/102-0000000b", answer="", billsec=0, disposition="NO ANSWER")


def make_tailer(path: Path, **kwargs: object) -> MasterCsvTailer:
    return MasterCsvTailer(path, system_name=SYSTEM, timezone=TZ, **kwargs)  # type: ignore[arg-type]


def append(path: Path, *chunks: bytes) -> None:
    with path.open("ab") as f:
        for chunk in chunks:
            f.write(chunk)


def drain(tailer: MasterCsvTailer, position: CsvPosition | None, **kwargs: int) -> tuple[list[CallEnded], CsvBatch]:
    """read_new until at_end; every batch's events in order and the last batch."""
    events: list[CallEnded] = []
    for _ in range(10_000):
        batch = tailer.read_new(position, **kwargs)
        events += batch.events
        position = batch.position
        if batch.at_end:
            return events, batch
    raise AssertionError("read_new never reached the end")


def uids(events: list[CallEnded]) -> list[str]:
    return [e.unique_id for e in events]


# -- the row → CallEnded translation ----------------------------------------------------------


def test_row_gives_the_same_key_as_its_ami_twin() -> None:
    """A Master.csv row and its recorded AMI Cdr event must give one idempotency key."""
    summary = json.loads((FIXTURES / "summary.json").read_text())
    for ami in summary["answered_call"]["all_cdrs"]:
        row = Row(
            accountcode=ami["AccountCode"],
            src=ami["Source"],
            dst=ami["Destination"],
            dcontext=ami["DestinationContext"],
            clid=ami["CallerID"],
            channel=ami["Channel"],
            dstchannel=ami["DestinationChannel"],
            lastapp=ami["LastApplication"],
            lastdata=ami["LastData"],
            start=ami["StartTime"],
            answer=ami["AnswerTime"],
            end=ami["EndTime"],
            duration=int(ami["Duration"]),
            billsec=int(ami["BillableSeconds"]),
            disposition=ami["Disposition"],
            amaflags=ami["AMAFlags"],
            uniqueid=ami["UniqueID"],
            userfield=ami["UserField"],
        )
        event = call_ended_from_csv(row.fields(), system_name=SYSTEM, timezone=TZ)
        assert event.key == cdr_key(SYSTEM, ami["UniqueID"], ami["DestinationChannel"])
        assert event.origin is EventSource.CSV


@pytest.mark.parametrize(
    ("clid", "name"),
    [
        ('"Ion Popescu" <0721000001>', "Ion Popescu"),
        ('"Ion \\"the boss\\" P" <0721000001>', 'Ion "the boss" P'),  # ast_escape_quoted's \"
        ('"O\\\'Brien" <0721000001>', "O'Brien"),
        ('"C:\\\\pbx\\\\" <0721000001>', "C:\\pbx\\"),  # an escaped backslash, one at the end too
        ('"\\\\\\"" <0721000001>', '\\"'),
        ('"Evil \\" <0700000000>" <0721000001>', 'Evil " <0700000000>'),
        ('"Ion "the boss" P" <0721000001>', 'Ion "the boss" P'),  # quotes not escaped (older versions)
        ('"Ion \\"the b', 'Ion "the b'),  # cut by the 80-byte clid inside the quotes
        ('A \\"name\\" alone', 'A \\"name\\" alone'),  # a name alone is written as it is
    ],
)
def test_caller_name_with_quotes_and_backslashes_is_the_same_as_its_ami_twins(clid: str, name: str) -> None:
    """Master.csv holds the CDR's clid as the AMI Cdr event's CallerID (only its quotes doubled for
    the CSV): both must give one display name, with Asterisk's backslash escapes undone."""
    ami = json.loads((FIXTURES / "summary.json").read_text())["answered_call"]["all_cdrs"][0]
    from_ami = translate([*{**ami, "CallerID": clid}.items()], TranslateContext(SYSTEM, TZ))
    assert isinstance(from_ami, CallEnded)
    (fields,) = csv.reader(io.StringIO(replace(ANSWERED, clid=clid).line().decode()))  # as cdr_csv writes it
    from_csv = call_ended_from_csv(fields, system_name=SYSTEM, timezone=TZ)
    assert (from_csv.caller_id_name, from_ami.caller_id_name) == (name, name)


def test_answered_row_translates_every_field() -> None:
    event = call_ended_from_csv(ANSWERED.fields(), system_name=SYSTEM, timezone=TZ)
    assert event == CallEnded(
        key="cdr:pbx1:1795882891.1:Local/0040212345678@lab-pstn-00000001;1",
        system_name="pbx1",
        account="acct1001",
        source="0721000001",
        destination="0040212345678",
        destination_context="lab-outbound",
        caller_id_name="Ion Popescu",
        caller_id_num="0721000001",
        channel="Local/0040212345678@lab-outbound-00000000;2",
        destination_channel="Local/0040212345678@lab-pstn-00000001;1",
        last_application="Dial",
        last_data="Local/0040212345678@lab-pstn/n,30",
        disposition=Disposition.ANSWERED,
        duration=3,
        billable_seconds=3,
        start=datetime(2026, 11, 28, 16, 21, 31, tzinfo=TZ),
        answer=datetime(2026, 11, 28, 16, 21, 31, tzinfo=TZ),
        end=datetime(2026, 11, 28, 16, 21, 35, tzinfo=TZ),
        unique_id="1795882891.1",
        linked_id=None,
        sequence=None,
        user_field="",
        origin=EventSource.CSV,
    )
    assert event.start.utcoffset() is not None
    assert event.start.astimezone(UTC) == datetime(2026, 11, 28, 14, 21, 31, tzinfo=UTC)


def test_unanswered_rows_have_no_answer_time() -> None:
    missed = call_ended_from_csv(NO_ANSWER.fields(), system_name=SYSTEM, timezone=TZ)
    busy = call_ended_from_csv(BUSY.fields(), system_name=SYSTEM, timezone=TZ)
    assert (missed.disposition, missed.answer, missed.billable_seconds) == (Disposition.NO_ANSWER, None, 0)
    assert (busy.disposition, busy.answer, busy.duration) == (Disposition.BUSY, None, 1)


def test_extended_layout_carries_linkedid_and_sequence() -> None:
    event = call_ended_from_csv(ANSWERED.fields(extended=True), system_name=SYSTEM, timezone=TZ)
    assert (event.linked_id, event.sequence) == ("1795882891.0", 7)
    assert event.key == call_ended_from_csv(ANSWERED.fields(), system_name=SYSTEM, timezone=TZ).key


def test_usegmtime_rows_are_read_as_utc_and_given_in_the_local_zone() -> None:
    row = replace(ANSWERED, start="2026-11-28 14:21:31", answer="", end="2026-11-28 14:21:35")
    event = call_ended_from_csv(row.fields(), system_name=SYSTEM, timezone=TZ, gmt=True)
    assert event.start == datetime(2026, 11, 28, 16, 21, 31, tzinfo=TZ)
    assert event.start.tzinfo is TZ
    assert event.answer is None


def test_ambiguous_local_time_takes_the_first_occurrence() -> None:
    row = replace(ANSWERED, start="2026-10-25 03:30:00", answer="", end="2026-10-25 03:30:09")
    event = call_ended_from_csv(row.fields(), system_name=SYSTEM, timezone=TZ)
    assert event.start.fold == 0
    assert event.start.utcoffset() is not None
    assert event.start.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # EEST, UTC+3


@pytest.mark.parametrize(
    ("clid", "name", "number"),
    [
        ('"Ion Popescu" <0721000001>', "Ion Popescu", "0721000001"),
        ("Ion Popescu <0721000001>", "Ion Popescu", "0721000001"),
        ('"" <0721000001>', "", "0721000001"),
        ("0721000001", "", "0721000001"),
        ("+40721000001", "", "+40721000001"),
        ("Ion Popescu", "Ion Popescu", ""),
        ("", "", ""),
        ('"Ion\nPopescu" <0721000001>', "Ion Popescu", "0721000001"),  # a space, as from the AMI
        ('"Ion\\\r\\\nPopescu" <0721000001>', "Ion Popescu", "0721000001"),  # AMI's form: backslash + raw CR/LF
        ('"Evil <0700000000>" <0721000001>', "Evil <0700000000>", "0721000001"),
        ('"Ion "the boss" P" <0721000001>', 'Ion "the boss" P', "0721000001"),
        ('"=?UTF-8?Q?=0A?=Bcc: x@example.ro" <0721000001>', "UTF-8?Q?=0A?=Bcc: x@example.ro", "0721000001"),
        ('"==??x" <07=?21>', "x", "0721"),
        ('"Ștefan\u202e\x00Țurcanu" <0744123456>', "Ștefan Țurcanu", "0744123456"),
    ],
)
def test_caller_id_is_parsed_and_cleaned(clid: str, name: str, number: str) -> None:
    event = call_ended_from_csv(replace(ANSWERED, clid=clid).fields(), system_name=SYSTEM, timezone=TZ)
    assert (event.caller_id_name, event.caller_id_num) == (name, number)


@pytest.mark.parametrize(
    "clid",
    [
        '"Ion\\\r\\\nPopescu" <0721000001>',
        '"Ion\tPopescu" <0721000001>',
        '"Ion   Popescu" <0721000001>',
        '"Ion\\\x07Pop" <0721000001>',
        "Ion\nPopescu",
        '"cut before the closing quote',
    ],
)
def test_caller_id_reads_as_the_ami_cdr_twin_does(clid: str) -> None:
    """A call recovered from Master.csv names its caller as the AMI ``Cdr`` event's CallerID
    (the same text) does: a missed-call mail must not depend on which source was heard."""
    event = call_ended_from_csv(replace(ANSWERED, clid=clid).fields(), system_name=SYSTEM, timezone=TZ)
    assert (event.caller_id_name, event.caller_id_num) == parse_caller_id(clid)


def test_caller_id_name_is_capped() -> None:
    event = call_ended_from_csv(
        replace(ANSWERED, clid=f'"{"A" * 500}" <0721000001>').fields(), system_name=SYSTEM, timezone=TZ
    )
    assert event.caller_id_name == "A" * 80


def test_ring_group_forks_sharing_a_uniqueid_get_distinct_keys() -> None:
    a = call_ended_from_csv(RING_A.fields(), system_name=SYSTEM, timezone=TZ)
    b = call_ended_from_csv(RING_B.fields(), system_name=SYSTEM, timezone=TZ)
    assert a.unique_id == b.unique_id
    assert a.key != b.key
    assert b.key == cdr_key(SYSTEM, "1795882940.3", "PJSIP/102-0000000b")


@pytest.mark.parametrize(
    ("fields", "column", "fragment"),
    [
        (ANSWERED.fields()[:17], "userfield", "got 17"),
        ([*ANSWERED.fields(), "x"], "linkedid", "got 19"),
        ([*ANSWERED.fields(extended=True), "x"], None, "got 22"),
        (replace(ANSWERED, duration="abc").fields(), "duration", "'abc'"),  # type: ignore[arg-type]
        (replace(ANSWERED, billsec="-1").fields(), "billsec", "'-1'"),  # type: ignore[arg-type]
        (replace(ANSWERED, sequence="x").fields(extended=True), "sequence", "'x'"),  # type: ignore[arg-type]
        (replace(ANSWERED, start="28/11/2026 16:21").fields(), "start", "YYYY-MM-DD"),
        (replace(ANSWERED, end="").fields(), "end", "empty"),
        (replace(ANSWERED, answer="soon").fields(), "answer", "'soon'"),
        (replace(ANSWERED, uniqueid="").fields(), "uniqueid", "loguniqueid=yes"),
    ],
)
def test_malformed_row_raises_naming_the_column(fields: list[str], column: str | None, fragment: str) -> None:
    with pytest.raises(CsvRowError) as info:
        call_ended_from_csv(fields, system_name=SYSTEM, timezone=TZ)
    assert info.value.column == column
    assert isinstance(info.value, ValueError)
    assert fragment in str(info.value)
    if column:
        assert f"column {column!r}" in str(info.value)


def test_unknown_disposition_is_kept_as_unknown() -> None:
    event = call_ended_from_csv(replace(ANSWERED, disposition="").fields(), system_name=SYSTEM, timezone=TZ)
    assert event.disposition is Disposition.UNKNOWN


# -- CsvPosition ------------------------------------------------------------------------------


def test_position_round_trips_as_text() -> None:
    position = CsvPosition(inode=1234567, offset=890)
    assert position.to_text() == "1234567:890"
    assert CsvPosition.from_text(position.to_text()) == position


@pytest.mark.parametrize(
    "text", ["", "12", "a:1", "1:b", "-1:2", "1:-2", "1:2:3", "\u0661:2"]
)  # an Arabic-Indic digit is not a digit here
def test_position_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="position"):
        CsvPosition.from_text(text)


# -- tailing ---------------------------------------------------------------------------------


def test_reads_asterisk_rows_including_raw_newline_and_multibyte_names(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    rows = [ANSWERED, NEWLINE_NAME, MULTIBYTE, NO_ANSWER, RING_A, RING_B]
    append(master, *(r.line() for r in rows))
    batch = make_tailer(master).read_new(None)
    assert batch.errors == []
    assert batch.at_end
    assert not batch.gap_suspected
    assert batch.position == CsvPosition(master.stat().st_ino, master.stat().st_size)
    assert [e.key for e in batch.events] == [cdr_key(SYSTEM, r.uniqueid, r.dstchannel) for r in rows]
    assert len({e.key for e in batch.events}) == len(rows)
    assert batch.events[1].caller_id_name == "Ion Popescu"  # the raw LF a space, as from the AMI
    assert (batch.events[2].caller_id_name, batch.events[2].caller_id_num) == ("Ștefan Țurcanu", "0744123456")
    assert batch.events[3].answer is None
    assert all(e.origin is EventSource.CSV for e in batch.events)


def test_csv_writer_quote_all_rows_read_the_same(tmp_path: Path) -> None:
    """cdr_csv leaves integers and empty times unquoted; a QUOTE_ALL writer's rows parse identically."""
    master = tmp_path / "Master.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for row in (ANSWERED, NEWLINE_NAME, NO_ANSWER):
        writer.writerow(row.fields())
    master.write_bytes(buffer.getvalue().encode("utf-8"))
    other = tmp_path / "asterisk" / "Master.csv"
    other.parent.mkdir()
    append(other, ANSWERED.line(), NEWLINE_NAME.line(), NO_ANSWER.line())
    assert master.read_bytes() != other.read_bytes()
    assert make_tailer(master).read_new(None).events == make_tailer(other).read_new(None).events


def test_fields_are_decoded_one_by_one_like_ami_headers(tmp_path: Path) -> None:
    """A latin-1 caller name must not spoil the UTF-8 of the row's other fields (nor the key)."""
    master = tmp_path / "Master.csv"
    line = replace(ANSWERED, dstchannel="PJSIP/ș-00000001").line().replace(b"Ion Popescu", b"\xaa\xe9tefan")
    append(master, line)
    [event] = make_tailer(master).read_new(None).events
    assert event.caller_id_name == "\xaa\xe9tefan"  # not UTF-8: read as latin-1, as AMI's decode_text does
    assert event.destination_channel == "PJSIP/ș-00000001"
    assert event.key == cdr_key(SYSTEM, "1795882891.1", "PJSIP/ș-00000001")


def test_saved_position_returns_only_new_rows(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line(), NO_ANSWER.line())
    first = tailer.read_new(None)
    assert uids(first.events) == ["1795882891.1", "1795882900.5"]
    saved = CsvPosition.from_text(first.position.to_text())
    assert tailer.read_new(saved).events == []
    append(master, BUSY.line(), MULTIBYTE.line())
    second = tailer.read_new(saved)
    assert uids(second.events) == ["1795882910.9", "1795882930.1"]
    assert second.position.offset == master.stat().st_size
    assert tailer.read_new(second.position).events == []


@pytest.mark.parametrize(
    ("row", "cut_after"),
    [
        (ANSWERED, b'"ANSWERED","DOCUMENTATION","17958'),  # mid-field
        (MULTIBYTE, '"Ș'.encode()[:-1]),  # inside the two bytes of 'Ș'
        (NEWLINE_NAME, b'"Ion\n'),  # right after the raw LF inside the quoted clid
        (ANSWERED, b'"1795882891.1",""'),  # everything but the final LF
    ],
)
def test_partial_last_record_is_left_until_completed(tmp_path: Path, row: Row, cut_after: bytes) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, NO_ANSWER.line())
    line = row.line()
    cut = line.index(cut_after) + len(cut_after)
    append(master, line[:cut])
    batch = tailer.read_new(None)
    assert uids(batch.events) == ["1795882900.5"]
    assert batch.position.offset == len(NO_ANSWER.line())  # the start of the unfinished record
    assert batch.at_end
    assert batch.errors == []
    assert tailer.read_new(batch.position).events == []
    append(master, line[cut:])
    done = tailer.read_new(batch.position)
    assert uids(done.events) == [row.uniqueid]
    assert done.events[0] == call_ended_from_csv(row.fields(), system_name=SYSTEM, timezone=TZ)
    assert done.position.offset == master.stat().st_size


def test_missing_master_csv_is_an_empty_start(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    batch = tailer.read_new(None)
    assert (batch.events, batch.errors, batch.position, batch.at_end) == ([], [], CsvPosition(0, 0), True)
    append(master, ANSWERED.line())
    assert uids(tailer.read_new(batch.position).events) == ["1795882891.1"]


def test_create_mode_rotation_during_the_gap_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """logrotate (create, delaycompress): Master.csv → Master.csv.1, new Master.csv; rows in both."""
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line())
    saved = tailer.read_new(None).position
    append(master, NO_ANSWER.line())  # after our last read, before the rotation
    master.rename(tmp_path / "Master.csv.1")
    append(tmp_path / "Master.csv.1", BUSY.line())  # a write Asterisk had opened before the rename
    append(master, MULTIBYTE.line(), RING_A.line())  # the new file
    (tmp_path / "Master.csv.2.gz").write_bytes(b"\x1f\x8b old, compressed")
    (tmp_path / "Master.csv.3").write_bytes(replace(ANSWERED, uniqueid="old.1").line())  # older: ignored
    os.utime(tmp_path / "Master.csv.3", (1, 1))
    events, last = drain(tailer, saved)
    assert uids(events) == ["1795882900.5", "1795882910.9", "1795882930.1", "1795882940.3"]
    assert last.errors == []
    assert not last.gap_suspected
    assert last.position == CsvPosition(master.stat().st_ino, master.stat().st_size)
    assert tailer.read_new(last.position).events == []


def test_two_rotations_during_the_gap_read_the_intermediate_file(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line())
    saved = tailer.read_new(None).position
    append(master, NO_ANSWER.line())
    master.rename(tmp_path / "Master.csv.1")
    append(master, BUSY.line())
    (tmp_path / "Master.csv.1").rename(tmp_path / "Master.csv.2")
    master.rename(tmp_path / "Master.csv.1")
    append(master, MULTIBYTE.line())
    events, last = drain(tailer, saved)
    assert uids(events) == ["1795882900.5", "1795882910.9", "1795882930.1"]
    assert last.errors == []


def test_rotation_stopped_by_max_bytes_resumes_inside_the_rotated_file(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line())
    saved = tailer.read_new(None).position
    old_rows = [replace(NO_ANSWER, uniqueid=f"1795882900.{i}") for i in range(5)]
    append(master, *(r.line() for r in old_rows))
    master.rename(tmp_path / "Master.csv.1")
    append(master, BUSY.line())
    first = tailer.read_new(saved, max_bytes=1)
    assert uids(first.events) == ["1795882900.0"]
    assert first.position.inode == saved.inode
    assert not first.at_end
    events, _ = drain(tailer, first.position, max_bytes=1)
    assert uids(first.events + events) == [r.uniqueid for r in old_rows] + ["1795882910.9"]


def test_copytruncate_restarts_from_the_beginning_and_reports_it(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line(), NO_ANSWER.line())
    saved = tailer.read_new(None).position
    with master.open("r+b") as f:  # logrotate copytruncate
        f.truncate(0)
    append(master, BUSY.line())
    batch = tailer.read_new(saved)
    assert uids(batch.events) == ["1795882910.9"]
    assert batch.gap_suspected
    assert any("shorter" in e and "copytruncate" in e for e in batch.errors)
    assert batch.position == CsvPosition(master.stat().st_ino, master.stat().st_size)


def test_copytruncate_regrown_past_the_offset_is_detected(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, BUSY.line())
    saved = tailer.read_new(None).position
    with master.open("r+b") as f:
        f.truncate(0)
    append(master, NEWLINE_NAME.line(), MULTIBYTE.line())
    assert master.read_bytes()[saved.offset - 1 : saved.offset] != b"\n"
    batch = tailer.read_new(saved)
    assert uids(batch.events) == ["1795882920.1", "1795882930.1"]
    assert batch.gap_suspected
    assert any("rewritten" in e for e in batch.errors)


def test_unknown_inode_reads_the_whole_file_and_reports_a_gap(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line())
    saved = tailer.read_new(None).position
    append(master, NO_ANSWER.line())
    master.rename(tmp_path / "Master.csv.1")
    (tmp_path / "Master.csv.1").rename(tmp_path / "Master.csv.1.gz")  # compressed at once: no delaycompress
    append(master, BUSY.line())
    batch = tailer.read_new(saved)
    assert uids(batch.events) == ["1795882910.9"]
    assert batch.gap_suspected
    assert len(batch.errors) == 1
    assert "possible gap" in batch.errors[0]
    assert f"inode {saved.inode}" in batch.errors[0]
    assert "delaycompress" in batch.errors[0]
    assert batch.at_end


def test_rotated_glob_does_not_follow_symlinks_or_leave_the_directory(tmp_path: Path) -> None:
    logs = tmp_path / "cdr-csv"
    logs.mkdir()
    master = logs / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line())
    saved = tailer.read_new(None).position
    append(master, NO_ANSWER.line())
    outside = tmp_path / "elsewhere.csv"
    master.rename(outside)
    (logs / "Master.csv.1").symlink_to(outside)
    append(master, BUSY.line())
    batch = tailer.read_new(saved)
    assert uids(batch.events) == ["1795882910.9"]
    assert batch.gap_suspected
    for bad in ("../Master.csv.*", "sub/Master.csv.*", "", ".."):
        with pytest.raises(ValueError, match="rotated_glob"):
            make_tailer(master, rotated_glob=bad)


def test_malformed_rows_are_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    append(
        master,
        ANSWERED.line(),  # line 1
        NEWLINE_NAME.line(),  # lines 2-3
        replace(NO_ANSWER, duration="abc").line(),  # type: ignore[arg-type]  # line 4
        b"\n",  # line 5: blank, ignored
        BUSY.line(),  # line 6
        b'"acct1001","only","three"\n',  # line 7
        b'"acct1001","x"y"",1\n',  # line 8: not CSV
        MULTIBYTE.line(),  # line 9
    )
    batch = make_tailer(master).read_new(None)
    assert uids(batch.events) == ["1795882891.1", "1795882920.1", "1795882910.9", "1795882930.1"]
    assert len(batch.errors) == 3
    line_4, line_7, line_8 = batch.errors
    assert line_4.startswith(f"{master}:4 (byte ")
    assert "column 'duration'" in line_4
    assert "'abc'" in line_4
    assert line_7.startswith(f"{master}:7 (byte ")
    assert "got 3" in line_7
    assert line_8.startswith(f"{master}:8 (byte ")
    assert batch.position.offset == master.stat().st_size
    assert batch.at_end


def test_error_line_numbers_continue_across_calls(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    append(master, ANSWERED.line(), NEWLINE_NAME.line())
    saved = tailer.read_new(None).position
    append(master, replace(BUSY, start="yesterday").line())
    [error] = tailer.read_new(saved).errors
    assert error.startswith(f"{master}:4 (byte {saved.offset}): column 'start'")


def test_a_cut_short_write_followed_by_more_rows_is_skipped_and_reported(tmp_path: Path) -> None:
    """A crash or full disk mid-write leaves half a record with the next ones glued to it."""
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master, max_record_bytes=2048)
    append(master, ANSWERED.line(), NO_ANSWER.line()[:45])  # half a record, a quote left open
    glued = [replace(BUSY, uniqueid=f"1795882910.{i}") for i in range(30)]
    append(master, *(r.line() for r in glued))
    events, last = drain(tailer, None)
    assert uids(events) == ["1795882891.1"] + [r.uniqueid for r in glued[1:]]
    assert len(last.errors) == 1
    assert f"{master}:2 (byte {len(ANSWERED.line())})" in last.errors[0]
    assert "skipped" in last.errors[0]


def test_rotated_file_ending_mid_record_waits_to_settle_then_is_reported(tmp_path: Path) -> None:
    now = [0.0]
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master, clock=lambda: now[0], settle_seconds=5.0)
    append(master, ANSWERED.line())
    saved = tailer.read_new(None).position
    append(master, NO_ANSWER.line(), BUSY.line()[:50])
    master.rename(tmp_path / "Master.csv.1")
    append(master, MULTIBYTE.line())
    now[0] = (tmp_path / "Master.csv.1").stat().st_mtime + 1
    waiting = tailer.read_new(saved)
    assert uids(waiting.events) == ["1795882900.5"]
    assert waiting.position == CsvPosition(saved.inode, saved.offset + len(NO_ANSWER.line()))
    assert waiting.at_end
    assert waiting.errors == []
    now[0] += 10
    settled = tailer.read_new(waiting.position)
    assert uids(settled.events) == ["1795882930.1"]
    assert len(settled.errors) == 1
    assert "unterminated" in settled.errors[0]


def test_max_bytes_chunks_reach_the_end_with_every_row_once(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    tailer = make_tailer(master)
    rows = [replace(r, uniqueid=f"{r.uniqueid}{i}") for i in range(40) for r in (ANSWERED, NEWLINE_NAME, MULTIBYTE)]
    append(master, *(r.line(extended=True) for r in rows))
    shortest = min(len(r.line(extended=True)) for r in rows)
    position: CsvPosition | None = None
    events: list[CallEnded] = []
    calls = 0
    while True:
        batch = tailer.read_new(position, max_bytes=1000)
        calls += 1
        assert batch.errors == []
        assert len(batch.events) <= 1000 // shortest + 1  # the budget, overshot by at most one record
        if position is not None:
            assert batch.position.offset >= position.offset
        events += batch.events
        position = batch.position
        if batch.at_end:
            break
    assert calls > 10
    assert uids(events) == [r.uniqueid for r in rows]
    assert all(e.sequence == 7 for e in events)
    assert position.offset == master.stat().st_size


def test_max_bytes_bounds_one_call(tmp_path: Path) -> None:
    master = tmp_path / "Master.csv"
    lines = [replace(ANSWERED, uniqueid=f"1.{i}").line() for i in range(100)]
    append(master, *lines)
    budget = sum(len(line) for line in lines[:10])
    batch = make_tailer(master, max_bytes=budget).read_new(None)
    assert uids(batch.events) == [f"1.{i}" for i in range(10)]
    assert batch.position.offset == budget
    assert not batch.at_end
    over = make_tailer(master).read_new(None, max_bytes=budget + 1)  # a record crossing the budget is taken whole
    assert len(over.events) == 11


# -- property: Asterisk writing rows in pieces between reads ----------------------------------

_NAME_CHARS = st.sampled_from([*'Ion PopescuȘțăîâ"\n\r,<>=?\\', "ș", "€", "😀"])


@settings(max_examples=80, deadline=None)
@given(
    names=st.lists(st.text(_NAME_CHARS, max_size=12), min_size=1, max_size=8),
    extended=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    max_bytes=st.sampled_from([1, 7, 300, 16 * 1024 * 1024]),
)
def test_rows_written_in_arbitrary_pieces_are_read_exactly_once(
    names: list[str], extended: bool, cuts: list[int], max_bytes: int
) -> None:
    rows = [
        replace(ANSWERED, clid=f'"{name}" <0721000001>', uniqueid=f"1795882891.{i}", dstchannel=f"PJSIP/{i}-0000")
        for i, name in enumerate(names)
    ]
    content = b"".join(r.line(extended=extended) for r in rows)
    points = sorted({c % (len(content) + 1) for c in cuts} | {len(content)})
    with tempfile.TemporaryDirectory() as directory:
        master = Path(directory) / "Master.csv"
        master.touch()
        tailer = make_tailer(master)
        position: CsvPosition | None = None
        events: list[CallEnded] = []
        written = 0
        for point in points:
            append(master, content[written:point])
            written = point
            got, batch = drain(tailer, position, max_bytes=max_bytes)
            assert batch.errors == []
            assert content[: batch.position.offset].endswith(b"\n") or batch.position.offset == 0
            events += got
            position = batch.position
    assert [e.key for e in events] == [cdr_key(SYSTEM, r.uniqueid, r.dstchannel) for r in rows]
    assert position is not None
    assert position.offset == len(content)


def test_a_master_csv_without_linkedid_is_reported_once(tmp_path: Path) -> None:
    """The 18-column layout has no linkedid: its CDRs are recovered and charged, but a missed call
    needs the linkedid to group its legs, so the operator is told once to set newcdrcolumns."""
    master = tmp_path / "Master.csv"
    append(master, ANSWERED.line(), NO_ANSWER.line())
    tailer = make_tailer(master)
    with capture_logs() as logs:
        batch = tailer.read_new(None)
        append(master, BUSY.line())
        tailer.read_new(batch.position)
    assert [e["event"] for e in logs] == ["cdr_csv.no_linkedid"]
    assert "newcdrcolumns" in logs[0]["note"]
    extended = tmp_path / "extended" / "Master.csv"
    extended.parent.mkdir()
    append(extended, ANSWERED.line(extended=True))
    with capture_logs() as logs:
        make_tailer(extended).read_new(None)
    assert logs == []
