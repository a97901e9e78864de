"""A protocol-level fake Asterisk AMI server that replays recorded transcripts.

Used by the built-in demo and by the tests. It speaks the wire protocol like Asterisk 22 does:
banner on connect, Login checked against one username/secret (``Response: Error`` and close on a
wrong one, as Asterisk does), Ping answered with ``Ping: Pong`` and a timestamp, Logoff answered
with ``Response: Goodbye`` and close. :meth:`AmiReplayServer.play` then sends the event frames of
a recorded transcript byte for byte to the logged-in clients.

Like Asterisk it does not wait for a client that stops reading: Asterisk writes to each AMI
session with ``writetimeout`` (default 100 ms) and disconnects a client it cannot write to in
that time, and the events that client missed are gone. Here every frame (events, raw bytes,
responses) goes through a small write buffer (64 KiB in user space plus a 64 KiB ``SO_SNDBUF``);
when it is above its high-water mark the server waits at most ``write_timeout`` for the client
to take bytes, and aborts the connection if it took none (``slow_client_drops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
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

#: User-space write buffer above which the server waits for the client (asyncio's high-water mark).
DEFAULT_WRITE_BUFFER_HIGH = 64 * 1024
#: Kernel send buffer per connection, kept small so a client that stops reading fills it quickly.
DEFAULT_SOCKET_SEND_BUFFER = 64 * 1024
#: ``send_raw`` writes large payloads in pieces of this size, as Asterisk writes frame by frame.
_RAW_CHUNK = 16 * 1024
#: Loop iterations granted after a write timeout before judging the client: a stalled event loop
#: (GC pause, busy CPU) fires the timer in the same iteration as the client's read, before the
#: server's transport has pushed the freed space; a live client shows progress by then.
_GRACE_ITERATIONS = 5


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

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel (asyncio's user-space buffer)."""
        return self.writer.transport.get_write_buffer_size()


