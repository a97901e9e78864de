"""AmiClient against the protocol-level fake Asterisk (AmiReplayServer) on loopback.

Time is a FakeClock: backoff, auth back-off, ping interval and ping timeout only pass when a
test advances it, so nothing here waits on the wall clock for them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from ami_fixtures import (
    FIXTURES,
    SECRET,
    USERNAME,
    advance_until,
    running_client,
    settle,
    summary,
    wait_for,
)
from structlog.testing import capture_logs

from clickphone_agi.adapters.ami.client import AmiClient
from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser, encode_action
from clickphone_agi.clock import FakeClock
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript


class MaxJitter(random.Random):
    """Full jitter drawn at its upper bound, so the delays are predictable."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
async def server() -> AsyncIterator[AmiReplayServer]:
    async with AmiReplayServer(USERNAME, SECRET) as srv:
        yield srv


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def unused_port() -> int:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(srv.sockets[0].getsockname()[1])
    srv.close()
    await srv.wait_closed()
    return port


# -- happy path -------------------------------------------------------------------------------


async def test_logs_in_and_receives_the_answered_call_events_in_order(
    server: AmiReplayServer, clock: FakeClock
) -> None:
    transcript = load_transcript(FIXTURES / "answered_call.ami")
    async with running_client(server, clock=clock) as h:
        await h.connected()
        sent = await server.play(transcript)
        await wait_for(lambda: len(h.received) == 1 + sent)

        assert sent == summary()["answered_call"]["event_count"] - 1
        assert h.client.state == "connected"
        assert h.client.asterisk_version == "11.0.0"
        assert h.client.connects == 1
        # FullyBooted from the login first, then the recording byte for byte, in order
        assert h.received[0].event == "FullyBooted"
        assert [m.raw for m in h.received[1:]] == [f.raw for f in transcript.replay_frames]
        # the Login response is consumed by the client, not delivered
        assert all(m.is_event for m in h.received)
        assert h.client.messages_received == len(h.received) + 1

    login = server.actions_received[0]
    assert login["Action"] == "Login"
    assert login["Username"] == USERNAME
    assert login["Events"] == "system,call,cdr,user"
    assert login["ActionID"]
    assert h.client.snapshot()["state"] == "stopped"


async def test_reader_hands_on_events_without_decoding_their_headers(server: AmiReplayServer, clock: FakeClock) -> None:
    """The reader decodes a frame's Event name only: the rest waits for whoever needs it."""
    seen_undecoded: list[bool] = []

    def on_message(message: AmiMessage) -> None:
        seen_undecoded.append(message._headers is None)

    transcript = load_transcript(FIXTURES / "full_noise.ami")
    async with running_client(server, clock=clock, on_message=on_message) as h:
        await h.connected()
        sent = await server.play(transcript)
        await wait_for(lambda: len(h.received) == 1 + sent)
        assert all(seen_undecoded)
        assert h.received[0].event == "FullyBooted"
        assert all(m.is_event for m in h.received)  # the Login response was consumed, decoded
        assert [m.headers for m in h.received[1:]] == [f.message.headers for f in transcript.replay_frames]


async def test_stop_while_connected_sends_logoff(server: AmiReplayServer, clock: FakeClock) -> None:
    async with running_client(server, clock=clock) as h:
        await h.connected()
    await server.wait_until(lambda: any(a["Action"] == "Logoff" for a in server.actions_received))
    assert [a["Action"] for a in server.actions_received] == ["Login", "Logoff"]


async def test_play_by_packaged_name_reaches_the_client(server: AmiReplayServer, clock: FakeClock) -> None:
    async with running_client(server, clock=clock) as h:
        await h.connected()
        await server.play("user_event")
        await wait_for(lambda: bool(h.events("UserEvent")))
        (event,) = h.events("UserEvent")
        assert event.get("UserEvent") == "ClickPhonePasswordChanged"
        assert event.get("Account") == "acct1001"


async def test_split_utf8_and_latin1_bytes_arrive_intact(server: AmiReplayServer, clock: FakeClock) -> None:
    frame = 'Event: Cdr\r\nCallerID: "Ion Ștefan" <0721000001>\r\n\r\n'.encode()
    cut = frame.index("Ș".encode()) + 1
    async with running_client(server, clock=clock) as h:
        await h.connected()
        await server.send_raw(frame[:cut])
        await settle()
        await server.send_raw(frame[cut:])
        await server.send_raw(b"Event: Hangup\r\nCallerIDName: Andr\xe9\r\n\r\n")
        await wait_for(lambda: len(h.events()) == 3)
    assert h.events("Cdr")[0].get("CallerID") == '"Ion Ștefan" <0721000001>'
    assert h.events("Hangup")[0].get("CallerIDName") == "André"


