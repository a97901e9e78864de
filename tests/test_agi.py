"""FastAgiServer on real loopback sockets, driven by the scripted FastAGI client
(``agi_client.py``), plus the dialplan contract with ``dialplan_vars``.

Timeouts here only guard against hangs; ``header_timeout`` and ``session_timeout`` are set small
where a test needs them to fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from clickphone_agi import dialplan_vars
from clickphone_agi.adapters.agi import (
    MAX_COMMAND_BYTES,
    AgiHangup,
    AgiHeaderError,
    AgiProtocolError,
    AgiReply,
    AgiRequest,
    AgiRouter,
    AgiSession,
    FastAgiServer,
    _LogThrottle,
    parse_reply,
    parse_request,
    quote_value,
)
from clickphone_agi.config.schema import BillingConfig
from clickphone_agi.dialplan_vars import Reason
from clickphone_agi.sim.agi_client import AgiCallResult, agi_call, parse_agi_args

HOST = "127.0.0.1"
DIALPLAN = Path(__file__).resolve().parent.parent / "dialplan"
GUARD = 10.0  # seconds; only a hang guard


# -- toy routes -------------------------------------------------------------------------------


@dataclass
class Toys:
    """Routes for the tests and what they observed."""

    requests: list[AgiRequest] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    replies: dict[str, Any] = field(default_factory=dict)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def echo(self, request: AgiRequest, session: AgiSession) -> None:
        """Sets TEST_VAR to the first argument."""
        await session.set_variable("TEST_VAR", request.args[0])

    async def echo_env(self, request: AgiRequest, session: AgiSession) -> None:
        """Sets TEST_VAR to the caller-ID name header, whatever bytes it holds."""
        await session.set_variable("TEST_VAR", request.calleridname)

    async def inspect(self, request: AgiRequest, session: AgiSession) -> None:
        self.requests.append(request)

    async def boom(self, request: AgiRequest, session: AgiSession) -> None:
        await session.set_variable("BEFORE", "1")
        raise RuntimeError("route bug")

    async def three(self, request: AgiRequest, session: AgiSession) -> None:
        """Sets A, B, C; on a hangup records it and returns normally."""
        try:
            for name in ("A", "B", "C"):
                await session.set_variable(name, "1")
        except AgiHangup as exc:
            self.errors.append(exc)
            self.replies["hung_up"] = session.hung_up
            with contextlib.suppress(AgiHangup):
                await session.command("NOOP")
                self.replies["after_hangup"] = "sent"

    async def slow(self, request: AgiRequest, session: AgiSession) -> None:
        await session.set_variable("STARTED", "1")
        self.entered.set()
        await self.gate.wait()
        await session.set_variable("DONE", "1")

    async def commands(self, request: AgiRequest, session: AgiSession) -> None:
        r = self.replies
        r["unknown"] = await session.command("FOO BAR")
        r["usage"] = await session.command("SET VARIABLE ONLYNAME")
        r["get"] = await session.command("GET VARIABLE CHANNEL_X")
        r["longest"] = await session.command("NOOP " + "x" * (MAX_COMMAND_BYTES - len("NOOP \n")))
        refused = []
        for bad in ("NOOP\nHANGUP", "NOOP\r", "NOOP\x00", "NOOP " + "x" * MAX_COMMAND_BYTES):
            try:
                await session.command(bad)
            except ValueError:
                refused.append(bad[:12])
        for name, value in (("BAD NAME", "x"), ("1X", "x"), ("X", "line\nbreak"), ("X", "tab\there"), ("X", "\x7f")):
            try:
                await session.set_variable(name, value)
            except ValueError:
                refused.append(name)
        r["refused"] = refused
        await session.set_variable("AFTER", "ok")

    def router(self) -> AgiRouter:
        router = AgiRouter()
        for name in ("echo", "echo_env", "inspect", "boom", "three", "slow", "commands"):
            router.register(name, getattr(self, name))
        return router


@asynccontextmanager
async def running_server(toys: Toys, host: str = HOST, **options: Any) -> AsyncIterator[FastAgiServer]:
    server = FastAgiServer(toys.router(), host=host, port=0, **options)
    await server.start()
    try:
        yield server
    finally:
        toys.gate.set()
        await server.close(timeout=2.0)


async def wait_for(predicate: Callable[[], bool], timeout: float = GUARD) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def call(server: FastAgiServer, script: str, args: list[str], **kwargs: Any) -> AgiCallResult:
    return await agi_call(HOST, server.port, script, args, **kwargs)


def sessions(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "agi.session"]


# -- raw (bad) clients ------------------------------------------------------------------------

ECHO_REQUEST = b"agi_network: yes\nagi_network_script: echo\nagi_arg_1: x\n\n"  # as Asterisk sends it, in short


async def raw_client(port: int, payload: bytes, *, close_at_once: bool = False, host: str = HOST) -> bytes:
    """Connect, send ``payload``, then read until the server closes; returns what it sent."""
    async with asyncio.timeout(GUARD):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            if close_at_once:
                return b""
            writer.write(payload)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            try:
                return await reader.read()
            except ConnectionResetError:
                return b""
        finally:
            writer.transport.abort()


def bad_clients(port: int, n: int) -> list[Awaitable[bytes]]:
    """``n`` misbehaving clients, four kinds in turn."""
    kinds: list[Callable[[], Awaitable[bytes]]] = [
        lambda: raw_client(port, b"", close_at_once=True),  # port scan / TCP health check
        lambda: raw_client(port, b"agi_network: yes\nagi_network_script: echo\n"),  # never a blank line
        lambda: raw_client(port, b"agi_arg_1: " + b"A" * (20 * 1024) + b"\n\n"),  # oversized
        lambda: raw_client(port, bytes(range(256)) * 4 + b"\n\n"),  # binary junk
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


# -- a normal session -------------------------------------------------------------------------


async def test_a_normal_session_sets_the_variable_and_is_logged_once() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys) as server:
            result = await call(server, "echo", ["hello"])
            await wait_for(lambda: server.active == 0)

    assert result.commands == ['SET VARIABLE TEST_VAR "hello"']
    assert result.variables == {"TEST_VAR": "hello"}
    assert result.closed_by_server
    assert result.agistatus == "SUCCESS"
    assert server.stats() == {**server.stats(), "sessions": 1, "completed": 1, "active": 0, "route_errors": 0}
    [line] = sessions(logs)
    assert line["outcome"] == "completed"
    assert line["script"] == "echo"
    assert line["commands"] == 1
    assert line["uniqueid"] == "1718000000.1"
    assert isinstance(line["duration_ms"], float)


async def test_the_request_carries_env_script_query_and_args_in_order() -> None:
    toys = Toys()
    async with running_server(toys) as server:
        await call(server, "inspect?mode=strict&mode=lax&empty=&x=a%20b", ["acct1001", "0212345678", "10.0.0.7"])
    [req] = toys.requests
    assert req.script == "inspect"
    assert dict(req.query) == {"mode": "strict", "empty": "", "x": "a b"}
    assert req.args == ("acct1001", "0212345678", "10.0.0.7")
    assert req.env["network"] == "yes"
    assert req.env["network_script"] == "inspect?mode=strict&mode=lax&empty=&x=a%20b"
    assert req.channel == "PJSIP/100-00000001"
    assert req.uniqueid == "1718000000.1"
    assert req.accountcode == "acct1001"
    assert req.callerid == "100"
    assert req.extension == "0212345678"


def test_parse_request_orders_args_numerically_and_falls_back_to_agi_request() -> None:
    lines = [f"agi_arg_{i}: v{i}\n".encode() for i in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9)]
    req = parse_request([b"agi_request: agi://127.0.0.1:4573/authorize/?a=1&a=2\n", *lines])
    assert req.script == "authorize"
    assert dict(req.query) == {"a": "1"}
    assert req.args == tuple(f"v{i}" for i in range(1, 11))
    assert parse_request([b"agi_network: yes\r\n"]).script == ""
    assert parse_request([b"agi_accountcode: \n", b"agi_accountcode: second\n"]).accountcode == ""


def test_parse_request_first_value_wins_and_only_the_last_cr_goes() -> None:
    """The header dict is built in one go when every name comes once; a repeat (first value wins)
    and CRLF lines (one CR off the end of a value, one inside it stays) take the slower path."""
    req = parse_request(
        [
            b"agi_network_script: authorize\r\n",
            b"agi_arg_1: a\r\r\n",
            b"agi_arg_2: b\rc\r\n",
            b"agi_arg_1: later\r\n",
            b"agi_arg_3: \r\n",
        ]
    )
    assert req.script == "authorize"
    assert req.args == ("a\r", "b\rc", "")
    assert req.env["arg_1"] == "a\r"
    assert list(req.env) == ["network_script", "arg_1", "arg_2", "arg_3"]


@pytest.mark.parametrize(
    ("lines", "kind"),
    [
        ([], "empty"),
        ([b"GET / HTTP/1.0\r\n"], "garbage"),
        ([b"agi_network yes\n"], "garbage"),
        ([b"network: yes\n"], "garbage"),
        ([bytes(range(1, 10)) + b"\n"], "garbage"),
    ],
)
def test_parse_request_rejects_what_is_not_an_agi_header_block(lines: list[bytes], kind: str) -> None:
    with pytest.raises(AgiHeaderError) as info:
        parse_request(lines)
    assert info.value.kind == kind


# -- values round-trip exactly ----------------------------------------------------------------

TRICKY = [
    "hello world",
    "  leading and trailing  ",
    'say "hi"',
    "back\\slash",
    "ends with a backslash\\",
    '\\"',
    '"',
    "",
    "ünïcödé ☎ 📞 Ștefan",
    "semi;colon, comma | pipe $ {} []",
]


@pytest.mark.parametrize("value", TRICKY)
async def test_arguments_round_trip_exactly_through_set_variable(value: str) -> None:
    toys = Toys()
    async with running_server(toys) as server:
        result = await call(server, "echo", [value])
    assert result.variables == {"TEST_VAR": value}


async def test_non_utf8_header_bytes_round_trip_unchanged() -> None:
    name = b"Jos\xe9 \xff\xfe M\xfcller".decode("utf-8", "surrogateescape")  # Latin-1 + junk
    toys = Toys()
    async with running_server(toys) as server:
        result = await call(server, "echo_env", [], env={"calleridname": name})
    assert result.variables["TEST_VAR"].encode("utf-8", "surrogateescape") == b"Jos\xe9 \xff\xfe M\xfcller"
    assert server.completed == 1


@given(st.text(alphabet=st.characters(exclude_categories=["Cc"])))
def test_quote_value_is_undone_exactly_by_asterisks_parser(value: str) -> None:
    assert parse_agi_args(f"SET VARIABLE X {quote_value(value)}") == ["SET", "VARIABLE", "X", value]


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "\x00", "tab\t", "\x1b[31m", "\x7f"])
def test_quote_value_refuses_control_characters(value: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        quote_value(value)


def test_the_test_clients_parser_matches_res_agi_parse_args() -> None:
    assert parse_agi_args('SET VARIABLE X "a b"') == ["SET", "VARIABLE", "X", "a b"]
    assert parse_agi_args('SET  VARIABLE\tX ""') == ["SET", "VARIABLE", "X", ""]
    assert parse_agi_args(r"a\ b c\\d \"q\"") == ["a b", "c\\d", '"q"']
    assert parse_agi_args('ab"c d"e f') == ["abc de", "f"]


# -- replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        ("200 result=1", AgiReply(200, 1, None, None, "result=1")),
        ("200 result=-1", AgiReply(200, -1, None, None, "result=-1")),
        ("200 result=1 (a (nested) value)", AgiReply(200, 1, "a (nested) value", None, "result=1 (a (nested) value)")),
        ("200 result=0 (timeout) endpos=9", AgiReply(200, 0, "timeout", "endpos=9", "result=0 (timeout) endpos=9")),
        ("200 result= (timeout)", AgiReply(200, None, "timeout", None, "result= (timeout)")),
        ("510 Invalid or unknown command", AgiReply(510, text="Invalid or unknown command")),
    ],
)
def test_parse_reply(first: str, expected: AgiReply) -> None:
    assert parse_reply(first) == expected


def test_parse_reply_keeps_the_usage_text_and_refuses_garbage() -> None:
    reply = parse_reply("520-Invalid command syntax.  Proper usage follows:", [" Usage: X", "520 End of proper usage."])
    assert reply.code == 520
    assert not reply.ok
    assert reply.text.splitlines()[-1] == "520 End of proper usage."
    with pytest.raises(AgiProtocolError):
        parse_reply("HELLO")


async def test_command_reads_510_and_multi_line_520_and_refuses_unsafe_commands() -> None:
    toys = Toys()
    async with running_server(toys) as server:
        result = await call(server, "commands", [], channel_vars={"CHANNEL_X": "from (the) dialplan"})
    r = toys.replies
    assert r["unknown"].code == 510
    assert r["usage"].code == 520
    assert "End of proper usage." in r["usage"].text
    assert (r["get"].code, r["get"].result, r["get"].data) == (200, 1, "from (the) dialplan")
    assert r["longest"].ok
    assert r["refused"] == ["NOOP\nHANGUP", "NOOP\r", "NOOP\x00", "NOOP " + "x" * 7, "BAD NAME", "1X", "X", "X", "X"]
    # nothing refused reached the wire, and the multi-line reply was consumed whole
    assert result.commands[:3] == ["FOO BAR", "SET VARIABLE ONLYNAME", "GET VARIABLE CHANNEL_X"]
    assert result.commands[4:] == ['SET VARIABLE AFTER "ok"']
    assert len(result.commands[3].encode()) + 1 == MAX_COMMAND_BYTES
    assert result.variables == {"AFTER": "ok"}
    assert server.completed == 1


async def test_set_variable_raises_agi_command_error_when_asterisk_refuses() -> None:
    toys = Toys()
    refuse = "511 Command Not Permitted on a dead channel or intercept routine\n"
    with capture_logs() as logs:
        async with running_server(toys) as server:
            result = await call(server, "echo", ["x"], override=lambda argv: refuse)
            await wait_for(lambda: server.active == 0)
    assert result.variables == {}
    assert server.route_errors == 1
    [error] = [e for e in logs if e["event"] == "agi.route_error"]
    assert error["error"].startswith("AgiCommandError('SET VARIABLE -> 511 Command Not Permitted")


@pytest.mark.parametrize(("line_bytes", "lines"), [(65_000, 100), (1_000, 20)])
async def test_a_multi_line_reply_that_never_ends_is_cut_at_16_kib(line_bytes: int, lines: int) -> None:
    """``520-`` then long lines and never the ``520 `` end line: bounded only by line count and
    length, each session held megabytes until its timeout. It is cut once the reply passes
    16 KiB, counted as a protocol error, and the server goes on serving."""
    toys = Toys()
    flood = b"520-Invalid command syntax.  Proper usage follows:\n" + (b"y" * line_bytes + b"\n") * lines
    with capture_logs() as logs:
        async with running_server(toys, session_timeout=GUARD) as server:
            async with asyncio.timeout(2.0):  # well before the session timeout
                await raw_client(server.port, ECHO_REQUEST + flood)
            result = await call(server, "echo", ["still serving"])
            await wait_for(lambda: server.active == 0)
    assert (server.protocol_errors, server.route_errors, server.completed) == (1, 0, 1)
    assert server.stats()["protocol_errors"] == 1
    cut, normal = sessions(logs)
    assert (cut["outcome"], normal["outcome"]) == ("protocol_error", "completed")
    assert cut["error"] == "multi-line 520 reply over 16384 bytes"
    assert cut["log_level"] == "warning"
    assert result.variables == {"TEST_VAR": "still serving"}


# -- hangups ----------------------------------------------------------------------------------


async def test_hangup_mid_session_reaches_the_route_as_agi_hangup_and_is_counted() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys) as server:
            result = await call(server, "three", [], hangup_after=1)
            after = await call(server, "echo", ["still serving"])
            await wait_for(lambda: server.active == 0)

    [exc] = toys.errors
    assert isinstance(exc, AgiHangup)
    assert toys.replies == {"hung_up": True}  # later commands raise at once, unsent
    # Asterisk answered B in dead mode before we read HANGUP; C was never sent
    assert result.commands == ['SET VARIABLE A "1"', 'SET VARIABLE B "1"']
    assert result.agistatus == "HANGUP"
    assert (server.hangups, server.route_errors) == (1, 0)
    assert after.variables == {"TEST_VAR": "still serving"}
    assert [s["outcome"] for s in sessions(logs)] == ["hangup", "completed"]


async def test_hangup_before_the_first_command_uncaught_by_the_route() -> None:
    toys = Toys()
    async with running_server(toys) as server:
        result = await call(server, "echo", ["x"], hangup_after=0)
        await wait_for(lambda: server.active == 0)
    assert result.hangup_sent
    assert result.closed_by_server
    assert (server.hangups, server.route_errors, server.completed) == (1, 0, 0)


# -- routing ----------------------------------------------------------------------------------


def test_registering_a_route_twice_raises() -> None:
    router = AgiRouter()
    router.register("authorize", Toys().echo)
    with pytest.raises(ValueError, match="registered twice"):
        router.register("authorize", Toys().inspect)
    for bad in ("", "/x", "x?y", "a b"):
        with pytest.raises(ValueError, match="invalid"):
            router.register(bad, Toys().echo)
    assert router.names() == ["authorize"]


async def test_unknown_script_sets_nothing_and_closes() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys) as server:
            result = await call(server, "nope?x=1", ["a"])
            await wait_for(lambda: server.active == 0)
    assert result.commands == []
    assert result.variables == {}
    assert result.closed_by_server
    assert server.unknown_scripts == 1
    [unknown] = [e for e in logs if e["event"] == "agi.unknown_script"]
    assert unknown["script"] == "nope"
    assert sessions(logs)[0]["outcome"] == "unknown_script"


async def test_route_exception_is_logged_counted_and_the_connection_closed() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys) as server:
            result = await call(server, "boom", [])
            after = await call(server, "echo", ["ok"])
            await wait_for(lambda: server.active == 0)
    assert result.variables == {"BEFORE": "1"}
    assert result.closed_by_server
    # Asterisk reports SUCCESS for a script that closed early: the dialplan must check
    # CLICKPHONE_AUTH itself (clickphone-outbound.conf clears it before the AGI call)
    assert result.agistatus == "SUCCESS"
    assert server.route_errors == 1
    [error] = [e for e in logs if e["event"] == "agi.route_error"]
    assert error["log_level"] == "error"
    assert "route bug" in error["error"]
    assert after.variables == {"TEST_VAR": "ok"}


async def test_session_timeout_ends_a_route_that_never_returns() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, session_timeout=0.3) as server:
            result = await call(server, "slow", [])
            await wait_for(lambda: server.active == 0)
    assert result.variables == {"STARTED": "1"}
    assert result.closed_by_server
    assert server.timeouts == 1
    assert sessions(logs)[0]["outcome"] == "timeout"


_HEADER_LINES = st.lists(
    st.one_of(
        st.sampled_from(["network: yes", "network_script: inspect?q=1", "request: agi://h/inspect", "arg_2: b"]),
        st.builds("{}: {}".format, st.from_regex(r"[a-z_0-9]{1,8}", fullmatch=True), st.text(max_size=8)),
    ).map(lambda text: ("agi_" + text).encode(errors="surrogateescape")),
    min_size=1,
    max_size=12,
).filter(lambda ls: all(b"\n" not in line and b"\r" not in line for line in ls))


@settings(max_examples=150)
@given(
    lines=_HEADER_LINES,
    routed=st.booleans(),
    crlf=st.booleans(),
    chunk=st.one_of(st.just(1 << 16), st.integers(min_value=1, max_value=80)),  # at once, or in pieces
    junk=st.sampled_from([b"", b"", b"not a header\n", b"\n"]),
)
async def test_a_header_block_read_in_any_pieces_is_what_parse_request_gives(
    lines: list[bytes], routed: bool, crlf: bool, chunk: int, junk: bytes
) -> None:
    """The server's own header reader (a fast path for Asterisk's LF block, a line scan for
    anything else) hands the route exactly the request :func:`parse_request` builds from the
    same lines, or fails with the same kind of header error, however the bytes arrive."""
    eol = b"\r\n" if crlf else b"\n"
    if routed:
        lines = [b"agi_network_script: inspect", *lines]
    raw = [junk] if junk else []
    raw += [line + eol for line in lines]
    payload = b"".join(raw) + eol
    try:
        expected: AgiRequest | str = parse_request([line for line in raw if line not in (b"\n", b"\r\n")])
        if junk == b"\n":
            expected = "empty"  # a blank first line ends an empty block
    except AgiHeaderError as exc:
        expected = exc.kind
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, header_timeout=5.0) as server:
            async with asyncio.timeout(GUARD):
                reader, writer = await asyncio.open_connection(HOST, server.port)
                with contextlib.suppress(ConnectionError):  # a header error aborts the connection
                    for start in range(0, len(payload), chunk):
                        writer.write(payload[start : start + chunk])
                        await writer.drain()
                        await asyncio.sleep(0)
                    while await reader.readline():
                        writer.write(b"200 result=1\n")
                writer.transport.abort()
                await wait_for(lambda: server.active == 0)
    [session] = sessions(logs)
    if isinstance(expected, str):
        assert session.get("header_error") == expected
    elif expected.script != "inspect":
        assert session["outcome"] == "unknown_script"
    else:
        assert toys.requests == [expected]


def test_sessions_run_on_uvloop_as_the_daemon_runs_them() -> None:
    """The daemon's loop is uvloop by default: its transports are not asyncio.Transport objects,
    and a session, a hangup and a refusal must work on them as on asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> tuple[AgiCallResult, AgiCallResult, dict[str, int]]:
        toys = Toys()
        async with running_server(toys, max_connections=1) as server:
            normal = await call(server, "echo", ["on uvloop"])
            hung = await call(server, "three", [], hangup_after=1)
            await wait_for(lambda: server.active == 0)
            return normal, hung, server.stats()

    normal, hung, stats = uvloop.run(main())
    assert normal.variables == {"TEST_VAR": "on uvloop"}
    assert hung.agistatus == "HANGUP"
    assert (stats["completed"], stats["hangups"], stats["route_errors"]) == (1, 1, 0)


