"""AMI → domain translation against the real Asterisk 22 recordings, hostile text and bad numbers.

Every transcript is parsed with the real ``FrameParser`` and each event goes, in stream order,
through a ``LinkedIdCorrelator`` (observe first) and then ``translate``, as the daemon does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser
from clickphone_agi.domain import ami_translate, correlation, keys
from clickphone_agi.domain.ami_translate import (
    ACCOUNT_USER_EVENTS,
    HANDLED_EVENTS,
    TranslateContext,
    TranslateError,
    c_unescape,
    clean_text,
    parse_caller_id,
    translate,
    unsupported_user_event,
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
    FaxSent,
    VoicemailPasswordChanged,
    VoicemailWaiting,
)

FIXTURES = Path(__file__).parent / "fixtures" / "ami"
SCENARIOS = sorted(p.stem for p in FIXTURES.glob("*.ami"))
ZONE = ZoneInfo("Europe/Bucharest")
CTX = TranslateContext(system_name="lab", timezone=ZONE)

Headers = list[tuple[str, str]]


def event_messages(scenario: str) -> list[AmiMessage]:
    parsed = FrameParser().feed((FIXTURES / f"{scenario}.ami").read_bytes())
    return [m for m in parsed if isinstance(m, AmiMessage) and m.is_event]


def run(scenario: str) -> list[DomainEvent]:
    """The daemon's order: observe every event, then translate it; ``None`` results dropped."""
    correlator = LinkedIdCorrelator()
    out: list[DomainEvent] = []
    for message in event_messages(scenario):
        correlator.observe(message.headers)
        event = translate(message.headers, CTX, correlator.linked_id_for)
        if event is not None:
            out.append(event)
    return out


def cdrs(events: list[DomainEvent]) -> list[CallEnded]:
    return [e for e in events if isinstance(e, CallEnded)]


T = TypeVar("T")


def of_type(events: list[DomainEvent], kind: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, kind)]


def first_frame(scenario: str, event: str, **match: str) -> Headers:
    for message in event_messages(scenario):
        if message.event == event and all(message.get(k) == v for k, v in match.items()):
            return list(message.headers)
    raise AssertionError(f"no {event} {match} in {scenario}")


def replace(headers: Headers, name: str, value: str) -> Headers:
    """``headers`` with ``name`` set to ``value`` (appended if absent)."""
    if not any(k == name for k, _ in headers):
        return [*headers, (name, value)]
    return [(k, value if k == name else v) for k, v in headers]