# -- authentication ---------------------------------------------------------------------------


async def test_wrong_secret_waits_auth_backoff_before_trying_again(server: AmiReplayServer, clock: FakeClock) -> None:
    with capture_logs() as logs:
        async with running_client(
            server, clock=clock, secret="wrong-secret", auth_backoff=300.0, backoff_initial=1.0
        ) as h:
            await wait_for(lambda: h.client.auth_failures == 1)
            assert h.client.state == "auth_failed"
            assert server.logins_failed == 1

            await clock.advance(299.0)
            await settle()
            assert server.connections_accepted == 1, "reconnected before auth_backoff"
            assert server.logins_failed == 1
            assert h.client.state == "auth_failed"

            await clock.advance(1.5)
            await server.wait_until(lambda: server.logins_failed == 2)
            await wait_for(lambda: h.client.auth_failures == 2)
            assert h.client.connects == 0
            assert h.client.last_error == "Authentication failed"

    assert any(e["event"] == "ami.auth_failed" for e in logs)
    assert "wrong-secret" not in repr(logs), "the secret must never be logged"


async def test_stop_during_auth_backoff_ends_run_promptly(server: AmiReplayServer, clock: FakeClock) -> None:
    async with running_client(server, clock=clock, secret="nope", auth_backoff=3600.0) as h:
        await wait_for(lambda: h.client.state == "auth_failed")
        h.stop.set()
        await asyncio.wait_for(h.task, timeout=2.0)  # the fake clock never reaches 3600 s
        assert h.client.state == "stopped"


# -- lost links -------------------------------------------------------------------------------


async def test_half_open_link_is_detected_by_ping_timeout_and_reconnected(
    server: AmiReplayServer, clock: FakeClock
) -> None:
    server.answer_pings = False
    async with running_client(server, clock=clock, ping_interval=20.0, ping_timeout=10.0) as h:
        await h.connected()

        await clock.advance(20.0)  # first ping goes out
        await server.wait_until(lambda: any(a["Action"] == "Ping" for a in server.actions_received))
        await clock.advance(9.5)  # not yet overdue
        await settle()
        assert h.client.pings_missed == 0
        assert h.client.state == "connected"

        server.answer_pings = True  # the next link is healthy
        with capture_logs() as logs:
            await clock.advance(1.0)
            await wait_for(lambda: h.client.pings_missed == 1)
            await advance_until(clock, lambda: server.logins_ok >= 2, step=0.25)
        assert server.pings_answered == 0
        assert h.client.disconnects == 1
        assert h.client.last_error is not None
        assert "Ping" in h.client.last_error
        assert any(e["event"] == "ami.ping_timeout" for e in logs)
        await wait_for(lambda: h.client.connects == 2)

        # the new link answers pings and stays up
        await clock.advance(20.0)
        await server.wait_until(lambda: server.pings_answered == 1)
        await clock.advance(15.0)
        await settle()
        assert h.client.pings_missed == 1
        assert h.client.state == "connected"
        assert server.logins_ok == 2


async def test_callback_error_does_not_drop_the_connection(server: AmiReplayServer, clock: FakeClock) -> None:
    def explode_on_newchannel(message: AmiMessage) -> None:
        if message.event == "Newchannel":
            raise RuntimeError("consumer bug")

    transcript = load_transcript(FIXTURES / "answered_call.ami")
    async with running_client(server, clock=clock, on_message=explode_on_newchannel) as h:
        await h.connected()
        sent = await server.play(transcript)
        await wait_for(lambda: len(h.received) == 1 + sent)
        assert h.client.callback_errors == 4  # four Newchannel events in the recording
        assert h.client.connects == 1
        assert h.client.disconnects == 0
        assert h.client.state == "connected"
        assert h.received[-1].raw == transcript.replay_frames[-1].raw
        assert server.connections_accepted == 1


async def test_dropped_connection_reconnects_with_backoff(server: AmiReplayServer, clock: FakeClock) -> None:
    async with running_client(server, clock=clock, backoff_initial=1.0, rng=MaxJitter()) as h:
        await h.connected()
        assert await server.drop_clients() == 1
        await wait_for(lambda: h.client.state == "backoff")
        assert h.client.disconnects == 1

        await clock.advance(0.9)  # MaxJitter: the first delay is exactly backoff_initial
        await settle()
        assert server.connections_accepted == 1
        await clock.advance(0.2)
        await server.wait_for_login(logins=2)
        await wait_for(lambda: h.client.connects == 2)

        await server.play("user_event")
        await wait_for(lambda: bool(h.events("UserEvent")))
        assert len(h.events("FullyBooted")) == 2


