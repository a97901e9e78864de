"""FastAGI ``authorize`` against the real daemon: ALLOW with MAXSEC, DENY with each reason, and
hostile clients that do not disturb the others."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from clickphone_agi import dialplan_vars as dv
from clickphone_agi.adapters.accounts_file import load_accounts
from clickphone_agi.adapters.control import CommandError
from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import load_config
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.agi_client import agi_call
from tests.conftest import REPO

ACCOUNTS = REPO / "etc" / "accounts.example.yaml"
TARIFFS = REPO / "etc" / "tariffs.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def _running(write_config: Callable[..., Path], agi: str = "") -> AsyncIterator[tuple[Daemon, int]]:
    """The daemon with FastAGI on a free port, tariffs and the example accounts; ``agi`` adds keys."""
    port = _free_port()
    cfg = write_config(
        extra=f"agi:\n  enabled: true\n  port: {port}\n{agi}billing:\n  tariffs_file: {TARIFFS}\n"
        "  billing_cdr:\n    destination_contexts: [lab-outbound]\n",
    )
    d = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    parts = d._running()
    await parts.store.write(import_unit([(i.account, i.opening_balance) for i in load_accounts(ACCOUNTS)]))
    try:
        yield d, port
    finally:
        d.request_stop()
        assert await task == 0


@pytest.fixture
async def daemon(write_config: Callable[..., Path]) -> AsyncIterator[tuple[Daemon, int]]:
    async with _running(write_config) as running:
        yield running


async def _authorize(port: int, account: str, number: str, ip: str, uniqueid: str) -> dict[str, str]:
    result = await agi_call("127.0.0.1", port, "authorize", [account, number, ip], {"uniqueid": uniqueid})
    return result.variables


async def test_allow_sets_auth_and_maxsec(daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    v = await _authorize(port, "acct1001", "0212345678", "127.0.0.1", "1.1")
    assert v[dv.AUTH] == dv.ALLOW
    assert int(v[dv.MAXSEC]) > 0
    assert v[dv.REASON] == ""


@pytest.mark.parametrize(
    ("account", "number", "ip", "reason"),
    [
        ("nobody", "0212345678", "127.0.0.1", dv.Reason.NO_ACCOUNT),
        ("acct1001", "0212345678", "203.0.113.66", dv.Reason.IP_NOT_ALLOWED),
        ("acct1001", "0900123456", "127.0.0.1", dv.Reason.BLOCKED_CLASS),
        ("acct1001", "00999123456", "127.0.0.1", dv.Reason.NO_ROUTE),
    ],
)
async def test_deny_reasons(daemon: tuple[Daemon, int], account: str, number: str, ip: str, reason: str) -> None:
    _, port = daemon
    v = await _authorize(port, account, number, ip, "2.2")
    assert (v[dv.AUTH], v[dv.REASON], v[dv.MAXSEC]) == (dv.DENY, reason, "0")


async def test_emergency_allowed_for_anyone(daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    v = await _authorize(port, "nobody", "112", "203.0.113.66", "3.3")
    assert (v[dv.AUTH], v[dv.REASON]) == (dv.ALLOW, dv.Reason.EMERGENCY)


async def test_concurrent_calls_and_hostile_clients(daemon: tuple[Daemon, int]) -> None:
    """20 simultaneous authorisations on one account hold no more than its budget, while port
    scanners and garbage senders hit the same server."""
    d, port = daemon

    async def scanner() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01garbage without a blank line")
        writer.close()

    calls = [_authorize(port, "acct1001", "0721000001", "127.0.0.1", f"c{i}") for i in range(20)]
    results = await asyncio.gather(*calls, *(scanner() for _ in range(30)))
    decisions = [r for r in results if isinstance(r, dict)]
    allowed = [r for r in decisions if r[dv.AUTH] == dv.ALLOW]
    assert allowed
    assert all(r[dv.REASON] in ("", dv.Reason.TOO_MANY_CALLS, dv.Reason.NO_CREDIT) for r in decisions)
    parts = d._running()
    held, count = await parts.store.write(lambda tx: tx.reservations("acct1001"))
    balance = await parts.store.write(lambda tx: tx.balance("acct1001"))
    assert count == len(allowed) <= 2  # acct1001 may hold 2 concurrent calls
    assert held <= balance


async def test_a_uniqueid_that_is_not_text_fails_nobody_else(daemon: tuple[Daemon, int]) -> None:
    """agi_uniqueid as the single byte 0xff (decoded with surrogateescape): the reservation id
    could not be stored, and queued with the batch it failed every call committed with it."""
    d, port = daemon
    with capture_logs() as logs:
        results = await asyncio.gather(
            _authorize(port, "acct1001", "0212345678", "127.0.0.1", "ok-1"),
            _authorize(port, "acct1001", "0212345678", "127.0.0.1", "\udcff"),
        )
    assert [(v[dv.AUTH], v[dv.REASON]) for v in results] == [(dv.ALLOW, "")] * 2
    assert "agi.bad_uniqueid" in [e["event"] for e in logs]
    store = d._running().store
    assert await store.write(lambda tx: tx.release("ok-1")) is not None
    # the odd client's reservation is kept, under an id of the daemon's own: it expires unused
    assert (await store.write(lambda tx: tx.reservations("acct1001")))[1] == 1


async def test_a_client_outside_agi_allowed_peers_gets_no_decision_and_reserves_nothing(
    write_config: Callable[..., Path],
) -> None:
    """``agi.allowed_peers`` reaches the server: with Asterisk on another host, a local process
    that connects is closed unread, so it can neither reserve budget nor probe account codes."""
    async with _running(write_config, agi="  allowed_peers: [198.51.100.7]\n") as (d, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"agi_network: yes\nagi_network_script: authorize\nagi_arg_1: acct1001\nagi_arg_2: 0212345678\n\n")
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b""
        writer.transport.abort()
        parts = d._running()
        assert parts.agi is not None
        assert parts.agi.stats()["refused_peers"] == 1
        assert parts.agi.sessions == 0
        assert (await parts.store.write(lambda tx: tx.reservations("acct1001")))[1] == 0


async def test_an_adjustment_through_the_control_socket_takes_whole_bani_only(daemon: tuple[Daemon, int]) -> None:
    """The daemon's side of ``accounts adjust``: 12.5 bani used to book 12, and ``true`` 1."""
    d, _ = daemon
    before = await d._running().store.write(lambda tx: tx.balance("acct1001"))
    for amount in (12.5, True, "12"):
        with pytest.raises(CommandError, match="amount"):
            await d._cmd_accounts_adjust(
                {"code": "acct1001", "amount": amount, "reason": "x", "ref": f"adjust:{amount}"}
            )
    await d._cmd_accounts_adjust({"code": "acct1001", "amount": 1250, "reason": "goodwill", "ref": "adjust:ok"})
    assert await d._running().store.write(lambda tx: tx.balance("acct1001")) == before + 1250
