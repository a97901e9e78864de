"""Gap-free CDRs: re-read Asterisk's Master.csv from the saved position after any AMI gap.

Runs at start-up, whenever the AMI (re)connects or the ingest queue overflowed, and every
``reconcile_interval`` seconds. Each row becomes the same :class:`CallEnded` (same key) as its
AMI twin and goes through the same :class:`EventProcessor`, so nothing is counted twice. The
position (inode + byte offset) is saved only after the rows before it were committed: a crash
in between re-reads them, and their keys make that harmless.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import structlog

from clickphone_agi.adapters.cdr_csv import CsvBatch, CsvPosition
from clickphone_agi.clock import Clock, wait_any
from clickphone_agi.faults import crash_point
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.ingest import EventProcessor

log = structlog.get_logger(__name__)

CURSOR_KEY = "cursor:master_csv"


class Tailer(Protocol):
    @property
    def path(self) -> Path: ...

    def read_new(self, position: CsvPosition | None) -> CsvBatch: ...


class CdrReconciler:
    def __init__(self, store: Store, tailer: Tailer, processor: EventProcessor, clock: Clock, interval: float) -> None:
        self._store = store
        self._tailer = tailer
        self._processor = processor
        self._clock = clock
        self._interval = interval
        self._wake = asyncio.Event()
        self.passes = 0
        self.rows_seen = 0
        self.recovered = 0
        self.row_errors = 0
        self.gaps_suspected = 0
        self.last_error: str | None = None
        self._missing_logged = False

    def request(self, reason: str = "") -> None:
        """Ask for a pass soon (AMI reconnected, queue overflowed); cheap and idempotent."""
        if not self._wake.is_set():
            log.info("reconcile.requested", reason=reason)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("reconcile.failed")
            await wait_any(self._clock, self._interval, stop, self._wake)

    async def run_once(self) -> int:
        """One pass to the end of the file; returns the CDRs that had an effect (were missed)."""
        if not self._tailer.path.exists():
            if not self._missing_logged:
                log.warning("reconcile.no_master_csv", path=str(self._tailer.path))
                self._missing_logged = True
            return 0
        self._missing_logged = False
        saved = await self._store.get_meta(CURSOR_KEY)
        position = CsvPosition.from_text(saved) if saved else None
        recovered = 0
        while True:
            batch = await asyncio.to_thread(self._tailer.read_new, position)
            for error in batch.errors:
                self.row_errors += 1
                log.error("reconcile.row_error", error=error)
            if batch.gap_suspected:
                self.gaps_suspected += 1
                log.error(
                    "reconcile.gap_suspected",
                    path=str(self._tailer.path),
                    note="Master.csv was truncated or rotated away; some CDRs may be missing",
                )
            for call in batch.events:
                self.rows_seen += 1
                if await self._processor.handle(call):
                    recovered += 1
                crash_point("reconcile.row_applied")
            new_position = batch.position
            text = new_position.to_text()

            def save(tx: WriteTx, text: str = text) -> None:
                tx.set_meta(CURSOR_KEY, text)

            await self._store.write(save)
            crash_point("reconcile.cursor_saved")
            position = new_position
            if batch.at_end:
                break
        self.passes += 1
        self.recovered += recovered
        if recovered:
            log.warning("reconcile.recovered", cdrs=recovered, note="CDRs missed on AMI, taken from Master.csv")
        return recovered