async def test_shutdown_event_is_delivered_then_the_client_reconnects(
    server: AmiReplayServer, clock: FakeClock
) -> None:
    with capture_logs() as logs:
        async with running_client(server, clock=clock) as h:
            await server.wait_for_login()
            await server.play("shutdown")
            await wait_for(lambda: bool(h.events("Shutdown")))
            await advance_until(clock, lambda: server.logins_ok >= 2)
            await wait_for(lambda: h.client.connects == 2)
            assert h.client.disconnects == 1
    (shutdown,) = h.events("Shutdown")
    assert shutdown.get("Shutdown") == "Cleanly"
    assert any(e["event"] == "ami.asterisk_shutdown" for e in logs)


async def test_backoff_doubles_up_to_the_cap_while_asterisk_is_down(clock: FakeClock) -> None:
    port = await unused_port()
    delays: list[float] = []
    with capture_logs() as logs:
        async with running_client(
            None, port=port, clock=clock, rng=MaxJitter(), backoff_initial=1.0, backoff_max=8.0
        ) as h:
            for _ in range(6):
                await wait_for(lambda: h.client.state == "backoff")
                delay = [e for e in logs if e["event"] == "ami.backoff"][-1]["seconds"]
                delays.append(delay)
                await clock.advance(delay)
                await wait_for(lambda: len(delays) < len([e for e in logs if e["event"] == "ami.backoff"]))
            assert h.client.connects == 0
            assert h.client.last_error is not None
            assert "ConnectionRefusedError" in h.client.last_error
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


