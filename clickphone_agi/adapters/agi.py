"""A small FastAGI server: Asterisk's ``AGI(agi://host:port/script?query,arg1,arg2,...)``.

Why our own: panoramisk's FastAGI spins the event loop at 100 % CPU when a client closes early
(a port scan, a health check). Here every read is bounded: the header block by size and by
``header_timeout``, the whole session by ``session_timeout``, the number of sessions by
``max_connections``; EOF ends a session at once.

The protocol, as ``res/res_agi.c`` speaks it:

* Asterisk connects and writes ``agi_network: yes``, ``agi_network_script: <everything after
  host:port/>`` (only when there is one), then ``agi_request: <the URL>``, ``agi_channel``,
  ``agi_language``, ... ``agi_accountcode``, ``agi_threadid``, ``agi_arg_1`` ... ``agi_arg_N``,
  each ``name: value\\n``, and an empty line.
* The server writes one command per line and reads its reply: ``200 result=<n> [(data)]
  [key=value]``, ``510 Invalid or unknown command``, ``511 Command Not Permitted on a dead
  channel ...``, or ``520-Invalid command syntax.  Proper usage follows:`` + usage lines +
  ``520 End of proper usage.``. Asterisk splits a command into words like a shell: double quotes
  group, a backslash takes the next character literally. It reads a command with ``fgets`` into a
  2048-byte buffer, so a longer line would be cut in two commands: :meth:`AgiSession.command`
  refuses it.
* When the channel hangs up, Asterisk writes ``HANGUP`` on a line of its own, between replies
  (unless ``AGISIGHUP=no``), and keeps answering in "dead channel" mode (``SET VARIABLE`` still
  works, most other commands get 511). With ``AGIEXITONHANGUP=yes`` it closes instead. Unless
  ``AGISIGHUP=no`` it also writes a last ``HANGUP`` after the server has closed, hung up or not.
* The script ends when the server closes the connection. That leaves ``AGISTATUS=SUCCESS``
  even when the server gave up half way, so a dialplan must check the variables it expects,
  not only ``AGISTATUS``.

Values are bytes on the wire: they are decoded as UTF-8 with ``surrogateescape`` and encoded back
the same way, so a Latin-1 caller name survives a round trip unchanged.

This module knows nothing about accounts or money: routes (``Route``) do, and are registered in
one :class:`AgiRouter` table by the composition root.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import structlog

__all__ = [
    "MAX_COMMAND_BYTES",
    "AgiCommandError",
    "AgiError",
    "AgiHangup",
    "AgiHeaderError",
    "AgiProtocolError",
    "AgiReply",
    "AgiRequest",
    "AgiRouter",
    "AgiSession",
    "FastAgiServer",
    "Route",
    "parse_reply",
    "parse_request",
    "quote_value",
]

log = structlog.get_logger(__name__)

MAX_COMMAND_BYTES: Final = 2047
"""Longest command line Asterisk reads whole, newline included (``AGI_BUF_LEN`` 2048 minus NUL)."""

_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"
_READ_LIMIT: Final = 64 * 1024  # longest single reply line (GET FULL VARIABLE can be long)
_MAX_REPLY_LINES: Final = 500  # a 520 usage text is a few dozen lines
_CLOSE_TIMEOUT: Final = 1.0
_LOG_TEXT_MAX: Final = 80

#: One header line: ``agi_<name>:``, one optional space, the value (its last CR, if any, is not part of it).
_HEADER_LINE = re.compile(r"^agi_([A-Za-z0-9_]+): ?(.*)$", re.MULTILINE)
_ARG_KEY = re.compile(r"arg_([1-9][0-9]{0,3})")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,79}")
_REPLY_LINE = re.compile(r"(\d{3})([ -])(.*)")
_RESULT = re.compile(r"result=(\S*)(?: \((.*)\))?(?: (.*))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# -- errors -----------------------------------------------------------------------------------


class AgiError(Exception):
    """Base class of this module's errors."""


class AgiHangup(AgiError):
    """The channel hung up (Asterisk sent ``HANGUP``) or Asterisk closed the connection."""


class AgiProtocolError(AgiError):
    """A reply that is not AGI (or too long): the session cannot go on."""


class AgiCommandError(AgiError):
    """A command got a reply other than ``200``."""

    def __init__(self, command: str, reply: AgiReply) -> None:
        verb = " ".join(command.split(" ", 2)[:2])
        first = reply.text.splitlines()[0] if reply.text else ""
        super().__init__(f"{verb} -> {reply.code} {first}".rstrip())
        self.reply = reply


