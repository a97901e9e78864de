"""The test-only fault injector: inert unless armed, exact about which hit kills, loud about typos."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clickphone_agi import faults


def test_unarmed_points_do_nothing() -> None:
    faults.disarm()
    for name in faults.POINTS:
        faults.crash_point(name)
    assert faults.armed() is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("writer.before_comit:1", "unknown crash point 'writer.before_comit'"),
        ("writer.before_commit", "expected '<point>:<N>'"),
        ("writer.before_commit:0", "expected '<point>:<N>'"),
        ("writer.before_commit:x", "expected '<point>:<N>'"),
    ],
)
def test_a_bad_spec_is_refused_with_the_reason(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        faults.arm(spec)
    assert faults.armed() is None


def test_other_points_and_earlier_hits_do_not_kill() -> None:
    faults.arm("smtp.after_250:3")
    try:
        faults.crash_point("writer.before_commit")
        faults.crash_point("smtp.after_250")
        faults.crash_point("smtp.after_250")
        assert faults.armed() == ("smtp.after_250", 3, 2)
    finally:
        faults.disarm()


def test_the_nth_hit_sigkills_the_process_and_says_where() -> None:
    script = (
        "from clickphone_agi import faults\n"
        "faults.arm('smtp.after_250:2')\n"
        "faults.crash_point('smtp.after_250')\n"
        "print('first hit survived', flush=True)\n"
        "faults.crash_point('smtp.after_250')\n"
        "print('second hit survived', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == -9
    assert proc.stdout == "first hit survived\n"
    line = json.loads(proc.stderr.strip().splitlines()[-1])
    assert (line["event"], line["point"], line["hit"]) == ("fault.crash_point", "smtp.after_250", 2)