def local(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime:
    """A wall-clock time in Asterisk's zone."""
    return datetime(year, month, day, hour, minute, second, tzinfo=ZONE)


# --- the recordings ---------------------------------------------------------------------------

# (LastApplication, Disposition, BillableSeconds, DestinationChannel) of every Cdr, stream order
EXPECTED_CDRS: dict[str, list[tuple[str, str, int, str]]] = {
    "answered_call": [
        ("Hangup", "ANSWERED", 3, ""),
        ("Dial", "ANSWERED", 3, "Local/0040212345678@lab-pstn-00000001;1"),
        ("Wait", "ANSWERED", 3, ""),
    ],
    "busy_call": [
        ("Dial", "BUSY", 0, "Local/0040219999999@lab-pstn-00000005;1"),
        ("Hangup", "NO ANSWER", 0, ""),
        ("AppDial2", "NO ANSWER", 0, ""),
        ("Busy", "BUSY", 0, ""),
    ],
    "fax": [("Return", "ANSWERED", 23, ""), ("Return", "ANSWERED", 23, "")],
    "fax_failed": [("Return", "ANSWERED", 8, ""), ("Return", "ANSWERED", 8, "")],
    "full_noise": [
        ("Hangup", "ANSWERED", 3, ""),
        ("Wait", "ANSWERED", 3, ""),
        ("Dial", "ANSWERED", 3, "Local/0040212345678@lab-pstn-0000000d;1"),
    ],
    "long_call": [
        ("Hangup", "ANSWERED", 65, ""),
        ("Dial", "ANSWERED", 65, "Local/0040216500000@lab-pstn-0000000b;1"),
        ("Wait", "ANSWERED", 65, ""),
    ],
    "missed_call": [
        ("Wait", "FAILED", 0, ""),
        ("Dial", "NO ANSWER", 0, "Local/100@lab-phones-00000003;1"),
        ("Hangup", "NO ANSWER", 0, ""),
        ("AppDial2", "NO ANSWER", 0, ""),
    ],
    "shutdown": [],
    "user_event": [],
    "voicemail": [
        ("Wait", "FAILED", 0, ""),
        ("Hangup", "ANSWERED", 26, ""),
        ("Dial", "NO ANSWER", 0, "Local/100@lab-phones-00000007;1"),
        ("VoiceMail", "ANSWERED", 26, ""),
    ],
}


def test_every_transcript_is_covered() -> None:
    assert sorted(EXPECTED_CDRS) == SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_transcript_yields_exactly_its_cdrs_all_linked_to_one_call(scenario: str) -> None:
    found = cdrs(run(scenario))
    assert [
        (c.last_application, c.disposition.value, c.billable_seconds, c.destination_channel) for c in found
    ] == EXPECTED_CDRS[scenario]
    # one call per scenario: the correlator gave every CDR the same Linkedid, none missing
    assert len({c.linked_id for c in found}) <= 1
    assert all(c.linked_id for c in found)
    assert all(c.account == "acct1001" and c.system_name == "lab" for c in found)


def test_answered_call_billing_cdr_has_exact_fields() -> None:
    found = cdrs(run("answered_call"))
    dial = [c for c in found if c.last_application == "Dial"]
    assert len(dial) == 1
    assert dial[0] == CallEnded(
        key="cdr:lab:1795882891.1:Local/0040212345678@lab-pstn-00000001;1",
        system_name="lab",
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
        start=local(2026, 11, 28, 16, 21, 31),
        answer=local(2026, 11, 28, 16, 21, 31),
        end=local(2026, 11, 28, 16, 21, 35),
        unique_id="1795882891.1",
        linked_id="1795882891.0",
        sequence=None,
        user_field="",
    )
    assert dial[0].start == datetime(2026, 11, 28, 16, 21, 31, tzinfo=ZoneInfo("Europe/Bucharest"))
    assert dial[0].start.utcoffset() == timedelta(hours=2)  # EET in November
    # the other CDRs of the call: the pstn ;2 half (Hangup) and the originating ;1 half (Wait)
    others = sorted(c.last_application for c in found if c is not dial[0])
    assert others == ["Hangup", "Wait"]
    assert len(found) == 3
    assert {c.disposition for c in found} == {Disposition.ANSWERED}


def test_cdr_key_is_exactly_keys_cdr_key_of_the_raw_headers() -> None:
    for scenario in SCENARIOS:
        raw = [m for m in event_messages(scenario) if m.event == "Cdr"]
        for message, event in zip(raw, cdrs(run(scenario)), strict=True):
            assert event.key == keys.cdr_key(
                "lab", message.get("UniqueID") or "", message.get("DestinationChannel") or ""
            )


def test_long_call_bills_65_seconds_from_the_header_not_the_times() -> None:
    (dial,) = [c for c in cdrs(run("long_call")) if c.last_application == "Dial"]
    assert dial.billable_seconds == 65
    assert dial.duration == 65
    # StartTime 16:22:58 → EndTime 16:24:04 is 66 s of wall clock: never used
    assert (dial.end - dial.start).total_seconds() == 66


def test_missed_call_is_no_answer_with_a_noanswer_dial_outcome() -> None:
    events = run("missed_call")
    (dial,) = [c for c in cdrs(events) if c.last_application == "Dial"]
    assert dial.disposition is Disposition.NO_ANSWER
    assert dial.billable_seconds == 0
    assert dial.answer is None
    assert dial.duration == 4
    outcomes = of_type(events, DialOutcome)
    assert [o.dial_status for o in outcomes] == ["NOANSWER", "NOANSWER"]
    assert outcomes[0] == DialOutcome(
        key="dial:lab:1795882897.5:1795882897.6",
        account="acct1001",
        unique_id="1795882897.5",
        linked_id="1795882897.4",
        channel="Local/100@lab-inbound-00000002;2",
        context="lab-inbound",
        exten="100",
        caller_id_num="0744123456",
        caller_id_name="Vasile Ionescu",
        dest_channel="Local/100@lab-phones-00000003;1",
        dest_unique_id="1795882897.6",
        dial_status="NOANSWER",
    )
    # the Originate's own DialEnd has no calling channel: only its Dest* half
    assert outcomes[1].unique_id == ""
    assert outcomes[1].key == "dial:lab::1795882897.4"


def test_busy_call_is_busy() -> None:
    events = run("busy_call")
    (dial,) = [c for c in cdrs(events) if c.last_application == "Dial"]
    assert dial.disposition is Disposition.BUSY
    assert dial.billable_seconds == 0
    busy = [o for o in of_type(events, DialOutcome) if o.dial_status == "BUSY"]
    assert len(busy) == 1
    assert busy[0].dest_channel == "Local/0040219999999@lab-pstn-00000005;1"


def test_voicemail_gives_message_waiting_and_both_dial_and_voicemail_cdrs() -> None:
    events = run("voicemail")
    assert of_type(events, VoicemailWaiting) == [
        VoicemailWaiting(
            key="mwi:lab:100@default:1795882906.13:1",
            mailbox="100",
            context="default",
            new=1,
            old=0,
            waiting=True,
            account="acct1001",
            caller_id_num="0744123456",
            caller_id_name="Vasile Ionescu",
            unique_id="1795882906.13",
            linked_id="1795882906.12",
            system_name="lab",
        )
    ]
    found = {(c.last_application, c.disposition) for c in cdrs(events)}
    assert ("Dial", Disposition.NO_ANSWER) in found
    assert ("VoiceMail", Disposition.ANSWERED) in found
    (vm,) = [c for c in cdrs(events) if c.last_application == "VoiceMail"]
    assert vm.billable_seconds == 26
    assert vm.last_data == "100@default,u"
    assert vm.caller_id_name == "Vasile Ionescu"


def test_fax_received_sent_and_lab_fax_results() -> None:
    events = run("fax")
    assert of_type(events, FaxReceived) == [
        FaxReceived(
            key="faxrx:lab:1795882939.18",
            account="acct1001",
            unique_id="1795882939.18",
            linked_id="1795882939.17",
            caller_id_num="0212345678",
            caller_id_name="Fax Sender",
            local_station="+40212345679",
            remote_station="+40212345678",
            pages=2,
            transfer_rate=14400,
            resolution_dpi=(204, 196),
            file_path="/tmp/asterisk-lab/fax/rx-1795882939.18.tif",
        )
    ]
    (sent,) = of_type(events, FaxSent)
    assert (sent.key, sent.pages, sent.file_path) == (
        "faxtx:lab:1795882939.17",
        2,
        "/tmp/asterisk-lab/fax/test-fax.tiff",
    )
    results = {r.direction: r for r in of_type(events, FaxResult)}
    assert results["receive"] == FaxResult(
        key="faxresult:lab:1795882939.18:receive",
        direction="receive",
        account="acct1001",
        unique_id="1795882939.18",
        linked_id="1795882939.17",
        status="SUCCESS",
        error="",
        status_text="OK",
        pages=2,
        rate=14400,
        resolution_dpi=(204, 196),
        local_station="+40212345679",
        remote_station="+40212345678",
        file_path="",
    )
    # a successful send still reports FAXERROR HANGUP: the status, not the error, decides
    assert (results["send"].status, results["send"].error) == ("SUCCESS", "HANGUP")


def test_failed_fax_results_are_failed_with_zero_pages() -> None:
    events = run("fax_failed")
    results = of_type(events, FaxResult)
    assert sorted(r.direction for r in results) == ["receive", "send"]
    for result in results:
        assert result.status == "FAILED"
        assert result.pages == 0
        assert result.error == "The call dropped prematurely"
    assert [f.pages for f in of_type(events, FaxReceived)] == [0]
    assert [f.pages for f in of_type(events, FaxSent)] == [0]


def test_clickphone_fax_result_is_the_products_name_for_the_same_event() -> None:
    lab = first_frame("fax", "UserEvent", Direction="receive")
    product = replace(lab, "UserEvent", "ClickPhoneFaxResult")
    assert translate(product, CTX) == translate(lab, CTX)


def test_user_event_password_changed_becomes_an_account_event() -> None:
    (event,) = of_type(run("user_event"), AccountEvent)
    assert event == AccountEvent(
        key="acct:lab:PasswordChanged:acct1001:req-20240101-0001",
        name="PasswordChanged",
        account="acct1001",
        fields={"Username": "ion.popescu", "ChangedBy": "selfcare-web", "RequestId": "req-20240101-0001"},
    )
    assert "req-20240101-0001" in event.key


def test_full_noise_gives_the_same_call_as_answered_call_and_ignores_dialplan_events() -> None:
    volatile = {"key", "unique_id", "linked_id", "start", "answer", "end", "channel", "destination_channel"}

    def stable(c: CallEnded) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(c).items() if k not in volatile}

    noisy = run("full_noise")
    (noisy_dial,) = [c for c in cdrs(noisy) if c.last_application == "Dial"]
    (quiet_dial,) = [c for c in cdrs(run("answered_call")) if c.last_application == "Dial"]
    assert stable(noisy_dial) == stable(quiet_dial)
    assert noisy_dial.linked_id == "1795883046.25"
    assert noisy_dial.start == local(2026, 11, 28, 16, 24, 6)
    assert sorted(map(stable, cdrs(noisy)), key=repr) == sorted(map(stable, cdrs(run("answered_call"))), key=repr)
    dialplan = [m for m in event_messages("full_noise") if m.event in ("Newexten", "VarSet")]
    assert len(dialplan) == 37
    assert all(translate(m.headers, CTX) is None for m in dialplan)


def test_shutdown_and_fully_booted_are_lifecycle_events() -> None:
    events = run("shutdown")
    assert events == [
        AsteriskLifecycle(key="lifecycle:lab:booted", state="booted", detail="Fully Booted"),
        AsteriskLifecycle(key="lifecycle:lab:shutdown", state="shutdown", detail="Cleanly, restart=False"),
    ]


