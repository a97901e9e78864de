"""The fake Asterisk drops a client that stops reading, as Asterisk's ``writetimeout`` does.

Asterisk writes to each AMI session with ``writetimeout`` (default 100 ms) and disconnects a
client it cannot write to in that time; the events that client missed are gone. A client that
reads continuously (ours) must never be dropped, however long the stream.

Real time and real loopback sockets: the timeouts below only guard against a hang, nothing
asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from ami_fixtures import FIXTURES, SECRET, USERNAME, running_client, wait_for
from structlog.testing import capture_logs

from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser
from clickphone_agi.clock import FakeClock
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript

LOGIN = b"Action: Login\r\nUsername: clickphone\r\nSecret: labsecret\r\n\r\n"


@pytest.fixture
async def server() -> AsyncIterator[AmiReplayServer]:
    async with AmiReplayServer(USERNAME, SECRET) as srv:
        yield srv


async def _read_frames_until(
    reader: asyncio.StreamReader, parser: FrameParser, done: str, timeout: float = 5.0
) -> list[AmiMessage]:
    """Read until an ``Event: <done>`` frame arrives; returns the frames read."""
    frames: list[AmiMessage] = []
    async with asyncio.timeout(timeout):
        while not any(m.event == done for m in frames):
            data = await reader.read(4096)
            assert data, "server closed the connection during login"
            frames.extend(m for m in parser.feed(data) if isinstance(m, AmiMessage))
    return frames


async def _read_to_the_end(reader: asyncio.StreamReader, parser: FrameParser) -> list[AmiMessage]:
    """Whatever was still in the socket buffers, until EOF or reset."""
    frames: list[AmiMessage] = []
    async with asyncio.timeout(30):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError:
                break
            if not data:
                break
            frames.extend(m for m in parser.feed(data) if isinstance(m, AmiMessage))
    return frames


async def test_client_that_stops_reading_is_dropped(server: AmiReplayServer) -> None:
    transcript = load_transcript(FIXTURES / "answered_call.ami")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    parser = FrameParser()
    try:
        writer.write(LOGIN)
        login = await _read_frames_until(reader, parser, done="FullyBooted")
        assert [m.response or m.event for m in login] == ["Success", "FullyBooted"]
        (conn,) = server.logged_in

        writer.transport.pause_reading()  # the client stops reading; its socket buffer fills up
        plays = 0
        with capture_logs() as logs:
            async with asyncio.timeout(30):  # hang guard only
                # up to 3,000 x 22 KB = 66 MB; the drop comes after a few hundred KB
                for _ in range(3000):
                    try:
                        await server.play(transcript, connection=conn)
                    except LookupError:  # the connection is gone: dropped
                        break
                    plays += 1
                else:
                    pytest.fail("the server kept writing to a client that does not read")

        assert server.slow_client_drops == 1
        assert server.logged_in == []
        assert server.write_waits >= 1
        dropped = [e for e in logs if e["event"] == "ami_sim.slow_client_dropped"]
        assert len(dropped) == 1
        assert dropped[0]["connection"] == conn
        assert dropped[0]["log_level"] == "warning"

        # when the client reads again it gets what the kernel still held, then the end of the
        # link: the rest of the stream is gone, as with Asterisk
        writer.transport.resume_reading()
        late = await _read_to_the_end(reader, parser)
        sent = (plays + 1) * len(transcript.replay_frames)
        assert len(late) < sent
        assert all(m.is_event for m in late)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_our_client_reading_continuously_is_never_dropped(server: AmiReplayServer) -> None:
    transcript = load_transcript(FIXTURES / "full_noise.ami")
    frames = transcript.replay_frames
    repeats = 200
    async with running_client(server, clock=FakeClock()) as h:
        await h.connected()
        sent = 0
        async with asyncio.timeout(120):  # hang guard only
            for _ in range(repeats):
                sent += await server.play(transcript)
        await wait_for(lambda: len(h.received) >= 1 + sent, timeout=60)

        assert sent == repeats * len(frames)
        assert server.write_waits > 0, "the stream never filled the buffers: the test proves nothing"
        assert server.slow_client_drops == 0
        assert server.connections_accepted == 1
        assert h.client.connects == 1
        assert h.client.disconnects == 0
        assert h.client.state == "connected"
        # FullyBooted from the login, then every frame of every play, byte for byte, in order
        assert len(h.received) == 1 + sent
        assert h.received[0].event == "FullyBooted"
        expected = [f.raw for f in frames]
        for index in range(repeats):
            chunk = h.received[1 + index * len(frames) : 1 + (index + 1) * len(frames)]
            assert [m.raw for m in chunk] == expected, f"play {index} arrived altered"
