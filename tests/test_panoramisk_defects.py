"""Evidence for "Why not panoramisk" (README): panoramisk 1.4 has the defects that made us write
our own AMI client.

Each ``test_panoramisk_<defect>`` runs plain panoramisk (its ``Manager`` and ``AMIProtocol``,
unmodified) against the fake Asterisk (:class:`AmiReplayServer`, real loopback sockets) and
asserts the BAD behaviour: it passes while the defect exists and fails once panoramisk is fixed.
On the very same input it then asserts that our client / parser behaves correctly; the docstring
names our own regression test for that behaviour.

How panoramisk is driven (read from its source, ``panoramisk/manager.py``):

- ``Manager(loop=<running loop>, host, port, username, secret, events)`` then ``connect()``;
  the login runs from ``connection_made`` and ``manager.authenticated`` tells whether it passed.
- ``__init__`` truncates ``ping_delay``, ``ping_interval`` and ``reconnect_timeout`` with
  ``int()``. To keep the tests short the two timing tests set those attributes to fractions of a
  second after construction; the code paths that use them are unchanged.
- ``Manager`` reconnects from ``loop.call_later`` callbacks and ``close()`` does not cancel them,
  so :class:`_Manager` only adds a switch that turns ``connect()`` into a no-op when the test
  ends (cleanup, not behaviour under test).

On Python 3.11.7 panoramisk 1.4 emits no DeprecationWarning on these paths (it is given the
running loop and creates its futures inside it), so no warning filter is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from ami_fixtures import EVENTS, FIXTURES, SECRET, USERNAME, advance_until, running_client, settle, wait_for
from panoramisk import Manager
from panoramisk.message import Message

from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.clock import FakeClock
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript

# -- driving panoramisk -----------------------------------------------------------------------


class _Manager(Manager):  # type: ignore[misc]  # panoramisk ships no type information
    """panoramisk's Manager; ``stop()`` only keeps its pending reconnect timers from
    connecting again after the test."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.stopped = False
        self.connect_tasks: list[asyncio.Task[Any]] = []
        self.seen: list[Message] = []
        self.register_event("*", lambda _manager, event: self.seen.append(event))

    def connect(self, run_forever: bool = False, on_startup: Any = None, on_shutdown: Any = None) -> Any:
        if self.stopped:
            return None
        task = super().connect(run_forever, on_startup, on_shutdown)
        self.connect_tasks.append(task)
        return task

    def events(self, name: str) -> list[Message]:
        return [e for e in self.seen if e.event == name]

    async def stop(self) -> None:
        self.stopped = True
        await asyncio.gather(*self.connect_tasks, return_exceptions=True)
        await asyncio.sleep(0)  # connection_made of the last connect runs as a done callback
        self.close()
        for _ in range(5):  # let the transport close its socket
            await asyncio.sleep(0)


@asynccontextmanager
async def panoramisk(
    server: AmiReplayServer,
    *,
    secret: str = SECRET,
    ping_every: float | None = None,
    reconnect_after: float | None = None,
    **config: Any,
) -> AsyncIterator[_Manager]:
    manager = _Manager(
        loop=asyncio.get_running_loop(),
        host=server.host,
        port=server.port,
        username=USERNAME,
        secret=secret,
        events=EVENTS,
        **config,
    )
    if ping_every is not None:  # __init__ would int() these to 0
        manager.ping_delay = manager.ping_interval = ping_every
    if reconnect_after is not None:
        manager.reconnect_timeout = reconnect_after
    manager.connect()
    try:
        yield manager
    finally:
        await manager.stop()


@pytest.fixture
async def server() -> AsyncIterator[AmiReplayServer]:
    async with AmiReplayServer(USERNAME, SECRET) as srv:
        yield srv


@pytest.fixture
async def other_server() -> AsyncIterator[AmiReplayServer]:
    """A second fake Asterisk, so our client's counters are not mixed with panoramisk's."""
    async with AmiReplayServer(USERNAME, SECRET) as srv:
        yield srv


def _pings(server: AmiReplayServer) -> int:
    return sum(1 for a in server.actions_received if a.get("Action") == "Ping")


# -- (1) a UTF-8 character split across two TCP reads -----------------------------------------

SPLIT_FRAME = 'Event: Cdr\r\nCallerID: "Ion Ștefan" <0721000001>\r\n\r\n'.encode()
SPLIT_AT = SPLIT_FRAME.index("Ș".encode()) + 1  # between the two bytes of "Ș"
MARKER = b"Event: Marker\r\n\r\n"
LATIN1 = b"Event: Hangup\r\nCallerIDName: Andr\xe9\r\n\r\n"