def test_keys_are_unique_per_cdr_across_all_transcripts_and_stable() -> None:
    all_cdrs = [c for s in SCENARIOS for c in cdrs(run(s))]
    assert len(all_cdrs) == 25
    assert len({c.key for c in all_cdrs}) == len(all_cdrs)
    effects = [e for s in SCENARIOS for e in run(s) if not isinstance(e, AsteriskLifecycle)]
    assert len({e.key for e in effects}) == len(effects)
    assert all("2026" not in e.key for e in effects)  # keys never hold times
    for scenario in SCENARIOS:
        assert [e.key for e in run(scenario)] == [e.key for e in run(scenario)]


def test_other_events_translate_to_none() -> None:
    for scenario in ("answered_call", "full_noise"):
        for message in event_messages(scenario):
            if message.event in ("Newchannel", "Hangup", "Newstate", "BridgeEnter", "LocalBridge"):
                assert translate(message.headers, CTX) is None
    assert translate([("Response", "Success"), ("ActionID", "x")], CTX) is None
    assert translate([], CTX) is None


# --- hostile text -----------------------------------------------------------------------------

BAD = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def assert_clean(text: str, limit: int = 80) -> None:
    assert "\r" not in text
    assert "\n" not in text
    assert not [c for c in text if unicodedata.category(c) in BAD], repr(text)
    assert "=?" not in text
    assert len(text) <= limit


ANSWERED_DIAL_CDR = first_frame("answered_call", "Cdr", LastApplication="Dial")
ANSWERED_DIAL_END = first_frame("answered_call", "DialEnd", DestUniqueid="1795882891.2")

HOSTILE_SNAPSHOT_NAMES = [
    "Evil\\r\\nBcc: victim@example.com",  # C-escaped, as it arrives in a snapshot
    "=?UTF-8?Q?=0A?=Bcc: victim@example.com",
    "==??UTF-8?Q?=0A?=",
    "\u202eevil\u202c \u2066x\u2069 \u2028y\u2029 \x85z\x7f\x00",
    "\\x1b[31mred \\a\\b\\f\\v",
    "A" * 10_240,
]


@pytest.mark.parametrize("name", HOSTILE_SNAPSHOT_NAMES)
def test_hostile_snapshot_caller_names_are_cleaned(name: str) -> None:
    frame = replace(ANSWERED_DIAL_END, "CallerIDName", name)
    event = translate(frame, CTX)
    assert isinstance(event, DialOutcome)
    assert_clean(event.caller_id_name)


def test_escaped_crlf_in_a_snapshot_name_becomes_a_space() -> None:
    frame = replace(ANSWERED_DIAL_END, "CallerIDName", "Evil\\r\\nBcc: victim@example.com")
    event = translate(frame, CTX)
    assert isinstance(event, DialOutcome)
    assert event.caller_id_name == "Evil Bcc: victim@example.com"


@pytest.mark.parametrize(
    "caller_id",
    [
        '"Evil\\\nBcc: victim@example.com" <0721000001>',  # raw LF, escaped by a backslash
        '"Evil\\\r\\\nBcc: victim@example.com" <0721000001>',
        '"=?UTF-8?Q?=0A?=" <0721000001>',
        '"\u202eevil\u2066" <0721000001>',
        '"' + "B" * 10_240 + '" <0721000001>',
        '"unbalanced <0721000001>',
        "\x00\x85\u2028",
    ],
)
def test_hostile_cdr_caller_ids_are_cleaned(caller_id: str) -> None:
    event = translate(replace(ANSWERED_DIAL_CDR, "CallerID", caller_id), CTX)
    assert isinstance(event, CallEnded)
    assert_clean(event.caller_id_name)
    assert_clean(event.caller_id_num, 64)


def test_a_raw_lf_in_the_cdr_caller_id_survives_framing_and_is_cleaned() -> None:
    raw = (
        b"Event: Cdr\r\nUniqueID: 1.1\r\nDestinationChannel: \r\n"
        b'CallerID: "Evil\\\nBcc: victim@example.com" <0721000001>\r\n'
        b"StartTime: 2026-11-28 16:21:31\r\nAnswerTime: \r\nEndTime: 2026-11-28 16:21:35\r\n"
        b"Duration: 3\r\nBillableSeconds: 0\r\nDisposition: NO ANSWER\r\n\r\n"
    )
    (message,) = FrameParser(expect_banner=False).feed(raw)
    assert isinstance(message, AmiMessage)
    event = translate(message.headers, CTX)
    assert isinstance(event, CallEnded)
    assert (event.caller_id_name, event.caller_id_num) == ("Evil Bcc: victim@example.com", "0721000001")
    assert event.answer is None


def test_quotes_and_romanian_letters_survive() -> None:
    dial_end = translate(replace(ANSWERED_DIAL_END, "CallerIDName", 'O\\\'Brien \\"Ştefan\\" Ionuț'), CTX)
    assert isinstance(dial_end, DialOutcome)
    assert dial_end.caller_id_name == 'O\'Brien "Ştefan" Ionuț'
    for caller_id in ('"O\\\'Brien" <0721000001>', '"O\'Brien" <0721000001>'):
        cdr = translate(replace(ANSWERED_DIAL_CDR, "CallerID", caller_id), CTX)
        assert isinstance(cdr, CallEnded)
        assert cdr.caller_id_name == "O'Brien"
    cdr = translate(replace(ANSWERED_DIAL_CDR, "CallerID", '"Ştefan Ionuț" <0721000001>'), CTX)
    assert isinstance(cdr, CallEnded)
    assert cdr.caller_id_name == "Ştefan Ionuț"


def test_a_cdr_caller_id_cut_before_the_number_takes_the_number_from_source() -> None:
    cut = '"' + "Ion Popescu-Ionescu " * 4
    event = translate(replace(ANSWERED_DIAL_CDR, "CallerID", cut[:79]), CTX)
    assert isinstance(event, CallEnded)
    assert event.caller_id_name.startswith("Ion Popescu-Ionescu Ion")
    assert event.caller_id_num == "0721000001"


def test_a_latin1_decoded_frame_never_crashes() -> None:
    # one byte that is not UTF-8 makes the parser decode the whole frame as latin-1
    raw = (
        b"Event: DialEnd\r\nUniqueid: 1.1\r\nLinkedid: 1.0\r\nDestUniqueid: 1.2\r\n"
        b"CallerIDName: \xaatefan \xc5\x9etefan\r\nDialStatus: ANSWER\r\n\r\n"
    )
    (message,) = FrameParser(expect_banner=False).feed(raw)
    assert isinstance(message, AmiMessage)
    event = translate(message.headers, CTX)
    assert isinstance(event, DialOutcome)
    assert event.caller_id_name.startswith("\u00aatefan")  # 'ª': cp1250's Ş read as latin-1
    assert_clean(event.caller_id_name)  # the UTF-8 'Ş' became 'Å' + a C1 control, removed


