"""Fixtures shared by the suites: config files on disk, a real SMTP sink, a fake Asterisk."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import structlog

from clickphone_agi.sim.ami_server import AmiReplayServer
from clickphone_agi.sim.smtp_sink import SmtpSink

pytest_plugins = ["tests.api_harness"]  # the intake API tests' shared `api` fixture

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "etc" / "clickphone-agi.yaml"


# A CI runner started as a systemd service passes its INVOCATION_ID to every daemon the tests
# start, which would then probe the unit's IP fence (Daemon._check_ip_fence) and warn: the
# daemons under test are not services, whoever runs the suite.
os.environ.pop("INVOCATION_ID", None)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def write_secret(path: Path, text: str) -> Path:
    """A secret file as an operator must write it: mode 0600 (the loader refuses one that all
    local users can read), whatever the umask."""
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: AF_UNIX socket paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="cpagi-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def write_config(short_tmp: Path) -> Callable[..., Path]:
    """Write a daemon config into ``short_tmp`` (database, secret, control socket inside it)."""

    def write(extra: str = "", *, ami_port: int = 5038, smtp_port: int = 25, ami_enabled: bool = False) -> Path:
        write_secret(short_tmp / "ami-secret", "labsecret\n")
        path = short_tmp / "clickphone-agi.yaml"
        path.write_text(
            f"""
ami:
  enabled: {"true" if ami_enabled else "false"}
  port: {ami_port}
  secret_file: {short_tmp / "ami-secret"}
  backoff_initial: 0.05
  backoff_max: 0.2
smtp:
  port: {smtp_port}
database:
  path: {short_tmp / "db" / "test.db"}
logging:
  format: json
daemon:
  control_socket: {short_tmp / "run" / "control.sock"}
  drain_timeout: 3
"""
            + extra
        )
        return path

    return write


@pytest.fixture
async def smtp_sink(tmp_path: Path) -> AsyncIterator[SmtpSink]:
    sink = SmtpSink(tmp_path / "mail")
    await sink.start()
    yield sink
    await sink.close()


@pytest.fixture
async def ami_server() -> AsyncIterator[AmiReplayServer]:
    async with AmiReplayServer("clickphone", "labsecret") as server:
        yield server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run tests/fuzz with the long hypothesis profile (see tests/fuzz/README.md)",
    )
