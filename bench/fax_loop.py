"""What converting a received fax costs the event loop: in a thread (the baseline) against the
daemon's converter process (clickphone_agi.adapters.fax.FaxConverter).

A 1 ms ticker runs on the event loop while a fax is converted; the bench prints the gaps between
its ticks (p50, p99, max), the conversion's wall time and the CPU this process spent. The fax is
the recorded G3 fax's pages repeated (``--pages``, default 30) as one G3 TIFF. A gap is time the
loop could not run: a FastAGI session or an AMI read waits for as long. The converter's first
conversion (its process starting) is done before measuring, as in a daemon that has had a fax.

    .venv/bin/python bench/fax_loop.py [--pages 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from PIL import Image

from clickphone_agi.adapters.fax import FaxConverter, FaxDocument, tiff_to_pdf

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "spool" / "fax" / "received-g3.tif"


def build_fax(root: Path, pages: int) -> Path:
    """The sample's pages repeated to ``pages`` pages, G3 like ReceiveFAX writes."""
    shutil.copy(SAMPLE, root / "sample.tif")
    source = Image.open(SAMPLE)
    frames = []
    try:
        while True:
            frames.append(source.copy())
            source.seek(source.tell() + 1)
    except EOFError:
        pass
    frames = (frames * pages)[:pages]
    path = root / "big.tif"
    frames[0].save(
        path, save_all=True, append_images=frames[1:], compression="group3", dpi=source.info.get("dpi", (204, 196))
    )
    return path


async def measure(convert: Callable[[], Awaitable[FaxDocument]]) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    last = loop.time()
    running = True

    def tick() -> None:
        nonlocal last
        now = loop.time()
        gaps.append(now - last)
        last = now
        if running:
            loop.call_later(0.001, tick)

    tick()
    wall, cpu = time.perf_counter(), time.process_time()
    doc = await convert()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    running = False
    gaps.sort()
    return {
        "pages": doc.pages,
        "wall": wall,
        "cpu": cpu,
        "p50": gaps[len(gaps) // 2] * 1000,
        "p99": gaps[int(len(gaps) * 0.99)] * 1000,
        "max": gaps[-1] * 1000,
    }


async def run(args: argparse.Namespace, root: Path) -> None:
    path = build_fax(root, args.pages)
    converter = FaxConverter()
    try:
        await converter.convert(root / "sample.tif", root=root)  # the worker process starts
        rows: dict[str, list[dict[str, float]]] = {"thread (baseline)": [], "converter process": []}
        for _ in range(args.runs):
            rows["thread (baseline)"].append(await measure(lambda: asyncio.to_thread(tiff_to_pdf, path, root=root)))
            rows["converter process"].append(await measure(lambda: converter.convert(path, root=root)))
    finally:
        converter.close()
    print(f"python {sys.version.split()[0]}; a {args.pages}-page G3 fax; {args.runs} runs each, alternating; medians")
    print(f"{'':20} {'wall s':>7} {'our CPU s':>9} {'gap p50 ms':>10} {'gap p99 ms':>10} {'gap max ms':>10}")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "p50", "p99", "max")}
        print(
            f"{name:20} {med['wall']:7.2f} {med['cpu']:9.2f} {med['p50']:10.2f} {med['p99']:10.2f} {med['max']:10.2f}"
        )
    print("gap: time between the event loop's 1 ms ticks during the conversion; our CPU: this process only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(args, Path(d)))


if __name__ == "__main__":  # the converter's process (spawn) imports this module again
    main()
