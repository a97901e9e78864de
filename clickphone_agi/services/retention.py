"""The daily retention job: personal data older than its configured period is deleted.

Runs at start-up and then once per local day at ``privacy.retention_hour`` (clock injected, so
tests drive it with a FakeClock). Each step walks its table in windows of
``privacy.retention_batch`` keys, one short unit of work per window, so the single writer is
never held for long and charging goes on between windows. What goes (see
:mod:`clickphone_agi.domain.retention` for the key floor that makes purging keys safe):

* outbox bodies (message, template data) of finished rows older than ``outbox_body_retention_days``,
  and of delivered/expired password-recovery, top-up and payment mails at any age — never pending;
* ``processed_events`` keys older than ``processed_event_retention_days`` (after raising the key floor);
* ``cdrs`` (by call end) and ``rated_calls`` (by answer) older than ``cdr_retention_days``;
* ``api_requests`` older than ``api_request_retention_days``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from clickphone_agi.clock import Clock, wait_any
from clickphone_agi.domain.retention import (
    PURGE_AFTER_SEND,
    RetentionPolicy,
    erased_numbers_cutoff,
    key_floor,
    next_run_at,
)
from clickphone_agi.ports import Store, WriteTx

log = structlog.get_logger(__name__)

FLOOR_META = "retention:key_floor"
KEY_STEPS = ("processed_events", "cdrs", "rated_calls", "api_requests")


@dataclass(frozen=True)
class RetentionSettings:
    policy: RetentionPolicy
    zone: ZoneInfo
    hour: int = 3
    batch: int = 2000


class RetentionJob:
    """Purges on schedule; ``baselines`` are told the key floor before any key is deleted."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        settings: Callable[[], RetentionSettings],
        baselines: Sequence[Callable[[datetime], None]] = (),
    ) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._baselines = tuple(baselines)
        self._stop: asyncio.Event | None = None
        self.runs = 0
        self.failures = 0
        self.purged: Counter[str] = Counter()
        self.last_run: dict[str, Any] | None = None
        self.next_run: datetime | None = None

    async def apply_saved_floor(self) -> datetime | None:
        """At start-up, before anything is replayed: keys purged by an earlier run stay accounted for."""
        saved = await self._store.get_meta(FLOOR_META)
        if saved is None:
            return None
        floor = datetime.fromisoformat(saved)
        for raise_baseline in self._baselines:
            raise_baseline(floor)
        return floor

    async def run(self, stop: asyncio.Event) -> None:
        """Once now, then every local day at the configured hour, until ``stop``."""
        self._stop = stop
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:
                self.failures += 1
                self.last_run = {"at": self._clock.now().isoformat(), "ok": False, "error": repr(exc)}
                log.exception("retention.failed")
            if stop.is_set():
                break
            s = self._settings()
            now = self._clock.now()
            self.next_run = next_run_at(now, s.zone, s.hour)
            await wait_any(self._clock, (self.next_run - now).total_seconds(), stop)

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def run_once(self) -> dict[str, Any]:
        s = self._settings()
        started = time.monotonic()
        now = self._clock.now()
        cutoffs = s.policy.cutoffs(now)
        floor = key_floor(cutoffs["processed_events"])
        # first nothing older than the floor is processed any more, then its keys may go
        for raise_baseline in self._baselines:
            raise_baseline(floor)
        saved = await self._store.get_meta(FLOOR_META)
        if saved is None or datetime.fromisoformat(saved) < floor:
            text = floor.isoformat()
            await self._store.write(lambda tx: tx.set_meta(FLOOR_META, text))
        purged: dict[str, int] = {"outbox_bodies": await self._purge_bodies(cutoffs["outbox_bodies"], s.batch)}
        for step in KEY_STEPS:
            purged[step] = await self._purge(step, cutoffs[step], s.batch)
            if self._stopping():
                break
        else:  # last: they outlive the keys by a margin (see erased_numbers_cutoff)
            purged["erased_numbers"] = await self._purge("erased_numbers", erased_numbers_cutoff(floor), s.batch)
        self.runs += 1
        self.purged.update(purged)
        seconds = round(time.monotonic() - started, 3)
        self.last_run = {
            "at": now.isoformat(),
            "ok": True,
            "seconds": seconds,
            "purged": purged,
            "key_floor": floor.isoformat(),
            "interrupted": self._stopping(),
        }
        log.info("retention.done", seconds=seconds, key_floor=floor.isoformat(), **purged)
        return self.last_run

    async def _purge(self, step: str, cutoff: datetime, batch: int) -> int:
        total, after = 0, None
        while True:

            def unit(tx: WriteTx, after: str | None = after) -> tuple[int, str | None]:
                return tx.purge_window(step, cutoff, after, batch)

            deleted, after = await self._store.write(unit)
            total += deleted
            if after is None or self._stopping():
                return total
            await asyncio.sleep(0)  # let other work reach the writer between windows

    async def _purge_bodies(self, cutoff: datetime, batch: int) -> int:
        total, after = 0, 0
        while True:

            def unit(tx: WriteTx, after: int = after) -> tuple[int, int | None]:
                return tx.purge_bodies_window(cutoff, after, batch, PURGE_AFTER_SEND)

            cleared, nxt = await self._store.write(unit)
            total += cleared
            if nxt is None or self._stopping():
                return total
            after = nxt
            await asyncio.sleep(0)

    def snapshot(self) -> dict[str, Any]:
        """For ``status``: the last run, the next one, totals since start."""
        return {
            "runs": self.runs,
            "failures": self.failures,
            "purged_since_start": dict(self.purged),
            "last_run": self.last_run,
            "next_run": self.next_run.isoformat() if self.next_run else None,
        }