def test_voicemail_password_change_never_keeps_the_password() -> None:
    frame = [
        ("Event", "VoicemailPasswordChange"),
        ("Privilege", "user,all"),
        ("Context", "default"),
        ("Mailbox", "100"),
        ("NewPassword", "s3cr3t-4711"),
    ]
    event = translate(frame, CTX)
    assert event == VoicemailPasswordChanged(
        key="vmpass:lab:100@default", mailbox="100", context="default", identified=False
    )
    assert "s3cr3t" not in repr(event)
    assert "4711" not in repr(dataclasses.asdict(event))


def test_account_events_drop_secrets_and_transport_noise() -> None:
    frame = [
        ("Event", "UserEvent"),
        ("Privilege", "user,all"),
        ("Channel", "PJSIP/100-00000001"),
        ("CallerIDName", "Ion"),
        ("AccountCode", "acct-chan"),
        ("Uniqueid", "1.5"),
        ("SystemName", "pbx1"),
        ("UserEvent", "ClickPhonePinCreated"),
        ("Account", "acct1001"),
        ("Pin", "4711"),
        ("NewPIN", "4712"),
        ("Password", "hunter2"),
        ("ApiToken", "tok-xyz"),
        ("PinType", "calling-card"),
        ("CreatedBy", "ivr\r\n=?UTF-8?Q?x?="),
        ("RequestId", "r-1"),
    ]
    event = translate(frame, CTX)
    assert isinstance(event, AccountEvent)
    assert event.account == "acct1001"  # Account wins over the channel's AccountCode
    assert event.name == "PinCreated"
    # "PinType" looks secret by name too: dropped, on purpose (better lose a label than a PIN)
    assert event.fields == {"CreatedBy": "ivr UTF-8?Q?x?=", "RequestId": "r-1"}
    text = repr(event)
    for secret in ("4711", "4712", "hunter2", "tok-xyz"):
        assert secret not in text
    assert event.key == "acct:lab:PinCreated:acct1001:r-1"


def test_account_event_without_request_id_has_a_digest_key_that_a_timestamp_tells_apart() -> None:
    """Two alike changes without a RequestId share the digest (``identified`` False: the notice is
    keyed by arrival); Asterisk's Timestamp (timestampevents=yes) tells them apart, and one event
    read twice keeps its key."""
    base = [("Event", "UserEvent"), ("UserEvent", "ClickPhonePasswordChanged"), ("Account", "a:1")]
    one = translate([*base, ("Username", "ion"), ("ActionID", "x-1")], CTX)
    again = translate([*base, ("Username", "ion"), ("ActionID", "x-1")], CTX)
    other = translate([*base, ("Username", "vasile"), ("ActionID", "x-1")], CTX)
    stamped = [translate([*base, ("Username", "ion"), ("Timestamp", t)], CTX) for t in ("1.000001", "1.000002")]
    stamped_again = translate([*base, ("Username", "ion"), ("Timestamp", "1.000001")], CTX)
    by_id = translate([*base, ("Username", "ion"), ("RequestId", "r-9")], CTX)
    events = [one, again, other, *stamped, stamped_again, by_id]
    assert all(isinstance(e, AccountEvent) for e in events)
    one, again, other, first, second, first_again, by_id = events  # type: ignore[assignment]
    assert one.key == again.key != other.key
    assert (one.identified, again.identified, other.identified) == (False, False, False)
    assert first.key != second.key != one.key
    assert first.key == first_again.key
    assert (first.identified, second.identified, by_id.identified) == (True, True, True)
    assert "Timestamp" not in first.fields  # transport noise, not the sender's field
    assert one.key.startswith("acct:lab:PasswordChanged:a1:sha256:")  # ':' never enters from a value


def test_voicemail_password_change_is_identified_only_by_a_timestamp() -> None:
    frame = [("Event", "VoicemailPasswordChange"), ("Context", "default"), ("Mailbox", "100"), ("NewPassword", "x")]
    plain = translate(frame, CTX)
    stamped = translate([*frame, ("Timestamp", "1795882976.427017")], CTX)
    assert isinstance(plain, VoicemailPasswordChanged)
    assert isinstance(stamped, VoicemailPasswordChanged)
    assert (plain.key, plain.identified) == ("vmpass:lab:100@default", False)
    assert (stamped.key, stamped.identified) == ("vmpass:lab:100@default:1795882976.427017", True)


def test_unknown_clickphone_user_events_are_none_and_reported() -> None:
    frame = [("Event", "UserEvent"), ("UserEvent", "ClickPhoneBalanceTopUp"), ("Account", "acct1001")]
    assert translate(frame, CTX) is None
    assert unsupported_user_event(frame) == "ClickPhoneBalanceTopUp"
    assert unsupported_user_event(first_frame("user_event", "UserEvent")) is None
    assert unsupported_user_event(first_frame("fax", "UserEvent")) is None
    assert translate([("Event", "UserEvent"), ("UserEvent", "SomeoneElses")], CTX) is None
    assert {"PasswordChanged", "PinCreated"} <= ACCOUNT_USER_EVENTS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"Ion Popescu" <0721000001>', ("Ion Popescu", "0721000001")),
        ("<0721000001>", ("", "0721000001")),
        ("0721000001", ("", "0721000001")),
        ("+40721000001", ("", "+40721000001")),
        ('"O\\\'Brien" <0721000001>', ("O'Brien", "0721000001")),
        ('"Say \\"hi\\" \\\\o/" <100>', ('Say "hi" \\o/', "100")),
        ("Ion Popescu <0721000001>", ("Ion Popescu", "0721000001")),
        ('"Ion Popescu"', ("Ion Popescu", "")),
        ("Anonymous", ("Anonymous", "")),
        ("", ("", "")),
        ("<unknown>", ("", "")),
        ('"a"b" <1>', ('a"b', "1")),
        (
            '"A name long enough to be cut by the 80-byte clid \\"field\\" of the CD',
            (
                'A name long enough to be cut by the 80-byte clid "field" of the CD',
                "",
            ),
        ),
    ],
)
def test_parse_caller_id(raw: str, expected: tuple[str, str]) -> None:
    assert parse_caller_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Evil\\r\\nBcc", "Evil\r\nBcc"),
        ('O\\\'Brien \\"x\\" what\\?', 'O\'Brien "x" what?'),
        ("back\\\\slash", "back\\slash"),
        ("\\a\\b\\f\\t\\v", "\a\b\f\t\v"),
        ("keep \\q and trailing \\", "keep \\q and trailing \\"),
    ],
)
def test_c_unescape(raw: str, expected: str) -> None:
    assert c_unescape(raw) == expected


def test_clean_text_rules() -> None:
    assert clean_text("  a\t\tb \u00a0 c  ") == "a b c"
    assert clean_text("==??") == ""
    assert clean_text("=\u2028?") == "= ?"
    assert clean_text("x" * 500, 10) == "x" * 10
    assert clean_text("Ştefan Ionuț") == "Ştefan Ionuț"