async def _send_split(server: AmiReplayServer, marker_seen: Callable[[], bool]) -> None:
    """Send the frame in two writes and make sure they are two reads: the first write ends
    with a complete Marker frame, and the second is only sent once the reader has seen it."""
    await server.send_raw(MARKER + SPLIT_FRAME[:SPLIT_AT])
    await wait_for(marker_seen)
    await server.send_raw(SPLIT_FRAME[SPLIT_AT:])
    await server.send_raw(LATIN1)


async def test_panoramisk_loses_a_utf8_character_split_across_reads(
    server: AmiReplayServer, other_server: AmiReplayServer
) -> None:
    """panoramisk decodes each TCP chunk by itself with ``errors='ignore'``: both halves of the
    split "Ș" are dropped, and a Latin-1 byte disappears too.

    Ours: tests/test_ami_client.py::test_split_utf8_and_latin1_bytes_arrive_intact and
    tests/test_ami_protocol.py::test_utf8_character_split_between_reads_survives.
    """
    async with panoramisk(server) as manager:
        await wait_for(lambda: manager.authenticated)
        await _send_split(server, lambda: bool(manager.events("Marker")))
        await wait_for(lambda: bool(manager.events("Cdr")) and bool(manager.events("Hangup")))
        (cdr,) = manager.events("Cdr")
        (hangup,) = manager.events("Hangup")
    assert cdr["CallerID"] == '"Ion tefan" <0721000001>'  # "Ș" vanished
    assert hangup["CallerIDName"] == "Andr"  # "é" vanished

    async with running_client(other_server, clock=FakeClock()) as h:
        await h.connected()
        await _send_split(other_server, lambda: bool(h.events("Marker")))
        await wait_for(lambda: bool(h.events("Cdr")) and bool(h.events("Hangup")))
    assert h.events("Cdr")[0].get("CallerID") == '"Ion Ștefan" <0721000001>'
    assert h.events("Hangup")[0].get("CallerIDName") == "André"


# -- (2) a callback that raises -----------------------------------------------------------------


def _explode_on_newchannel(event_name: str | None) -> None:
    if event_name == "Newchannel":
        raise RuntimeError("consumer bug")


