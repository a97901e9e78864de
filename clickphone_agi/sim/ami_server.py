"""A protocol-level fake Asterisk AMI server that replays recorded transcripts.

Used by the built-in demo and by the tests. It speaks the wire protocol like Asterisk 22 does:
banner on connect, Login checked against one username/secret (``Response: Error`` and close on a
wrong one, as Asterisk does), Ping answered with ``Ping: Pong`` and a timestamp, Logoff answered
with ``Response: Goodbye`` and close. :meth:`AmiReplayServer.play` then sends the event frames of
a recorded transcript byte for byte to the logged-in clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import structlog

from clickphone_agi.adapters.ami.protocol import AmiMessage, FrameParser, parse_frame

__all__ = [
    "DEFAULT_BANNER",
    "DEFAULT_FULLY_BOOTED",
    "AmiReplayServer",
    "Transcript",
    "TranscriptFrame",
    "load_transcript",
    "packaged_scenarios",
]

log = structlog.get_logger(__name__)

SCENARIO_DIR = Path(__file__).parent / "scenarios"

#: What Asterisk 22 sends (the AMI protocol version, not the Asterisk version).
DEFAULT_BANNER = b"Asterisk Call Manager/11.0.0\r\n"
#: The event Asterisk sends right after a successful Login (copied from the recordings).
DEFAULT_FULLY_BOOTED = (
    b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 1\r\nLastReload: 1\r\nStatus: Fully Booted\r\n\r\n"
)

_END = b"\r\n\r\n"


@dataclass(frozen=True)
class TranscriptFrame:
    """One recorded frame: its exact bytes (ending in CRLF CRLF) and the parsed message."""

    raw: bytes
    message: AmiMessage

    @property
    def kind(self) -> Literal["event", "response"]:
        return "event" if self.message.is_event else "response"


@dataclass(frozen=True)
class Transcript:
    """A recorded AMI session: banner line and every frame Asterisk sent, in order."""

    name: str
    banner: bytes
    frames: tuple[TranscriptFrame, ...]

    @property
    def events(self) -> tuple[TranscriptFrame, ...]:
        return tuple(f for f in self.frames if f.kind == "event")

    @property
    def replay_frames(self) -> tuple[TranscriptFrame, ...]:
        """The event frames after the recorded login, minus the login's own FullyBooted
        (the server sends one itself when a client logs in)."""
        start = 0
        for index, frame in enumerate(self.frames):
            if frame.kind == "response":
                start = index + 1
                break
        out: list[TranscriptFrame] = []
        skipped_booted = False
        for frame in self.frames[start:]:
            if frame.kind != "event":
                continue
            if not skipped_booted and frame.message.event == "FullyBooted":
                skipped_booted = True
                continue
            out.append(frame)
        return tuple(out)


def load_transcript(path: Path | str) -> Transcript:
    """Split an ``.ami`` recording into its banner line and its frames, bytes kept exact."""
    path = Path(path)
    data = path.read_bytes()
    newline = data.find(b"\r\n")
    if newline < 0 or b":" in data[:newline]:
        raise ValueError(f"{path.name}: no AMI banner line")
    banner = data[: newline + 2]
    frames: list[TranscriptFrame] = []
    pos = newline + 2
    while pos < len(data):
        end = data.find(_END, pos)
        if end < 0:
            raise ValueError(f"{path.name}: trailing bytes without a frame end at offset {pos}")
        raw = data[pos : end + len(_END)]
        message = parse_frame(data[pos:end], raw)
        if message is not None:
            frames.append(TranscriptFrame(raw=raw, message=message))
        pos = end + len(_END)
    return Transcript(name=path.stem, banner=banner, frames=tuple(frames))


def packaged_scenarios() -> dict[str, Path]:
    """Scenario name → path of the transcripts shipped in ``clickphone_agi/sim/scenarios``."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.ami"))}


def _resolve(scenario: Transcript | Path | str) -> Transcript:
    if isinstance(scenario, Transcript):
        return scenario
    if isinstance(scenario, str) and scenario in packaged_scenarios():
        return load_transcript(packaged_scenarios()[scenario])
    return load_transcript(Path(scenario))


def _response(status: str, action_id: str | None, *lines: tuple[str, str]) -> bytes:
    headers = [("Response", status)]
    if action_id is not None:
        headers.append(("ActionID", action_id))
    headers.extend(lines)
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n"


@dataclass(eq=False)
class _Connection:
    ident: int
    writer: asyncio.StreamWriter
    logged_in: bool = False
    closed: bool = False
    actions: list[dict[str, str]] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()


