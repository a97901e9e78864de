"""The intake API's test harness: the in-process daemon with the API on a free port, the example
accounts imported, an aiohttp client, and a read-only look at its database. Registered as a
plugin in conftest, so the ``api`` fixture serves every API test module."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from clickphone_agi.adapters.accounts_file import load_accounts
from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import load_config
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.conftest import REPO, write_secret

ACCOUNTS = REPO / "etc" / "accounts.example.yaml"
PUBLIC = "https://self.clickphone.example/api"
TOKEN = "s3cret-api-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    daemon: Daemon
    base: str
    session: aiohttp.ClientSession
    db: Path

    async def call(
        self, method: str, path: str, body: Any = None, *, key: str | None = None, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        async with self.session.request(method, self.base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    def ledger_sum(self, code: str) -> int:
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            return int(conn.execute("SELECT SUM(amount) FROM ledger WHERE account = ?", (code,)).fetchone()[0])

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            return conn.execute(sql, params).fetchall()


async def start_daemon(
    write_config: Callable[..., Path], short_tmp: Path, smtp_port: int, *, secret: bool = True, chunk: int = 500
) -> tuple[Daemon, asyncio.Task[int], int]:
    port = _free_port()
    write_secret(short_tmp / "api-token", TOKEN + "\n")
    write_secret(short_tmp / "unsub", "u" * 40 + "\n")
    extra = (
        f"api:\n  enabled: true\n  port: {port}\n  token_file: {short_tmp / 'api-token'}\n"
        f"  public_base_url: {PUBLIC}\n  broadcast_chunk: {chunk}\n"
    )
    if secret:
        extra += f"  unsubscribe_secret_file: {short_tmp / 'unsub'}\n"
    cfg = write_config(extra=extra, smtp_port=smtp_port)
    d = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    await d._running().store.write(import_unit([(i.account, i.opening_balance) for i in load_accounts(ACCOUNTS)]))
    return d, task, port


@pytest.fixture
async def api(write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink) -> AsyncIterator[Api]:
    d, task, port = await start_daemon(write_config, short_tmp, smtp_sink.port)
    async with aiohttp.ClientSession() as session:
        yield Api(d, f"http://127.0.0.1:{port}", session, d.config.database.path)
    d.request_stop()
    assert await task == 0


async def settle(sink: SmtpSink, count: int) -> None:
    await sink.wait_for(count)
    await asyncio.sleep(0.3)  # anything extra would have arrived by now
    assert len(sink.messages) == count, [m.rcpt_tos for m in sink.messages]
