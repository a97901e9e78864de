"""AMI ingest: reader → bounded queue → translator → effects committed under idempotency keys.

The AMI reader only calls :meth:`EventQueue.offer`, which never blocks (Asterisk drops a client
that does not read within ``writetimeout``). When the queue is full the event is dropped —
loudly: counted, logged, and a Master.csv reconciliation is requested, which recovers every CDR
in the gap exactly as after a disconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

import structlog

from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.domain.ami_translate import TranslateContext, TranslateError, translate
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.effects import plan
from clickphone_agi.domain.events import AsteriskLifecycle, CallEnded, DomainEvent
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.money import MoneyService

log = structlog.get_logger(__name__)

_STOP = object()


class EventQueue:
    """Bounded, non-blocking hand-off from the reader; depth and drops are metrics."""

    def __init__(self, maxsize: int, on_overflow: Callable[[], None]) -> None:
        self._queue: asyncio.Queue[AmiMessage | object] = asyncio.Queue()
        self.maxsize = maxsize
        self._on_overflow = on_overflow
        self.dropped = 0
        self.high_water = 0
        self._last_full_log = -1e9

    def offer(self, message: AmiMessage) -> None:
        if self._queue.qsize() >= self.maxsize:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_full_log > 5:  # loud, but not a log flood
                self._last_full_log = now
                log.error(
                    "ami.queue_full",
                    depth=self._queue.qsize(),
                    dropped_total=self.dropped,
                    action="dropping events; CDRs will be reconciled from Master.csv",
                )
            self._on_overflow()
            return
        self._queue.put_nowait(message)
        self.high_water = max(self.high_water, self._queue.qsize())

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """End of input: the consumer stops after what is already queued."""
        self._queue.put_nowait(_STOP)

    async def get(self) -> AmiMessage | None:
        item = await self._queue.get()
        return item if isinstance(item, AmiMessage) else None


class EventProcessor:
    """Commits each domain event's effects with its idempotency key (one unit of work)."""

    def __init__(self, store: Store, went_live_at: datetime, money: MoneyService | None = None) -> None:
        self._store = store
        self._went_live_at = went_live_at
        self._money = money
        self.applied: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()

    async def handle(self, event: DomainEvent) -> bool:
        """True if the event had an effect now; False if none or already processed."""
        decision = plan(event, self._went_live_at)
        if decision.kind is None:
            self.skipped[decision.reason] += 1
            return False
        kind = decision.kind

        def unit(tx: WriteTx) -> bool:
            if not tx.claim_event(event.key, kind):
                return False
            if decision.record_call and isinstance(event, CallEnded):
                tx.record_call(event)
                if self._money is not None and self._money.is_billing_cdr(event):
                    self._money.charge(tx, event)
            return True

        if await self._store.write(unit):
            self.applied[kind] += 1
            if isinstance(event, CallEnded):
                log.info(
                    "cdr.recorded",
                    key=event.key,
                    account=event.account,
                    src=event.source,
                    dst=event.destination,
                    disposition=str(event.disposition),
                    billsec=event.billable_seconds,
                    app=event.last_application,
                    origin=str(event.origin),
                )
            else:
                log.info("event.recorded", key=event.key, kind=kind)
            return True
        self.duplicates[kind] += 1
        log.debug("event.duplicate", key=event.key, kind=kind)
        return False


class IngestWorker:
    """Consumes the queue: correlate, translate, hand to the processor; counts everything."""

    def __init__(
        self,
        queue: EventQueue,
        processor: EventProcessor,
        context: TranslateContext,
        *,
        on_connected: Callable[[], None] = lambda: None,
        max_in_flight: int = 256,
        correlator: LinkedIdCorrelator | None = None,
    ) -> None:
        self._queue = queue
        self._processor = processor
        self._context = context
        self._on_connected = on_connected
        self._correlator = correlator or LinkedIdCorrelator()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self.events_by_type: Counter[str] = Counter()
        self.translated: Counter[str] = Counter()
        self.translate_errors = 0
        self.effect_errors = 0
        self.last_event_monotonic: float | None = None

    async def run(self) -> None:
        """Until the queue is closed; effects run concurrently (the writer keeps their order)."""
        while (message := await self._queue.get()) is not None:
            self.last_event_monotonic = time.monotonic()
            event = self._translate(message)
            if event is None:
                continue
            if isinstance(event, AsteriskLifecycle):
                if event.state == "booted":
                    self._on_connected()
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._apply(event))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if self._in_flight:
            await asyncio.gather(*self._in_flight)

    def _translate(self, message: AmiMessage) -> DomainEvent | None:
        name = message.event
        if name is None:
            return None
        self.events_by_type[name] += 1
        self._correlator.observe(message.headers)
        try:
            event = translate(message.headers, self._context, self._correlator.linked_id_for)
        except TranslateError as exc:
            self.translate_errors += 1
            log.warning("ami.untranslatable", ami_event=name, error=str(exc))
            return None
        if event is not None:
            self.translated[type(event).__name__] += 1
        return event

    async def _apply(self, event: DomainEvent) -> None:
        try:
            await self._processor.handle(event)
        except Exception:
            self.effect_errors += 1
            log.exception("ingest.effect_failed", key=event.key)
        finally:
            self._slots.release()
