"""Fuzzing the FastAGI server: the header parser and a real server on loopback.

* ``parse_request`` on any header lines (any bytes, bad query strings, URLs that are not URLs)
  returns a request or raises :class:`AgiHeaderError`, nothing else;
* a real :class:`FastAgiServer` fed hostile sessions (arbitrary header blocks and bytes, over-long
  lines, no blank line, ``HANGUP`` lines, bad query strings), each followed by a well-behaved
  Asterisk session, serves that session correctly every time, accounts for every connection
  in its counters, and never lets an exception reach the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from clickphone_agi.adapters.agi import AgiHeaderError, AgiRequest, AgiRouter, AgiSession, FastAgiServer, parse_request
from clickphone_agi.sim.agi_client import agi_call
from tests.fuzz.budget import fuzz

HOST = "127.0.0.1"

_PIECES = st.sampled_from(
    [
        b"agi_",
        b"agi_request: ",
        b"agi_network_script: ",
        b"agi_network: yes",
        b"agi_arg_",
        b"agi_arg_1: ",
        b"agi_arg_0",
        b"agi_arg_99999",
        b"agi_channel: PJSIP/x",
        b"agi://",
        b"agi://127.0.0.1:4573/",
        b"[",
        b"]",
        b"[::1",
        b"?",
        b"&",
        b"=",
        b"%",
        b"%ff",
        b"%00",
        b"#",
        b"/",
        b"echo",
        b":",
        b": ",
        b" ",
        b"\r",
        b"\t",
        b"\x00",
        b"\xff",
        b"\xef\xbc\x83",  # FULLWIDTH NUMBER SIGN: NFKC-normalises to '#' in a netloc
        "\u2100".encode(),  # ACCOUNT OF: NFKC 'a/c'
        b"HANGUP",
        b"x" * 40,
    ]
)
LINE = st.lists(_PIECES | st.binary(max_size=6), max_size=10).map(b"".join).filter(lambda b: b"\n" not in b)
_URL = st.lists(
    st.sampled_from([b"agi://", b"127.0.0.1", b":4573", b"/", b"echo", b"?", b"a=1", b"&", b"[", b"]", b"::1", b"@",
                     b"\xef\xbc\x83", "\u2100".encode(), b"%zz", b"#", b"\xff", b" "]),
    max_size=8,
).map(lambda parts: b"agi_request: " + b"".join(parts))  # fmt: skip
LINES = st.lists((LINE | _URL).map(lambda b: b + b"\n"), max_size=12)


@fuzz(600)
@given(lines=LINES)
@example(lines=[b"agi_request: agi://[::1/echo\n"])  # regression: urlsplit's "Invalid IPv6 URL"
@example(lines=[b"agi_request: agi://\xef\xbc\x83x/echo\n"])  # regression: NFKC-invalid netloc
def test_parse_request_returns_a_request_or_a_header_error(lines: list[bytes]) -> None:
    try:
        request = parse_request(lines)
    except AgiHeaderError as exc:
        kind = exc.kind
    else:
        kind = None
    if kind is not None:
        assert kind in ("garbage", "empty")
        return
    assert isinstance(request, AgiRequest)
    assert request.script == request.script.strip("/")
    assert all(isinstance(v, str) for v in (*request.args, *request.query.values(), *request.env.values()))
    numbered = sorted(
        (int(k[4:]), v) for k, v in request.env.items() if k.startswith("arg_") and k[4:].isdigit() and k[4] != "0"
    )
    assert list(request.args) == [v for n, v in numbered if n < 10_000]


# ---- a real server --------------------------------------------------------------------------------------


async def echo(request: AgiRequest, session: AgiSession) -> None:
    await session.set_variable("TEST_VAR", request.args[0] if request.args else "")


@pytest.fixture
async def server() -> AsyncIterator[FastAgiServer]:
    router = AgiRouter()
    router.register("echo", echo)
    srv = FastAgiServer(router, host=HOST, port=0, header_timeout=0.3, session_timeout=10.0, max_header_bytes=4096)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close(timeout=2.0)


async def hostile(port: int, payload: bytes, *, half_close: bool) -> None:
    """Send ``payload``; then either end our side (EOF) or answer whatever comes with HANGUP."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(payload)
            if half_close:
                writer.write_eof()
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                while await reader.readline():
                    if not half_close:
                        writer.write(b"HANGUP\n")
        finally:
            writer.transport.abort()


_BLOCK = st.one_of(
    LINES.map(b"".join),
    LINES.map(lambda ls: b"".join(ls) + b"\n"),  # a complete header block of junk
    st.builds(
        lambda script, extra: b"agi_network: yes\nagi_network_script: " + script + b"\n" + b"".join(extra) + b"\n",
        LINE,
        LINES,
    ),
    st.binary(min_size=1, max_size=5000).map(lambda b: b"agi_arg_1: " + b + b"\n\n"),  # over the 4 KiB header cap
    st.just(b"agi_network: yes\nagi_network_script: echo\nagi_arg_1: x\n\nHANGUP\nHANGUP\n"),
)


@fuzz(60)
@example(payload=b"agi_request: agi://[::1/echo\n\n", half_close=False, value="x")  # regression, see above
@given(payload=_BLOCK, half_close=st.booleans(), value=st.text(alphabet=st.characters(exclude_categories=["Cc", "Cs"])))
async def test_hostile_sessions_never_disturb_the_next_real_one(
    server: FastAgiServer, payload: bytes, half_close: bool, value: str
) -> None:
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        with capture_logs() as logs:
            before = server.stats()
            await hostile(server.port, payload, half_close=half_close)
            result = await agi_call(HOST, server.port, "echo", [value], timeout=10)
            async with asyncio.timeout(10):
                while server.active:
                    await asyncio.sleep(0.005)
    finally:
        loop.set_exception_handler(previous)
    assert loop_errors == []
    assert result.variables == {"TEST_VAR": value}
    after = server.stats()
    assert after["sessions"] - before["sessions"] == 2
    assert after["route_errors"] == before["route_errors"]
    ended = sum(after[k] - before[k] for k in ("header_errors", "unknown_scripts", "hangups", "completed", "timeouts"))
    assert ended == 2  # every connection ended in exactly one known outcome
    outcomes = [e["outcome"] for e in logs if e["event"] == "agi.session"]
    assert len(outcomes) == 2
    assert set(outcomes) <= {"completed", "hangup", "header_error", "unknown_script"}
    assert outcomes[-1] == "completed"