# -- hostile and broken clients ---------------------------------------------------------------


async def test_client_that_sends_nothing_is_dropped_after_header_timeout() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, header_timeout=0.2) as server:
            assert await raw_client(server.port, b"agi_network: yes\n") == b""
            await wait_for(lambda: server.active == 0)
    assert server.header_errors == 1
    assert sessions(logs)[0]["header_error"] == "timeout"


@pytest.mark.parametrize(
    "payload",
    [
        b"agi_arg_1: " + b"A" * (20 * 1024) + b"\n\n",  # one long line
        b"agi_arg_1: " + b"A" * (100 * 1024),  # longer than the stream limit, no newline
        b"".join(b"agi_arg_%d: %s\n" % (i, b"x" * 90) for i in range(1, 200)) + b"\n",  # many lines
    ],
)
async def test_oversized_header_is_refused(payload: bytes) -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys) as server:
            await raw_client(server.port, payload)
            await wait_for(lambda: server.active == 0)
    assert server.header_errors == 1
    assert sessions(logs)[0]["header_error"] == "oversized"


async def test_garbage_and_instant_close_are_header_errors() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys) as server:
            await raw_client(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await raw_client(server.port, b"", close_at_once=True)
            await raw_client(server.port, b"\n")
            await wait_for(lambda: server.header_errors == 3 and server.active == 0)
    assert sorted(s["header_error"] for s in sessions(logs)) == ["closed", "empty", "garbage"]


async def test_200_instant_closes_leave_no_session_behind() -> None:
    """The panoramisk defect: an early close made its reader spin. Here each ends at EOF."""
    toys = Toys()
    async with running_server(toys) as server:
        await asyncio.gather(*(raw_client(server.port, b"", close_at_once=True) for _ in range(200)))
        await wait_for(lambda: server.header_errors == 200 and server.active == 0)
        result = await call(server, "echo", ["still here"])
    assert result.variables == {"TEST_VAR": "still here"}


async def test_bad_clients_do_not_disturb_concurrent_normal_sessions() -> None:
    toys = Toys()
    async with running_server(toys, header_timeout=0.2) as server:
        normal = [call(server, "echo", [f"value {i}"]) for i in range(20)]
        results = await asyncio.gather(*bad_clients(server.port, 100), *normal)
        await wait_for(lambda: server.active == 0)

    good = [r for r in results if isinstance(r, AgiCallResult)]
    assert [r.variables for r in good] == [{"TEST_VAR": f"value {i}"} for i in range(20)]
    assert server.completed == 20
    assert server.header_errors == 100
    assert server.route_errors == server.refused == 0


async def test_max_connections_is_enforced_without_reading() -> None:
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, max_connections=2, header_timeout=5.0) as server:
            holders = [await asyncio.open_connection(HOST, server.port) for _ in range(2)]
            await wait_for(lambda: server.active == 2)
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(b"agi_network: yes\n\n")
            async with asyncio.timeout(GUARD):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
            writer.transport.abort()
            assert server.refused == 1
            for _, w in holders:
                w.transport.abort()
            await wait_for(lambda: server.active == 0)
            result = await call(server, "echo", ["room again"])
    assert result.variables == {"TEST_VAR": "room again"}
    assert next(e for e in logs if e["event"] == "agi.refused")["max_connections"] == 2


