"""AMI framing and parsing against the real Asterisk 22 recordings and hostile input."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import pytest
from ami_fixtures import FIXTURES, summary, transcript_paths
from hypothesis import given, settings
from hypothesis import strategies as st

from clickphone_agi.adapters.ami.protocol import (
    AmiMessage,
    AmiProtocolError,
    Banner,
    FrameParser,
    encode_action,
    parse_frame,
)
from clickphone_agi.sim.ami_server import load_transcript, packaged_scenarios

SUMMARY = summary()
SCENARIOS = sorted(SUMMARY)


def feed_in_chunks(data: bytes, sizes: list[int]) -> list[AmiMessage | Banner]:
    parser = FrameParser()
    out: list[AmiMessage | Banner] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out.extend(parser.feed(data[pos : pos + size]))
        pos += size
        i += 1
    assert parser.buffered == 0, "bytes left over after the last frame"
    return out


def messages(items: list[AmiMessage | Banner]) -> list[AmiMessage]:
    return [m for m in items if isinstance(m, AmiMessage)]


def type_counts(msgs: list[AmiMessage]) -> Counter[str]:
    """Counted the way summary.json does: event name, or '(Response: X)' for replies."""
    return Counter(m.event if m.event is not None else f"(Response: {m.response})" for m in msgs)


def test_every_fixture_transcript_is_listed_in_the_summary() -> None:
    assert sorted(p.stem for p in transcript_paths()) == SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("chunking", ["one_shot", "one_byte", "random"])
def test_transcript_parses_to_the_recorded_event_counts(scenario: str, chunking: str) -> None:
    data = (FIXTURES / f"{scenario}.ami").read_bytes()
    if chunking == "one_shot":
        sizes = [len(data)]
    elif chunking == "one_byte":
        sizes = [1]
    else:
        rng = random.Random(scenario)
        sizes = [rng.randint(1, 700) for _ in range(64)]
    items = feed_in_chunks(data, sizes)
    expected = SUMMARY[scenario]

    assert items[0] == Banner(version="11.0.0", raw=b"Asterisk Call Manager/11.0.0\r\n")
    assert expected["banner"] == "Asterisk Call Manager/11.0.0"
    msgs = messages(items)
    assert len(msgs) == expected["message_count"]
    assert sum(m.is_event for m in msgs) == expected["event_count"]
    assert type_counts(msgs) == Counter(expected["events_by_type"])
    # the recorder's own parse of each key event and CDR is reproduced header for header
    dicts = [m.as_dict() for m in msgs]
    for key_event in expected["key_events"].values():
        assert key_event in dicts
    for cdr in expected.get("all_cdrs", []):
        assert cdr in dicts
    # nothing dropped: the frames' raw bytes put back together are the recording
    assert b"".join(i.raw for i in items) == data


def test_login_and_ping_responses_match_the_summary() -> None:
    for scenario in SCENARIOS:
        msgs = messages(FrameParser().feed((FIXTURES / f"{scenario}.ami").read_bytes()))
        responses = [m.as_dict() for m in msgs if m.is_response]
        assert responses[0] == SUMMARY[scenario]["login_response"]
        assert responses[1] == SUMMARY[scenario]["ping_response"]


def test_originate_response_and_user_event_count_as_events_not_replies() -> None:
    """Both carry an ActionID (and OriginateResponse a Response header); neither is a reply."""
    answered = messages(FrameParser().feed((FIXTURES / "answered_call.ami").read_bytes()))
    originate = next(m for m in answered if m.event == "OriginateResponse")
    assert originate.response == "Success"
    assert originate.action_id == "answered_call-3"
    assert originate.is_event
    assert not originate.is_response

    user = messages(FrameParser().feed((FIXTURES / "user_event.ami").read_bytes()))
    user_event = next(m for m in user if m.event == "UserEvent")
    assert user_event.action_id == "user_event-3"
    assert not user_event.is_response


def test_empty_value_of_the_last_header_is_kept() -> None:
    """Every recorded Cdr ends with ``UserField: `` (panoramisk loses it)."""
    parser = FrameParser(expect_banner=False)
    (with_space,) = parser.feed(b"Event: Cdr\r\nUniqueID: 1.1\r\nUserField: \r\n\r\n")
    (no_space,) = parser.feed(b"Event: Cdr\r\nUserField:\r\n\r\n")
    assert isinstance(with_space, AmiMessage)
    assert isinstance(no_space, AmiMessage)
    assert with_space.headers[-1] == ("UserField", "")
    assert with_space.get("UserField") == ""
    assert no_space.get("UserField", "missing") == ""

    answered = messages(FrameParser().feed((FIXTURES / "answered_call.ami").read_bytes()))
    cdrs = [m for m in answered if m.event == "Cdr"]
    assert cdrs
    assert all(m.headers[-1] == ("UserField", "") for m in cdrs)


def test_only_one_space_after_the_colon_is_removed() -> None:
    (msg,) = FrameParser(expect_banner=False).feed(b"Event: X\r\nData:  two spaces \r\n\r\n")
    assert isinstance(msg, AmiMessage)
    assert msg.get("Data") == " two spaces "


@pytest.mark.parametrize(
    ("text", "cut"),
    [("Ion Ștefan Bălănescu", "Ș"), ("Jörg Müller", "ö"), ("Vasile Ionescu ș", "ș")],
)
def test_utf8_character_split_between_reads_survives(text: str, cut: str) -> None:
    frame = f'Event: Cdr\r\nCallerID: "{text}" <0744123456>\r\n\r\n'.encode()
    split_at = frame.index(cut.encode()) + 1  # inside the multi-byte sequence
    parser = FrameParser(expect_banner=False)
    assert parser.feed(frame[:split_at]) == []
    (msg,) = parser.feed(frame[split_at:])
    assert isinstance(msg, AmiMessage)
    assert msg.get("CallerID") == f'"{text}" <0744123456>'


def test_non_utf8_value_decodes_as_latin1_without_losing_bytes() -> None:
    parser = FrameParser(expect_banner=False)
    (msg,) = parser.feed(b"Event: Hangup\r\nCallerIDName: Andr\xe9 \xff\x80\r\nExten: 100\r\n\r\n")
    assert isinstance(msg, AmiMessage)
    value = msg.get("CallerIDName")
    assert value == "Andr\xe9 \xff\x80"
    assert value is not None
    assert value.encode("latin-1") == b"Andr\xe9 \xff\x80"
    assert msg.get("Exten") == "100"  # other headers still UTF-8


def test_bare_lf_or_cr_inside_a_value_does_not_split_the_frame() -> None:
    """A hostile caller name reaches the Cdr CallerID raw; it must not forge an Event line."""
    payload = (
        b'Event: Cdr\r\nCallerID: "Evil\\\nEvent: Forged\\\rX: y\\\r\\\nZ: w" <1>\r\nDisposition: ANSWERED\r\n\r\n'
    )
    items = FrameParser(expect_banner=False).feed(payload)
    assert len(items) == 1
    msg = items[0]
    assert isinstance(msg, AmiMessage)
    assert msg.event == "Cdr"
    assert msg.get("CallerID") == '"Evil\\\nEvent: Forged\\\rX: y\\\r\\\nZ: w" <1>'
    assert msg.get_all("Event") == ["Cdr"]
    assert msg.get("Disposition") == "ANSWERED"


def test_line_without_colon_is_kept_under_empty_name() -> None:
    (msg,) = FrameParser(expect_banner=False).feed(b"Event: X\r\ngarbage line\r\nA: b\r\n\r\n")
    assert isinstance(msg, AmiMessage)
    assert msg.headers == (("Event", "X"), ("", "garbage line"), ("A", "b"))


def test_repeated_headers_keep_order_and_lookup_is_case_insensitive() -> None:
    (msg,) = FrameParser(expect_banner=False).feed(
        b"Event: Newchannel\r\nChanVariable: A=1\r\nchanvariable: B=2\r\n\r\n"
    )
    assert isinstance(msg, AmiMessage)
    assert msg.get("CHANVARIABLE") == "A=1"
    assert msg.get_all("ChanVariable") == ["A=1", "B=2"]
    assert msg.as_dict() == {"Event": "Newchannel", "ChanVariable": "A=1", "chanvariable": "B=2"}
    assert msg.get("Missing", "dflt") == "dflt"


def test_stray_blank_lines_between_frames_are_ignored() -> None:
    items = FrameParser(expect_banner=False).feed(b"\r\n\r\nEvent: A\r\n\r\n\r\nEvent: B\r\n\r\n")
    assert [m.event for m in messages(items)] == ["A", "B"]


def test_frame_terminator_split_across_reads() -> None:
    parser = FrameParser(expect_banner=False)
    assert parser.feed(b"Event: A\r\n\r") == []
    assert [m.event for m in messages(parser.feed(b"\nEvent: B\r\n"))] == ["A"]
    assert [m.event for m in messages(parser.feed(b"\r\n"))] == ["B"]


def test_oversized_frame_without_end_raises() -> None:
    parser = FrameParser(max_frame_bytes=64, expect_banner=False)
    parser.feed(b"Event: Flood\r\n" + b"X: " + b"a" * 40)
    with pytest.raises(AmiProtocolError):
        parser.feed(b"a" * 40)


def test_oversized_complete_frame_raises() -> None:
    parser = FrameParser(max_frame_bytes=64, expect_banner=False)
    assert parser.feed(b"Event: Small\r\n\r\n")  # under the limit is fine
    with pytest.raises(AmiProtocolError):
        parser.feed(b"Event: Big\r\nX: " + b"a" * 80 + b"\r\n\r\n")


@pytest.mark.parametrize("ending", [b"\r\n\r\n", b""], ids=["complete", "without-end"])
def test_frames_ahead_of_an_oversized_one_in_the_same_read_come_with_the_error(ending: bytes) -> None:
    """Regression: the recorded call's frames, Cdr included, that arrived in the same read as a
    flood were dropped with it; they are the error's ``parsed``, in order, and the error stays."""
    data = (FIXTURES / "missed_call.ami").read_bytes()
    expected = FrameParser().feed(data)
    flood = b"Event: Flood\r\nData: " + b"a" * 2000 + ending
    with pytest.raises(AmiProtocolError, match="exceeds 1024 bytes") as caught:
        FrameParser(max_frame_bytes=1024).feed(data + flood)
    assert caught.value.parsed == tuple(expected)
    assert "Cdr" in [m.event for m in messages(list(caught.value.parsed))]


