"""Fuzzing the AMI path: framing, header parsing, the translator and the Linkedid correlator.

Properties (tests/test_ami_protocol.py and tests/test_ami_translate.py hold the example-based
tests and the transcript-based properties; these add arbitrary bytes, sizes and times):

* any bytes, cut anywhere, in either parser mode and under any size limit, give exactly the
  messages of an independent reference parse, or :class:`AmiProtocolError` exactly when the
  reference finds an oversized frame or banner: never another exception, and the messages
  delivered before that error are the reference's first ones;
* a well-formed frame stream (any names and values, non-UTF-8 too, raw lone CR/LF inside values,
  duplicated names) decodes to exactly what was encoded, wherever it is cut;
* a huge line fed a byte at a time costs linear time (it used to be quadratic for the banner);
* ``translate`` on frames with arbitrary (and duplicated) headers and times anywhere in years
  1-9999, in several zones, returns a clean event or raises :class:`TranslateError`, nothing else;
* the correlator's byte-level fast path records exactly what the header-level path records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickphone_agi.adapters.ami.protocol import (
    AmiMessage,
    AmiProtocolError,
    Banner,
    FrameParser,
    decode_text,
    parse_frame,
)
from clickphone_agi.domain.ami_translate import HANDLED_EVENTS, TranslateContext, TranslateError, translate
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.services.ingest import EventProcessor, EventQueue, IngestWorker
from tests.fuzz.budget import fuzz

Headers = list[tuple[str, str]]

# ---- an independent reference parse ----------------------------------------------------------------

_BANNER_RE = re.compile(rb"[^:/\r\n]+/([^\s/:]+)")


@dataclasses.dataclass
class Reference:
    banner: bytes | None  # the banner line's raw bytes, when one was taken
    frames: list[tuple[bytes, tuple[tuple[str, str], ...]]]  # (raw, headers) of each non-empty frame
    error: bool  # the parser must raise AmiProtocolError (after delivering ``frames``)


def reference_headers(body: bytes) -> tuple[tuple[str, str], ...]:
    out = []
    for line in body.split(b"\r\n"):
        if not line:
            continue
        if b":" not in line:
            out.append(("", decode_text(line)))
            continue
        name, value = line.split(b":", 1)
        out.append((decode_text(name), decode_text(value[1:] if value[:1] == b" " else value)))
    return tuple(out)


def reference(data: bytes, *, banner: bool, limit: int) -> Reference:
    """What FrameParser must produce for ``data``, written from the protocol rules, not the code."""
    pos = 0
    taken: bytes | None = None
    if banner:
        end = data.find(b"\r\n")
        if end < 0:
            return Reference(None, [], len(data) > limit)
        if end + 2 > limit or _BANNER_RE.fullmatch(data[:end]) is None:
            return Reference(None, [], True)
        taken, pos = data[: end + 2], end + 2
    frames = []
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        raw = data[pos : end + 4]
        if len(raw) > limit:
            return Reference(taken, frames, True)
        headers = reference_headers(data[pos:end])
        if headers:
            frames.append((raw, headers))
        pos = end + 4
    return Reference(taken, frames, len(data) - pos > limit)


def feed(data: bytes, cuts: Sequence[int], *, banner: bool, limit: int) -> tuple[list[AmiMessage | Banner], bool]:
    parser = FrameParser(max_frame_bytes=limit, expect_banner=banner)
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out: list[AmiMessage | Banner] = []
    try:
        for start, stop in itertools.pairwise(bounds):
            out.extend(parser.feed(data[start:stop]))
    except AmiProtocolError:
        return out, True
    return out, False


def check_message(message: AmiMessage, raw: bytes, headers: tuple[tuple[str, str], ...]) -> None:
    assert message.raw == raw
    assert message.headers == headers
    event = next((v for k, v in headers if k.lower() == "event"), None)
    assert message.event == event
    response = next((v for k, v in headers if k.lower() == "response"), None)
    assert message.is_response == (event is None and response is not None)
    assert message.as_dict() == dict(reversed(headers))


# ---- strategies ---------------------------------------------------------------------------------------

_TOKENS = st.sampled_from(
    [
        b"\r\n",
        b"\r\n\r\n",
        b"\r",
        b"\n",
        b":",
        b": ",
        b" ",
        b"Event: ",
        b"event:",
        b"Response: Success",
        b"Response: Error",
        b"ActionID: 1",
        b"Asterisk Call Manager/11.0.0",
        b"HTTP/1.1 400 Bad Request",
        b"Uniqueid: 1.2",
        b"Linkedid: 1.1",
        b"CallerID: ",
        b'"',
        b"\\",
        b"\x00",
        b"\xff",
        b"\xc3",
        b"\xc8\x98",
        b"\xe2\x84\xaa",  # KELVIN SIGN
        b"=?UTF-8?Q?=0A?=",
        b"x" * 50,
    ]
)
STREAMS = st.lists(_TOKENS | st.binary(max_size=12), max_size=60).map(b"".join)
CUTS = st.lists(st.integers(min_value=0, max_value=3000), max_size=12)
LIMITS = st.sampled_from([4, 16, 40, 120, 500, 1024 * 1024])


@fuzz(400)
@given(data=STREAMS, cuts=CUTS, banner=st.booleans(), limit=LIMITS)
def test_arbitrary_bytes_in_any_chunks_parse_like_the_reference_or_raise_a_protocol_error(
    data: bytes, cuts: list[int], banner: bool, limit: int
) -> None:
    expected = reference(data, banner=banner, limit=limit)
    items, raised = feed(data, cuts, banner=banner, limit=limit)
    assert raised == expected.error
    banners = [i for i in items if isinstance(i, Banner)]
    messages = [i for i in items if isinstance(i, AmiMessage)]
    if banners:
        assert items[0] is banners[0]
        assert len(banners) == 1
        assert banners[0].raw == expected.banner
    elif not raised:
        assert expected.banner is None
    if raised:
        # what was delivered before the error is the reference's beginning (the rest is dropped
        # with the connection; the Master.csv reconciliation recovers its CDRs)
        assert len(messages) <= len(expected.frames)
    else:
        assert len(messages) == len(expected.frames)
    for message, (raw, headers) in zip(messages, expected.frames, strict=False):
        check_message(message, raw, headers)


# a header name: no ':' (it would end the name), no CR/LF; a value: anything but CRLF itself
_NAME_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b":" not in b and b"\r" not in b and b"\n" not in b)
_KNOWN_NAMES = st.sampled_from([b"Event", b"Response", b"ActionID", b"Uniqueid", b"Linkedid", b"CallerID", b"event"])
_VALUE_BYTES = (
    st.binary(max_size=40) | st.sampled_from([b"", b" ", b"\r", b"\n", b"a\rb\nc", b"\xff\xfe", "Ș".encode()])
).filter(lambda b: b"\r\n" not in b and not b.startswith(b"\n"))
FRAME = st.lists(st.tuples(_KNOWN_NAMES | _NAME_BYTES, _VALUE_BYTES), min_size=1, max_size=10)


def encode(frame: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(name + b": " + value + b"\r\n" for name, value in frame) + b"\r\n"


@fuzz(300)
@given(frames=st.lists(FRAME, min_size=1, max_size=8), cuts=CUTS, banner=st.booleans())
def test_a_valid_frame_stream_decodes_the_same_wherever_it_is_cut(
    frames: list[list[tuple[bytes, bytes]]], cuts: list[int], banner: bool
) -> None:
    # a value may end in a lone CR (before the line's CRLF) or start with LF after the space: both
    # stay inside the value; only CRLF ends a line
    body = b"".join(encode(f) for f in frames)
    data = (b"Asterisk Call Manager/11.0.0\r\n" if banner else b"") + body
    items, raised = feed(data, cuts, banner=banner, limit=1024 * 1024)
    assert not raised
    messages = [i for i in items if isinstance(i, AmiMessage)]
    assert len(messages) == len(frames)
    for message, frame in zip(messages, frames, strict=True):
        assert message.headers == tuple((decode_text(n), decode_text(v)) for n, v in frame)
        assert message.raw == encode(frame)
        # the transcript loader's parse of the same frame agrees
        single = parse_frame(encode(frame)[:-4])
        assert single is not None
        assert single.headers == message.headers
        # duplicated names: every value kept in order, the first one wins a lookup
        for name, _ in frame:
            text = decode_text(name)
            values = [decode_text(v) for n, v in frame if decode_text(n).lower() == text.lower()]
            assert message.get_all(text) == values
            assert message.get(text) == values[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("banner", [True, False])
def test_a_huge_line_fed_a_byte_at_a_time_is_linear_not_quadratic(banner: bool) -> None:
    """Regression: the banner search restarted from the first byte on every read, so a peer that
    trickled 512 KiB without a CRLF cost minutes of event-loop time (quadratic); now ~1 s."""
    limit = 512 * 1024
    parser = FrameParser(max_frame_bytes=limit, expect_banner=banner)
    with pytest.raises(AmiProtocolError):
        trickle(parser, b"x\r" * limit)  # CRs without LF: every one a near-miss for the CRLF search


def trickle(parser: FrameParser, data: bytes) -> None:
    for i in range(len(data)):
        parser.feed(data[i : i + 1])


def test_an_over_long_banner_is_refused_however_it_arrives() -> None:
    """Regression: a banner longer than the limit was accepted in one read but refused when it
    trickled in; the size limit now applies to the banner line itself."""
    line = b"Asterisk Call Manager/" + b"1" * 60 + b"\r\n"
    for cuts in ([], list(range(len(line)))):
        _, raised = feed(line + b"Event: A\r\n\r\n", cuts, banner=True, limit=40)
        assert raised


# ---- the translator ---------------------------------------------------------------------------------

ZONES = ["Europe/Bucharest", "UTC", "America/New_York", "Pacific/Kiritimati", "Pacific/Pago_Pago"]
_DROPPED = {"Cc", "Cf", "Cs", "Zl", "Zp"}
# the whole calendar, with its two ends (where a zone's offset leaves datetime's range) weighted up
_TIMES = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1, 1, 2)),
    st.datetimes(min_value=datetime(9999, 12, 30), max_value=datetime(9999, 12, 31, 23, 59, 59)),
).map(lambda d: f"{d.year:04d}-{d.month:02d}-{d.day:02d} {d.hour:02d}:{d.minute:02d}:{d.second:02d}")
_HOSTILE_TEXT = st.text(max_size=30) | st.sampled_from(
    [
        "",
        "0",
        "none",
        "<unknown>",
        '"Evil\\\nBcc: x@example.com" <0721>',
        "=?UTF-8?Q?=0A?=Bcc: a@b.c",
        "\u202eevil\u2066",
        "100@default",
        "8031x7700",
        "0x0",
        "99999999999999999999",
        "2026-02-30 10:00:00",
        "9999-12-31 23:59:59",
        "0001-01-01 00:00:00",
        "receive",
        "ClickPhonePasswordChanged",
    ]
)
_HEADER_NAMES = st.sampled_from(
    [
        "UniqueID", "Uniqueid", "LinkedID", "Linkedid", "DestinationChannel", "Disposition", "CallerID",
        "StartTime", "AnswerTime", "EndTime", "Duration", "BillableSeconds", "Sequence", "AccountCode",
        "Source", "Destination", "DestUniqueid", "Mailbox", "New", "Old", "Waiting", "PagesTransferred",
        "Resolution", "TransferRate", "FileName", "Direction", "FAXSTATUS", "FAXPAGES", "FAXRESOLUTION",
        "UserEvent", "Account", "RequestId", "MessageFile", "Context", "Event", "event", "Shutdown", "Restart",
    ]
)  # fmt: skip


@st.composite
def frames_to_translate(draw: st.DrawFn) -> tuple[Headers, str]:
    event = draw(st.sampled_from(sorted(HANDLED_EVENTS)))
    headers: Headers = [("Event", event)]
    if event == "UserEvent":
        headers.append(
            ("UserEvent", draw(st.sampled_from(["ClickPhoneFaxResult", "LabFaxResult", "ClickPhoneVoicemail",
                                                "ClickPhonePasswordChanged", "ClickPhonePinCreated", "Other"])))
        )  # fmt: skip
    if event == "Cdr" and draw(st.booleans()):
        # a well-formed Cdr whose times range over the whole calendar: only the time can be wrong
        headers += [("UniqueID", "1.2"), ("Duration", "5"), ("BillableSeconds", "3")]
        headers += [(name, draw(_TIMES)) for name in ("StartTime", "AnswerTime", "EndTime")]
    headers += draw(st.lists(st.tuples(_HEADER_NAMES, _TIMES | _HOSTILE_TEXT), max_size=20))
    return headers, draw(st.sampled_from(ZONES))


def assert_clean(event: object) -> None:
    for value in dataclasses.asdict(event).values():  # type: ignore[call-overload]
        texts = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else []
        for text in texts:
            assert not [c for c in text if unicodedata.category(c) in _DROPPED], repr(text)
    key = getattr(event, "key", "")
    assert key.isprintable()


@fuzz(500)
@given(frame=frames_to_translate())
def test_translate_returns_a_clean_event_or_a_translate_error_for_any_headers_and_times(
    frame: tuple[Headers, str],
) -> None:
    headers, zone = frame
    try:
        event = translate(headers, TranslateContext("pbx1", ZoneInfo(zone)), lambda _: None)
    except TranslateError as exc:
        event, header = None, exc.header
    else:
        header = None
    if header is not None:
        assert header.strip()  # names the header it could not read (or that is missing)
        return
    if event is None:
        return
    assert_clean(event)
    if isinstance(event, CallEnded):
        for moment in (event.start, event.end, event.answer):
            if moment is not None:
                assert moment.tzinfo is not None
                moment.astimezone(ZoneInfo("UTC"))  # usable: converting never overflows


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("when", ["0001-01-01 00:00:00", "9999-12-31 23:59:59", "0001-01-01 12:00:00"])
def test_a_cdr_time_at_the_edge_of_the_calendar_is_a_translate_error(zone: str, when: str) -> None:
    """Regression: ``0001-01-01 00:00:00`` in Europe/Bucharest raised OverflowError (its UTC
    instant is in year 0), which escaped the ingest worker and stopped the daemon."""
    headers = [("Event", "Cdr"), ("UniqueID", "1.2"), ("Duration", "1"), ("BillableSeconds", "1")]
    headers += [("StartTime", when), ("AnswerTime", ""), ("EndTime", when)]
    with pytest.raises(TranslateError, match="StartTime"):
        translate(headers, TranslateContext("pbx1", ZoneInfo(zone)))


async def test_the_ingest_worker_survives_a_cdr_it_cannot_translate() -> None:
    """Regression (daemon level): the worker counts an unreadable frame and goes on with the next."""
    from datetime import UTC

    seen: list[object] = []

    class Recorder(EventProcessor):
        def __init__(self) -> None:  # no store: this test only watches what reaches the processor
            pass

        async def handle_many(self, events: object) -> list[bool | Exception]:  # type: ignore[override]
            seen.extend(events)  # type: ignore[call-overload]
            return [True] * len(events)  # type: ignore[arg-type]

    queue = EventQueue(100, on_overflow=lambda: None)
    worker = IngestWorker(queue, Recorder(), TranslateContext("pbx1", ZoneInfo("Europe/Bucharest")))
    base = b"Event: Cdr\r\nUniqueID: %s\r\nDuration: 1\r\nBillableSeconds: 1\r\nAnswerTime: \r\n"
    bad = base % b"1.1" + b"StartTime: 0001-01-01 00:00:00\r\nEndTime: 0001-01-01 00:00:00\r\n\r\n"
    good = base % b"1.2" + b"StartTime: 2026-11-28 16:21:37\r\nEndTime: 2026-11-28 16:21:41\r\n\r\n"
    for item in FrameParser(expect_banner=False).feed(bad + good):
        assert isinstance(item, AmiMessage)
        queue.offer(item)
    queue.close()
    await asyncio.wait_for(worker.run(), 5)
    assert worker.translate_errors == 1
    assert [getattr(e, "unique_id", None) for e in seen] == ["1.2"]
    assert seen[0].start.astimezone(UTC).hour == 14  # type: ignore[attr-defined]


# ---- the correlator's two paths agree -----------------------------------------------------------------

_ID_NAMES = st.sampled_from(
    [b"Uniqueid", b"Linkedid", b"UniqueID", b"LinkedID", b"DestUniqueid", b"DestLinkedid", b"uniqueid",
     b"LINKEDID", b"XUniqueid", b"X-Linkedid", "\u00c9Uniqueid".encode(), "Lin\u212aedid".encode(),
     b"Caller\xe9Linkedid", b"Event", b"Channel"]
)  # fmt: skip
_ID_VALUES = st.sampled_from([b"1.1", b"1.2", b"", b"none", b" 1.3", b"\xff1", "Ș.1".encode(), b"x" * 151]) | st.binary(
    max_size=8
).filter(lambda b: b"\r\n" not in b)


@fuzz(400)
@given(
    lines=st.lists(st.tuples(_ID_NAMES | _NAME_BYTES, st.sampled_from([b": ", b":", b" : "]), _ID_VALUES), max_size=10),
    junk=st.lists(_TOKENS, max_size=4),
    ended=st.booleans(),
)
def test_the_correlators_byte_path_records_exactly_what_the_header_path_records(
    lines: list[tuple[bytes, bytes, bytes]], junk: list[bytes], ended: bool
) -> None:
    frame = b"\r\n".join([b"Event: Newchannel", *(n + s + v for n, s, v in lines), *junk])
    fast, slow = LinkedIdCorrelator(), LinkedIdCorrelator()
    headers = reference_headers(frame)
    if fast.observe_frame(frame, ended=ended):
        slow.observe(headers, ended=ended)
        assert dict(fast._links) == dict(slow._links)
        assert dict(fast._ended) == dict(slow._ended)
    else:
        assert len(fast) == 0  # it gave up without recording anything: the caller falls back


@pytest.mark.parametrize("gmt", [False, True])
def test_a_master_csv_time_at_the_edge_of_the_calendar_is_a_row_error(gmt: bool) -> None:
    """Regression, the reconciliation twin of the above: with ``usegmtime`` the conversion raised
    OverflowError, the pass failed at that row on every retry and no later CDR was recovered."""
    import csv

    from clickphone_agi.domain.cdr_csv import CsvRowError, call_ended_from_csv
    from clickphone_agi.sim.master_csv import csv_record

    cdr = AmiMessage(
        [("Event", "Cdr"), ("UniqueID", "1.2"), ("StartTime", "0001-01-01 00:00:00"), ("AnswerTime", ""),
         ("EndTime", "0001-01-01 00:00:04"), ("Duration", "4"), ("BillableSeconds", "0")]
    )  # fmt: skip
    (fields,) = csv.reader([csv_record(cdr).decode()])
    with pytest.raises(CsvRowError, match="start"):
        call_ended_from_csv(fields, system_name="pbx1", timezone=ZoneInfo("America/New_York"), gmt=gmt)


# ---- a hostile AMI peer against the real client ---------------------------------------------------------


class HostilePeer:
    """A loopback 'Asterisk' that sends the next example's bytes, then hangs up."""

    def __init__(self) -> None:
        self.script: tuple[bool, bool, bytes] = (False, False, b"")
        self.served = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        banner, accept_login, data = self.script
        try:
            if banner:
                writer.write(b"Asterisk Call Manager/11.0.0\r\n")
                if accept_login:  # answer the client's own Login with its ActionID: then the junk
                    async with asyncio.timeout(5):
                        login = await reader.readuntil(b"\r\n\r\n")
                    action_id = next(
                        (line[10:] for line in login.split(b"\r\n") if line.startswith(b"ActionID: ")), b""
                    )
                    writer.write(b"Response: Success\r\nActionID: " + action_id + b"\r\nMessage: ok\r\n\r\n")
            writer.write(data)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.served += 1
            writer.close()