# --- bad numbers and times --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-3", "3.5", "", " 3", "\uff11\uff12", "99999999999", str(31 * 86400 + 1)])
def test_malformed_billable_seconds_raise_a_translate_error_naming_the_header(value: str) -> None:
    with pytest.raises(TranslateError, match="BillableSeconds") as info:
        translate(replace(ANSWERED_DIAL_CDR, "BillableSeconds", value), CTX)
    assert info.value.header == "BillableSeconds"
    assert info.value.event == "Cdr"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("UniqueID", ""),
        ("StartTime", "2026-02-30 10:00:00"),
        ("EndTime", ""),
        ("AnswerTime", "yesterday"),
        ("Duration", "0x10"),
        ("Sequence", "-1"),
    ],
)
def test_other_malformed_cdr_headers_raise(header: str, value: str) -> None:
    with pytest.raises(TranslateError) as info:
        translate(replace(ANSWERED_DIAL_CDR, header, value), CTX)
    assert info.value.header == header


def test_malformed_values_in_other_events_raise() -> None:
    mwi = first_frame("voicemail", "MessageWaiting")
    with pytest.raises(TranslateError, match="'New'"):
        translate(replace(mwi, "New", "many"), CTX)
    fax = first_frame("fax", "ReceiveFAX")
    with pytest.raises(TranslateError, match="'Resolution'"):
        translate(replace(fax, "Resolution", "fine"), CTX)
    result = first_frame("fax", "UserEvent", Direction="receive")
    with pytest.raises(TranslateError, match="'Direction'"):
        translate(replace(result, "Direction", "sideways"), CTX)


def test_unknown_disposition_and_cdr_manager_mappings() -> None:
    frame = replace(ANSWERED_DIAL_CDR, "Disposition", "CONGESTED?")
    frame = [*frame, ("LinkedID", "9.0"), ("Sequence", "42")]
    event = translate(frame, CTX, lambda _: "from-correlator")
    assert isinstance(event, CallEnded)
    assert event.disposition is Disposition.UNKNOWN
    assert (event.linked_id, event.sequence) == ("9.0", 42)  # the header wins over correlation
    without = translate(ANSWERED_DIAL_CDR, CTX)
    assert isinstance(without, CallEnded)
    assert without.linked_id is None  # no mapping, no correlator


# --- time zone --------------------------------------------------------------------------------


def test_ambiguous_autumn_time_uses_fold_0() -> None:
    frame = replace(ANSWERED_DIAL_CDR, "StartTime", "2026-10-25 03:30:00")
    event = translate(frame, CTX)
    assert isinstance(event, CallEnded)
    assert event.start.fold == 0
    assert event.start.tzinfo is ZONE
    assert event.start.utcoffset() == timedelta(hours=3)  # the first (EEST) 03:30
    assert event.start.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def test_nonexistent_spring_time_is_normalised_not_a_crash() -> None:
    frame = replace(ANSWERED_DIAL_CDR, "StartTime", "2026-03-29 03:30:00")
    event = translate(frame, CTX)
    assert isinstance(event, CallEnded)
    # read with the offset before the gap (+02:00), shown as the real local time of that instant
    assert event.start.astimezone(UTC) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert event.start.replace(tzinfo=None) == datetime(2026, 3, 29, 4, 30)
    assert event.start.utcoffset() == timedelta(hours=3)


# --- correlator -------------------------------------------------------------------------------


def test_correlator_is_bounded_and_counts_evictions() -> None:
    correlator = LinkedIdCorrelator(max_entries=100)
    for i in range(110):
        correlator.observe([("Event", "Newchannel"), ("Uniqueid", f"1.{i}"), ("Linkedid", "1.0")])
    assert len(correlator) == 100
    assert correlator.evictions == 10
    assert correlator.linked_id_for("1.9") is None
    assert correlator.linked_id_for("1.10") == "1.0"
    assert LinkedIdCorrelator().max_entries == 50_000


def test_an_ended_channel_is_kept_for_its_cdr_then_forgotten_first_in_first_out() -> None:
    correlator = LinkedIdCorrelator(max_entries=100, ended_entries=2)
    for unique_id in ("a", "b", "c"):
        correlator.record(unique_id, "L")
    correlator.observe([("Event", "Hangup"), ("Uniqueid", "a"), ("Linkedid", "L")], ended=True)
    assert (correlator.live, len(correlator)) == (2, 3)
    assert correlator.linked_id_for("a") == "L"  # a Cdr after the Hangup still finds its call
    correlator.end("b")
    correlator.end("c")  # the third ended channel: the first one ended is forgotten
    assert (correlator.live, len(correlator), correlator.forgotten) == (0, 2, 1)
    assert [correlator.linked_id_for(u) for u in ("a", "b", "c")] == [None, "L", "L"]
    correlator.end("never-seen")  # a Cdr of a channel evicted long ago: nothing to end
    assert (len(correlator), correlator.forgotten, correlator.evictions) == (2, 1, 0)


def test_events_after_its_end_do_not_bring_a_channel_back_to_life() -> None:
    """A Cdr with the ``LinkedID`` mapping, or a peer's DialEnd, after the Hangup records the pair
    again: it must stay ended, or every channel would end up live until the LRU bound."""
    correlator = LinkedIdCorrelator(ended_entries=10)
    correlator.observe_frame(b"Event: Hangup\r\nUniqueid: 1.5\r\nLinkedid: 1.0\r\n", ended=True)
    correlator.observe_frame(b"Event: Cdr\r\nUniqueID: 1.5\r\nLinkedID: 1.0\r\n")
    correlator.observe([("Event", "DialEnd"), ("DestUniqueid", "1.5"), ("DestLinkedid", "1.0")])
    assert (correlator.live, len(correlator), correlator.linked_id_for("1.5")) == (0, 1, "1.0")


def test_a_long_call_outlives_any_number_of_short_calls() -> None:
    """The bound follows the calls in progress: a call of hours keeps its Linkedid however many
    short calls (each ended by its Hangup) come and go meanwhile; with the old LRU of every id
    seen, 100 of them were enough to lose it."""
    correlator = LinkedIdCorrelator(max_entries=100, ended_entries=100)
    correlator.observe([("Event", "Newchannel"), ("Uniqueid", "9.0"), ("Linkedid", "9.0")])
    for i in range(10_000):
        headers = [("Uniqueid", f"1.{i}"), ("Linkedid", f"1.{i}")]
        correlator.observe([("Event", "Newchannel"), *headers])
        correlator.observe([("Event", "Hangup"), *headers], ended=True)
    assert correlator.linked_id_for("9.0") == "9.0"
    assert (correlator.live, correlator.evictions, len(correlator)) == (1, 0, 101)


def test_correlator_is_lru_on_observe() -> None:
    correlator = LinkedIdCorrelator(max_entries=2)
    correlator.record("a", "L")
    correlator.record("b", "L")
    correlator.record("a", "L")  # a is fresh again
    correlator.record("c", "L")
    assert (correlator.linked_id_for("a"), correlator.linked_id_for("b")) == ("L", None)


def test_correlator_reads_prefixed_pairs_and_ignores_none() -> None:
    correlator = LinkedIdCorrelator()
    correlator.observe(first_frame("answered_call", "LocalBridge"))
    assert correlator.linked_id_for("1795882891.0") == "1795882891.0"
    assert correlator.linked_id_for("1795882891.1") == "1795882891.0"
    correlator.observe(first_frame("missed_call", "DialEnd", DialStatus="NOANSWER"))
    assert correlator.linked_id_for("1795882897.6") == "1795882897.4"  # DestUniqueid → DestLinkedid
    correlator.observe([("Event", "VarSet"), ("Uniqueid", "none"), ("Linkedid", "none")])
    assert correlator.linked_id_for("none") is None
    with pytest.raises(ValueError, match="max_entries"):
        LinkedIdCorrelator(max_entries=0)


