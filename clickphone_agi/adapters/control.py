"""The local control socket: how CLI verbs reach the running daemon (the one writer).

A Unix stream socket, owner-only (0600 in a 0700-or-stricter directory). One JSON request per
line, one JSON reply per line: ``{"cmd": "...", "args": {...}}`` →
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Commands are registered in
one explicit table; registering a name twice raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 8 * 1024 * 1024  # a privacy-policy text travels in one request (policy publish)


class CommandError(Exception):
    """A command refused its arguments; the message goes back to the CLI as is."""


class ControlUnavailable(Exception):
    """No daemon is listening on the control socket."""


class CommandTable:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"control command {name!r} registered twice")
        self._handlers[name] = handler

    def names(self) -> list[str]:
        return sorted(self._handlers)

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("cmd")
        args = request.get("args", {})
        if not isinstance(name, str) or name not in self._handlers:
            return {"ok": False, "error": f"unknown command {name!r}; known: {', '.join(self.names())}"}
        if not isinstance(args, dict):
            return {"ok": False, "error": "args must be an object"}
        try:
            return {"ok": True, "result": await self._handlers[name](args)}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control.command_failed", cmd=name)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


class ControlServer:
    def __init__(self, path: Path, table: CommandTable) -> None:
        self.path = path
        self._table = table
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(parent.stat().st_mode)
        if mode & 0o002:
            raise PermissionError(f"{parent}: control socket directory is world-writable")
        if self.path.is_socket():
            # a socket left by a crashed daemon: the writer lock already proved nobody owns it
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                reply: dict[str, Any] = {"ok": False, "error": "expected one JSON object per line"}
            else:
                reply = await self._table.dispatch(request)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def call(path: Path, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Blocking client used by the CLI; raises :class:`ControlUnavailable` when no daemon answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(str(path)) from exc
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    reply = json.loads(data or b"{}")
    if not reply.get("ok"):
        raise CommandError(reply.get("error", "no reply from the daemon"))
    return reply.get("result")
