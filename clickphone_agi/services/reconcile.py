"""Gap-free CDRs: re-read Asterisk's Master.csv from the saved position after any AMI gap.

Runs at start-up, whenever the AMI (re)connects or the ingest queue overflowed, and every
``reconcile_interval`` seconds. Each row becomes the same :class:`CallEnded` (same key) as its
AMI twin and goes through the same :class:`EventProcessor`, so nothing is counted twice. The
position (inode + byte offset) is saved only after the rows before it were committed: a crash
in between re-reads them, and their keys make that harmless.

A second position is saved with it: where to *replay* from after a crash. A missed call is
decided in memory some time after its last CDR (``notifications.missed_call_grace``, longer
without the caller's own CDR); its CDRs are committed long before. Had the cursor alone been
saved, a crash in that window would lose the decision for good: AMI does not resend, and the
cursor is past the rows. So each pass remembers where each of its reads started and which calls
it fed; the replay position is the start of the oldest read that fed a call the notifier has
not decided yet (the cursor when there is none). The first pass after a start reads from there:
the re-read rows have no effect of their own (their keys are claimed) but rebuild the undecided
calls, which are then decided and mailed once (the missed-call key is claimed with the mail).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from clickphone_agi.adapters.cdr_csv import CsvBatch, CsvPosition
from clickphone_agi.clock import Clock, wait_any
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.faults import crash_point
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.ingest import EventProcessor

log = structlog.get_logger(__name__)

CURSOR_KEY = "cursor:master_csv"
REPLAY_KEY = "cursor:master_csv:replay"
_FILE_START = CsvPosition(0, 0)  # "from the start of whatever Master.csv is there"
IN_FLIGHT = 256  # rows handed to the processor at once (the writer's batch holds up to 256 units)


class Tailer(Protocol):
    @property
    def path(self) -> Path: ...

    def read_new(self, position: CsvPosition | None) -> CsvBatch: ...


class CdrReconciler:
    def __init__(
        self,
        store: Store,
        tailer: Tailer,
        processor: EventProcessor,
        clock: Clock,
        interval: float,
        *,
        undecided: Callable[[str], bool] = lambda _linked_id: False,
    ) -> None:
        self._store = store
        self._tailer = tailer
        self._processor = processor
        self._clock = clock
        self._interval = interval
        # whether the call with this Linkedid still waits for a decision (the missed-call notifier)
        self._undecided = undecided
        # (where a read started, the calls it fed), oldest first, while one of them is undecided
        self._held: deque[tuple[CsvPosition, frozenset[str]]] = deque()
        self._replayed = False
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
        if not self._replayed:  # the first pass since the start: from the replay position
            self._replayed = True
            replay = await self._store.get_meta(REPLAY_KEY)
            if replay and replay != saved:
                log.info("reconcile.replaying", since=replay, cursor=saved, note="rebuilding undecided calls")
                position = CsvPosition.from_text(replay)
        recovered = 0
        while True:
            started = position or _FILE_START
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
            recovered += await self._apply(batch.events)
            new_position = batch.position
            text = new_position.to_text()
            replay = self._replay_from(started, batch.events, new_position).to_text()

            def save(tx: WriteTx, text: str = text, replay: str = replay) -> None:
                tx.set_meta(CURSOR_KEY, text)
                tx.set_meta(REPLAY_KEY, replay)

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

    async def _apply(self, calls: list[CallEnded]) -> int:
        """Hand the rows to the processor up to :data:`IN_FLIGHT` at a time, in file order: their
        units join the writer's batches (one commit for many rows) instead of one commit each,
        which capped recovery at the disk's fsync rate (~70 rows/s here). The writer keeps their
        order; the cursor is saved only after all of them committed."""
        applied = 0

        async def apply(call: CallEnded) -> bool:
            done = await self._processor.handle(call)
            crash_point("reconcile.row_applied")
            return done

        for start in range(0, len(calls), IN_FLIGHT):
            chunk = calls[start : start + IN_FLIGHT]
            self.rows_seen += len(chunk)
            applied += sum(await asyncio.gather(*(apply(call) for call in chunk)))
        return applied

    def _replay_from(self, started: CsvPosition, calls: list[CallEnded], end: CsvPosition) -> CsvPosition:
        """Where a restart must re-read from so that no undecided call is lost (see the module doc)."""
        linked = frozenset(c.linked_id for c in calls if c.linked_id)
        if linked:
            self._held.append((started, linked))
        while self._held and not any(self._undecided(lid) for lid in self._held[0][1]):
            self._held.popleft()
        return self._held[0][0] if self._held else end
