"""Synthetic calls (``sim/traffic.py``): distinct identities, Asterisk-consistent twins on AMI and in
Master.csv, and spool files where the daemon's own readers find them."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clickphone_agi.adapters.fax import scan_fax_spool
from clickphone_agi.adapters.spool import VoicemailSpool
from clickphone_agi.domain.ami_translate import TranslateContext, translate
from clickphone_agi.domain.cdr_csv import call_ended_from_csv
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.sim.traffic import CALL_SCENARIOS, AsteriskFiles, CallFactory, load_templates

ZONE = ZoneInfo("Europe/Bucharest")
START = datetime(2026, 12, 1, 23, 59, 50)


@pytest.fixture(scope="module")
def factory() -> CallFactory:
    return CallFactory(load_templates(), zone=ZONE)


@pytest.mark.parametrize("scenario", CALL_SCENARIOS)
def test_a_call_is_the_recording_under_a_new_identity(factory: CallFactory, scenario: str) -> None:
    first = factory.call(0, scenario, "acct2001", START, billsec=321, mailbox="2001")
    second = factory.call(1, scenario, "acct2002", START, billsec=321, mailbox="2002")
    blob = b"".join(first.frames)
    assert b"acct1001" not in blob
    assert b"100@default" not in blob
    assert b"2026-11-28" not in blob  # every time moved...
    assert b"1795882" not in blob  # ...every recorded Uniqueid/Linkedid renumbered
    assert len(first.frames) == len(factory.call(2, scenario, "x", START).frames)
    keys = {(c.get("UniqueID"), c.get("DestinationChannel")) for c in first.cdrs}
    assert len(keys) == len(first.cdrs)
    assert keys.isdisjoint((c.get("UniqueID"), c.get("DestinationChannel")) for c in second.cdrs)
    for cdr in first.cdrs:
        assert cdr.get("LinkedID") == first.linked_id  # one call, one Linkedid: the root's Uniqueid
        assert cdr.get("AccountCode") == "acct2001"
        if cdr.get("LastApplication") == "Dial" and cdr.get("Disposition") == "ANSWERED":
            assert cdr.get("BillableSeconds") == "321"
    assert first.linked_id in {c.get("UniqueID") for c in first.cdrs}


@pytest.mark.parametrize("scenario", CALL_SCENARIOS)
def test_master_csv_twin_gives_the_ami_cdrs_key_and_fields(factory: CallFactory, scenario: str) -> None:
    """The daemon counts a CDR seen on both paths once only if both give the same key."""
    call = factory.call(0, scenario, "acct2001", START, billsec=75)
    ctx = TranslateContext("pbx1", ZONE)
    records = b"".join(r for r, _ in call.segments())
    rows = list(csv.reader(io.StringIO(records.decode())))
    assert len(rows) == len(call.cdrs)
    for row, cdr in zip(rows, call.cdrs, strict=True):
        assert len(row) == 21  # newcdrcolumns=yes
        from_csv = call_ended_from_csv(row, system_name="pbx1", timezone=ZONE)
        from_ami = translate(cdr.headers, ctx)
        assert isinstance(from_ami, CallEnded)
        assert from_csv.key == from_ami.key
        assert (from_csv.linked_id, from_csv.billable_seconds, from_csv.answer) == (
            from_ami.linked_id,
            from_ami.billable_seconds,
            from_ami.answer,
        )


def test_segments_put_each_cdr_record_before_its_frame(factory: CallFactory) -> None:
    call = factory.call(0, "voicemail", "acct2001", START, mailbox="2001")
    segments = list(call.segments())
    assert b"".join(f for _, f in segments) == b"".join(call.frames)
    for records, frames in segments[:-1]:
        assert records.count(b"\n") == 1
        assert frames.split(b"\r\n\r\n")[-2].startswith(b"Event: Cdr\r\n")  # the run ends with its Cdr


def test_spool_files_are_read_by_the_daemons_own_readers(factory: CallFactory, tmp_path: Path) -> None:
    files = AsteriskFiles(tmp_path / "cdr" / "Master.csv", tmp_path / "vm", tmp_path / "fax")
    vm = factory.call(0, "voicemail", "acct2001", START, mailbox="2001")
    ok = factory.call(1, "fax", "acct2001", START)
    failed = factory.call(2, "fax_failed", "acct2001", START)
    for call in (vm, ok, failed):
        files.spool(call)
    files.close()
    (message,) = VoicemailSpool(tmp_path / "vm").list_messages("default", "2001")
    assert vm.voicemail is not None
    assert (message.meta.msg_id, message.meta.callerid_num) == (vm.voicemail.msg_id, "0744123456")
    assert message.meta.origtime.timestamp() > START.replace(tzinfo=ZONE).timestamp()
    found = {f.path.name: f for f in scan_fax_spool(tmp_path / "fax")}
    assert ok.fax is not None
    assert failed.fax is not None
    assert found[ok.fax.name].path.is_file()
    assert not found[failed.fax.name].path.exists()  # no page arrived: the sidecar alone
    for fax in (ok.fax, failed.fax):
        sidecar = found[fax.name].sidecar
        assert sidecar is not None
        assert (sidecar.uniqueid, sidecar.status, sidecar.account) == (fax.unique_id, fax.status, "acct2001")