class AmiReplayServer:
    """Fake Asterisk AMI on loopback. Use ``async with AmiReplayServer(user, secret) as srv``.

    Counters for assertions: ``logins_ok``, ``logins_failed``, ``pings_answered``,
    ``connections_accepted``, ``slow_client_drops``, ``write_waits`` (times a write had to wait
    for a client to read) and ``actions_received`` (every action as a dict, in order).
    Set ``answer_pings = False`` to simulate a half-open link. ``VoicemailRemove`` (Asterisk
    ≥ 18.20/20.5) is answered ``Success``, or ``Error`` with ``voicemail_remove_error`` as the
    message when that is set; ``voicemail_remove_answer = False`` leaves it unanswered.

    ``write_timeout`` is Asterisk's ``writetimeout`` (seconds, real time): a client whose write
    buffer stays above ``write_buffer_high`` bytes for that long without taking any of it is
    disconnected, like Asterisk does, and what it missed is not sent again. ``socket_send_buffer``
    sets the connection's ``SO_SNDBUF`` (``None`` keeps the system default).
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
        write_timeout: float = 0.1,
        write_buffer_high: int = DEFAULT_WRITE_BUFFER_HIGH,
        socket_send_buffer: int | None = DEFAULT_SOCKET_SEND_BUFFER,
    ) -> None:
        if write_timeout <= 0:
            raise ValueError("write_timeout must be > 0")
        if write_buffer_high < 1:
            raise ValueError("write_buffer_high must be >= 1")
        self._username = username
        self._secret = secret
        self._host = host
        self._requested_port = port
        self._banner = banner
        self._fully_booted = fully_booted
        self._write_timeout = write_timeout
        self._write_high = write_buffer_high
        self._socket_send_buffer = socket_send_buffer
        self._server: asyncio.Server | None = None
        self._conns: dict[int, _Connection] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._queued: list[Transcript] = []

        self.answer_pings = True
        self.voicemail_remove_error: str | None = None
        self.voicemail_remove_answer = True
        # when set, a successful VoicemailRemove deletes the message's files here, as Asterisk does
        self.voicemail_spool: Path | None = None
        self.logins_ok = 0
        self.logins_failed = 0
        self.pings_answered = 0
        self.connections_accepted = 0
        self.slow_client_drops = 0
        self.write_waits = 0
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
        """Write arbitrary bytes to the logged-in client(s): split characters, garbage…

        Bytes are written as given (one write for small payloads, pieces of 16 KiB for large
        ones) and are subject to ``write_timeout`` like every frame."""
        for conn in self._targets(connection):
            for start in range(0, max(len(data), 1), _RAW_CHUNK):
                if not await self._send(conn, data[start : start + _RAW_CHUNK]):
                    break

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
            if not await self._send(conn, frame.raw):
                return
            if frame.message.event == "Shutdown":
                conn.close()  # flushes what is buffered, then closes
                self._notify()
                return

    async def _send(self, conn: _Connection, data: bytes) -> bool:
        """Write one frame as Asterisk does; ``False`` if the connection is gone (or dropped now)."""
        if conn.closed or conn.writer.is_closing():
            return False
        conn.writer.write(data)
        return await self._wait_writable(conn)

    async def _wait_writable(self, conn: _Connection) -> bool:
        """Asterisk's ``writetimeout``: while the buffer is above the high-water mark, wait for
        the client to take bytes; abort it if it took none within ``write_timeout``."""
        while not conn.closed and conn.buffered > self._write_high:
            before = conn.buffered
            self.write_waits += 1
            try:
                async with asyncio.timeout(self._write_timeout):
                    await conn.writer.drain()
            except TimeoutError:
                for _ in range(_GRACE_ITERATIONS):
                    await asyncio.sleep(0)
                if conn.closed:
                    return False
                if conn.buffered < before:
                    continue  # the client is reading; only the loop was late
                self._drop_slow_client(conn)
                return False
            except OSError:  # ConnectionResetError from drain(): the peer is gone
                return False
        return not conn.closed

    def _drop_slow_client(self, conn: _Connection) -> None:
        self.slow_client_drops += 1
        log.warning(
            "ami_sim.slow_client_dropped",
            connection=conn.ident,
            write_timeout=self._write_timeout,
            buffered=conn.buffered,
            slow_client_drops=self.slow_client_drops,
        )
        conn.abort()
        self._notify()

    # -- per connection ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        conn = _Connection(ident=next(self._ids), writer=writer)
        self._limit_buffers(writer)
        self._conns[conn.ident] = conn
        self.connections_accepted += 1
        self._notify()
        parser = FrameParser(expect_banner=False)
        try:
            await self._send(conn, self._banner)
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

    def _limit_buffers(self, writer: asyncio.StreamWriter) -> None:
        """Small buffers, so a client that stops reading is noticed after ~200 KiB, not megabytes."""
        writer.transport.set_write_buffer_limits(high=self._write_high)
        sock = writer.get_extra_info("socket")
        if self._socket_send_buffer is not None and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._socket_send_buffer)

    async def _other_action(
        self, conn: _Connection, action: str, action_id: str | None, fields: dict[str, str]
    ) -> None:
        """A logged-in client's action other than Login, Ping and Logoff."""
        if action != "voicemailremove":
            await self._send(conn, _response("Error", action_id, ("Message", "Invalid/unknown command")))
        elif not self.voicemail_remove_answer:
            return
        elif self.voicemail_remove_error is not None:
            await self._send(conn, _response("Error", action_id, ("Message", self.voicemail_remove_error)))
        elif self.voicemail_spool is not None and not self._remove_message(fields):
            await self._send(conn, _response("Error", action_id, ("Message", "Message not found")))
        else:
            await self._send(conn, _response("Success", action_id, ("Message", "Message removed successfully")))

    def _remove_message(self, action: dict[str, str]) -> bool:
        """Delete msgNNNN.* of the message with ID in Context/Mailbox/Folder (no renumbering)."""
        assert self.voicemail_spool is not None
        folder = self.voicemail_spool / action.get("Context", "") / action.get("Mailbox", "") / action.get("Folder", "")
        if not folder.is_dir() or ".." in folder.parts:
            return False
        for txt in folder.glob("msg????.txt"):
            if f"msg_id={action.get('ID')}" in txt.read_text(errors="replace").splitlines():
                for path in folder.glob(f"{txt.stem}.*"):
                    path.unlink()
                return True
        return False

    async def _on_action(self, conn: _Connection, message: AmiMessage) -> None:
        action = (message.get("Action") or "").lower()
        action_id = message.action_id
        self.actions_received.append(message.as_dict())
        self._notify()
        if action == "login":
            if message.get("Username") == self._username and message.get("Secret") == self._secret:
                conn.logged_in = True
                self.logins_ok += 1
                log.info("ami_sim.login_ok", connection=conn.ident)
                self._notify()
                if not await self._send(conn, _response("Success", action_id, ("Message", "Authentication accepted"))):
                    return
                if not await self._send(conn, self._fully_booted):
                    return
                if self._queued:
                    queued, self._queued = self._queued, []
                    for transcript in queued:
                        await self._send_frames(conn, transcript.replay_frames)
            else:
                self.logins_failed += 1
                await self._send(conn, _response("Error", action_id, ("Message", "Authentication failed")))
                log.info("ami_sim.login_failed", connection=conn.ident)
                conn.close()
                self._notify()
        elif action == "ping":
            if self.answer_pings:
                self.pings_answered += 1
                pong = _response("Success", action_id, ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}"))
                await self._send(conn, pong)
        elif action == "logoff":
            await self._send(conn, _response("Goodbye", action_id, ("Message", "Thanks for all the fish.")))
            conn.close()
            self._notify()
        elif not conn.logged_in:
            await self._send(conn, _response("Error", action_id, ("Message", "Authentication Required")))
        else:
            await self._other_action(conn, action, action_id, message.as_dict())