@pytest.fixture
async def peer() -> Any:
    p = HostilePeer()
    port = await p.start()
    yield p, port
    await p.close()


@fuzz(40)
@given(data=STREAMS, banner=st.booleans(), accept_login=st.booleans())
async def test_the_client_survives_any_peer_and_goes_back_to_reconnecting(
    peer: tuple[HostilePeer, int], data: bytes, banner: bool, accept_login: bool
) -> None:
    from clickphone_agi.adapters.ami.client import AmiClient
    from clickphone_agi.clock import FakeClock

    server, port = peer
    server.script = (banner, accept_login, data)
    served = server.served
    received: list[AmiMessage] = []
    client = AmiClient(
        "127.0.0.1", port, "clickphone", "labsecret", "system,call,cdr,user", FakeClock(), received.append,
        max_frame_bytes=4096,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        async with asyncio.timeout(10):  # a hang guard only: the peer hangs up at once
            while server.served == served or client.state not in ("backoff", "auth_failed"):
                assert not task.done(), task
                await asyncio.sleep(0.002)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)  # run() returns normally: no exception escaped it
    assert client.state == "stopped"
    assert client.callback_errors == 0
    assert all(isinstance(m, AmiMessage) for m in received)
    if not (banner and accept_login):
        assert client.connects == 0  # never logged in: no session, whatever was received
