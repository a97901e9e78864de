"""AMI ingest: reader → bounded queue → translator → effects committed under idempotency keys.

The AMI reader only calls :meth:`EventQueue.offer`, which never blocks (Asterisk drops a client
that does not read within ``writetimeout``). When the queue is full the event is dropped —
loudly: counted, logged, and a Master.csv reconciliation is requested, which recovers every CDR
in the gap exactly as after a disconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.adapters.logging import debug_enabled
from clickphone_agi.domain.ami_translate import (
    HANDLED_EVENTS,
    ZONES_DIFFER_AT_MOST,
    TranslateContext,
    TranslateError,
    cdr_clock_skew,
    is_money_user_event,
    translate,
    unsupported_user_event,
)
from clickphone_agi.domain.correlation import LinkedIdCorrelator
from clickphone_agi.domain.effects import plan
from clickphone_agi.domain.events import (
    AsteriskLifecycle,
    CallEnded,
    DomainEvent,
    VoicemailPasswordChanged,
    VoicemailRecorded,
    VoicemailWaiting,
)
from clickphone_agi.domain.money import RatedCall
from clickphone_agi.faults import crash_point
from clickphone_agi.ports import (
    STORAGE_RETRY_FIRST,
    STORAGE_RETRY_MAX,
    StorageRetry,
    StorageUnavailable,
    Store,
    WriteTx,
)
from clickphone_agi.services.money import MoneyService

log = structlog.get_logger(__name__)

#: Longest stretch (seconds) the worker works off a backlog before it yields to the event loop,
#: so the reader always gets its turn well within Asterisk's writetimeout (100 ms by default).
_SLICE = 0.02
#: Most domain events handed to the processor as one group (one queue entry on the writer).
_GROUP = 128


class EventQueue:
    """Bounded, non-blocking hand-off from the reader; depth and drops are metrics.

    A plain deque: :meth:`offer` appends (or drops when full) and wakes a waiting consumer;
    :meth:`get_nowait` and :meth:`get` take from the front. :meth:`close` queues an end marker
    that :meth:`get`/:meth:`get_nowait` return as ``None``.
    """

    def __init__(self, maxsize: int, on_overflow: Callable[[], None]) -> None:
        self._items: deque[AmiMessage | None] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self.maxsize = maxsize
        self._on_overflow = on_overflow
        self.dropped = 0
        self.high_water = 0
        self._last_full_log = -1e9

    def offer(self, message: AmiMessage) -> None:
        """Queue ``message`` and return at once; when the queue is full, drop it, count it, log
        (at most every 5 s) and call ``on_overflow``. Never blocks, never awaits."""
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_full_log > 5:  # loud, but not a log flood
                self._last_full_log = now
                log.error(
                    "ami.queue_full",
                    depth=len(items),
                    dropped_total=self.dropped,
                    action="dropping events; CDRs will be reconciled from Master.csv",
                )
            self._on_overflow()
            return
        items.append(message)
        self.high_water = max(self.high_water, len(items))
        if self._waiters:
            self._wake()

    @property
    def depth(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """End of input: the consumer stops after what is already queued."""
        self._items.append(None)
        self._wake()

    def get_nowait(self) -> AmiMessage | None:
        """The oldest message, ``None`` for the end marker; :class:`asyncio.QueueEmpty` if none."""
        try:
            return self._items.popleft()
        except IndexError:
            raise asyncio.QueueEmpty from None

    async def get(self) -> AmiMessage | None:
        """The oldest message, waiting for one; ``None`` once the queue is closed."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:  # cancelled before being woken
                    self._waiters.remove(waiter)
        return self._items.popleft()

    def _wake(self) -> None:
        # every waiter re-checks the deque, so waking them all is always correct
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class EventProcessor:
    """Commits each domain event's effects with its idempotency key (one unit of work)."""

    def __init__(self, store: Store, went_live_at: datetime, money: MoneyService | None = None) -> None:
        self._store = store
        self._went_live_at = went_live_at
        self._money = money
        self.applied: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._recorded: list[CallEnded] = []  # committed, not logged yet: see _log_recorded
        self._log_scheduled: asyncio.AbstractEventLoop | None = None  # the loop _log_recorded will run on

    async def handle(self, event: DomainEvent) -> bool:
        """True if the event had an effect now; False if none or already processed."""
        (outcome,) = await self.handle_many([event])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def handle_many(self, events: Sequence[DomainEvent]) -> list[bool | Exception]:
        """:meth:`handle` for each event, in order, as one group of units of work.

        Each event keeps its own unit (one failing leaves the others) and its own idempotency key;
        the group costs the event loop one queue entry and one future, and its keys' claims are
        read ahead in a few statements. A burst of CDRs (AMI catching up, a Master.csv replay)
        goes through here. Returns each event's outcome: applied or not, or the exception its unit
        raised.
        """
        for event in events:
            self.observe(event)
        return await self.apply_many(events)

    async def apply_many(self, events: Sequence[DomainEvent]) -> list[bool | Exception]:
        """:meth:`handle_many` without showing the events to :meth:`observe`: for events that
        were observed already and failed for want of storage (:class:`StorageUnavailable`)."""
        outcomes: list[bool | Exception] = [False] * len(events)
        units, planned, records = self._plan(events, outcomes)
        if not units:
            return outcomes
        keys = [events[index].key for index, _ in planned]
        results = await self._store.write_many(units, prefetch_claims=keys, records=records)
        for (index, kind), result in zip(planned, results, strict=True):
            event = events[index]
            outcomes[index] = result
            if isinstance(result, Exception):
                continue
            if result:
                self.applied[kind] += 1
                if isinstance(event, CallEnded):
                    loop = asyncio.get_running_loop()
                    if self._log_scheduled is not loop:
                        self._log_scheduled = loop
                        loop.call_soon(self._log_recorded)
                    self._recorded.append(event)
                else:
                    log.info("event.recorded", key=event.key, kind=kind)
            else:
                self.duplicates[kind] += 1
                log.debug("event.duplicate", key=event.key, kind=kind)
        return outcomes

    def _plan(
        self, events: Sequence[DomainEvent], outcomes: list[bool | Exception]
    ) -> tuple[list[Callable[[WriteTx], bool]], list[tuple[int, str]], list[tuple[CallEnded, RatedCall | None]]]:
        """The units of work of ``events``; (index in events, kind) of each; the CDRs they record,
        rated. An event that needs no unit is counted as skipped; one whose rating raised gets
        its exception in ``outcomes``."""
        units: list[Callable[[WriteTx], bool]] = []
        planned: list[tuple[int, str]] = []
        records: list[tuple[CallEnded, RatedCall | None]] = []
        for index, event in enumerate(events):
            decision = plan(event, self._went_live_at)
            if decision.kind is None:
                self.skipped[decision.reason] += 1
                continue
            try:
                unit, record = self._unit(event, decision.kind, decision.record_call, decision.settles)
            except Exception as exc:  # rating raised: this event fails alone
                outcomes[index] = exc
                continue
            units.append(unit)
            if record is not None:
                records.append(record)
            planned.append((index, decision.kind))
        return units, planned, records

    def _unit(
        self, event: DomainEvent, kind: str, record_call: bool, settles: tuple[str, ...] = ()
    ) -> tuple[Callable[[WriteTx], bool], tuple[CallEnded, RatedCall | None] | None]:
        """The event's unit of work: claim its key, record the CDR, charge it (rated here, now);
        and the CDR it records with its rating, if any (a hint for the store)."""
        call = event if record_call and isinstance(event, CallEnded) else None
        money = self._money if call is not None else None
        billing = money is not None and call is not None and money.is_billing_cdr(call)
        # rating is pure: done here, on the event loop, so that the writer's thread only reads and writes
        rated = money.rate(call) if billing and money is not None and call is not None else None
        key = event.key

        def unit(tx: WriteTx) -> bool:
            if call is not None and _erased(tx, call):
                return False  # nothing of an erased account or number is recorded again, not even its key
            if isinstance(event, _BOX_EVENTS) and _erased_box(tx, event):
                for settled in settles:  # no number in these: the call was not missed all the same
                    tx.claim_event(settled, "not_missed")
                return False  # its key names the erased box
            if not tx.claim_event(key, kind):
                return False
            for settled in settles:
                tx.claim_event(settled, "not_missed")  # taken already (decided, or mailed): fine
            if call is not None:
                tx.record_call(call)
                if billing and money is not None:
                    money.charge_rated(tx, call, rated)
                    crash_point("ingest.unit_applied")
                elif money is not None:
                    # busy, unanswered, failed, emergency: nothing to charge, but the call is over,
                    # so the budget its authorize reserved is free again (not in two hours)
                    tx.release(call.unique_id)
            return True

        return unit, ((call, rated) if call is not None else None)

    def observe(self, event: DomainEvent) -> None:
        """Called with every event handed in, before its effects (a hook: nothing here)."""

    def raise_baseline(self, moment: datetime) -> None:
        """Ignore recovered history older than ``moment`` from now on (the retention's key floor:
        keys of events that old may have been purged, so a replay of one would look new)."""
        self._went_live_at = max(self._went_live_at, moment)

    def _log_recorded(self) -> None:
        """Log the CDRs committed since the last call (scheduled by the first of them).

        A CDR committed on its own, the usual trickle, gets its canonical ``cdr.recorded`` line at
        info. CDRs that complete together, because the writer committed them in one batch (a burst,
        a Master.csv catch-up), get their ``cdr.recorded`` lines at debug and one ``cdrs.recorded``
        line at info with their count: a masked and rendered line costs 50-100 us of the event
        loop, which at thousands of CDRs a second would starve the SQLite writer of the GIL.
        """
        calls, self._recorded = self._recorded, []
        self._log_scheduled = None
        if len(calls) == 1:
            _log_cdr(log.info, calls[0])
            return
        if debug_enabled():
            debug = log.bind().debug
            for call in calls:
                _log_cdr(debug, call)
        log.info(
            "cdrs.recorded",
            count=len(calls),
            billsec=sum(c.billable_seconds for c in calls),
            first_key=calls[0].key,
            last_key=calls[-1].key,
        )


