"""AMI ingest throughput: plain panoramisk with a no-op handler vs. our ingest path to domain events.

One synthetic AMI stream (the event frames of recorded Asterisk 22 calls, repeated to N events)
is served over loopback TCP by a minimal fake Asterisk in a separate process, identical for both
clients: banner, the reply to their Login, then the whole stream as fast as the client reads,
then EOF. Measured, alternately, in the same run:

(a) panoramisk 1.4 ``Manager`` with one synchronous ``'*'`` handler that only counts;
(b) ours, as the daemon wires it: ``AmiClient`` → ``EventQueue.offer`` → ``IngestWorker``
    (correlate + translate) → a processor stub that counts domain events (no SQLite: storage
    has its own bench). Timed until every event is translated and every domain event handled.

Each run is timed from connect to the last event (connect and login on loopback take well
under a millisecond). A raw ``FrameParser`` loop over the same bytes (no socket, no asyncio)
is printed for context. Figures are measured in this run only (the machine is shared and
noisy): compare ratios, not absolute numbers. Nothing here fails on timing.

Usage: python bench/ami_ingest.py [--events N] [--runs R] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import re
import socket
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from zoneinfo import ZoneInfo

from panoramisk import Manager

from clickphone_agi.adapters.ami.client import AmiClient
from clickphone_agi.adapters.ami.protocol import FrameParser
from clickphone_agi.adapters.logging import configure_logging
from clickphone_agi.clock import SystemClock
from clickphone_agi.config.schema import AmiConfig
from clickphone_agi.domain.ami_translate import TranslateContext
from clickphone_agi.domain.events import DomainEvent
from clickphone_agi.services.ingest import EventProcessor, EventQueue, IngestWorker
from clickphone_agi.sim.ami_server import DEFAULT_BANNER, load_transcript, packaged_scenarios

HOST = "127.0.0.1"
USERNAME = "bench"
SECRET = "bench-secret"  # loopback fake server only
EVENTS = cast(str, AmiConfig.model_fields["events"].default)
QUEUE_SIZE = cast(int, AmiConfig.model_fields["queue_size"].default)
CONTEXT = TranslateContext(system_name="bench", timezone=ZoneInfo("Europe/Bucharest"))

#: One cycle of the stream: every recorded call once (``full_noise`` adds Newexten/VarSet).
#: ``shutdown`` is left out: panoramisk drops the link on it, and ours logs it.
MIX = (
    "answered_call",
    "missed_call",
    "busy_call",
    "voicemail",
    "fax",
    "fax_failed",
    "long_call",
    "full_noise",
    "user_event",
)
#: ``Uniqueid``/``Linkedid``/``DestUniqueid``/``UniqueID``/… lines: rewritten per cycle so every
#: repetition is a new call (distinct Cdr keys, a correlator that grows as in production).
_ID_LINE = re.compile(rb"(?im)^([a-z]*(?:uniqueid|linkedid): )([0-9]+)\.([0-9]+)(?=\r\n)")
_POLL = 0.001  # seconds between completion checks; the same for both clients
_END = b"\r\n\r\n"
_LOGIN_OK = b"Response: Success\r\nActionID: %s\r\nMessage: Authentication accepted\r\n\r\n"


# -- the stream ---------------------------------------------------------------------------------


def build_stream(n: int) -> tuple[bytes, Counter[str]]:
    """``n`` event frames, bytes as recorded apart from the per-cycle id rewrite."""
    scenarios = packaged_scenarios()
    frames = [f for name in MIX for f in load_transcript(scenarios[name]).replay_frames]
    kinds = [f.message.event or "" for f in frames]
    raws = [f.raw for f in frames]

    def cycle(k: int, count: int) -> bytes:
        return _ID_LINE.sub(
            lambda m: b"%s%s.%d" % (m.group(1), m.group(2), int(m.group(3)) + 1000 * k), b"".join(raws[:count])
        )

    full, rest = divmod(n, len(raws))
    parts = [cycle(k, len(raws)) for k in range(full)]
    if rest:
        parts.append(cycle(full, rest))
    mix: Counter[str] = Counter()
    for kind in kinds:
        mix[kind] += full
    for kind in kinds[:rest]:
        mix[kind] += 1
    return b"".join(parts), mix


# -- the fake Asterisk (a separate process, so it does not compete for the client's GIL) ---------


def _action_id(action: bytes) -> bytes:
    for line in action.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"actionid":
            return value.strip()
    return b""


def _read_action(conn: socket.socket) -> bytes | None:
    buf = b""
    while _END not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    return buf


def _serve(listener: socket.socket, stream: bytes) -> None:
    """One client at a time: banner, Login reply, the stream, EOF; then wait for its close."""
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                conn.sendall(DEFAULT_BANNER)
                login = _read_action(conn)
                if login is not None:
                    conn.sendall(_LOGIN_OK % _action_id(login))
                    conn.sendall(stream)
                    conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # Logoff and the like, until the client closes
                    pass
            except OSError:
                pass


def start_server(stream: bytes) -> tuple[multiprocessing.process.BaseProcess, int]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(8)
    port = int(listener.getsockname()[1])
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    proc = ctx.Process(target=_serve, args=(listener, stream), daemon=True, name="fake-asterisk")
    proc.start()
    listener.close()
    return proc, port


# -- the runs -----------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # wall clock
    cpu: float  # this process only: the fake Asterisk runs in another one
    events: int
    complete: bool
    note: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.events / self.cpu if self.cpu > 0 else 0.0


async def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.perf_counter() + timeout
    while not done():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def run_panoramisk(port: int, n: int, timeout: float) -> Run:
    count = 0

    def on_event(_manager: object, _event: object) -> None:
        nonlocal count
        count += 1

    lost = asyncio.Event()
    quiet = logging.getLogger("bench.panoramisk")
    quiet.disabled = True  # its "Connection lost" at EOF would go to stderr
    manager = Manager(
        loop=asyncio.get_running_loop(),
        host=HOST,
        port=port,
        username=USERNAME,
        secret=SECRET,
        events=EVENTS,
        ping_delay=3600,  # no Ping during the run
        ping_interval=3600,
        reconnect_timeout=3600,  # no reconnect after the stream's EOF
        log=quiet,
        on_disconnect=lambda *_: lost.set(),
    )
    manager.register_event("*", on_event)
    start, cpu = time.perf_counter(), time.process_time()
    manager.connect()
    finished = await _wait(lambda: count >= n or lost.is_set(), timeout)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    manager.close()
    await asyncio.sleep(0)
    note = "" if finished else f"timed out after {timeout:g} s"
    return Run(elapsed, cpu, count, finished and count >= n, note)


class CountingProcessor:
    """Stands in for :class:`EventProcessor`: counts the domain events, stores nothing."""

    def __init__(self) -> None:
        self.handled: Counter[str] = Counter()

    async def handle_many(self, events: list[DomainEvent]) -> list[bool | Exception]:
        for event in events:
            self.handled[type(event).__name__] += 1
        return [True] * len(events)


async def run_ours(port: int, n: int, timeout: float) -> tuple[Run, Counter[str], int]:
    processor = CountingProcessor()
    queue = EventQueue(QUEUE_SIZE, on_overflow=lambda: None)
    worker = IngestWorker(queue, cast(EventProcessor, processor), CONTEXT)
    client = AmiClient(
        HOST,
        port,
        USERNAME,
        SECRET,
        EVENTS,
        SystemClock(),
        queue.offer,
        ping_interval=3600,  # no Ping during the run
        ping_timeout=3600,
        backoff_initial=3600,  # no reconnect after the stream's EOF
        backoff_max=3600,
    )
    stop = asyncio.Event()
    start, cpu = time.perf_counter(), time.process_time()
    working = asyncio.create_task(worker.run())
    reading = asyncio.create_task(client.run(stop))
    finished = await _wait(lambda: worker.events_by_type.total() >= n or client.disconnects > 0, timeout)
    if finished:
        queue.close()  # the worker drains what is queued, then waits for its in-flight effects
        await working
    else:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    stop.set()
    await reading
    count = worker.events_by_type.total()
    note = "" if finished else f"timed out after {timeout:g} s"
    if queue.dropped:
        note = f"{note} {queue.dropped} dropped (queue full)".strip()
    return Run(elapsed, cpu, count, finished and count >= n, note), processor.handled, queue.high_water


def parse_only(stream: bytes, chunk: int = 65536) -> Run:
    """The parser alone over the same bytes, fed in socket-sized pieces."""
    parser = FrameParser(expect_banner=False)
    count = 0
    start, cpu = time.perf_counter(), time.process_time()
    for offset in range(0, len(stream), chunk):
        count += len(parser.feed(stream[offset : offset + chunk]))
    return Run(time.perf_counter() - start, time.process_time() - cpu, count, True)


# -- report -------------------------------------------------------------------------------------


def _median_rate(runs: list[Run]) -> float:
    return statistics.median(r.rate for r in runs)


def _median_cpu_rate(runs: list[Run]) -> float:
    return statistics.median(r.cpu_rate for r in runs)


def _runs_text(runs: list[Run]) -> str:
    parts = []
    for r in runs:
        text = f"{r.rate:.0f}"
        if not r.complete:
            text += f" [{r.events} events; {r.note or 'incomplete'}]"
        elif r.note:
            text += f" [{r.note}]"
        parts.append(text)
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=60_000, help="events in the stream (default 60000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each client, alternating (default 3)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds before a run is cut short (default 15)")
    args = parser.parse_args()
    if args.events < 1 or args.runs < 1 or args.timeout <= 0:
        parser.error("--events and --runs must be >= 1 and --timeout > 0")
    warnings.simplefilter("ignore")  # panoramisk is not maintained for current Pythons
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        configure_logging(level="warning", fmt="json", stream=devnull)
        _bench(args.events, args.runs, args.timeout)


def _bench(n: int, runs: int, timeout: float) -> None:
    stream, mix = build_stream(n)
    server, port = start_server(stream)
    bases: list[Run] = []
    theirs: list[Run] = []
    ours: list[Run] = []
    domain: Counter[str] = Counter()
    high_water = 0
    try:
        for _ in range(runs):
            gc.collect()
            bases.append(parse_only(stream))
            gc.collect()
            theirs.append(asyncio.run(run_panoramisk(port, n, timeout)))
            gc.collect()
            run, domain, water = asyncio.run(run_ours(port, n, timeout))
            ours.append(run)
            high_water = max(high_water, water)
    finally:
        server.terminate()
        server.join(5)

    def share(*kinds: str) -> str:
        return f"{100 * sum(mix[k] for k in kinds) / n:.1f}%"

    base_rate, a, b = _median_rate(bases), _median_rate(theirs), _median_rate(ours)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; panoramisk 1.4 vs clickphone_agi")
    print(
        f"events per run: {n} ({len(stream) / 1e6:.1f} MB; {len(MIX)} recorded sessions repeated: Cdr {share('Cdr')},"
        f" Hangup {share('Hangup')}, DialEnd {share('DialEnd')}, Newexten+VarSet {share('Newexten', 'VarSet')})"
    )
    print(f"{runs} rounds of (baseline, a, b); medians below; loopback TCP to a fake Asterisk in another process")
    print(f"baseline FrameParser only, no socket   : {base_rate:9.0f} events/s  (1.00x)")
    print(f"(a) panoramisk, no-op '*' handler      : {a:9.0f} events/s  ({a / base_rate:.2f}x baseline)")
    print(
        f"(b) ours, AmiClient → queue → translate: {b:9.0f} events/s  ({b / base_rate:.2f}x baseline,"
        f" {b / a:.2f}x panoramisk; goal >= 0.80x)"
    )
    print(f"runs (events/s): (a) {_runs_text(theirs)} | (b) {_runs_text(ours)}")
    ca, cb = _median_cpu_rate(theirs), _median_cpu_rate(ours)
    print(
        f"per CPU second of the client process (the server excluded): baseline {_median_cpu_rate(bases):.0f},"
        f" (a) {ca:.0f}, (b) {cb:.0f} events/s  ((b) = {cb / ca:.2f}x (a))"
    )
    print(
        f"(b) domain events per run: {domain.total()} ({', '.join(f'{k} {v}' for k, v in domain.most_common())});"
        f" queue high water {high_water} of {QUEUE_SIZE}"
    )


if __name__ == "__main__":
    main()
