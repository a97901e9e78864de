"""The soak: AMI events through the running daemon, RSS sampled every second (tests/chaos/README.md).

CI runs 100,000 events; ``CLICKPHONE_CHAOS_LONG=1`` runs the full 1,000,000 (``CLICKPHONE_SOAK_EVENTS``
overrides either). Both print the same figures: RSS peak, mid, end and growth over the second half,
the ingest queue's high water and drops, and the charged CDRs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.driver import env_flag, report_dir
from tests.chaos.soak import Soak

LONG = env_flag("CLICKPHONE_CHAOS_LONG")
EVENTS = int(os.environ.get("CLICKPHONE_SOAK_EVENTS") or (1_000_000 if LONG else 100_000))
RATE = float(os.environ.get("CLICKPHONE_SOAK_RATE") or 5000)


@pytest.mark.slow
@pytest.mark.timeout(3600 if LONG else 300)
async def test_soak_memory_stays_flat_and_every_cdr_is_charged_once(chaos_report: Callable[[str], None]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cpsoak-", dir="/tmp"))
    report = await Soak(workdir, EVENTS, RATE).run()
    out = report_dir()
    (out / "soak.json").write_text(json.dumps(report.as_json(), indent=1) + "\n")
    chaos_report(f"{report.summary()} report={out / 'soak.json'}")

    assert not report.problems, "\n".join(report.problems)
    assert report.events_sent >= EVENTS
    assert report.charged == report.billing_cdrs > 0
    assert report.queue["dropped"] == 0
    assert report.queue["high_water"] < report.queue["max"]
    # The goals (peak < 100 MB, growth < 5 %) are reported in the summary, not asserted:
    # a 100,000-event run is still filling its bounded structures (the missed-call grace alone is
    # 30 s), so only the 1,000,000-event run speaks to them (tests/chaos/README.md).
    # This only guards against a leak: 100 bytes kept per event would pass it by far.
    assert report.peak_mb < 150, f"RSS peak {report.peak_mb:.1f} MB"
    if not env_flag("CLICKPHONE_CHAOS_KEEP"):
        shutil.rmtree(workdir, ignore_errors=True)
