"""sd_notify against a real AF_UNIX datagram socket standing in for the service manager."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clickphone_agi.adapters.systemd import STATUS_MAX_CHARS, SdNotifier


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
