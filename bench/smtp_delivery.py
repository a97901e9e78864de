"""Mail delivery bench: messages/s through the outbox against raw aiosmtplib, and commit→250 latency.

Everything runs on loopback against one aiosmtpd sink in its own process (so the sink's CPU is
not charged to either client). For each mail size (small notices, and 200 KB attachments with the
MIME built once and stored, as the sender does):

* **outbox**: N rows enqueued (in batches of 100), then ``OutboxSender`` started on the real clock
  until every row is marked sent (the DB update after each 250 included), at the default
  ``max_concurrency`` and at 1;
* **raw**: the same N messages sent with aiosmtplib over one reused connection, one after the
  other (what the sender would do with no outbox at all).

Each figure is the median of interleaved rounds (the machine is shared and noisy): the ratio of
medians outbox/raw is the figure to compare (goal >= 0.8 at the default concurrency). Then a
steady load: rows committed at a fixed rate, one transaction each, and the time from each COMMIT
to the sink's 250 — p50/p99/max.

Prints figures, never asserts timing. Bounded (well under 90 s): each phase has a deadline.

    .venv/bin/python bench/smtp_delivery.py [--small N] [--large N] [--rounds K] [--rate R] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from email.message import EmailMessage
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiosmtplib

from clickphone_agi.adapters.logging import configure_logging
from clickphone_agi.adapters.smtp import OutboxSender
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import SystemClock
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.delivery import ensure_headers, message_id
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.ports import WriteTx

DOMAIN = "clickphone.example"
TO = "ion.popescu@example.ro"
_MSGID = re.compile(rb"(?im)^message-id:\s*(<[^>]+>)")


# ---- the sink, in its own process ----------------------------------------------------------------


def _sink_main(conn: Connection) -> None:
    from aiosmtpd.smtp import SMTP

    received: dict[bytes, float] = {}

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            found = _MSGID.search(envelope.content[:4096])
            received[found.group(1) if found else str(len(received)).encode()] = time.monotonic()
            return "250 2.0.0 Ok: queued"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.local", data_size_limit=0), "127.0.0.1", 0
        )
        conn.send(server.sockets[0].getsockname()[1])
        done = asyncio.Event()

        def command() -> None:
            cmd = conn.recv()
            if cmd == "stop":
                done.set()
            elif cmd == "count":
                conn.send(len(received))
            elif cmd == "take":
                conn.send(dict(received))
                received.clear()

        loop.add_reader(conn.fileno(), command)
        await done.wait()
        server.close()

    asyncio.run(main())


class Sink:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sink_main, args=(child,), daemon=True)
        self._proc.start()
        self.port = int(self._conn.recv())

    def ask(self, cmd: str) -> Any:
        self._conn.send(cmd)
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send("stop")
        self._proc.join(5)


# ---- messages ------------------------------------------------------------------------------------


def build_mime(key: str, attachment: bytes | None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "ClickPhone <no-reply@clickphone.example>"
    msg["To"] = TO
    msg["Subject"] = "Mesaj vocal nou de la 0721***001"
    msg["Message-ID"] = message_id(key, DOMAIN)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("Aveți un mesaj vocal nou (0:42) în căsuța 100.\n" * 3)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="audio", subtype="wav", filename="msg0001.wav")
    return msg.as_bytes()


def messages(prefix: str, n: int, size: int) -> list[tuple[str, bytes]]:
    blob = bytes(range(256)) * (size // 256) if size else None
    return [(f"{prefix}:{i}", build_mime(f"{prefix}:{i}", blob)) for i in range(n)]


async def _fresh_store(folder: Path, name: str) -> SqliteStore:
    store = await SqliteStore.open(folder / f"{name}.db", SystemClock())
    store.start()
    return store


async def enqueue_all(store: SqliteStore, batch: list[tuple[str, bytes]]) -> None:
    now = SystemClock().now()
    rows = [
        OutboxMessage.build(
            key=k, kind="voicemail", recipient=TO, account="a1", mime=m, now=now, lifetime=timedelta(days=1)
        )
        for k, m in batch
    ]

    def unit(chunk: list[OutboxMessage]) -> Any:
        def work(tx: WriteTx) -> None:
            for row in chunk:
                tx.enqueue(row)

        return work

    for start in range(0, len(rows), 100):
        await store.write(unit(rows[start : start + 100]))


# ---- phases --------------------------------------------------------------------------------------


async def outbox_rate(folder: Path, sink: Sink, batch: list[tuple[str, bytes]], concurrency: int) -> float:
    store = await _fresh_store(folder, f"outbox-{uuid.uuid4().hex}")  # a new database per run
    cfg = SmtpConfig(host="127.0.0.1", port=sink.port, max_concurrency=concurrency, message_id_domain=DOMAIN)
    await enqueue_all(store, batch)
    sender = OutboxSender(store, SystemClock(), config=lambda: cfg, password=lambda: None)
    store.on_outbox = sender.wake
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(sender.run(stop))
    try:
        async with asyncio.timeout(25):
            while (await store.outbox_counts()).get("sent", 0) < len(batch):  # noqa: ASYNC110 - polls the DB
                await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await task
        await store.close()
    sink.ask("take")
    return len(batch) / elapsed


async def raw_rate(sink: Sink, batch: list[tuple[str, bytes]]) -> float:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False, local_hostname="bench.local")
    started = time.perf_counter()
    await smtp.connect()
    async with asyncio.timeout(25):
        for _, mime in batch:
            await smtp.sendmail("no-reply@clickphone.example", [TO], ensure_headers(mime, ""))
    await smtp.quit()
    elapsed = time.perf_counter() - started
    sink.ask("take")
    return len(batch) / elapsed


async def latency(folder: Path, sink: Sink, rate: float, seconds: float) -> dict[str, float]:
    store = await _fresh_store(folder, "latency")
    cfg = SmtpConfig(host="127.0.0.1", port=sink.port, message_id_domain=DOMAIN)
    sender = OutboxSender(store, SystemClock(), config=lambda: cfg, password=lambda: None)
    store.on_outbox = sender.wake
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop))
    committed: dict[bytes, float] = {}
    total = int(rate * seconds)
    mimes = messages("lat", total, 0)
    clock = SystemClock()
    try:
        begin = time.monotonic()
        for i, (key, mime) in enumerate(mimes):
            delay = begin + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            row = OutboxMessage.build(
                key=key, kind="voicemail", recipient=TO, account="a1", mime=mime, now=clock.now(), lifetime=timedelta(1)
            )
            await store.write(lambda tx, row=row: tx.enqueue(row))
            committed[message_id(key, DOMAIN).encode()] = time.monotonic()
        async with asyncio.timeout(20):
            while sink.ask("count") < total:  # noqa: ASYNC110 - polls the sink process
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await store.close()
    received = sink.ask("take")
    lat = sorted((received[k] - t) * 1000 for k, t in committed.items() if k in received)
    return {
        "messages": len(lat),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
    }


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def main(args: argparse.Namespace) -> None:
    configure_logging(level="error", fmt="console", stream=sys.stderr)
    sink = Sink()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="smtp-bench-") as tmp:
            folder = Path(tmp)
            print(f"loopback aiosmtpd sink in its own process (port {sink.port}); DB under {folder}")
            print(f"{args.rounds} interleaved rounds per figure (raw, outbox x4, outbox x1); median, [min-max]")
            for label, n, size in (("small (~1 KB)", args.small, 0), ("200 KB attachment", args.large, 200_000)):
                batch = messages(f"m{size}", n, size)
                raw: list[float] = []
                outbox: dict[int, list[float]] = {4: [], 1: []}
                for _ in range(args.rounds):
                    raw.append(await raw_rate(sink, batch))
                    for concurrency, rates in outbox.items():
                        rates.append(await outbox_rate(folder, sink, batch, concurrency))
                base = _median(raw)
                print(f"\n{label}: {n} messages, {len(batch[0][1]):,} bytes each")
                print(f"  raw aiosmtplib, one reused connection  {base:7.1f} msg/s  [{min(raw):.0f}-{max(raw):.0f}]")
                for concurrency, rates in outbox.items():
                    mid = _median(rates)
                    print(
                        f"  outbox sender, max_concurrency={concurrency}       {mid:7.1f} msg/s"
                        f"  [{min(rates):.0f}-{max(rates):.0f}]  ratio {mid / base:4.2f}x"
                    )
            figures = await latency(folder, sink, args.rate, args.seconds)
            print(
                f"\nsteady load {args.rate:g} msg/s for {args.seconds:g} s, one commit per row:"
                f" commit->250 p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms,"
                f" max {figures['max_ms']:.1f} ms ({figures['messages']:.0f} messages)"
            )
    finally:
        sink.close()
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=800, help="small messages per run (default 800)")
    parser.add_argument("--large", type=int, default=50, help="200 KB messages per run (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure (default 3)")
    parser.add_argument("--rate", type=float, default=50, help="steady-load messages per second (default 50)")
    parser.add_argument("--seconds", type=float, default=6, help="steady-load duration (default 6)")
    asyncio.run(main(parser.parse_args()))