async def test_panoramisk_callback_error_closes_the_connection(
    server: AmiReplayServer, other_server: AmiReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A synchronous event callback runs inside ``data_received``; its exception escapes into
    asyncio, which closes the transport ("Fatal error: protocol.data_received() call failed"):
    the link drops and the rest of that read is lost.

    Ours: tests/test_ami_client.py::test_callback_error_does_not_drop_the_connection.
    """
    transcript = load_transcript(FIXTURES / "answered_call.ami")
    sent = len(transcript.replay_frames)
    async with panoramisk(server, reconnect_timeout=3600) as manager:
        await wait_for(lambda: manager.authenticated)
        manager.register_event("Newchannel", lambda _m, event: _explode_on_newchannel(event.event))
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            await server.play(transcript)
            await server.wait_until(lambda: not server.logged_in)
            await wait_for(lambda: not manager._connected)
        received = len(manager.seen) - 1  # minus FullyBooted
        assert manager.protocol.closed
        assert received < sent, "events after the failing callback should have been lost"
        assert len(manager.events("Newchannel")) == 1  # it died on the first one
        assert any("data_received() call failed" in r.getMessage() for r in caplog.records)

    async with running_client(
        other_server, clock=FakeClock(), on_message=lambda m: _explode_on_newchannel(m.event)
    ) as h:
        await h.connected()
        await other_server.play(transcript)
        await wait_for(lambda: len(h.received) == 1 + sent)
        assert h.client.callback_errors == 4  # four Newchannel events in the recording
        assert h.client.disconnects == 0
        assert h.client.state == "connected"
        assert other_server.logged_in


# -- (3) an unanswered Ping --------------------------------------------------------------------


async def test_panoramisk_never_notices_an_unanswered_ping(
    server: AmiReplayServer, other_server: AmiReplayServer
) -> None:
    """panoramisk sends a Ping every ``ping_interval`` and never looks at the answer: with no
    Pong at all (a half-open link) it stays "connected" and piles up unanswered Ping actions.

    Ours: tests/test_ami_client.py::test_half_open_link_is_detected_by_ping_timeout_and_reconnected.
    """
    server.answer_pings = False
    async with panoramisk(server, ping_every=0.02) as manager:
        await wait_for(lambda: manager.authenticated)
        await server.wait_until(lambda: _pings(server) >= 6, timeout=10)  # six ping intervals
        await settle()
        assert server.pings_answered == 0
        assert manager._connected
        assert manager.authenticated
        assert not manager.protocol.closed
        assert server.logged_in, "panoramisk dropped the link after all"
        assert server.connections_accepted == 1
        unanswered = {id(a) for a in manager.protocol.responses.values() if a["Action"] == "Ping"}
        assert len(unanswered) >= 5

    other_server.answer_pings = False
    clock = FakeClock()
    async with running_client(other_server, clock=clock, ping_interval=20.0, ping_timeout=10.0) as h:
        await h.connected()
        await clock.advance(20.0)
        await other_server.wait_until(lambda: _pings(other_server) == 1)
        await clock.advance(10.5)
        await wait_for(lambda: h.client.pings_missed == 1)
        await wait_for(lambda: h.client.disconnects == 1)
        assert h.client.last_error is not None
        assert "Ping" in h.client.last_error
        await advance_until(clock, lambda: h.client.connects == 2)


# -- (4) a wrong secret --------------------------------------------------------------------------


async def test_panoramisk_retries_a_wrong_secret_forever(
    server: AmiReplayServer, other_server: AmiReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused Login only leaves ``manager.authenticated`` False: no exception, no error
    about the login. Asterisk then closes the link and panoramisk reconnects after
    ``reconnect_timeout`` and sends the same wrong secret again, without end (fail2ban bait).

    Ours: tests/test_ami_client.py::test_wrong_secret_waits_auth_backoff_before_trying_again.
    """
    with caplog.at_level(logging.INFO, logger="panoramisk"):
        async with panoramisk(server, secret="wrong-secret", reconnect_after=0.02) as manager:
            await server.wait_until(lambda: server.logins_failed >= 5, timeout=10)
            assert not manager.authenticated
    assert server.logins_ok == 0
    assert server.connections_accepted >= 5
    complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert complaints, "expected at least the 'Connection lost' errors"
    assert not any("auth" in c.lower() or "login" in c.lower() for c in complaints), complaints

    async with running_client(
        other_server, clock=FakeClock(), secret="wrong-secret", auth_backoff=300.0, backoff_initial=0.01
    ) as h:
        await wait_for(lambda: h.client.auth_failures == 1)
        await asyncio.sleep(0.2)  # real time passes; the fake clock never reaches auth_backoff
        assert other_server.logins_failed == 1
        assert other_server.connections_accepted == 1
        assert h.client.state == "auth_failed"
        assert h.client.last_error == "Authentication failed"


# -- (5) an empty last header --------------------------------------------------------------------


async def test_panoramisk_drops_an_empty_last_header(server: AmiReplayServer, other_server: AmiReplayServer) -> None:
    """Every recorded Cdr ends with ``UserField: `` (empty). panoramisk strips the whole frame
    before splitting it, so the last line becomes ``UserField:`` and, without ``': '``, is
    dropped: the header is missing, not empty.

    Ours: tests/test_ami_protocol.py::test_empty_value_of_the_last_header_is_kept.
    """
    transcript = load_transcript(FIXTURES / "answered_call.ami")
    cdr_frames = [f for f in transcript.replay_frames if f.message.event == "Cdr"]
    assert cdr_frames
    assert all(f.raw.endswith(b"\r\nUserField: \r\n\r\n") for f in cdr_frames)

    async with panoramisk(server) as manager:
        await wait_for(lambda: manager.authenticated)
        await server.play(transcript)
        await wait_for(lambda: len(manager.events("Cdr")) == len(cdr_frames))
        cdrs = manager.events("Cdr")
    assert all("Disposition" in c for c in cdrs)  # the other headers are there
    assert not any("UserField" in c for c in cdrs)  # the empty last one is gone

    async with running_client(other_server, clock=FakeClock()) as h:
        await h.connected()
        await other_server.play(transcript)
        await wait_for(lambda: len(h.events("Cdr")) == len(cdr_frames))
    ours: list[AmiMessage] = h.events("Cdr")
    assert all(m.headers[-1] == ("UserField", "") for m in ours)
    assert all(m.get("UserField", "missing") == "" for m in ours)
