"""A local SMTP sink (aiosmtpd) for the demo and the tests.

Every accepted message is kept in memory and, when a folder is given, written as an ``.eml``
file. Tests can script failures: each entry of ``scripted_replies`` answers one DATA instead of
``250`` (e.g. ``"421 4.3.0 try later"``, ``"550 5.1.1 no such user"``).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    path: Path | None


class SinkHandler:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.messages: list[Received] = []
        self.scripted_replies: list[str] = []
        self._seq = itertools.count(1)
        self.changed = asyncio.Event()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.scripted_replies:
            return self.scripted_replies.pop(0)
        raw = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        path = None
        if self.folder is not None:
            path = self.folder / f"{next(self._seq):04d}.eml"
            path.write_bytes(raw)
        self.messages.append(Received(str(envelope.mail_from), tuple(envelope.rcpt_tos), raw, path))
        self.changed.set()
        return "250 2.0.0 Ok: queued"


class SmtpSink:
    """An aiosmtpd server in the caller's event loop, on loopback, on a free port."""

    def __init__(self, folder: Path | None = None, host: str = "127.0.0.1") -> None:
        self.handler = SinkHandler(folder)
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> Any:
            return SMTP(self.handler, hostname="sink.local", loop=loop)

        self._server = await loop.create_server(factory, self.host, 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.handler.messages) < count:
                self.handler.changed.clear()
                await self.handler.changed.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
