"""Run the real daemon as a subprocess with a real NOTIFY_SOCKET, and read its JSON log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import LoadedConfig


class NotifySocket:
    """The systemd side of sd_notify: a real AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.datagrams: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.datagrams.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.datagrams

    async def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for d in self.drain():
                    if needle in d.split("\n"):
                        return d
                await asyncio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    def __init__(self, config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clickphone_agi",
            "run",
            "-c",
            str(self.config),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:
                self.lines.append(json.loads(text))
            except ValueError:
                continue

    async def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for entry in self.lines:
                    if predicate(entry):
                        return entry
                if self.proc is not None and self.proc.returncode is not None:
                    raise AssertionError("daemon exited:\n" + "\n".join(self.raw[-30:]))
                await asyncio.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clickphone_agi",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def in_process(loaded: LoadedConfig, cfg: Path) -> AsyncIterator[Daemon]:
    """The daemon on ``loaded`` (read from ``cfg``) running in this event loop, ready; it must stop
    cleanly (exit 0) when the block ends."""
    d = Daemon(loaded, config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    try:
        yield d
    finally:
        d.request_stop()
        assert await task == 0