def test_default_limit_is_one_mebibyte() -> None:
    parser = FrameParser(expect_banner=False)
    parser.feed(b"Event: Big\r\nX: " + b"a" * (1024 * 1024 - 100))
    with pytest.raises(AmiProtocolError):
        parser.feed(b"a" * 200)


@pytest.mark.parametrize(
    "first_line",
    [b"HTTP/1.1 400 Bad Request\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"Response: Success\r\n"],
)
def test_a_peer_that_is_not_ami_is_a_protocol_error(first_line: bytes) -> None:
    with pytest.raises(AmiProtocolError):
        FrameParser().feed(first_line)


def test_banner_split_across_reads() -> None:
    parser = FrameParser()
    assert parser.feed(b"Asterisk Call Man") == []
    items = parser.feed(b"ager/11.0.0\r\nResponse: Success\r\n\r\n")
    assert items[0] == Banner(version="11.0.0", raw=b"Asterisk Call Manager/11.0.0\r\n")
    assert isinstance(items[1], AmiMessage)
    assert items[1].response == "Success"


def test_encode_action_reproduces_the_recorded_login_and_ping() -> None:
    sent = (FIXTURES / "shutdown.sent").read_bytes()
    login = encode_action("Login", "shutdown-1", Username="clickphone", Secret="labsecret", Events="on")
    ping = encode_action("Ping", "shutdown-2")
    assert sent == login + ping


@pytest.mark.parametrize("bad", ["a\r\nAction: Originate", "a\nb", "a\rb"])
def test_encode_action_rejects_cr_and_lf(bad: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        encode_action("UserEvent", "id-1", UserEvent=bad)
    with pytest.raises(ValueError, match="CR or LF"):
        encode_action("Ping", bad)
    with pytest.raises(ValueError, match="CR or LF"):
        encode_action(bad, "id-1")
    with pytest.raises(ValueError, match="CR or LF"):
        encode_action("UserEvent", "id-1", **{bad: "x"})


def test_encode_action_error_does_not_echo_the_value() -> None:
    with pytest.raises(ValueError, match="Secret") as info:
        encode_action("Login", "1", Username="u", Secret="s3cr3t\r\nx")
    assert "s3cr3t" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(
    scenario=st.sampled_from(["answered_call", "voicemail", "fax", "user_event", "shutdown"]),
    cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=80),
)
def test_any_chunking_yields_the_same_messages(scenario: str, cuts: list[int]) -> None:
    data = (FIXTURES / f"{scenario}.ami").read_bytes()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    parser = FrameParser()
    chunked: list[AmiMessage | Banner] = []
    for start, end in itertools.pairwise(bounds):
        chunked.extend(parser.feed(data[start:end]))
    assert chunked == FrameParser().feed(data)


def test_load_transcript_classifies_frames_and_keeps_bytes() -> None:
    for path in transcript_paths():
        transcript = load_transcript(path)
        expected = SUMMARY[path.stem]
        assert transcript.banner == b"Asterisk Call Manager/11.0.0\r\n"
        assert len(transcript.frames) == expected["message_count"]
        assert len(transcript.events) == expected["event_count"]
        assert transcript.banner + b"".join(f.raw for f in transcript.frames) == (path.read_bytes())
        # replay skips the responses and the login's FullyBooted
        replay = transcript.replay_frames
        assert len(replay) == expected["event_count"] - 1
        assert all(f.kind == "event" and f.raw.endswith(b"\r\n\r\n") for f in replay)
        assert "FullyBooted" not in [f.message.event for f in replay]


def test_packaged_scenarios_match_the_fixtures() -> None:
    packaged = packaged_scenarios()
    assert sorted(packaged) == SCENARIOS
    for name, path in packaged.items():
        assert isinstance(path, Path)
        assert path.read_bytes() == (FIXTURES / f"{name}.ami").read_bytes()
    shutdown = load_transcript(packaged["shutdown"]).replay_frames
    assert [f.message.event for f in shutdown] == ["Shutdown"]


# --- lazy parsing against a straightforward eager reference -----------------------------------


def reference_headers(frame: bytes) -> tuple[tuple[str, str], ...]:
    """The parser as it was before headers became lazy: split on CRLF, skip empty lines, name and
    value each decoded on their own (UTF-8, else latin-1), one space after the colon removed."""

    def decode(data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")

    headers: list[tuple[str, str]] = []
    for line in frame.split(b"\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            headers.append(("", decode(line)))
            continue
        if value.startswith(b" "):
            value = value[1:]
        headers.append((decode(name), decode(value)))
    return tuple(headers)


def reference_frames(data: bytes) -> list[tuple[bytes, tuple[tuple[str, str], ...]]]:
    """``(raw, headers)`` of every non-empty frame of a banner-less stream, eagerly."""
    out = []
    pos = 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        headers = reference_headers(data[pos:end])
        if headers:
            out.append((data[pos : end + 4], headers))
        pos = end + 4
    return out


def assert_matches_reference(message: AmiMessage, raw: bytes, headers: tuple[tuple[str, str], ...]) -> None:
    event = next((v for k, v in headers if k.lower() == "event"), None)
    assert message.event == event  # decided at parse time, before any header is decoded
    assert message.raw == raw
    assert message.headers == headers
    assert message.is_event == (event is not None)
    response = next((v for k, v in headers if k.lower() == "response"), None)
    assert message.is_response == (event is None and response is not None)
    assert message == AmiMessage(headers=headers, raw=raw)
    assert hash(message) == hash(AmiMessage(headers=headers, raw=raw))
    assert reference_headers(message.frame or b"") == headers


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("chunk", [1, 7, 700, 65536])
def test_lazy_messages_equal_the_eager_reference_parse(scenario: str, chunk: int) -> None:
    data = (FIXTURES / f"{scenario}.ami").read_bytes()
    banner_end = data.index(b"\r\n") + 2
    items = feed_in_chunks(data, [chunk])
    expected = reference_frames(data[banner_end:])
    msgs = messages(items)
    assert len(msgs) == len(expected)
    for message, (raw, headers) in zip(msgs, expected, strict=True):
        assert_matches_reference(message, raw, headers)


HOSTILE_FRAMES = [
    b'Event: Cdr\r\nCallerID: "Evil\\\nUniqueid: 1\\\rX: y" <1>\r\nUserField: \r\n\r\n',  # raw LF/CR
    b"Event: Hangup\r\nCallerIDName: Andr\xe9 \xff\x80\r\nExten: 100\r\n\r\n",  # latin-1 value
    b"Event: Hangup\r\nCallerIDName: \xc8\x98tefan\r\n\r\n",  # UTF-8 value
    b"Event: Hangup\r\nCaller\xe9Name: x\r\nExten: \xe2\x84\xaa\r\n\r\n",  # latin-1 name, UTF-8 value
    b"Event: Caf\xe9\r\nA: b\r\n\r\n",  # a latin-1 event name
    b"Event: Cdr\nEvent: Forged\r\nA: b\r\n\r\n",  # a raw LF in the Event line
    b"Event:  two spaces\r\n\r\n",
    b"Event:NoSpace\r\nA: b\r\n\r\n",
    b"event: lower\r\nEvent: Second\r\n\r\n",
    b"Privilege: call,all\r\nEvent: NotFirst\r\n\r\n",
    b"\r\n\r\nEvent: AfterBlankLines\r\n\r\n",
    b"Response: Success\r\nActionID: 1\r\nMessage: x\r\n\r\n",
    b"garbage line\r\nA: b\r\n\r\n",
    b"Event: X\r\ngarbage line\r\nA:\r\nB: \r\n\r\n",
    b"Event: \r\n\r\n",
    b":\r\n\r\n",
]


@pytest.mark.parametrize("frame", HOSTILE_FRAMES)
def test_hostile_frames_parse_like_the_eager_reference(frame: bytes) -> None:
    expected = reference_frames(frame)
    for chunk in (1, 3, len(frame)):
        parser = FrameParser(expect_banner=False)
        items = [item for start in range(0, len(frame), chunk) for item in parser.feed(frame[start : start + chunk])]
        msgs = messages(items)
        assert len(msgs) == len(expected)
        for message, (raw, headers) in zip(msgs, expected, strict=True):
            assert_matches_reference(message, raw, headers)
        assert parser.buffered == 0
    # parse_frame (the transcript loader's path) agrees too
    body = frame.removesuffix(b"\r\n\r\n")
    single = parse_frame(body)
    if not reference_headers(body):
        assert single is None
    else:
        assert single is not None
        assert single.headers == reference_headers(body)
        assert single.raw == body + b"\r\n\r\n"


_LINE_PARTS = st.sampled_from(
    [b"Event", b"event", b"Response", b"Uniqueid", b": ", b":", b" ", b"\n", b"\r", b"x", b"\xe9", b"\xc8\x98", b"\xff"]
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    lines=st.lists(st.lists(_LINE_PARTS, max_size=8).map(b"".join), min_size=0, max_size=8),
    first_is_event=st.booleans(),
    cut=st.integers(min_value=0, max_value=200),
)
def test_any_frame_parses_like_the_eager_reference(lines: list[bytes], first_is_event: bool, cut: int) -> None:
    body = b"\r\n".join([b"Event: Fuzz", *lines] if first_is_event else lines)
    data = body + b"\r\n\r\n" + b"Event: Next\r\nA: b\r\n\r\n"
    expected = reference_frames(data)
    parser = FrameParser(expect_banner=False)
    cut %= len(data) + 1
    msgs = messages(parser.feed(data[:cut]) + parser.feed(data[cut:]))
    assert len(msgs) == len(expected)
    for message, (raw, headers) in zip(msgs, expected, strict=True):
        assert_matches_reference(message, raw, headers)


def test_an_event_frame_decodes_only_its_event_name_until_asked() -> None:
    raw = b"Event: Newexten\r\nChannel: PJSIP/100-00000001\r\nAppData: \xff\r\n\r\n"
    (message,) = FrameParser(expect_banner=False).feed(raw)
    assert isinstance(message, AmiMessage)
    assert message.event == "Newexten"
    assert message.frame is message.raw
    assert message._headers is None  # nothing decoded yet: the worker skips most frames unread
    assert message.get("AppData") == "\xff"
    assert message._headers is not None
    assert message.headers is message.headers  # parsed once, then cached


def test_a_message_built_from_headers_behaves_like_the_dataclass_it_was() -> None:
    message = AmiMessage(headers=(("Event", "Cdr"), ("UserField", "")))
    assert message.raw == b""
    assert message.frame is None
    assert message.event == "Cdr"
    assert message == AmiMessage((("Event", "Cdr"), ("UserField", "")), b"")
    assert message != AmiMessage((("Event", "Cdr"),))
    assert message != (("Event", "Cdr"), ("UserField", ""))
    assert len({message, AmiMessage((("Event", "Cdr"), ("UserField", "")))}) == 1
    assert repr(message) == "AmiMessage(headers=(('Event', 'Cdr'), ('UserField', '')), raw=b'')"
    with pytest.raises(AttributeError):
        message.event = "Forged"  # type: ignore[misc]
    response = AmiMessage([("Response", "Success"), ("ActionID", "a-1")])
    assert response.is_response
    assert not response.is_event
    assert response.headers == (("Response", "Success"), ("ActionID", "a-1"))


def test_frame_size_limit_counts_each_frame_not_the_whole_read() -> None:
    parser = FrameParser(max_frame_bytes=64, expect_banner=False)
    frame = b"Event: A\r\nX: " + b"a" * 30 + b"\r\n\r\n"  # 47 bytes
    items = parser.feed(frame * 5)  # five frames in one read: 235 bytes, each under the limit
    assert [m.event for m in messages(items)] == ["A"] * 5
    with pytest.raises(AmiProtocolError, match="exceeds 64 bytes"):
        FrameParser(max_frame_bytes=64, expect_banner=False).feed(frame + b"Event: B\r\nX: " + b"b" * 60 + b"\r\n\r\n")
