"""sd_notify against a real AF_UNIX datagram socket standing in for the service manager."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import clickphone_agi.app
from clickphone_agi.adapters.systemd import STATUS_MAX_CHARS, SdNotifier, ip_fence_probe
from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import load_config


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """tmp_path can exceed the 107-byte sun_path limit; /tmp keeps the path short."""
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that points at it."""
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield sock, str(path)


def recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2)
    return False


def test_helpers_send_exact_datagrams(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled

    assert n.ready()
    assert recv(sock) == b"READY=1"
    assert n.ready("serving 3 AGI routes")
    assert recv(sock) == b"READY=1\nSTATUS=serving 3 AGI routes"
    assert n.status("draining 2 calls")
    assert recv(sock) == b"STATUS=draining 2 calls"
    assert n.reloading(123456789)
    assert recv(sock) == b"RELOADING=1\nMONOTONIC_USEC=123456789"
    assert n.stopping()
    assert recv(sock) == b"STOPPING=1"
    assert n.watchdog()
    assert recv(sock) == b"WATCHDOG=1"
    assert n.notify("A=1", "B=2")
    assert recv(sock) == b"A=1\nB=2"
    assert nothing_pending(sock)


def test_abstract_namespace_socket() -> None:
    """'@name' in NOTIFY_SOCKET means the abstract socket '\\0name' (as systemd itself uses)."""
    name = f"clickphone-agi-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        n = SdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.address == "\0" + name
        assert n.ready("up")
        assert recv(sock) == b"READY=1\nSTATUS=up"


def test_without_notify_socket_everything_is_a_silent_no_op() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        n = SdNotifier.from_env({**env, "WATCHDOG_USEC": "30000000"})
        assert not n.enabled
        assert not n.ready("x")
        assert not n.status("x")
        assert not n.reloading(1)
        assert not n.stopping()
        assert not n.watchdog()
        assert not n.notify("READY=1")
        assert n.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_usec(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval() == 15.0


def test_watchdog_pid_matching_us_enables_watchdog(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}
    assert SdNotifier.from_env(env, pid=4242).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert SdNotifier.from_env(env).watchdog_interval() == 15.0


def test_watchdog_for_another_pid_is_not_ours(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}
    assert SdNotifier.from_env(env, pid=4243).watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "soon"])
def test_no_usable_watchdog_usec_means_no_watchdog(manager: tuple[socket.socket, str], usec: str | None) -> None:
    _, path = manager
    env = {"NOTIFY_SOCKET": path}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    assert SdNotifier.from_env(env).watchdog_interval() is None


def test_status_text_is_one_bounded_line(manager: tuple[socket.socket, str]) -> None:
    """A newline in STATUS= would inject another assignment (here a forged READY=1)."""
    sock, path = manager
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert n.status("line one\nREADY=1\r\nend")
    assert recv(sock) == b"STATUS=line one READY=1 end"
    assert n.ready("a\nb")
    assert recv(sock) == b"READY=1\nSTATUS=a b"
    assert n.status("x" * 1000)
    assert recv(sock) == b"STATUS=" + b"x" * STATUS_MAX_CHARS


def test_vanished_socket_returns_false_and_does_not_raise(short_dir: Path) -> None:
    path = short_dir / "gone"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    path.unlink()
    n = SdNotifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert n.enabled
    assert not n.ready("up")
    assert not n.watchdog()
    assert not n.stopping()


def test_socket_nobody_reads_returns_false(short_dir: Path) -> None:
    """A path that exists but has no listener (manager restarted) fails the same way."""
    path = short_dir / "stale"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    assert path.exists()
    assert not SdNotifier.from_env({"NOTIFY_SOCKET": str(path)}).watchdog()


UNDER_SYSTEMD = {"INVOCATION_ID": "6b1c2d3e4f5a47b8a9c0d1e2f3a4b5c6"}


def test_the_ip_fence_probe_sees_no_fence_here() -> None:
    """No systemd unit fences this test process: the datagram to the host's own address goes.
    (Refused, as under a unit whose fence holds, was seen in tests/systemd_boot's unified run.)"""
    probe = ip_fence_probe()
    if probe is None:
        pytest.skip("this machine has no IPv4 address but loopback: nothing to probe")
    address, refused = probe
    assert not address.startswith("127.")
    assert refused is False


def _global_ipv6() -> str | None:
    """One global IPv6 address of this host, from /proc/net/if_inet6 (scope 00), or None."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hexaddr, _index, _plen, scope, *_ = line.split()
        if scope == "00":
            return str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
    return None


def test_the_ip_fence_probe_falls_back_to_ipv6_when_ipv4_has_no_way_out() -> None:
    """An IPv6-only host: IPv4 finds no route (a loopback-only target stands in), so the probe's
    datagram goes to the host's own IPv6 address, and nothing fences this test process."""
    own = _global_ipv6()
    if own is None:
        pytest.skip("this machine has no global IPv6 address")
    probe = ip_fence_probe(((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, own)))
    assert probe == (own, False)
    # loopback and link-local sources are never probed: no route out, nothing to say
    assert ip_fence_probe(((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))) is None
    assert ip_fence_probe(((socket.AF_INET6, "fe80::1"),)) is None


@pytest.mark.parametrize(
    ("environ", "probe", "warned"),
    [
        (UNDER_SYSTEMD, ("192.0.2.2", False), True),  # the datagram went: no fence
        (UNDER_SYSTEMD, ("192.0.2.2", True), False),  # refused with EPERM: the fence holds
        (UNDER_SYSTEMD, None, False),  # nothing to probe: nothing said
        ({}, ("192.0.2.2", False), False),  # not a service: no unit, no fence to miss
    ],
)
async def test_the_daemon_says_at_start_when_the_units_ip_fence_does_not_hold(
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    probe: tuple[str, bool] | None,
    warned: bool,
) -> None:
    """One warning when ready, as a service whose fence does not hold: systemd drops
    IPAddressDeny= without a word where it cannot enforce it. The probe's answer is fed in (this
    machine has one kind of host only); the probe itself is tested above and in tests/systemd_boot."""
    asked: list[bool] = []

    def fake_probe() -> tuple[str, bool] | None:
        asked.append(True)
        return probe

    monkeypatch.setattr(clickphone_agi.app, "ip_fence_probe", fake_probe)
    cfg = write_config()
    daemon = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False, environ=environ)
    with capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        daemon.request_stop()
        assert await task == 0
    fences = [e for e in logs if e["event"] == "systemd.ip_filter_not_enforced"]
    assert len(fences) == (1 if warned else 0)
    assert any(e["event"] == "daemon.ready" for e in logs)  # the capture saw the start at all
    assert asked == ([True] if environ else [])  # never probes outside systemd
    if warned:
        assert fences[0]["log_level"] == "warning"
        assert fences[0]["address"] == "192.0.2.2"
        assert "IPAddressDeny=" in fences[0]["note"]