async def test_full_jitter_stays_within_the_exponential_bound(clock: FakeClock) -> None:
    port = await unused_port()
    with capture_logs() as logs:
        async with running_client(
            None,
            port=port,
            clock=clock,
            rng=random.Random(7),
            backoff_initial=1.0,
            backoff_max=4.0,
        ):
            await advance_until(clock, lambda: len([e for e in logs if e["event"] == "ami.backoff"]) >= 6)
    seconds = [e["seconds"] for e in logs if e["event"] == "ami.backoff"][:6]
    bounds = [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(0.0 <= s <= b for s, b in zip(seconds, bounds, strict=True))
    assert len(set(seconds)) > 1  # jittered, not a fixed schedule


async def test_stop_during_backoff_ends_run_promptly(clock: FakeClock) -> None:
    port = await unused_port()
    async with running_client(
        None, port=port, clock=clock, rng=MaxJitter(), backoff_initial=1000.0, backoff_max=1000.0
    ) as h:
        await wait_for(lambda: h.client.state == "backoff")
        h.stop.set()
        await asyncio.wait_for(h.task, timeout=2.0)  # the fake clock never reaches 1000 s
        assert h.client.state == "stopped"


async def test_silent_server_is_bounded_by_connect_timeout(clock: FakeClock) -> None:
    """A peer that accepts but never sends the banner must not hang the client."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = int(srv.sockets[0].getsockname()[1])
    try:
        async with running_client(None, port=port, clock=clock, connect_timeout=10.0) as h:
            await wait_for(lambda: len(accepted) == 1)
            await clock.advance(9.0)
            await settle()
            assert h.client.state == "connecting"
            await clock.advance(1.5)
            await wait_for(lambda: h.client.state == "backoff")
            assert h.client.last_error is not None
            assert "TimeoutError" in h.client.last_error
    finally:
        for w in accepted:
            w.close()
        srv.close()
        await srv.wait_closed()


async def test_run_twice_at_once_is_refused(server: AmiReplayServer, clock: FakeClock) -> None:
    async with running_client(server, clock=clock) as h:
        await h.connected()
        with pytest.raises(RuntimeError, match="already running"):
            await h.client.run(asyncio.Event())


def test_credentials_with_crlf_are_refused_at_construction(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        AmiClient("127.0.0.1", 5038, "u", "s\r\nAction: Originate", "on", clock, print)


# -- the fake server itself --------------------------------------------------------------------


async def _raw_session(server: AmiReplayServer, actions: bytes, frames: int) -> tuple[bytes, list[AmiMessage]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    parser = FrameParser()
    items: list[object] = []
    try:
        writer.write(actions)
        async with asyncio.timeout(5):
            while len([i for i in items if isinstance(i, AmiMessage)]) < frames:
                data = await reader.read(4096)
                if not data:
                    break
                items.extend(parser.feed(data))
    finally:
        writer.close()
        await writer.wait_closed()
    banner = items[0]
    return getattr(banner, "raw", b""), [i for i in items if isinstance(i, AmiMessage)]


async def test_server_speaks_like_asterisk(server: AmiReplayServer) -> None:
    actions = (
        encode_action("Login", "a-1", Username=USERNAME, Secret=SECRET, Events="on")
        + encode_action("Ping", "a-2")
        + encode_action("Originate", "a-3", Channel="Local/1@x")
        + encode_action("Logoff", "a-4")
    )
    banner, msgs = await _raw_session(server, actions, frames=5)
    assert banner == b"Asterisk Call Manager/11.0.0\r\n"
    assert [(m.response, m.event, m.action_id) for m in msgs] == [
        ("Success", None, "a-1"),
        (None, "FullyBooted", None),
        ("Success", None, "a-2"),
        ("Error", None, "a-3"),
        ("Goodbye", None, "a-4"),
    ]
    assert msgs[0].get("Message") == "Authentication accepted"
    assert msgs[2].get("Ping") == "Pong"
    assert float(msgs[2].get("Timestamp") or "0") > 0
    assert msgs[3].get("Message") == "Invalid/unknown command"
    assert server.logins_ok == 1
    assert server.pings_answered == 1
    assert [a["Action"] for a in server.actions_received] == [
        "Login",
        "Ping",
        "Originate",
        "Logoff",
    ]


async def test_server_refuses_a_wrong_secret_and_closes(server: AmiReplayServer) -> None:
    actions = encode_action("Login", "b-1", Username=USERNAME, Secret="bad", Events="on")
    _, msgs = await _raw_session(server, actions + encode_action("Ping", "b-2"), frames=2)
    assert [(m.response, m.get("Message")) for m in msgs] == [("Error", "Authentication failed")]
    assert server.logins_failed == 1
    assert server.pings_answered == 0


async def test_play_without_a_logged_in_client_fails_loudly(server: AmiReplayServer) -> None:
    with pytest.raises(LookupError):
        await server.play("answered_call")


async def test_oversized_frame_drops_the_link_and_the_client_reconnects(
    server: AmiReplayServer, clock: FakeClock
) -> None:
    async with running_client(server, clock=clock, max_frame_bytes=1024) as h:
        await h.connected()
        await server.send_raw(b"Event: Flood\r\nData: " + b"a" * 2000)
        await wait_for(lambda: h.client.disconnects == 1)
        assert h.client.last_error is not None
        assert h.client.last_error.startswith("AmiProtocolError")
        assert not h.events("Flood")
        await advance_until(clock, lambda: h.client.connects == 2)
        assert h.client.state == "connected"


async def test_events_ahead_of_an_oversized_frame_in_one_read_are_delivered_before_the_link_drops(
    server: AmiReplayServer, clock: FakeClock
) -> None:
    cdr = next(f.raw for f in load_transcript(FIXTURES / "missed_call.ami").replay_frames if f.message.event == "Cdr")
    async with running_client(server, clock=clock, max_frame_bytes=1024) as h:
        await h.connected()
        await server.send_raw(cdr + b"Event: Flood\r\nData: " + b"a" * 2000 + b"\r\n\r\n")
        await wait_for(lambda: h.client.disconnects == 1)
        assert [m.raw for m in h.events("Cdr")] == [cdr]
        assert not h.events("Flood")
        assert h.client.last_error is not None
        assert h.client.last_error.startswith("AmiProtocolError")


async def test_queued_scenarios_play_to_the_next_client_that_logs_in(server: AmiReplayServer, clock: FakeClock) -> None:
    server.queue_scenarios("user_event", FIXTURES / "shutdown.ami")
    async with running_client(server, clock=clock) as h:
        await wait_for(lambda: bool(h.events("Shutdown")))
        assert [m.event for m in h.received] == ["FullyBooted", "UserEvent", "Shutdown"]
        await advance_until(clock, lambda: h.client.connects == 2)
        assert [m.event for m in h.received][3:] == ["FullyBooted"]  # the queue was used once


async def test_play_to_one_connection_only(server: AmiReplayServer, clock: FakeClock) -> None:
    async with running_client(server, clock=clock) as first, running_client(server, clock=clock) as second:
        await first.connected()
        await second.connected()
        ids = server.logged_in
        assert len(ids) == 2
        await server.play("user_event", connection=ids[-1])
        await wait_for(lambda: len(first.events("UserEvent")) + len(second.events("UserEvent")) == 1)
        await settle()
        assert len(first.events("UserEvent")) + len(second.events("UserEvent")) == 1
        with pytest.raises(LookupError):
            await server.play("user_event", connection=999)