def test_every_cdr_in_the_recordings_finds_its_linked_id() -> None:
    # a Cdr can arrive before its channel's Hangup (missed/busy): Newchannel already gave the id
    cdr_before_hangup = 0
    for scenario in SCENARIOS:
        hung_up: set[str] = set()
        for message in event_messages(scenario):
            if message.event == "Hangup":
                hung_up.add(message.get("Uniqueid") or "")
            if message.event == "Cdr" and message.get("UniqueID") not in hung_up:
                cdr_before_hangup += 1
        assert all(c.linked_id for c in cdrs(run(scenario)))
    assert cdr_before_hangup > 0


# --- property ---------------------------------------------------------------------------------

HANDLED = ["Cdr", "DialEnd", "MessageWaiting", "ReceiveFAX", "SendFAX", "UserEvent", "VoicemailPasswordChange"]
EVENT_NAMES = sorted({*HANDLED, "FullyBooted", "Shutdown", "Newchannel", "Hangup", "VarSet"})
USER_EVENT_NAMES = [
    "LabFaxResult",
    "ClickPhoneFaxResult",
    *(f"ClickPhone{n}" for n in sorted(ACCOUNT_USER_EVENTS)),
    "ClickPhoneBogus",
]
HEADER_NAMES = sorted(
    {name for s in SCENARIOS for m in event_messages(s) for name, _ in m.headers}
    | {"LinkedID", "Sequence", "NewPassword", "RequestId", "Account", "Pin", "FileName", ""}
)
REAL_FRAMES = [list(m.headers) for s in SCENARIOS for m in event_messages(s) if m.event in (*HANDLED, "Shutdown")] + [
    [("Event", "VoicemailPasswordChange"), ("Context", "default"), ("Mailbox", "100"), ("NewPassword", "1")]
]
TEXT = st.text(max_size=40) | st.sampled_from(["", "0", "3", "<unknown>", "100@default", "8031x7700", "none"])


def assert_translates_or_translate_error(headers: Headers) -> None:
    try:
        event = translate(headers, CTX, lambda _: None)
    except TranslateError:
        return
    if event is None:
        return
    for value in dataclasses.asdict(event).values():
        texts = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else []
        for text in texts:
            assert not [c for c in text if unicodedata.category(c) in BAD], repr(text)
    assert event.key.isprintable()


@settings(max_examples=300, deadline=None, database=None)
@given(
    event=st.sampled_from(EVENT_NAMES),
    user_event=st.sampled_from(USER_EVENT_NAMES),
    headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), TEXT), max_size=30),
)
def test_translate_raises_only_translate_error_on_arbitrary_headers(
    event: str, user_event: str, headers: Headers
) -> None:
    assert_translates_or_translate_error([("Event", event), ("UserEvent", user_event), *headers])


@settings(max_examples=300, deadline=None, database=None)
@given(
    frame=st.sampled_from(REAL_FRAMES),
    changes=st.lists(st.tuples(st.integers(min_value=0, max_value=60), TEXT), max_size=6),
)
def test_translate_raises_only_translate_error_on_mutated_real_frames(
    frame: Headers, changes: list[tuple[int, str]]
) -> None:
    mutated = list(frame)
    for index, value in changes:
        if index and index < len(mutated):  # keep the Event header, change any other value
            mutated[index] = (mutated[index][0], value)
    assert_translates_or_translate_error(mutated)


def test_clickphone_voicemail_user_event_carries_the_recorded_file() -> None:
    """The dialplan snippet's hangup handler publishes VM_MESSAGEFILE; keyed on the file."""
    from clickphone_agi.domain.events import VoicemailRecorded

    headers = [
        ("Event", "UserEvent"),
        ("Privilege", "user,all"),
        ("Uniqueid", "1795882906.13"),
        ("Linkedid", "1795882906.12"),
        ("UserEvent", "ClickPhoneVoicemail"),
        ("Mailbox", "100@default"),
        ("MessageFile", "/var/spool/asterisk/voicemail/default/100/INBOX/msg0000"),
        ("VMStatus", "SUCCESS"),
        ("AccountCode", "acct1001"),
    ]
    ctx = TranslateContext("pbx1", ZoneInfo("Europe/Bucharest"))
    event = translate(headers, ctx)
    assert isinstance(event, VoicemailRecorded)
    assert (event.mailbox, event.context, event.status, event.account) == ("100", "default", "SUCCESS", "acct1001")
    assert event.message_file.endswith("INBOX/msg0000")
    assert event.key == translate(headers, ctx).key  # type: ignore[union-attr]
    assert event.key.startswith("vmfile:pbx1:")


# --- the fast paths against the straightforward code they replaced -----------------------------
#
# The references below are the translator's helpers and the correlator as they were before the
# fast paths (per-character category checks, strptime, lower()/endswith() on every header). The
# old pipeline is: eager parse → observe(every header) → translate with those helpers patched in;
# the new one is the daemon's: lazy FrameParser message → observe_frame(bytes) → translate only
# the names in HANDLED_EVENTS. Their outputs must be identical, event for event.

_DROP = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_WHITESPACE = re.compile(r"\s+")


def old_clean_text(s: str, max_len: int = 80) -> str:
    s = s[: max_len * 8]
    s = "".join(" " if unicodedata.category(c) in _DROP else c for c in s)
    while "=?" in s:
        s = s.replace("=?", "")
    s = _WHITESPACE.sub(" ", s).strip()
    return s[:max_len].rstrip()


def old_ident(s: str, max_len: int = 255) -> str:
    s = s[: max_len * 2]
    return "".join(c for c in s if unicodedata.category(c) not in _DROP).strip()[:max_len]


def old_key_part(s: str) -> str:
    return "".join(c for c in s if c.isprintable() and c != ":")[:120]


def old_local_time(self: Any, name: str, zone: ZoneInfo) -> datetime:
    raw = self.get(name)
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}", raw):
        raise self.error(name, "expected YYYY-MM-DD HH:MM:SS", raw)
    try:
        naive = datetime.strptime(raw, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise self.error(name, "not a valid date and time", raw) from None
    if not 2 <= naive.year <= 9998:  # a zone's offset would leave datetime's range (tests/fuzz)
        raise self.error(name, "year outside 2..9998", raw)
    return ami_translate._attach_zone(naive, zone)


class OldCorrelator(LinkedIdCorrelator):
    def observe(self, headers: Sequence[tuple[str, str]]) -> None:
        unique_ids: dict[str, str] = {}
        linked_ids: dict[str, str] = {}
        for name, value in headers:
            lower = name.lower()
            if lower.endswith("uniqueid"):
                unique_ids.setdefault(lower[: -len("uniqueid")], value)
            elif lower.endswith("linkedid"):
                linked_ids.setdefault(lower[: -len("linkedid")], value)
        for prefix, unique_id in unique_ids.items():
            linked_id = linked_ids.get(prefix)
            if linked_id is not None:
                self.record(unique_id, linked_id)


@contextlib.contextmanager
def old_helpers() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ami_translate, "clean_text", old_clean_text)
        patch.setattr(ami_translate, "_ident", old_ident)
        patch.setattr(ami_translate, "_key_part", old_key_part)
        patch.setattr(ami_translate._Frame, "local_time", old_local_time)
        yield