class AmiReplayServer:
    """Fake Asterisk AMI on loopback. Use ``async with AmiReplayServer(user, secret) as srv``.

    Counters for assertions: ``logins_ok``, ``logins_failed``, ``pings_answered``,
    ``connections_accepted`` and ``actions_received`` (every action as a dict, in order).
    Set ``answer_pings = False`` to simulate a half-open link.
    """

    def __init__(
        self,
        username: str,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        banner: bytes = DEFAULT_BANNER,
        fully_booted: bytes = DEFAULT_FULLY_BOOTED,
    ) -> None:
        self._username = username
        self._secret = secret
        self._host = host
        self._requested_port = port
        self._banner = banner
        self._fully_booted = fully_booted
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Connection] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._queued: list[Transcript] = []

        self.answer_pings = True
        self.logins_ok = 0
        self.logins_failed = 0
        self.pings_answered = 0
        self.connections_accepted = 0
        self.actions_received: list[dict[str, str]] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("AmiReplayServer already started")
        self._server = await asyncio.start_server(self._handle, self._host, self._requested_port)
        log.info("ami_sim.listening", host=self._host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.abort()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("AmiReplayServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def logged_in(self) -> list[int]:
        """Ids of the connections currently open and logged in."""
        return [c.ident for c in self._conns.values() if c.logged_in and not c.closed]

    # -- waiting ----------------------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (real time) until ``predicate()`` holds after some server-side change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                changed = self._changed
                await changed.wait()

    async def wait_for_login(self, timeout: float = 5.0, *, logins: int | None = None) -> int:
        """Wait until ``logins_ok >= logins`` (default: until some client is logged in now).
        Returns the id of the most recent logged-in connection."""
        if logins is None:
            await self.wait_until(lambda: bool(self.logged_in), timeout)
        else:
            target = logins
            await self.wait_until(lambda: self.logins_ok >= target and bool(self.logged_in), timeout)
        return self.logged_in[-1]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- driving clients --------------------------------------------------------------------

    def queue_scenarios(self, *scenarios: Transcript | Path | str) -> None:
        """Play these, in order, to the next client that logs in (the demo's script)."""
        self._queued.extend(_resolve(s) for s in scenarios)

    async def play(self, scenario: Transcript | Path | str, *, connection: int | None = None) -> int:
        """Send the scenario's event frames, byte for byte, to the logged-in client(s).

        After an ``Event: Shutdown`` frame the connection is closed, as Asterisk does.
        Returns the number of frames sent to each connection.
        """
        transcript = _resolve(scenario)
        targets = self._targets(connection)
        frames = transcript.replay_frames
        for conn in targets:
            await self._send_frames(conn, frames)
        log.info("ami_sim.played", scenario=transcript.name, frames=len(frames), connections=[c.ident for c in targets])
        return len(frames)

    async def send_raw(self, data: bytes, *, connection: int | None = None) -> None:
        """Write arbitrary bytes to the logged-in client(s): split characters, garbage…"""
        for conn in self._targets(connection):
            conn.write(data)
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()

    async def drop_clients(self) -> int:
        """Abort every connection without a goodbye (an Asterisk crash or restart)."""
        conns = [c for c in self._conns.values() if not c.closed]
        for conn in conns:
            conn.abort()
        self._notify()
        log.info("ami_sim.dropped", connections=len(conns))
        return len(conns)

    def _targets(self, connection: int | None) -> list[_Connection]:
        if connection is not None:
            conn = self._conns.get(connection)
            if conn is None or conn.closed or not conn.logged_in:
                raise LookupError(f"no logged-in AMI connection {connection}")
            return [conn]
        targets = [c for c in self._conns.values() if c.logged_in and not c.closed]
        if not targets:
            raise LookupError("no AMI client is logged in")
        return targets

    async def _send_frames(self, conn: _Connection, frames: Iterable[TranscriptFrame]) -> None:
        for frame in frames:
            if conn.closed:
                return
            conn.write(frame.raw)
            if frame.message.event == "Shutdown":
                with contextlib.suppress(ConnectionError):
                    await conn.writer.drain()
                conn.close()
                self._notify()
                return
        with contextlib.suppress(ConnectionError):
            await conn.writer.drain()

    # -- per connection ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn = _Connection(ident=next(self._ids), writer=writer)
        self._conns[conn.ident] = conn
        self.connections_accepted += 1
        self._notify()
        parser = FrameParser(expect_banner=False)
        try:
            conn.write(self._banner)
            while not conn.closed:
                data = await reader.read(65536)
                if not data:
                    break
                for item in parser.feed(data):
                    if isinstance(item, AmiMessage):
                        await self._on_action(conn, item)
                        if conn.closed:
                            break
        except (ConnectionError, OSError):
            pass
        finally:
            conn.logged_in = False
            if not conn.closed:
                conn.abort()
            self._conns.pop(conn.ident, None)
            if task is not None:
                self._handlers.discard(task)
            self._notify()

    async def _on_action(self, conn: _Connection, message: AmiMessage) -> None:
        action = (message.get("Action") or "").lower()
        action_id = message.action_id
        self.actions_received.append(message.as_dict())
        self._notify()
        if action == "login":
            if message.get("Username") == self._username and message.get("Secret") == self._secret:
                conn.logged_in = True
                self.logins_ok += 1
                conn.write(_response("Success", action_id, ("Message", "Authentication accepted")))
                conn.write(self._fully_booted)
                log.info("ami_sim.login_ok", connection=conn.ident)
                self._notify()
                if self._queued:
                    queued, self._queued = self._queued, []
                    for transcript in queued:
                        await self._send_frames(conn, transcript.replay_frames)
            else:
                self.logins_failed += 1
                conn.write(_response("Error", action_id, ("Message", "Authentication failed")))
                log.info("ami_sim.login_failed", connection=conn.ident)
                conn.close()
                self._notify()
        elif action == "ping":
            if self.answer_pings:
                self.pings_answered += 1
                conn.write(_response("Success", action_id, ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}")))
        elif action == "logoff":
            conn.write(_response("Goodbye", action_id, ("Message", "Thanks for all the fish.")))
            conn.close()
            self._notify()
        elif not conn.logged_in:
            conn.write(_response("Error", action_id, ("Message", "Authentication Required")))
        else:
            conn.write(_response("Error", action_id, ("Message", "Invalid/unknown command")))