def _erased(tx: WriteTx, call: CallEnded) -> bool:
    """Whether ``call`` belongs to an erased account, or is a leg without an account code carrying a
    number erased after the call started (a Master.csv row read again, a late leg of an old call)."""
    if not call.account:
        return tx.erased_leg(call)
    account = tx.get_account(call.account)
    return account is not None and account.erased


_BOX_EVENTS = (VoicemailWaiting, VoicemailRecorded, VoicemailPasswordChanged)


def _erased_box(tx: WriteTx, event: VoicemailWaiting | VoicemailRecorded | VoicemailPasswordChanged) -> bool:
    """Whether a voicemail event belongs to an erased account, or names a box erased with its
    account and given to no one since (its key would hold the box, often the subscriber's number)."""
    code = "" if isinstance(event, VoicemailPasswordChanged) else event.account
    account = tx.get_account(code) if code else None
    if account is not None and account.erased:
        return True
    return tx.box_erased_at(event.box) is not None and tx.account_for_mailbox(event.box) is None


def _log_cdr(method: Callable[..., Any], call: CallEnded) -> None:
    method(
        "cdr.recorded",
        key=call.key,
        account=call.account,
        src=call.source,
        dst=call.destination,
        disposition=str(call.disposition),
        billsec=call.billable_seconds,
        app=call.last_application,
        origin=str(call.origin),
    )