Outcome = DomainEvent | str | None


def reference_eager_headers(frame: bytes) -> Headers:
    def decode(data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")

    out: Headers = []
    for line in frame.split(b"\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            out.append(("", decode(line)))
            continue
        out.append((decode(name), decode(value[1:] if value.startswith(b" ") else value)))
    return out


def old_pipeline(frames: list[bytes], max_entries: int = 50_000) -> tuple[list[Outcome], OldCorrelator]:
    correlator = OldCorrelator(max_entries)
    out: list[Outcome] = []
    with old_helpers():
        for frame in frames:
            headers = reference_eager_headers(frame)
            if not any(k.lower() == "event" for k, _ in headers):
                continue
            correlator.observe(headers)
            try:
                out.append(translate(headers, CTX, correlator.linked_id_for))
            except TranslateError as exc:
                out.append(str(exc))
    return out, correlator


def new_pipeline(data: bytes, chunk: int, max_entries: int = 50_000) -> tuple[list[Outcome], LinkedIdCorrelator]:
    correlator = LinkedIdCorrelator(max_entries)
    parser = FrameParser(expect_banner=False)
    out: list[Outcome] = []
    for start in range(0, len(data), chunk):
        for message in parser.feed(data[start : start + chunk]):
            assert isinstance(message, AmiMessage)
            if message.event is None:
                continue
            assert message.frame is not None
            if not correlator.observe_frame(message.frame):
                correlator.observe(message.headers)
            if message.event not in HANDLED_EVENTS:
                out.append(None)
                continue
            try:
                out.append(translate(message.headers, CTX, correlator.linked_id_for))
            except TranslateError as exc:
                out.append(str(exc))
    return out, correlator


def split_frames(data: bytes) -> list[bytes]:
    frames = []
    pos = 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        frames.append(data[pos:end])
        pos = end + 4
    return frames


def assert_pipelines_agree(data: bytes, *, max_entries: int = 50_000) -> list[Outcome]:
    old, old_correlator = old_pipeline(split_frames(data), max_entries)
    for chunk in (1, 61, 4096, len(data) or 1):
        new, new_correlator = new_pipeline(data, chunk, max_entries)
        assert new == old
        assert list(new_correlator._links.items()) == list(old_correlator._links.items())
        assert new_correlator.evictions == old_correlator.evictions
    return old


def stream_of(scenario: str) -> bytes:
    data = (FIXTURES / f"{scenario}.ami").read_bytes()
    return data[data.index(b"\r\n") + 2 :]  # without the banner line


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_new_ingest_path_gives_identical_outputs_on_every_transcript(scenario: str) -> None:
    outcomes = assert_pipelines_agree(stream_of(scenario))
    assert [o for o in outcomes if isinstance(o, DomainEvent)] == run(scenario)


def test_new_ingest_path_gives_identical_outputs_on_all_transcripts_in_one_stream_with_evictions() -> None:
    data = b"".join(stream_of(s) for s in SCENARIOS)
    outcomes = assert_pipelines_agree(data)
    assert sum(isinstance(o, CallEnded) for o in outcomes) > 20
    assert_pipelines_agree(data, max_entries=3)  # a small correlator: evictions in the same order


def _hostile(data: bytes, rng: random.Random) -> bytes:
    """Hostile values and names spliced into real frames: non-ASCII and latin-1 text, control
    characters, raw LF/CR, invisible formatting, bad numbers and times, lookalike id headers."""
    values = [
        "Ştefan Ionuț".encode(),
        b"Andr\xe9 \xff\x80",
        b'"Evil\\\nUniqueid: 9.9\\\rLinkedid: 9.8" <0721>',
        "\u202eevil\u2066 \u2028x\x85".encode(),
        b"=?UTF-8?Q?=0A?= a  b\t c",
        b"2026-02-30 10:00:00",
        b"2026-13-01 10:00:00",
        b"0000-01-01 00:00:00",
        b"2026-11-28 24:00:00",
        b"2026-11-28 23:59:60",
        b"12a",
        b"",
        b"none",
        "\u212a".encode(),
        b"x" * 300,
    ]
    names = [
        b"XUniqueid",
        b"XLinkedid",
        "\u00c9Uniqueid".encode(),
        "\u00e9Linkedid".encode(),
        "Lin\u212aedid".encode(),
        b"Dest-Uniqueid",
        b"UNIQUEID",
        b"linkedID",
        b"Caller\xe9Name",
    ]
    out = []
    for frame in split_frames(data):
        lines = frame.split(b"\r\n")
        for _ in range(rng.randint(0, 3)):
            index = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
            name, _, _ = lines[index].partition(b":")
            if rng.random() < 0.3:
                name = rng.choice(names)
            if index:
                lines[index] = name + b": " + rng.choice(values)
        out.append(b"\r\n".join(lines) + b"\r\n\r\n")
    return b"".join(out)


@pytest.mark.parametrize("seed", range(12))
def test_new_ingest_path_gives_identical_outputs_on_hostile_transcripts(seed: int) -> None:
    rng = random.Random(seed)
    data = b"".join(_hostile(stream_of(s), rng) for s in SCENARIOS)
    assert_pipelines_agree(data)


def test_handled_events_are_exactly_what_translate_may_act_on() -> None:
    assert frozenset({*ami_translate._HANDLERS, "UserEvent"}) == HANDLED_EVENTS
    for scenario in SCENARIOS:
        for message in event_messages(scenario):
            if message.event not in HANDLED_EVENTS:
                assert translate(message.headers, CTX) is None
                # the old code built the whole frame first and found no handler either
                assert ami_translate._Frame(message.headers).event not in HANDLED_EVENTS


def test_translate_takes_the_first_event_header_case_insensitively() -> None:
    with pytest.raises(TranslateError, match="UniqueID"):
        translate([("Privilege", "cdr,all"), ("event", "Cdr"), ("Event", "Newexten")], CTX)
    assert translate([("Event", "Newexten"), ("Event", "Cdr")], CTX) is None


@settings(max_examples=500, deadline=None, database=None)
@given(text=st.text(max_size=120) | st.text(alphabet=st.characters(max_codepoint=0x3000), max_size=40))
def test_text_fast_paths_equal_the_per_character_code(text: str) -> None:
    for limit in (80, 64, 3):
        assert clean_text(text, limit) == old_clean_text(text, limit)
        assert ami_translate._ident(text, limit) == old_ident(text, limit)
    assert ami_translate._key_part(text) == old_key_part(text)


def test_printable_strings_hold_nothing_the_cleaners_drop() -> None:
    """The fast paths rest on this: across all of Unicode, a printable character is never of the
    dropped categories, and the only printable whitespace is the ASCII space."""
    for code in range(sys.maxunicode + 1):
        c = chr(code)
        if c.isprintable():
            assert unicodedata.category(c) not in _DROP, hex(code)
            assert not (_WHITESPACE.fullmatch(c) and c != " "), hex(code)


_DIGITS = st.text(alphabet="0123456789", min_size=2, max_size=2)


@settings(max_examples=500, deadline=None, database=None)
@given(
    year=st.text(alphabet="0123456789", min_size=4, max_size=4) | st.sampled_from(["0000", "0001", "2024", "9999"]),
    rest=st.lists(_DIGITS | st.sampled_from(["00", "12", "13", "23", "24", "29", "30", "31", "59", "60"]), min_size=5),
)
def test_local_time_equals_strptime(year: str, rest: list[str]) -> None:
    month, day, hour, minute, second = rest[:5]
    raw = f"{year}-{month}-{day} {hour}:{minute}:{second}"
    frame = ami_translate._Frame([("Event", "Cdr"), ("StartTime", raw)])
    try:
        new: datetime | str = frame.local_time("StartTime", ZONE)
    except TranslateError as exc:
        new = str(exc)
    try:
        old: datetime | str = old_local_time(frame, "StartTime", ZONE)
    except TranslateError as exc:
        old = str(exc)
    assert new == old
    if isinstance(new, datetime):
        assert isinstance(old, datetime)
        assert (new.utcoffset(), new.fold) == (old.utcoffset(), old.fold)


# --- the correlator's byte path ----------------------------------------------------------------

_ID_NAMES = [
    "Uniqueid",
    "Linkedid",
    "UniqueID",
    "LinkedID",
    "DestUniqueid",
    "DestLinkedid",
    "LocalOneUniqueid",
    "LocalOneLinkedid",
    "BridgeUniqueid",
    "uniqueid",
    "LINKEDID",
    "X-Uniqueid",
    "X-Linkedid",
    " Uniqueid",
    "\u00c9Uniqueid",
    "\u00e9Linkedid",
    "Lin\u212aedid",
    "L\u0130NKEDID",
    "Dest\nUniqueid",
    "Channel",
    "",
]
_ID_VALUES = st.sampled_from(
    [
        "1.1",
        "1.2",
        "1.0",
        "",
        "none",
        "x" * 151,
        "\u0218.1",
        "a:b",
        "q\nUniqueid: 7.7",
        "q\nLinkedid: 7.0",
        "Linkedid: 7",
    ]
) | st.text(max_size=6)


def _encode_value(value: str, latin1: bool) -> bytes:
    return value.encode("latin-1", "replace") if latin1 else value.encode()


@settings(max_examples=600, deadline=None, database=None)
@given(
    headers=st.lists(st.tuples(st.sampled_from(_ID_NAMES), _ID_VALUES, st.booleans()), max_size=10),
    junk=st.sampled_from([b"", b"\r\n", b"garbage\r\n", b'CallerID: "a\\\nUniqueid: 5.5\\\nLinkedid: 5.0"\r\n']),
)
def test_observe_frame_records_what_observe_records(headers: list[tuple[str, str, bool]], junk: bytes) -> None:
    frame = b"Event: Fuzz\r\n" + junk
    frame += b"".join(n.encode() + b": " + _encode_value(v, latin1) + b"\r\n" for n, v, latin1 in headers) + b"\r\n"
    old = OldCorrelator(4)
    old.observe(reference_eager_headers(frame))
    new = LinkedIdCorrelator(4)
    if not new.observe_frame(frame):
        assert len(new) == 0  # nothing recorded before giving up
        new.observe(reference_eager_headers(frame))
    assert list(new._links.items()) == list(old._links.items())
    assert new.evictions == old.evictions
    via_headers = LinkedIdCorrelator(4)
    via_headers.observe(reference_eager_headers(frame))
    assert list(via_headers._links.items()) == list(old._links.items())


def test_a_raw_lf_in_a_caller_id_never_adds_an_id_pair() -> None:
    frame = (
        b"Event: Cdr\r\nUniqueID: 1.5\r\n"
        b'CallerID: "Evil\\\nUniqueID: 6.6\\\nLinkedID: 6.0\\\r\\\nLinkedid: 6.0" <1>\r\n'
        b"Disposition: ANSWERED\r\n\r\n"
    )
    correlator = LinkedIdCorrelator()
    assert correlator.observe_frame(frame)
    assert len(correlator) == 0
    assert correlator.linked_id_for("6.6") is None
    # the same forged text in two values of one header name: the same text before each match
    forged = b'Event: Cdr\r\nCallerID: "x\nUniqueid: 6.6"\r\nCallerID: "x\nLinkedid: 6.0"\r\n\r\n'
    assert correlator.observe_frame(forged)
    assert len(correlator) == 0
    assert correlator.observe_frame(b"Event: Newchannel\r\nUniqueid: 1.5\r\nLinkedid: 1.4\r\n\r\n")
    assert correlator.linked_id_for("1.5") == "1.4"


def test_observe_frame_hands_undecidable_frames_back_without_recording() -> None:
    kelvin = "Event: X\r\nUniqueid: 1.1\r\nLin\u212aedid: 1.0\r\n\r\n".encode()
    accented = "Event: X\r\n\u00c9Uniqueid: 1.1\r\n\u00e9Linkedid: 1.0\r\n\r\n".encode()
    for frame in (kelvin, accented):
        correlator = LinkedIdCorrelator()
        assert not correlator.observe_frame(frame)
        assert len(correlator) == 0
        correlator.observe(reference_eager_headers(frame))
        assert correlator.linked_id_for("1.1") == "1.0"  # str.lower() pairs them, as before
    plain = LinkedIdCorrelator()
    assert plain.observe_frame(b"Event: Newexten\r\nChannel: x\r\n\r\n")
    assert plain.observe_frame(b"Event: VarSet\r\nUniqueid: 1.1\r\n\r\n")
    assert len(plain) == 0


def test_known_id_names_classify_like_the_generic_rule() -> None:
    for name, kind in correlation._KNOWN_NAMES.items():
        assert correlation._classify(name) == kind
    names = {name for s in SCENARIOS for m in event_messages(s) for name, _ in m.headers}
    id_names = {n for n in names if n.lower().endswith(("uniqueid", "linkedid"))}
    assert id_names <= set(correlation._KNOWN_NAMES), id_names - set(correlation._KNOWN_NAMES)


def test_kelvin_sign_is_the_only_way_a_non_ascii_name_lowers_onto_an_id_suffix() -> None:
    """observe_frame matches lowercased bytes; str.lower() differs from bytes.lower() only for
    non-ASCII characters. Across all of Unicode, the ones whose lower() holds an ASCII letter are
    U+0130 (then followed by a combining dot, so it cannot complete "uniqueid"/"linkedid") and
    U+212A KELVIN SIGN ("k", in "linkedid"), which observe_frame hands back to observe()."""
    lowering_to_ascii = {
        code: chr(code).lower()
        for code in range(128, sys.maxunicode + 1)
        if any(ord(c) < 128 for c in chr(code).lower())
    }
    assert lowering_to_ascii == {0x130: "i\u0307", 0x212A: "k"}
    assert "\u212a".encode() == correlation._KELVIN_UTF8