class AgiHeaderError(AgiError):
    """The client did not send a usable AGI header block. ``kind`` names what went wrong:
    ``closed`` (EOF before the blank line), ``timeout``, ``oversized``, ``garbage`` (a line
    that is not ``agi_name: value``) or ``empty`` (a blank line and nothing else)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# -- request ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgiRequest:
    """What Asterisk sent before the first command.

    ``env`` holds every ``agi_*`` header without the prefix (``channel``, ``uniqueid``,
    ``arg_1``, ...). ``script`` is the path of ``agi_network_script`` without surrounding
    slashes (``authorize`` for ``agi://127.0.0.1:4573/authorize?mode=strict``), ``query`` its
    query string (first value of each name), ``args`` the ``agi_arg_N`` values in order.
    """

    env: Mapping[str, str]
    script: str
    query: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    args: tuple[str, ...] = ()

    @property
    def uniqueid(self) -> str:
        return self.env.get("uniqueid", "")

    @property
    def channel(self) -> str:
        return self.env.get("channel", "")

    @property
    def accountcode(self) -> str:
        return self.env.get("accountcode", "")

    @property
    def callerid(self) -> str:
        return self.env.get("callerid", "")

    @property
    def calleridname(self) -> str:
        return self.env.get("calleridname", "")

    @property
    def extension(self) -> str:
        return self.env.get("extension", "")

    @property
    def context(self) -> str:
        return self.env.get("context", "")


def _decode(raw: bytes) -> str:
    return raw.decode(_ENCODING, _ERRORS)


def _strip_eol(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def parse_request(lines: Sequence[bytes]) -> AgiRequest:
    """Build an :class:`AgiRequest` from the header lines (without the final blank line).

    Raises :class:`AgiHeaderError` (``garbage`` or ``empty``). A repeated header keeps its first
    value.
    """
    if not lines:
        raise AgiHeaderError("empty")
    block = b"\n".join(raw[:-1] if raw[-1:] == b"\n" else raw for raw in lines)
    text = block.decode(_ENCODING, _ERRORS)  # per line or at once: the same (LF is never inside a character)
    pairs = _HEADER_LINE.findall(text)  # every line at once, in C
    if len(pairs) != text.count("\n") + 1:  # some line is not "agi_name: value": name the first
        for line in text.split("\n"):
            if _HEADER_LINE.fullmatch(line) is None:
                raise AgiHeaderError("garbage", _for_log(line.removesuffix("\r")))
    env: dict[str, str] = {}
    numbered: list[tuple[int, str]] = []
    for name, raw_value in pairs:
        if name in env:
            continue  # a repeated header keeps its first value
        value = raw_value[:-1] if raw_value[-1:] == "\r" else raw_value
        env[name] = value
        if name[:4] == "arg_":
            m = _ARG_KEY.fullmatch(name)
            if m is not None:
                numbered.append((int(m.group(1)), value))
    args = tuple(value for _, value in sorted(numbered))

    target = env.get("network_script")
    if target is None:
        # no script in the URL: Asterisk sends no agi_network_script; agi_request still has it
        try:
            parts = urlsplit(env.get("request", ""))
        except ValueError as exc:  # "agi://[::1/x" (Invalid IPv6 URL), a netloc NFKC refuses
            raise AgiHeaderError("garbage", _for_log(f"agi_request is not a URL: {exc}")) from None
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    path, _, query_string = target.partition("?")
    query: dict[str, str] = {}
    for name, value in parse_qsl(query_string, keep_blank_values=True, encoding=_ENCODING, errors=_ERRORS):
        query.setdefault(name, value)
    return AgiRequest(
        env=MappingProxyType(env),
        script=path.strip("/"),
        query=MappingProxyType(query),
        args=args,
    )


# -- replies and commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class AgiReply:
    """One reply: ``code`` (200, 510, 511, 520, ...), for 200 the ``result`` number (``None``
    when absent or not an integer), ``data`` (the text in parentheses) and ``extra`` (what
    follows, e.g. ``endpos=1234``); ``text`` is the whole reply after the code, usage lines
    included."""

    code: int
    result: int | None = None
    data: str | None = None
    extra: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 200


def parse_reply(first: str, more: Sequence[str] = ()) -> AgiReply:
    """Parse a reply from its first line (and, for a ``NNN-`` reply, the lines after it)."""
    m = _REPLY_LINE.fullmatch(first)
    if m is None:
        raise AgiProtocolError(f"not an AGI reply: {_for_log(first)!r}")
    code = int(m.group(1))
    rest = m.group(3)
    text = "\n".join([rest, *more])
    if code != 200:
        return AgiReply(code=code, text=text)
    r = _RESULT.fullmatch(rest)
    if r is None:
        return AgiReply(code=code, text=text)
    try:
        result: int | None = int(r.group(1))
    except ValueError:
        result = None
    return AgiReply(code=code, result=result, data=r.group(2), extra=r.group(3), text=text)


def quote_value(value: str) -> str:
    """``value`` as one AGI command argument: in double quotes, with ``\\`` and ``"`` escaped.

    Asterisk's command parser takes a backslash as "next character literally", so this is
    exact for any text without control characters, which it refuses (a CR or LF would end or
    split the command; the rest have no business in a channel variable).
    """
    if _CONTROL.search(value):
        raise ValueError(f"control character in AGI value {_for_log(value)!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class AgiSession:
    """The command side of one FastAGI connection, handed to a :data:`Route`.

    Commands run one at a time (a lock keeps concurrent callers from reading each other's
    replies). Once Asterisk has reported a hangup, every command raises :class:`AgiHangup`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._hung_up = False
        self._commands = 0

    @property
    def hung_up(self) -> bool:
        """Asterisk sent ``HANGUP`` or closed the connection."""
        return self._hung_up

    @property
    def commands(self) -> int:
        """Commands written so far."""
        return self._commands

    async def command(self, line: str) -> AgiReply:
        """Send one command line (no newline) and return its reply.

        Raises :class:`ValueError` for a CR, LF or NUL in ``line`` or a line Asterisk would
        split, :class:`AgiHangup` when the channel hung up or the connection closed, and
        :class:`AgiProtocolError` for a reply that is not AGI.
        """
        if any(c in line for c in "\r\n\x00"):
            raise ValueError(f"CR, LF or NUL in AGI command {_for_log(line)!r}")
        data = line.encode(_ENCODING, _ERRORS) + b"\n"
        if len(data) > MAX_COMMAND_BYTES:
            raise ValueError(f"AGI command of {len(data)} bytes; Asterisk reads at most {MAX_COMMAND_BYTES}")
        async with self._lock:
            if self._hung_up:
                raise AgiHangup("the channel has hung up")
            self._commands += 1
            try:
                self._writer.write(data)
                await self._writer.drain()
            except ConnectionError as exc:
                self._hung_up = True
                raise AgiHangup(f"connection lost: {exc}") from exc
            return await self._read_reply()

    async def set_variable(self, name: str, value: str) -> None:
        """``SET VARIABLE name "value"``; raises :class:`AgiCommandError` unless Asterisk says 200.

        ``name`` must be a plain variable name (letters, digits, underscores; a leading ``_``
        or ``__`` for inheritance is fine); use :meth:`command` for function writes.
        """
        if _VARIABLE_NAME.fullmatch(name) is None:
            raise ValueError(f"not a channel variable name: {_for_log(name)!r}")
        command = f"SET VARIABLE {name} {quote_value(value)}"
        reply = await self.command(command)
        if not reply.ok:
            raise AgiCommandError(command, reply)

    async def _readline(self) -> str:
        try:
            raw = await self._reader.readline()
        except ConnectionError as exc:
            self._hung_up = True
            raise AgiHangup(f"connection lost: {exc}") from exc
        except ValueError as exc:  # longer than the stream limit
            raise AgiProtocolError("reply line too long") from exc
        if not raw.endswith(b"\n"):  # EOF, possibly after a partial line
            self._hung_up = True
            raise AgiHangup("Asterisk closed the connection")
        return _strip_eol(_decode(raw))

    async def _read_reply(self) -> AgiReply:
        first = await self._readline()
        if first == "HANGUP":
            self._hung_up = True
            raise AgiHangup("HANGUP")
        m = _REPLY_LINE.fullmatch(first)
        if m is None:
            raise AgiProtocolError(f"not an AGI reply: {_for_log(first)!r}")
        more: list[str] = []
        if m.group(2) == "-":
            end = f"{m.group(1)} "
            while True:
                line = await self._readline()
                more.append(line)
                if line.startswith(end):
                    break
                if len(more) >= _MAX_REPLY_LINES:
                    raise AgiProtocolError(f"multi-line {m.group(1)} reply without an end line")
        return parse_reply(first, more)


# -- routing ----------------------------------------------------------------------------------

Route = Callable[[AgiRequest, AgiSession], Awaitable[None]]
"""Handles one script: reads the request, sends commands, returns (the server then closes)."""


class AgiRouter:
    """The one table of FastAGI scripts; registering a name twice raises."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def register(self, name: str, route: Route) -> None:
        if not name or name != name.strip("/") or any(c in name for c in "?# \t"):
            raise ValueError(f"invalid AGI script name {name!r}")
        if name in self._routes:
            raise ValueError(f"AGI script {name!r} registered twice")
        self._routes[name] = route

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def names(self) -> list[str]:
        return sorted(self._routes)


# -- server -----------------------------------------------------------------------------------


class LatencyHistogram:
    """Session durations in fixed buckets (seconds), for the Prometheus histogram on /metrics.

    Plain counters, no lock: only the event loop touches them.
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counts by upper bound (``"+Inf"`` last), the sum and the count."""
        cumulative: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*(repr(b) for b in self.BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return {"buckets": cumulative, "sum": self.sum, "count": running}


class FastAgiServer:
    """Accepts FastAGI connections and runs the routed script for each.

    A connection over ``max_connections`` is closed at once, unread. Each accepted one must
    deliver its header block (at most ``max_header_bytes``) within ``header_timeout`` seconds
    and finish within ``session_timeout``. An unknown script is logged and closed with nothing
    set; a route that raises is logged and counted and its connection closed. Every accepted
    connection ends with one ``agi.session`` log line (script, outcome, duration_ms, ...).

    Outcomes: ``completed``, ``hangup`` (Asterisk reported a hangup or closed), ``route_error``,
    ``timeout`` (session timeout), ``unknown_script``, ``header_error`` (with ``header_error``
    naming the kind), ``cancelled`` (cut by :meth:`close`).
    """

    def __init__(
        self,
        router: AgiRouter,
        *,
        host: str,
        port: int,
        max_connections: int = 200,
        header_timeout: float = 2.0,
        session_timeout: float = 10.0,
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        if max_connections < 1 or header_timeout <= 0 or session_timeout <= 0 or max_header_bytes < 64:
            raise ValueError("need max_connections >= 1, timeouts > 0 and max_header_bytes >= 64")
        self._router = router
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        self._session_timeout = session_timeout
        self._max_header_bytes = max_header_bytes
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False

        self._sessions = 0
        self._refused = 0
        self._header_errors = 0
        self._unknown_scripts = 0
        self._hangups = 0
        self._route_errors = 0
        self._timeouts = 0
        self._completed = 0
        self.latency = LatencyHistogram()

    # -- status -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    @property
    def sessions(self) -> int:
        """Connections accepted (not refused)."""
        return self._sessions

    @property
    def refused(self) -> int:
        """Connections closed unread because ``max_connections`` were busy (or closing)."""
        return self._refused

    @property
    def header_errors(self) -> int:
        return self._header_errors

    @property
    def unknown_scripts(self) -> int:
        return self._unknown_scripts

    @property
    def hangups(self) -> int:
        return self._hangups

    @property
    def route_errors(self) -> int:
        return self._route_errors

    @property
    def timeouts(self) -> int:
        return self._timeouts

    @property
    def completed(self) -> int:
        return self._completed

    def stats(self) -> dict[str, int]:
        """All counters, for the status command or a log line."""
        return {
            "active": self.active,
            "sessions": self._sessions,
            "refused": self._refused,
            "header_errors": self._header_errors,
            "unknown_scripts": self._unknown_scripts,
            "hangups": self._hangups,
            "route_errors": self._route_errors,
            "timeouts": self._timeouts,
            "completed": self._completed,
        }

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FastAgiServer already started")
        self._closing = False
        self._server = await asyncio.start_server(
            self._handle,
            self._host,
            self._port,
            limit=max(_READ_LIMIT, self._max_header_bytes),
            backlog=max(128, self._max_connections),
        )
        log.info("agi.listening", host=self._host, port=self.port, scripts=self._router.names())

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, let sessions in flight finish for up to ``timeout`` seconds, then
        cancel the rest."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        pending = set(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
                log.warning("agi.close_cancelled", sessions=len(still), timeout=timeout)
        if server is not None:
            await server.wait_closed()
        log.info("agi.closed", **self.stats())

    # -- one connection -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self._closing or len(self._tasks) >= self._max_connections:
            self._refused += 1
            writer.transport.abort()
            log.warning(
                "agi.refused",
                peer=peer_host,
                active=len(self._tasks),
                max_connections=self._max_connections,
                closing=self._closing,
                refused=self._refused,
            )
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._sessions += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        info: dict[str, object] = {"peer": peer_host, "script": None}
        outcome = "cancelled"
        graceful = False
        try:
            outcome, graceful = await self._serve(reader, writer, info)
        except asyncio.CancelledError:
            # close() gave up waiting. End quietly: asyncio.streams' done-callback calls
            # task.exception(), which would raise (and get logged) for a cancelled task.
            outcome = "cancelled"
        finally:
            self._tasks.discard(task)
            await self._close_writer(writer, graceful=graceful)
            elapsed = loop.time() - started
            duration_ms = round(elapsed * 1000, 1)
            if info["script"] is not None:  # a request was read: how long Asterisk waited for its answer
                self.latency.observe(elapsed)
            # a completed session is already told by its route's own line (agi.authorize): debug
            level = (
                "debug" if outcome == "completed" else "info" if outcome in {"hangup", "header_error"} else "warning"
            )
            getattr(log, level)("agi.session", outcome=outcome, duration_ms=duration_ms, **info)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: dict[str, object]
    ) -> tuple[str, bool]:
        """Run one session; returns (outcome, close gracefully) and updates the counters."""
        session: AgiSession | None = None
        try:
            async with asyncio.timeout(self._session_timeout):
                try:
                    request = await self._read_request(reader)
                except AgiHeaderError as exc:
                    self._header_errors += 1
                    info["header_error"] = exc.kind
                    return "header_error", False
                script = request.script
                info.update(script=_for_log(script), uniqueid=_for_log(request.uniqueid), args=len(request.args))
                route = self._router.get(script)
                if route is None:
                    self._unknown_scripts += 1
                    log.warning("agi.unknown_script", script=_for_log(script), known=self._router.names())
                    return "unknown_script", True
                session = AgiSession(reader, writer)
                try:
                    await route(request, session)
                except AgiHangup:
                    hung_up = True
                except Exception as exc:
                    self._route_errors += 1
                    info["commands"] = session.commands
                    log.exception("agi.route_error", script=_for_log(script), error=repr(exc))
                    return "route_error", True
                else:
                    hung_up = session.hung_up
                info["commands"] = session.commands
                if hung_up:
                    self._hangups += 1
                    return "hangup", True
                self._completed += 1
                return "completed", True
        except TimeoutError:
            self._timeouts += 1
            if session is not None:
                info["commands"] = session.commands
            info["timeout"] = self._session_timeout
            return "timeout", session is not None

    async def _read_request(self, reader: asyncio.StreamReader) -> AgiRequest:
        """The header block, bounded by size and time.

        Asterisk writes LF-terminated lines: after the first two, the rest of the block is taken
        with one ``readuntil(b"\\n\\n")`` instead of a read per line (a real request has ~30
        lines). Anything else (CRLF, a very short block) goes line by line.
        """
        lines: list[bytes] = []
        try:
            async with asyncio.timeout(self._header_timeout):
                total = 0
                while True:
                    raw = await self._header_read(reader, b"\n")
                    total += len(raw)
                    if total > self._max_header_bytes:
                        raise AgiHeaderError("oversized")
                    if raw in (b"\n", b"\r\n"):
                        break
                    lines.append(raw)
                    if len(lines) == 2 and not any(line.endswith(b"\r\n") for line in lines):
                        block = await self._header_read(reader, b"\n\n")
                        total += len(block)
                        if total > self._max_header_bytes:
                            raise AgiHeaderError("oversized")
                        if block != b"\n":
                            lines.extend(block[:-2].split(b"\n"))
                        break
        except TimeoutError as exc:
            raise AgiHeaderError("timeout") from exc
        return parse_request(lines)

    @staticmethod
    async def _header_read(reader: asyncio.StreamReader, separator: bytes) -> bytes:
        try:
            return await reader.readuntil(separator)
        except asyncio.IncompleteReadError as exc:  # EOF before the separator
            raise AgiHeaderError("closed") from exc
        except asyncio.LimitOverrunError as exc:  # no separator within the stream limit
            raise AgiHeaderError("oversized") from exc
        except ConnectionError as exc:
            raise AgiHeaderError("closed", type(exc).__name__) from exc

    @staticmethod
    async def _close_writer(writer: asyncio.StreamWriter, *, graceful: bool) -> None:
        """Close politely after a real session (Asterisk reads EOF), abort junk at once."""
        if not graceful:
            writer.transport.abort()
            return
        writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):  # not wait_for: no extra task per session
                await writer.wait_closed()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise


def _for_log(text: str) -> str:
    """Attacker-chosen text made safe for one log field: printable and short."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c) & 0xFF:02x}" for c in text[:_LOG_TEXT_MAX])
    return out + ("..." if len(text) > _LOG_TEXT_MAX else "")