async def test_refusals_over_max_connections_are_each_counted_but_logged_once_a_minute() -> None:
    """A client that keeps the cap full and reconnects in a loop must not flood the log: every
    refusal is counted, one ``agi.refused`` line is written (the next a minute later at most)."""
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, max_connections=1, header_timeout=5.0) as server:
            _, holder = await asyncio.open_connection(HOST, server.port)
            await wait_for(lambda: server.active == 1)
            for _ in range(20):
                assert await raw_client(server.port, b"agi_network: yes\n\n") == b""
            holder.transport.abort()
    assert server.refused == 20
    [line] = [e for e in logs if e["event"] == "agi.refused"]
    assert (line["log_level"], line["refused"], line["since_last_line"]) == ("warning", 1, 1)


async def test_a_peer_outside_allowed_peers_is_closed_unread_counted_and_logged_once_a_minute() -> None:
    """FastAGI has no login: a connection from an address not in ``allowed_peers`` is closed
    before the server reads its header or writes a command, each one is counted, and a scanner
    looping on the port gets one log line a minute."""
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, allowed_peers=["198.51.100.0/24", "::1/128"]) as server:
            sent = [await raw_client(server.port, ECHO_REQUEST) for _ in range(5)]
    assert sent == [b""] * 5  # no SET VARIABLE: the route never ran
    assert server.stats() == {**server.stats(), "refused_peers": 5, "refused": 0, "sessions": 0, "completed": 0}
    assert sessions(logs) == []
    [line] = [e for e in logs if e["event"] == "agi.refused_peer"]
    assert line["log_level"] == "warning"
    assert (line["peer"], line["refused_peers"], line["since_last_line"]) == (HOST, 1, 1)