class IngestWorker:
    """Consumes the queue: correlate, translate, hand to the processor; counts everything.

    Every event is counted and shown to the correlator, in stream order; only the event names
    :func:`translate` handles (:data:`HANDLED_EVENTS`) are translated; every domain event but
    ``AsteriskLifecycle`` goes to the processor, in groups, each group in its own task, started
    in stream order.
    """

    def __init__(
        self,
        queue: EventQueue,
        processor: EventProcessor,
        context: TranslateContext,
        *,
        on_connected: Callable[[], None] = lambda: None,
        on_storage_recovered: Callable[[], None] = lambda: None,
        max_in_flight: int = 256,
        correlator: LinkedIdCorrelator | None = None,
        storage_retry: tuple[float, float] = (STORAGE_RETRY_FIRST, STORAGE_RETRY_MAX),
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._queue = queue
        self._now = now
        # seconds a live Cdr's end lay before its arrival, when that says asterisk.timezone is
        # not Asterisk's zone (cdr_clock_skew); None while the Cdrs agree with the clock
        self.cdr_clock_skew: int | None = None
        self._skew_logged_at: float | None = None
        self._processor = processor
        self._context = context
        self._on_connected = on_connected
        self._correlator = correlator or LinkedIdCorrelator()
        self._max_in_flight = max_in_flight
        self._group = max(1, min(_GROUP, max_in_flight))
        self._events_in_flight = 0
        self._room = asyncio.Event()
        self._pending: list[DomainEvent] = []  # translated, not yet handed on
        self._in_flight: set[asyncio.Task[None]] = set()
        self.events_by_type: Counter[str] = Counter()
        self.translated: Counter[str] = Counter()
        self.translate_errors = 0
        self.unsupported_user_events: Counter[str] = Counter()
        self.money_user_events_refused = 0
        self.effect_errors = 0
        self.last_event_monotonic: float | None = None
        # events the database could not take (a full disk): held, in stream order, and retried
        self._on_storage_recovered = on_storage_recovered
        self._retry = StorageRetry(*storage_retry)
        self._retry_turn = asyncio.Lock()  # FIFO: held groups retry in the order they failed
        self._storage_down_since: float | None = None  # monotonic; None while writes commit
        self.storage_error: str | None = None  # the last reason the database gave
        self.held = 0  # events held now
        self.storage_outages = 0
        self.storage_retries = 0
        self.held_lost = 0  # held events given up at shutdown

    async def run(self) -> None:
        """Until the queue is closed; effects run concurrently (the writer keeps their order).

        Awaits the queue only when it is empty; otherwise it takes what is queued without
        awaiting, and yields to the event loop after ``_SLICE`` seconds of work so that the
        reader and the effect tasks keep running while a backlog is worked off. The domain events
        of one stretch go to the processor together (:meth:`EventProcessor.handle_many`, at most
        ``_GROUP``): handed on before the worker waits, yields or reports a (re)connect, so none
        waits longer than it did alone.

        Cancelled (the daemon's drain ran out of time), it cancels the effects still in flight and
        waits for them: events held for a full disk then say they are lost, once each.
        """
        try:
            await self._run()
        except asyncio.CancelledError:
            in_flight = list(self._in_flight)
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise

    async def _run(self) -> None:
        queue = self._queue
        pending = self._pending
        deadline = time.monotonic() + _SLICE
        while True:
            if queue.depth:
                message = queue.get_nowait()
            else:
                await self._dispatch()
                message = await queue.get()
                deadline = time.monotonic() + _SLICE
            if message is None:
                break
            now = self.last_event_monotonic = time.monotonic()
            event = self._translate(message)
            if isinstance(event, AsteriskLifecycle):
                await self._dispatch()
                if event.state == "booted":
                    self._on_connected()
            elif event is not None:
                pending.append(event)
                if len(pending) >= self._group:
                    await self._dispatch()
            if now >= deadline:
                await self._dispatch()
                await asyncio.sleep(0)
                deadline = time.monotonic() + _SLICE
        await self._dispatch()
        if self._in_flight:
            await asyncio.gather(*self._in_flight)

    async def _dispatch(self) -> None:
        """Start the effects of the pending events in a task of their own, once fewer than
        ``max_in_flight`` events are in flight (the bound that holds memory when the store lags)."""
        if not self._pending:
            return
        events = self._pending[:]
        self._pending.clear()
        while self._events_in_flight and self._events_in_flight + len(events) > self._max_in_flight:
            self._room.clear()
            await self._room.wait()
        self._events_in_flight += len(events)
        task = asyncio.create_task(self._apply(events))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def correlation(self) -> dict[str, int]:
        """The Linkedid correlator's figures for ``status``: live channels should follow the
        calls in progress; evicted and forgotten ids sent their Cdr to the fallbacks."""
        c = self._correlator
        return {"live": c.live, "ended": c.ended, "evicted": c.evictions, "forgotten": c.forgotten}

    def _translate(self, message: AmiMessage) -> DomainEvent | None:
        name = message.event
        if name is None:
            return None
        self.events_by_type[name] += 1
        # every event feeds the correlator, read from the frame's bytes when it has them
        frame = message.frame
        # a Hangup ends its channel's entry, as its Cdr does below: the correlator keeps
        # what the calls in progress need, not every channel since the start
        hangup = name == "Hangup"
        if frame is None or not self._correlator.observe_frame(frame, ended=hangup):
            self._correlator.observe(message.headers, ended=hangup)
        if name not in HANDLED_EVENTS:
            return None  # translate() would return None: leave the headers undecoded
        try:
            event = translate(message.headers, self._context, self._correlator.linked_id_for)
        except TranslateError as exc:
            self.translate_errors += 1
            log.warning("ami.untranslatable", ami_event=name, error=str(exc))
            return None
        if event is not None:
            self.translated[type(event).__name__] += 1
            if isinstance(event, CallEnded):
                self._correlator.end(event.unique_id)
                self._check_clock(event)
        elif name == "UserEvent":
            self._unsupported(message)
        return event

    def _check_clock(self, call: CallEnded) -> None:
        """Say (at most once an hour) when live Cdrs end hours before or after they arrive: the
        configured zone is not Asterisk's. ``status`` shows the skew while it lasts."""
        received = self._now()
        if received - call.end > ZONES_DIFFER_AT_MOST:
            return  # history (a replay), not a zone: changes nothing
        skew = cdr_clock_skew(call.end, received)
        if skew is None:
            self.cdr_clock_skew = None
            return
        self.cdr_clock_skew = round(skew.total_seconds())
        now = time.monotonic()
        if self._skew_logged_at is not None and now - self._skew_logged_at < 3600:
            return
        self._skew_logged_at = now
        log.warning(
            "ami.cdr_clock_skew",
            end=call.end.isoformat(),
            skew_hours=round(skew.total_seconds() / 3600, 2),
            timezone=str(self._context.timezone),
            note="Cdr times are Asterisk's wall-clock times read in asterisk.timezone: set it to the zone"
            " Asterisk runs in (a container is often on UTC), or fix the clock; calls are dated wrong and"
            " CDRs recovered from Master.csv may be taken for history before the go-live and skipped",
        )

    def _unsupported(self, message: AmiMessage) -> None:
        """Unknown ClickPhone* UserEvents are counted; money ones are a security event."""
        unknown = unsupported_user_event(message.headers)
        if unknown is None:
            return
        self.unsupported_user_events[unknown] += 1
        if is_money_user_event(unknown):
            self.money_user_events_refused += 1
            log.error(
                "security.money_user_event_refused", user_event=unknown, channel=message.get("Channel"),
                note="money never arrives over AMI; use the intake API",
            )  # fmt: skip
        else:
            log.warning("ami.unknown_user_event", user_event=unknown)

    def storage_outage(self) -> dict[str, Any] | None:
        """For ``status`` and ``/healthz``: None while the database takes the events' writes;
        else how long it has refused them, how many events are held and why."""
        since = self._storage_down_since
        if since is None:
            return None
        return {
            "seconds": round(time.monotonic() - since, 1),
            "held_events": self.held,
            "error": self.storage_error,
            "retry_in_seconds": self._retry.delay,
        }

    async def _apply(self, events: list[DomainEvent]) -> None:
        try:
            try:
                outcomes: list[bool | Exception] = await self._processor.handle_many(events)
            except Exception as exc:
                outcomes = [exc] * len(events)
            held = self._report(events, outcomes)
            if held:
                await self._hold(held)
        finally:
            self._events_in_flight -= len(events)
            self._room.set()

    def _report(self, events: Sequence[DomainEvent], outcomes: Sequence[bool | Exception]) -> list[DomainEvent]:
        """Log and count each event whose effects failed; return those the database could not
        take (to be held and retried), with the storage marked down."""
        held: list[DomainEvent] = []
        for event, outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, StorageUnavailable):
                held.append(event)
                self.storage_error = str(outcome)
            elif isinstance(outcome, Exception):
                self.effect_errors += 1
                log.error(
                    "ingest.effect_failed",
                    key=event.key,
                    error=repr(outcome),
                    exc_info=(type(outcome), outcome, outcome.__traceback__),
                )
        if held and self._storage_down_since is None:
            self._storage_down_since = time.monotonic()
            self.storage_outages += 1
            log.error(
                "ingest.storage_unavailable", error=self.storage_error, held=self.held + len(held),
                retry_in=self._retry.delay,
                action="holding the events and retrying; when the ingest queue fills, events are dropped and CDRs "
                "are reconciled from Master.csv",
            )  # fmt: skip
        return held

    async def _hold(self, events: list[DomainEvent]) -> None:
        """Retry ``events`` until the database takes them. Held groups retry one at a time in the
        order they failed, so effects still commit in stream order; only the first one waits
        between tries, and once it goes through the others follow at once. Their room in flight
        stays taken: the worker stops handing on, the queue takes the stream meanwhile."""
        self.held += len(events)
        try:
            async with self._retry_turn:
                while events:
                    if self._storage_down_since is not None:
                        await asyncio.sleep(self._retry.take())
                    self.storage_retries += 1
                    try:
                        outcomes: list[bool | Exception] = await self._processor.apply_many(events)
                    except Exception as exc:
                        outcomes = [exc] * len(events)
                    before = len(events)
                    events = self._report(events, outcomes)
                    self.held -= before - len(events)
                    if events:
                        log.warning(
                            "ingest.storage_still_unavailable", error=self.storage_error, held=self.held,
                            retry_in=self._retry.delay,
                        )  # fmt: skip
                    elif self._storage_down_since is not None:
                        self._recovered()
        except asyncio.CancelledError:
            # the daemon stops (its drain timed out) with the database still refusing
            self.held -= len(events)
            self.held_lost += len(events)
            log.error(
                "ingest.held_events_lost", events=len(events), keys=[e.key for e in events[:5]],
                action="CDRs among them are recovered from Master.csv at the next start",
            )  # fmt: skip
            raise

    def _recovered(self) -> None:
        assert self._storage_down_since is not None
        log.warning(
            "ingest.storage_recovered", seconds=round(time.monotonic() - self._storage_down_since, 1),
            still_held=self.held, retries=self.storage_retries,
        )  # fmt: skip
        self._storage_down_since = None
        self.storage_error = None
        self._retry.reset()
        self._on_storage_recovered()  # events the full queue dropped meanwhile: reconcile Master.csv
