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
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, cast
from urllib.parse import parse_qsl, urlsplit

import structlog

from clickphone_agi.adapters.logging import debug_enabled

__all__ = [
    "LOOPBACK_PEERS",
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

LOOPBACK_PEERS: Final = ("127.0.0.1/32", "::1/128")
"""Who may connect by default: FastAGI has no login, so whoever reaches the port can authorise calls."""

_ENCODING: Final = "utf-8"
_ERRORS: Final = "surrogateescape"
_READ_LIMIT: Final = 64 * 1024  # longest single reply line (GET FULL VARIABLE can be long)
_MAX_REPLY_LINES: Final = 200  # a 520 usage text is a few dozen lines
_MAX_REPLY_BYTES: Final = 16 * 1024  # a whole multi-line reply; a 520 usage text is under 2 KB
_CLOSE_TIMEOUT: Final = 1.0
_REFUSAL_LOG_EVERY: Final = 60.0  # seconds; refusals are counted each, logged at most this often
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
    return _parse_block(b"\n".join(raw[:-1] if raw[-1:] == b"\n" else raw for raw in lines))


def _header_env(pairs: list[tuple[str, str]], *, crlf: bool) -> dict[str, str]:
    """The (name, value) pairs as a dict: a repeated header keeps its first value, and with CRLF
    lines (not Asterisk's) a value's last CR is not part of it."""
    if crlf:
        pairs = [(name, value[:-1] if value[-1:] == "\r" else value) for name, value in pairs]
    env = dict(pairs)  # in C; the usual case: every name once
    if len(env) != len(pairs):
        env = {}
        for name, value in pairs:
            env.setdefault(name, value)
    return env


def _parse_block(block: bytes) -> AgiRequest:
    """:func:`parse_request` of the header lines joined by LF (no final LF, no blank line)."""
    text = block.decode(_ENCODING, _ERRORS)  # per line or at once: the same (LF is never inside a character)
    pairs = _HEADER_LINE.findall(text)  # every line at once, in C
    if len(pairs) != text.count("\n") + 1:  # some line is not "agi_name: value": name the first
        for line in text.split("\n"):
            if _HEADER_LINE.fullmatch(line) is None:
                raise AgiHeaderError("garbage", _for_log(line.removesuffix("\r")))
    env = _header_env(pairs, crlf="\r" in text)
    numbered: list[tuple[int, str]] = []
    for name, value in env.items():
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
    if query_string:
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
    if first == "200 result=1" and not more:
        return _OK  # every SET VARIABLE's answer: the same frozen object
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


_OK: Final = AgiReply(code=200, result=1, text="result=1")


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
    Replies are read from the connection's buffer only while a command waits for one, so a
    ``HANGUP`` line Asterisk writes between replies is seen by the next command, as a blocking
    reader would see it.
    """

    def __init__(self, connection: _AgiConnection) -> None:
        self._connection = connection
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
        if "\r" in line or "\n" in line or "\x00" in line:
            raise ValueError(f"CR, LF or NUL in AGI command {_for_log(line)!r}")
        data = line.encode(_ENCODING, _ERRORS) + b"\n"
        if len(data) > MAX_COMMAND_BYTES:
            raise ValueError(f"AGI command of {len(data)} bytes; Asterisk reads at most {MAX_COMMAND_BYTES}")
        async with self._lock:
            if self._hung_up:
                raise AgiHangup("the channel has hung up")
            self._commands += 1
            try:
                return await self._connection.exchange(data)
            except AgiHangup:
                self._hung_up = True
                raise

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


class _LogThrottle:
    """At most one log line per ``every`` seconds for one kind of event, however many events come:
    a client that keeps the session cap full cannot flood the log, and nothing is kept per peer.
    The line that is written carries the number of events since the previous one."""

    def __init__(self, every: float = _REFUSAL_LOG_EVERY) -> None:
        self._every = every
        self._next = float("-inf")
        self._unlogged = 0

    def due(self, now: float) -> int:
        """Count one event at ``now``; the number to log (this one included), or 0: stay quiet."""
        self._unlogged += 1
        if now < self._next:
            return 0
        self._next = now + self._every
        count, self._unlogged = self._unlogged, 0
        return count


_HEADER, _ROUTE, _DONE = 0, 1, 2  # a connection's phases


class _AgiConnection(asyncio.Protocol):
    """One accepted FastAGI connection, as a protocol: no stream objects, no task until a route runs.

    Reads the header block (bounded by ``max_header_bytes`` and ``header_timeout``), then runs the
    route in a task of its own and hands it the replies to its commands (:meth:`exchange`). The
    whole session is bounded by ``session_timeout``. Ends exactly once (:meth:`_finish`), with one
    ``agi.session`` line and one outcome counted.
    """

    def __init__(self, server: FastAgiServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._phase = _HEADER
        self._scanned = 0  # header bytes already split into lines
        self._lines: list[bytes] = []
        self._closed: str | None = None  # why no more bytes will come (EOF, connection lost)
        self._paused = False
        self._waiter: asyncio.Future[AgiReply] | None = None
        self._first: re.Match[str] | None = None  # the first line of a multi-line reply being read
        self._more: list[str] = []
        self._reply_bytes = 0  # of the multi-line reply being read, newlines included
        self._timers: tuple[asyncio.TimerHandle, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._timed_out = False
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._started = self._loop.time()
        self._info: dict[str, object] = {"peer": "", "script": None}

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        peer = transport.get_extra_info("peername")
        peer_host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._info["peer"] = peer_host
        if not server._admits(peer_host):
            server._refused_peers += 1
            self._refuse(
                transport, server._refused_peer_log, "agi.refused_peer", peer=peer_host,
                refused_peers=server._refused_peers,
            )  # fmt: skip
            return
        if server._closing or len(server._connections) >= server._max_connections:
            server._refused += 1
            self._refuse(
                transport, server._refused_log, "agi.refused", peer=peer_host, active=len(server._connections),
                max_connections=server._max_connections, closing=server._closing, refused=server._refused,
            )  # fmt: skip
            return
        server._connections.add(self)
        server._sessions += 1
        self._timers = (
            self._loop.call_later(server._header_timeout, self._header_timed_out),
            self._loop.call_later(server._session_timeout, self._session_timed_out),
        )

    def _refuse(self, transport: asyncio.Transport, throttle: _LogThrottle, event: str, **fields: Any) -> None:
        """Close at once, unread: this connection never becomes a session. Logged through
        ``throttle``, with the number refused since its last line."""
        self._phase = _DONE
        self.done.set_result(None)
        transport.abort()
        since_last_line = throttle.due(self._loop.time())
        if since_last_line:
            log.warning(event, **fields, since_last_line=since_last_line)

    def data_received(self, data: bytes) -> None:
        if self._phase == _DONE:
            return
        self._buffer += data
        if self._phase == _HEADER:
            self._read_header()
        elif self._waiter is not None:
            self._read_reply()
        elif len(self._buffer) > 2 * _READ_LIMIT and not self._paused:  # nobody asked: stop reading
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._gone("Asterisk closed the connection")
        return True  # keep our side open: the route may still be finishing

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(f"connection lost: {exc}" if exc else "Asterisk closed the connection")

    # -- the header block -------------------------------------------------------------------

    def _read_header(self) -> None:
        buffer = self._buffer
        limit = self._server._max_header_bytes
        if not self._scanned:  # Asterisk's block: LF lines, a blank line; one search, one parse
            end = buffer.find(b"\n\n")
            if end > 0 and buffer[0] != 0x0A and buffer.find(b"\r", 0, end) < 0:  # not CRLF, not blank first
                if end + 2 > limit:
                    self._header_failed(AgiHeaderError("oversized"))
                    return
                block = bytes(buffer[:end])
                del buffer[: end + 2]  # anything after the blank line is Asterisk's first reply (or HANGUP)
                self._header_read(block)
                return
        pos = self._scanned
        while True:
            end = buffer.find(b"\n", pos) + 1
            if not end:
                if len(buffer) > limit:
                    self._header_failed(AgiHeaderError("oversized"))
                else:
                    self._scanned = pos
                return
            if end > limit:
                self._header_failed(AgiHeaderError("oversized"))
                return
            line = bytes(buffer[pos:end])
            pos = end
            if line in (b"\n", b"\r\n"):
                break
            self._lines.append(line)
        del buffer[:pos]  # anything after the blank line is Asterisk's first reply (or HANGUP)
        lines, self._lines = self._lines, []
        if not lines:
            self._header_failed(AgiHeaderError("empty"))
            return
        self._header_read(b"\n".join(line[:-1] for line in lines))  # each line ends with LF here

    def _header_read(self, block: bytes) -> None:
        self._timers[0].cancel()
        try:
            request = _parse_block(block)
        except AgiHeaderError as exc:
            self._header_failed(exc)
            return
        self._start_route(request)

    def _header_failed(self, exc: AgiHeaderError) -> None:
        self._server._header_errors += 1
        self._info["header_error"] = exc.kind
        self._finish("header_error", graceful=False)

    def _header_timed_out(self) -> None:
        if self._phase == _HEADER:
            self._header_failed(AgiHeaderError("timeout"))

    # -- the route --------------------------------------------------------------------------

    def _start_route(self, request: AgiRequest) -> None:
        server = self._server
        script = request.script
        self._info.update(script=_for_log(script), uniqueid=_for_log(request.uniqueid), args=len(request.args))
        route = server._router.get(script)
        if route is None:
            server._unknown_scripts += 1
            log.warning("agi.unknown_script", script=_for_log(script), known=server._router.names())
            self._finish("unknown_script", graceful=True)
            return
        self._phase = _ROUTE
        self._task = self._loop.create_task(self._run(route, request, AgiSession(self)))
        self._task.add_done_callback(self._route_ended)

    async def _run(self, route: Route, request: AgiRequest, session: AgiSession) -> None:
        server = self._server
        try:
            await route(request, session)
        except AgiHangup:
            hung_up = True
        except AgiProtocolError as exc:
            # the peer's fault, not the route's: counted apart, one warning line, no traceback
            server._protocol_errors += 1
            self._info["commands"] = session.commands
            self._info["error"] = str(exc)
            self._finish("protocol_error", graceful=False)
            return
        except asyncio.CancelledError:
            # by the session timeout or by close() giving up; ends quietly either way
            if self._timed_out:
                server._timeouts += 1
                self._info["commands"] = session.commands
                self._info["timeout"] = server._session_timeout
                self._finish("timeout", graceful=True)
            else:
                self._finish("cancelled", graceful=False)
            return
        except Exception as exc:
            server._route_errors += 1
            self._info["commands"] = session.commands
            log.exception("agi.route_error", script=self._info["script"], error=repr(exc))
            self._finish("route_error", graceful=True)
            return
        else:
            hung_up = session.hung_up
        self._info["commands"] = session.commands
        if hung_up:
            server._hangups += 1
            self._finish("hangup", graceful=True)
        else:
            server._completed += 1
            self._finish("completed", graceful=True)

    def _session_timed_out(self) -> None:
        if self._phase == _ROUTE and self._task is not None:
            self._timed_out = True
            self._task.cancel()
        elif self._phase == _HEADER:  # a header timeout longer than the session's
            self._server._timeouts += 1
            self._info["timeout"] = self._server._session_timeout
            self._finish("timeout", graceful=False)

    def _route_ended(self, _task: asyncio.Task[None]) -> None:
        if self._phase != _DONE:  # cancelled before its first step: _run never ran to finish it
            if self._timed_out:
                self._server._timeouts += 1
            self._finish("timeout" if self._timed_out else "cancelled", graceful=False)

    def abandon(self) -> None:
        """End now, whatever the route is doing (it ignored its cancellation)."""
        self._finish("cancelled", graceful=False)

    def cancel(self) -> None:
        """:meth:`FastAgiServer.close` gave up waiting: end this connection now."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._phase != _DONE:
            self._finish("cancelled", graceful=False)

    # -- commands and replies (for AgiSession) ----------------------------------------------

    async def exchange(self, data: bytes) -> AgiReply:
        """Write one command line and wait for its reply (one at a time: AgiSession's lock)."""
        transport = self._transport
        if transport is None or transport.is_closing() or (self._closed and not self._buffer):
            raise AgiHangup(self._closed or "connection closed")
        transport.write(data)
        waiter: asyncio.Future[AgiReply] = self._loop.create_future()
        self._waiter = waiter
        self._first, self._more = None, []
        self._read_reply()
        try:
            return await waiter
        finally:
            self._waiter = None

    def _read_reply(self) -> None:
        """Take reply lines from the buffer for the waiting command, as ``readline`` would."""
        waiter = self._waiter
        buffer = self._buffer
        while waiter is not None and not waiter.done():
            if self._first is None and buffer[:13] == b"200 result=1\n":  # every SET VARIABLE's answer
                del buffer[:13]
                waiter.set_result(_OK)
                break
            end = buffer.find(b"\n") + 1
            if not end:
                if len(buffer) > _READ_LIMIT:
                    waiter.set_exception(AgiProtocolError("reply line too long"))
                elif self._closed is not None:  # EOF, possibly after a partial line
                    waiter.set_exception(AgiHangup(self._closed))
                break
            if end > _READ_LIMIT + 1:
                waiter.set_exception(AgiProtocolError("reply line too long"))
                break
            line = _strip_eol(buffer[:end].decode(_ENCODING, _ERRORS))
            del buffer[:end]
            self._reply_line(waiter, line)
        if self._paused and len(buffer) <= _READ_LIMIT and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _reply_line(self, waiter: asyncio.Future[AgiReply], line: str) -> None:
        """One reply line for the waiting command: settles ``waiter`` unless more lines must follow."""
        first = self._first
        if first is None:
            if line == "HANGUP":
                waiter.set_exception(AgiHangup("HANGUP"))
                return
            m = _REPLY_LINE.fullmatch(line)
            if m is None:
                waiter.set_exception(AgiProtocolError(f"not an AGI reply: {_for_log(line)!r}"))
            elif m.group(2) != "-":
                waiter.set_result(parse_reply(line))
            else:
                self._first = m  # a multi-line reply: its lines follow
                self._reply_bytes = len(line) + 1
            return
        self._more.append(line)
        # bounded in bytes as well as lines: 200 lines of 64 KiB would hold 13 MB per session
        self._reply_bytes += len(line) + 1
        if self._reply_bytes > _MAX_REPLY_BYTES:
            waiter.set_exception(AgiProtocolError(f"multi-line {first.group(1)} reply over {_MAX_REPLY_BYTES} bytes"))
        elif line.startswith(f"{first.group(1)} "):
            waiter.set_result(parse_reply(first.group(0), self._more))
        elif len(self._more) >= _MAX_REPLY_LINES:
            waiter.set_exception(AgiProtocolError(f"multi-line {first.group(1)} reply without an end line"))

    def _gone(self, why: str) -> None:
        if self._closed is None:
            self._closed = why
        if self._phase == _HEADER:
            self._header_failed(AgiHeaderError("closed"))
        elif self._waiter is not None:
            self._read_reply()  # a whole reply may still be in the buffer

    # -- the end ----------------------------------------------------------------------------

    def _finish(self, outcome: str, *, graceful: bool) -> None:
        """Close (politely after a real session, at once for junk), count and log, once."""
        if self._phase == _DONE:
            return
        self._phase = _DONE
        for timer in self._timers:
            timer.cancel()
        server = self._server
        server._connections.discard(self)
        transport = self._transport
        if transport is not None:
            if graceful:
                transport.close()  # what we wrote is flushed first; Asterisk then reads EOF
                if transport.get_write_buffer_size():  # a peer that does not read: not for ever
                    self._loop.call_later(_CLOSE_TIMEOUT, transport.abort)
            else:
                transport.abort()
        elapsed = self._loop.time() - self._started
        if self._info["script"] is not None:  # a request was read: how long Asterisk waited for its answer
            server.latency.observe(elapsed)
        # a completed session is already told by its route's own line (agi.authorize): debug
        level = "debug" if outcome == "completed" else "info" if outcome in {"hangup", "header_error"} else "warning"
        if level != "debug" or debug_enabled():
            getattr(log, level)("agi.session", outcome=outcome, duration_ms=round(elapsed * 1000, 1), **self._info)
        if not self.done.done():
            self.done.set_result(None)


class FastAgiServer:
    """Accepts FastAGI connections and runs the routed script for each.

    A connection from outside ``allowed_peers`` (IP networks; loopback by default: FastAGI has
    no login) or over ``max_connections`` is closed at once, unread, and counted; each kind is
    logged (``agi.refused_peer``, ``agi.refused``) at most once a minute, with the number refused
    since the last line. Each accepted one must deliver its header block (at most
    ``max_header_bytes``) within ``header_timeout`` seconds and finish within
    ``session_timeout``. An unknown script is logged and closed with nothing
    set; a route that raises is logged and counted and its connection closed. Every accepted
    connection ends with one ``agi.session`` log line (script, outcome, duration_ms, ...).

    Outcomes: ``completed``, ``hangup`` (Asterisk reported a hangup or closed), ``route_error``,
    ``protocol_error`` (a reply that is not AGI, or too long), ``timeout`` (session timeout),
    ``unknown_script``, ``header_error`` (with ``header_error`` naming the kind), ``cancelled``
    (cut by :meth:`close`).

    Each connection is an :class:`asyncio.Protocol` (:class:`_AgiConnection`) rather than a
    stream pair and a task: at a thousand calls a second, the streams' objects, futures and
    timeout contexts cost more of the event loop than the session's own work.
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
        allowed_peers: Iterable[str] = LOOPBACK_PEERS,
    ) -> None:
        if max_connections < 1 or header_timeout <= 0 or session_timeout <= 0 or max_header_bytes < 64:
            raise ValueError("need max_connections >= 1, timeouts > 0 and max_header_bytes >= 64")
        networks = tuple(ipaddress.ip_network(peer, strict=True) for peer in allowed_peers)
        if not networks:
            raise ValueError("need at least one allowed peer network")
        self._router = router
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        self._session_timeout = session_timeout
        self._max_header_bytes = max_header_bytes
        self._allowed_peers = networks
        self._last_admitted: str | None = None  # Asterisk connects from one address: checked once, then compared
        self._server: asyncio.Server | None = None
        self._connections: set[_AgiConnection] = set()
        self._closing = False

        self._sessions = 0
        self._refused = 0
        self._refused_log = _LogThrottle()
        self._refused_peers = 0
        self._refused_peer_log = _LogThrottle()
        self._header_errors = 0
        self._unknown_scripts = 0
        self._hangups = 0
        self._route_errors = 0
        self._protocol_errors = 0
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
        return len(self._connections)

    @property
    def sessions(self) -> int:
        """Connections accepted (not refused)."""
        return self._sessions

    @property
    def refused(self) -> int:
        """Connections closed unread because ``max_connections`` were busy (or closing)."""
        return self._refused

    @property
    def refused_peers(self) -> int:
        """Connections closed unread because their address is not in ``allowed_peers``."""
        return self._refused_peers

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
    def protocol_errors(self) -> int:
        return self._protocol_errors

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
            "refused_peers": self._refused_peers,
            "header_errors": self._header_errors,
            "unknown_scripts": self._unknown_scripts,
            "hangups": self._hangups,
            "route_errors": self._route_errors,
            "protocol_errors": self._protocol_errors,
            "timeouts": self._timeouts,
            "completed": self._completed,
        }

    def _admits(self, host: str) -> bool:
        """Whether a peer address is in ``allowed_peers`` (FastAGI itself has no login)."""
        if host == self._last_admitted:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # no IP peer at all (a Unix socket): nothing to admit it by
            return False
        if any(address in network for network in self._allowed_peers):
            self._last_admitted = host
            return True
        return False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FastAgiServer already started")
        self._closing = False
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _AgiConnection(self), self._host, self._port, backlog=max(128, self._max_connections)
        )
        log.info("agi.listening", host=self._host, port=self.port, scripts=self._router.names())

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, let sessions in flight finish for up to ``timeout`` seconds, then
        cancel the rest."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        pending = {connection.done for connection in self._connections}
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            if still:
                for connection in list(self._connections):
                    connection.cancel()
                _, stuck = await asyncio.wait(still, timeout=_CLOSE_TIMEOUT)
                for connection in list(self._connections):  # a route that ignored its cancellation
                    connection.abandon()
                log.warning("agi.close_cancelled", sessions=len(still), timeout=timeout, ignored=len(stuck))
        if server is not None:
            await server.wait_closed()
        log.info("agi.closed", **self.stats())


def _for_log(text: str) -> str:
    """Attacker-chosen text made safe for one log field: printable and short."""
    if len(text) <= _LOG_TEXT_MAX and text.isprintable():
        return text  # the usual case, checked in C
    out = "".join(c if c.isprintable() else f"\\x{ord(c) & 0xFF:02x}" for c in text[:_LOG_TEXT_MAX])
    return out + ("..." if len(text) > _LOG_TEXT_MAX else "")