@pytest.mark.parametrize("host", [HOST, "::1"])
async def test_the_default_allowed_peers_admit_loopback_v4_and_v6(host: str) -> None:
    toys = Toys()
    try:
        server = FastAgiServer(toys.router(), host=host, port=0)
        await server.start()
    except OSError:
        pytest.skip(f"no {host} on this machine")
    try:
        result = await agi_call(host, server.port, "echo", ["from loopback"])
    finally:
        await server.close(timeout=2.0)
    assert result.variables == {"TEST_VAR": "from loopback"}
    assert (server.refused_peers, server.completed) == (0, 1)


def _own_address() -> str | None:
    """This machine's IPv4 address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


async def test_by_default_a_server_bound_to_every_address_still_serves_loopback_only() -> None:
    """``agi.host: 0.0.0.0`` by mistake: a connection to this machine's own LAN address comes
    from that address, not from loopback, and is refused unread; loopback is still served."""
    own = _own_address()
    if own is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    toys = Toys()
    with capture_logs() as logs:
        async with running_server(toys, host="0.0.0.0") as server:
            lan = await raw_client(server.port, ECHO_REQUEST, host=own)
            local = await call(server, "echo", ["from loopback"])
            await wait_for(lambda: server.active == 0)
    assert lan == b""
    assert local.variables == {"TEST_VAR": "from loopback"}
    assert (server.refused_peers, server.completed) == (1, 1)
    assert [e["peer"] for e in logs if e["event"] == "agi.refused_peer"] == [own]


@pytest.mark.parametrize(
    ("peers", "match"),
    [(["10.0.0.5/24"], "host bits set"), (["localhost"], "does not appear to be"), ([], "at least one")],
)
def test_allowed_peers_must_be_networks_and_not_empty(peers: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FastAgiServer(Toys().router(), host=HOST, port=0, allowed_peers=peers)


def test_the_refusal_log_throttle_reports_the_count_since_its_last_line() -> None:
    throttle = _LogThrottle(every=60.0)
    assert [throttle.due(t) for t in (100.0, 100.5, 130.0, 159.9, 160.0, 161.0, 230.0)] == [1, 0, 0, 0, 4, 0, 2]


# -- shutdown ---------------------------------------------------------------------------------


async def test_close_stops_accepting_and_waits_for_sessions_in_flight() -> None:
    toys = Toys()
    server = FastAgiServer(toys.router(), host=HOST, port=0)
    await server.start()
    port = server.port
    in_flight = asyncio.ensure_future(agi_call(HOST, port, "slow", []))
    async with asyncio.timeout(GUARD):
        await toys.entered.wait()
    closing = asyncio.ensure_future(server.close(timeout=GUARD))
    await asyncio.sleep(0.05)
    assert not closing.done()  # the route is still waiting at the gate
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)
    toys.gate.set()
    async with asyncio.timeout(GUARD):
        await closing
        result = await in_flight
    assert result.variables == {"STARTED": "1", "DONE": "1"}
    assert server.completed == 1


async def test_close_cancels_sessions_still_running_after_its_bound() -> None:
    toys = Toys()
    server = FastAgiServer(toys.router(), host=HOST, port=0)
    await server.start()
    in_flight = asyncio.ensure_future(agi_call(HOST, server.port, "slow", []))
    async with asyncio.timeout(GUARD):
        await toys.entered.wait()
    with capture_logs() as logs:
        async with asyncio.timeout(GUARD):
            await server.close(timeout=0.1)
            result = await in_flight
    assert result.variables == {"STARTED": "1"}
    assert result.closed_by_server or result.reset
    assert server.active == 0
    assert any(e["event"] == "agi.close_cancelled" for e in logs)
    assert sessions(logs)[0]["outcome"] == "cancelled"


# -- the dialplan contract --------------------------------------------------------------------


def _conf_lines(path: Path) -> list[str]:
    """Lines without comments (an unescaped ';' starts one, as in Asterisk's config parser)."""
    return [re.split(r"(?<!\\);", line, maxsplit=1)[0].rstrip() for line in path.read_text().splitlines()]


def _sections(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = ""
    for line in _conf_lines(path):
        m = re.fullmatch(r"\[([^\]]+)\].*", line)
        if m:
            current = m.group(1)
            out.setdefault(current, [])
        elif line.strip():
            out.setdefault(current, []).append(line.strip())
    return out


SHARED_NAMES = {v for k, v in vars(dialplan_vars).items() if k.isupper() and isinstance(v, str)}


@pytest.mark.parametrize("conf", sorted(DIALPLAN.glob("*.conf")), ids=lambda p: p.name)
def test_every_clickphone_name_in_the_dialplan_is_in_dialplan_vars(conf: Path) -> None:
    text = "\n".join(_conf_lines(conf))
    variables = set(re.findall(r"\bCLICKPHONE_[A-Z0-9_]+\b", text))
    events = set(re.findall(r"UserEvent\((ClickPhone\w+)", text))
    assert variables | events, f"{conf.name} uses no shared name?"
    assert variables - SHARED_NAMES == set()
    assert events - SHARED_NAMES == set()


def test_outbound_dialplan_handles_every_reason_in_the_cause_table() -> None:
    sections = _sections(DIALPLAN / "clickphone-outbound.conf")
    table = {}
    for line in sections["globals"]:
        m = re.fullmatch(rf"{dialplan_vars.CAUSE_PREFIX}(\w+) = (\d+)", line)
        assert m, line
        table[m.group(1)] = int(m.group(2))
    assert set(table) == {r.value for r in Reason}
    assert table[Reason.NO_CREDIT] == table[Reason.DAILY_LIMIT] == 21  # call rejected, nothing played
    assert table[Reason.NO_ROUTE] == 3
    assert table[Reason.ERROR] == table[Reason.TOO_MANY_CALLS] == 34  # fail closed; congestion
    outbound = "\n".join(sections["clickphone-outbound"])
    assert "Playback" not in outbound
    assert "Answer" not in outbound
    # a DENY hangs up on the dialled extension (a Goto elsewhere would put the reason in the
    # CDR's dst: seen with Asterisk 22, tests/asterisk_live), an unknown reason with 21
    denied = outbound[outbound.index("n(denied)") : outbound.index("n(agi_failed)")]
    assert "Goto" not in denied
    assert f"GLOBAL({dialplan_vars.CAUSE_PREFIX}${{FILTER(a-z_,${{{dialplan_vars.REASON}}})}})" in denied
    assert 'Hangup(${IF($["${CP_CAUSE}" = ""]?21:${CP_CAUSE})})' in denied


def test_outbound_dialplan_calls_the_registered_script_and_fails_closed() -> None:
    lines = _sections(DIALPLAN / "clickphone-outbound.conf")["clickphone-outbound"]
    text = "\n".join(lines)
    agi = next(i for i, line in enumerate(lines) if "AGI(agi://" in line)
    assert f"AGI(agi://127.0.0.1:4573/{dialplan_vars.AUTHORIZE_SCRIPT}," in lines[agi]
    assert lines[agi].endswith(",${CHANNEL(accountcode)},${EXTEN},${CP_SRC})")
    # stale values (an inherited or earlier ALLOW) cannot survive a daemon that set nothing
    for name in (dialplan_vars.AUTH, dialplan_vars.REASON, dialplan_vars.MAXSEC):
        cleared = lines.index(f"same => n,Set({name}=)")
        assert cleared < agi
    # emergency numbers are tried before the AGI; unauthorised calls end in a hangup
    assert text.index("DIALPLAN_EXISTS(clickphone-emergency") < text.index("AGI(")
    assert f'"${{{dialplan_vars.AUTH}}}" = "{dialplan_vars.DENY}"' in text
    assert f'"${{{dialplan_vars.AUTH}}}" != "{dialplan_vars.ALLOW}"]?agi_failed' in text
    # MAXSEC: validated (positive, no leading zero, <= 6 digits) before L() in milliseconds
    dial = next(line for line in lines if "Dial(" in line)
    assert dial.endswith(f"L(${{{dialplan_vars.MAXSEC}}}000))")
    # a ring timeout within the reservation margin: a call cannot outlive its reservation
    ring = re.search(r"Dial\([^,]+,(\d+),L\(", dial)
    assert ring, dial
    assert 0 < int(ring.group(1)) < BillingConfig().reservation_margin
    assert 'REGEX("^[1-9][0-9]*$" ${CLICKPHONE_MAXSEC})}?dial:agi_failed' in text
    assert "${LEN(${CLICKPHONE_MAXSEC})} > 6]?agi_failed" in text
    # IPv6 remote_addr "[addr]:port" is not cut on ':'
    assert "FIELDQTY(CP_ADDR,:)} > 2]?src_v6" in text
    assert "n(src_v6),Set(CP_ADDR=${CP_ADDR:1})" in text
    emergency = _sections(DIALPLAN / "clickphone-outbound.conf")["clickphone-emergency"]
    assert emergency[0].startswith("exten => 112,1,")
    assert not any("AGI(" in line or ",L(" in line for line in emergency)


def test_the_fax_sidecar_appends_name_their_line_format() -> None:
    """Asterisk 22's FILE() appends nothing to a new, empty file unless the line format is given
    ("not in line format": every sidecar came out empty, seen with tests/asterisk_live)."""
    lines = _sections(DIALPLAN / "clickphone-fax.conf")["clickphone-fax-result"]
    appends = [line for line in lines if "FILE(" in line and ",,,a" in line]
    assert len(appends) == 13  # direction ... linkedid, end=1
    assert all(",,,al,u)=" in line for line in appends), appends
    assert appends[-1].endswith("=end=1)")
