"""The crash test: the real daemon SIGKILLed at least 20 times while a fake Asterisk keeps calling.

CI variant (default): 40 starts, each armed with one fixed crash point (``CLICKPHONE_AGI_CRASH_AT``),
chosen to hit the dangerous windows — inside a batch before COMMIT, after COMMIT before the mail is
sent, between the relay's 250 and marking the row sent, mid AMI frame, during the Master.csv
reconciliation and the spool scan. Long variant (``CLICKPHONE_CHAOS_LONG=1``): SIGKILL from outside at seeded random
moments 0.3-1 s after each start is ready (``CLICKPHONE_CHAOS_SEED`` to replay a run).

After the last start drains, the database and the mail sink must show: every account's balance and
daily spend exactly as computed here from the generated calls, each CDR charged once, ledger sum ==
balance, every expected mail at least once, duplicates at most kills / 4, no unexpected mail, and
``PRAGMA integrity_check`` ok. See tests/chaos/README.md.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.driver import ChaosConfig, ChaosRun, Report, env_flag, report_dir, write_report

LONG = env_flag("CLICKPHONE_CHAOS_LONG")

# Every window three or four times, at different depths into a start (N = the N-th time the point
# is reached since that start). Forty kills: duplicates are allowed up to kills / 4, and the three
# kills between a 250 and its row's update make at least one each; see README.md.
SCHEDULE = (
    "writer.before_commit:40",
    "smtp.after_250:4",
    "ami.mid_frame:12",
    "reconcile.row_applied:25",
    "notices.rendered:6",
    "writer.after_commit:50",
    "smtp.before_data:5",
    "ingest.unit_applied:20",
    "reconcile.cursor_saved:2",
    "notices.scan_item:3",
    "writer.after_unit:100",
    "smtp.after_mark_sent:6",
    "writer.before_commit:90",
    "notices.scan_item:9",
    "reconcile.row_applied:70",
    "smtp.after_250:12",
    "writer.after_commit:120",
    "ami.mid_frame:40",
    "ingest.unit_applied:45",
    "notices.rendered:15",
    "reconcile.cursor_saved:3",
    "smtp.before_data:14",
    "writer.after_unit:250",
    "smtp.after_mark_sent:15",
    "reconcile.cursor_saved:1",
    "ami.mid_frame:5",
    "writer.before_commit:150",
    "notices.scan_item:20",
    "smtp.after_250:30",
    "ingest.unit_applied:80",
    "reconcile.row_applied:150",
    "writer.after_commit:200",
    "notices.rendered:30",
    "smtp.before_data:30",
    "writer.after_unit:500",
    "ami.mid_frame:25",
    "reconcile.cursor_saved:4",
    "smtp.after_mark_sent:30",
    "writer.before_commit:300",
    "notices.scan_item:40",
)


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cpchaos-", dir="/tmp"))  # short: it holds a unix socket


async def _run(cfg: ChaosConfig, mode: str, chaos_report: Callable[[str], None]) -> Report:
    workdir = _workdir()
    report = await ChaosRun(workdir, cfg, mode).run()
    out = report_dir()
    write_report(report, out / f"chaos-{mode}.json")
    chaos_report(f"{report.summary()} report={out / f'chaos-{mode}.json'}")
    return report


def _check(report: Report) -> None:
    kills = len(report.kills)
    assert kills >= 20, f"only {kills} kills"
    assert not report.unreached, f"crash points never reached: {report.unreached}"
    assert not report.problems, "\n".join(report.problems)
    assert not report.missing, f"{len(report.missing)} expected mails never arrived: {report.missing[:10]}"
    assert not report.unexpected, f"{len(report.unexpected)} unexpected mails: {report.unexpected[:10]}"
    assert report.duplicate_count <= kills / 4, f"{report.duplicate_count} duplicates for {kills} kills"
    assert report.final_exit == 0, f"the last start did not stop cleanly: {report.final_exit}"
    if not env_flag("CLICKPHONE_CHAOS_KEEP"):
        shutil.rmtree(report.workdir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_sigkill_at_fixed_crash_points_loses_and_doubles_nothing(chaos_report: Callable[[str], None]) -> None:
    cfg = ChaosConfig(min_calls=1500, calls_per_second=14.0, schedule=SCHEDULE, seed=7)
    report = await _run(cfg, "fixed", chaos_report)
    assert [k.how for k in report.kills] == ["crash_point"] * len(SCHEDULE)
    _check(report)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not LONG, reason="long variant: set CLICKPHONE_CHAOS_LONG=1")
async def test_sigkill_at_random_moments_loses_and_doubles_nothing(chaos_report: Callable[[str], None]) -> None:
    seed = int(os.environ.get("CLICKPHONE_CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
    kills = int(os.environ.get("CLICKPHONE_CHAOS_KILLS") or 150)
    calls = int(os.environ.get("CLICKPHONE_CHAOS_CALLS") or 3000)
    chaos_report(f"seed {seed} (replay with CLICKPHONE_CHAOS_SEED={seed})")
    # 10 calls/s, ~4 mails/s: each kill lands within a second of a start, while the sender works
    # off what the previous life left; duplicates per kill grow with that mail rate (README.md)
    cfg = ChaosConfig(min_calls=calls, calls_per_second=10.0, random_kills=kills, seed=seed)
    _check(await _run(cfg, "random", chaos_report))
