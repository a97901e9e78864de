"""A scripted FastAGI client that speaks to the server the way Asterisk's res_agi.c does.

It connects, writes the ``agi_*`` header block (``agi_network``, ``agi_network_script``, then
``agi_request`` first of the environment, ..., ``agi_arg_1..N``, a blank line), then answers
each command line until the server closes:

* ``SET VARIABLE <name> <value>``: parsed with :func:`parse_agi_args`, a line-by-line port of
  res_agi.c's ``parse_args`` (double quotes group, a backslash takes the next character
  literally); recorded in ``variables`` and answered ``200 result=1``. With the wrong number of
  words it answers the multi-line ``520-...`` usage reply, as Asterisk does.
* ``GET VARIABLE <name>``: ``200 result=1 (<value>)`` if set (by the server or ``channel_vars``),
  else ``200 result=0``. ``VERBOSE``: ``200 result=1``. ``NOOP``: ``200 result=0``.
* anything else: ``510 Invalid or unknown command``.

``hangup_after=N`` writes ``HANGUP`` after the N-th reply (0: before the first command), as
Asterisk does when the channel hangs up while the script runs; later commands are still
answered ("dead channel" mode: SET/GET VARIABLE, VERBOSE and NOOP work, the rest get 511).

Kept out of ``conftest.py`` on purpose (other suites own that file); import explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

ENCODING = "utf-8"
ERRORS = "surrogateescape"

USAGE_SET_VARIABLE = (
    "520-Invalid command syntax.  Proper usage follows:\n"
    " Usage: SET VARIABLE <variablename> <value>\n"
    "520 End of proper usage.\n"
)
DEAD_COMMANDS = frozenset({"SET VARIABLE", "GET VARIABLE"})  # plus VERBOSE and NOOP (one word)


def parse_agi_args(line: str) -> list[str]:
    """Split a command line into words exactly like res_agi.c ``parse_args``."""
    argv: list[str] = []
    cur: list[str] | None = None
    quoted = escaped = False
    whitespace = True
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                cur = []
                argv.append("")  # placeholder, filled below
                whitespace = False
            escaped = False
        elif ch in " \t" and not quoted and not escaped:
            if cur is not None:
                argv[-1] = "".join(cur)
                cur = None
            whitespace = True
        elif ch == "\\" and not escaped:
            escaped = True
        else:
            if whitespace:
                cur = []
                argv.append("")
                whitespace = False
            assert cur is not None
            cur.append(ch)
            escaped = False
    if cur is not None:
        argv[-1] = "".join(cur)
    return argv


def default_env(host: str, port: int, script: str, args: list[str]) -> dict[str, str]:
    """Headers as Asterisk 20 sends them for a PJSIP call from extension 100 dialling a number."""
    number = args[1] if len(args) > 1 else "0212345678"
    env = {
        "network": "yes",
        "network_script": script,
        "request": f"agi://{host}:{port}/{script}",
        "channel": "PJSIP/100-00000001",
        "language": "ro",
        "type": "PJSIP",
        "uniqueid": "1718000000.1",
        "version": "20.8.1",
        "callerid": "100",
        "calleridname": "Birou 100",
        "callingpres": "0",
        "callingani2": "0",
        "callington": "0",
        "callingtns": "0",
        "dnid": number,
        "rdnis": "unknown",
        "context": "clickphone-outbound",
        "extension": number,
        "priority": "9",
        "enhanced": "0.0",
        "accountcode": args[0] if args else "acct1001",
        "threadid": "140000000000000",
    }
    return env


@dataclass
class AgiCallResult:
    commands: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    hangup_sent: bool = False
    closed_by_server: bool = False
    reset: bool = False

    @property
    def agistatus(self) -> str:
        """What Asterisk would set: HANGUP after a channel hangup, else SUCCESS once the
        server closed (whatever it did or did not set before)."""
        return "HANGUP" if self.hangup_sent else "SUCCESS"


def _reply(argv: list[str], result: AgiCallResult, channel_vars: dict[str, str], dead: bool) -> str:
    words = [w.upper() for w in argv[:2]]
    name = " ".join(words)
    if dead and name not in DEAD_COMMANDS and words[:1] not in (["VERBOSE"], ["NOOP"]):
        return "511 Command Not Permitted on a dead channel or intercept routine\n"
    if name == "SET VARIABLE":
        if len(argv) != 4:
            return USAGE_SET_VARIABLE
        result.variables[argv[2]] = argv[3]
        return "200 result=1\n"
    if name == "GET VARIABLE":
        if len(argv) != 3:
            return "520 Invalid command syntax.  Proper usage not available.\n"
        value = result.variables.get(argv[2], channel_vars.get(argv[2]))
        return "200 result=0\n" if value is None else f"200 result=1 ({value})\n"
    if words[:1] == ["VERBOSE"]:
        return "200 result=1\n"
    if words[:1] == ["NOOP"]:
        return "200 result=0\n"
    return "510 Invalid or unknown command\n"


async def agi_call(
    host: str,
    port: int,
    script: str,
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    hangup_after: int | None = None,
    channel_vars: dict[str, str] | None = None,
    override: Callable[[list[str]], str | None] | None = None,
    timeout: float = 10.0,
) -> AgiCallResult:
    """One FastAGI session, as Asterisk runs ``AGI(agi://host:port/<script>,<args...>)``.

    ``script`` is what follows ``host:port/`` (query string included). ``env`` adds or replaces
    headers (names with or without ``agi_``; a value with surrogate escapes is sent as the raw
    bytes). ``override(argv)`` may return a reply (with its newline) to send instead of the
    usual one, e.g. an error Asterisk would give. ``timeout`` only guards against a hang.
    """
    headers = default_env(host, port, script, args)
    for key, value in (env or {}).items():
        headers[key.removeprefix("agi_")] = value
    for i, arg in enumerate(args, start=1):
        headers[f"arg_{i}"] = arg
    # agi_network and agi_network_script come from launch_netscript, then setup_env
    order = ["network", "network_script", "request"]
    block = "".join(f"agi_{k}: {headers[k]}\n" for k in order if k in headers)
    block += "".join(f"agi_{k}: {v}\n" for k, v in headers.items() if k not in order) + "\n"

    result = AgiCallResult()
    vars_ = channel_vars or {}
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(block.encode(ENCODING, ERRORS))
            if hangup_after == 0:
                writer.write(b"HANGUP\n")
                result.hangup_sent = True
            await writer.drain()
            while True:
                try:
                    raw = await reader.readline()
                except ConnectionResetError:
                    result.reset = True
                    break
                if not raw.endswith(b"\n"):
                    result.closed_by_server = True
                    break
                line = raw[:-1].decode(ENCODING, ERRORS)
                result.commands.append(line)
                argv = parse_agi_args(line)
                reply = (override(argv) if override else None) or _reply(argv, result, vars_, result.hangup_sent)
                writer.write(reply.encode(ENCODING, ERRORS))
                if hangup_after is not None and not result.hangup_sent and len(result.commands) >= hangup_after:
                    writer.write(b"HANGUP\n")
                    result.hangup_sent = True
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            # res_agi.c (AGISIGHUP unset) writes a last HANGUP once the script has ended
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(b"HANGUP\n")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return result
