"""Helpers shared by the AMI tests: paths, waiting helpers and a running-client harness.

Kept out of ``conftest.py`` on purpose (other suites own that file); import explicitly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clickphone_agi.adapters.ami.client import AmiClient
from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.clock import Clock, FakeClock
from clickphone_agi.sim.ami_server import AmiReplayServer

FIXTURES = Path(__file__).parent / "fixtures" / "ami"
USERNAME = "clickphone"
SECRET = "labsecret"  # the lab's secret, as recorded in the .sent files
EVENTS = "system,call,cdr,user"


def transcript_paths() -> list[Path]:
    return sorted(FIXTURES.glob("*.ami"))


def summary() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "summary.json").read_text())
    return data


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on real time; the timeout only guards against a hang."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)
    await _let_tasks_reach_their_next_await()


async def _let_tasks_reach_their_next_await() -> None:
    # e.g. a client that just entered 'backoff' registers its sleep with the FakeClock one
    # loop iteration later; advancing the clock before that would not wake it
    for _ in range(5):
        await asyncio.sleep(0)


async def advance_until(
    clock: FakeClock, predicate: Callable[[], bool], *, step: float = 0.5, timeout: float = 5.0
) -> None:
    """Move fake time in steps, letting real loopback I/O run in between, until it holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await clock.advance(step)
            await asyncio.sleep(0.002)


async def settle() -> None:
    """Give real loopback I/O a moment, for asserting that something did NOT happen."""
    await asyncio.sleep(0.05)


@dataclass
class Harness:
    client: AmiClient
    stop: asyncio.Event
    task: asyncio.Task[None]
    received: list[AmiMessage] = field(default_factory=list)

    async def connected(self, connects: int = 1) -> None:
        """Wait until the client itself reports its ``connects``-th login as done."""
        await wait_for(lambda: self.client.state == "connected" and self.client.connects >= connects)

    def events(self, name: str | None = None) -> list[AmiMessage]:
        return [m for m in self.received if m.is_event and (name is None or m.event == name)]


@asynccontextmanager
async def running_client(
    server: AmiReplayServer | None,
    *,
    clock: Clock | None = None,
    secret: str = SECRET,
    port: int | None = None,
    on_message: Callable[[AmiMessage], None] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Harness]:
    """Run an AmiClient against ``server`` (or ``port``); on exit stop it and await run()."""
    received: list[AmiMessage] = []

    def record(message: AmiMessage) -> None:
        received.append(message)
        if on_message is not None:
            on_message(message)

    target_port = port if port is not None else (server.port if server else 0)
    client = AmiClient(
        "127.0.0.1",
        target_port,
        USERNAME,
        secret,
        EVENTS,
        clock if clock is not None else FakeClock(),
        record,
        **kwargs,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    harness = Harness(client=client, stop=stop, task=task, received=received)
    try:
        yield harness
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5.0)
