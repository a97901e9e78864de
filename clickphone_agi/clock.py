"""Time as an injected dependency, so no test waits on the wall clock.

Services take a :class:`Clock`; production wires :class:`SystemClock`, tests wire
:class:`FakeClock` and move time with :meth:`FakeClock.advance`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Wall time for records, monotonic time for timeouts, and a sleep that obeys both."""

    def now(self) -> datetime:
        """Aware UTC wall-clock time."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep in this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ShiftedClock(SystemClock):
    """The real clock, moved to another wall-clock moment; monotonic time and sleeps stay real.

    For the demo, which replays calls recorded on one day: "today" (daily spend, limits) must be
    that day whatever the date the demo runs on, or its limit warnings would depend on the calendar.
    """

    def __init__(self, start: datetime) -> None:
        self._offset = start - datetime.now(UTC)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset


class FakeClock:
    """A clock that only moves when a test advances it; sleepers wake in order."""

    def __init__(self, start: datetime | None = None) -> None:
        self._wall = start or datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._wall + timedelta(seconds=self._mono)

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), fut))
        await fut

    def next_deadline(self) -> float | None:
        """The monotonic time the earliest sleeper waits for (None when nobody sleeps)."""
        return self._sleepers[0][0] if self._sleepers else None

    def sleeps_until(self, deadline: float) -> bool:
        """Whether some sleeper waits for exactly ``deadline`` (a test sees a wait has begun)."""
        return any(d == deadline and not f.done() for d, _, f in self._sleepers)

    @property
    def sleepers(self) -> int:
        """How many sleepers wait on this clock."""
        return len(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline has passed, in order."""
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._mono = max(self._mono, deadline)
            if not fut.done():
                fut.set_result(None)
            # let the woken task run before waking the next one
            for _ in range(5):
                await asyncio.sleep(0)
        self._mono = target
        for _ in range(5):
            await asyncio.sleep(0)


async def wait_any(clock: Clock, seconds: float, *events: asyncio.Event) -> None:
    """Return when any event is set or ``seconds`` of ``clock`` time passed, whichever is first.

    The background loops (sender, reconciliation, notices) sleep this way so a stop request or
    new work ends the sleep at once instead of waiting it out.
    """
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(e.wait()) for e in events]
    waiters.append(asyncio.ensure_future(clock.sleep(seconds)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
