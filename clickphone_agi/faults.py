"""Test-only fault injection: SIGKILL the daemon at a named point of its code.

The crash test (``tests/chaos/``) proves that a process killed at the worst moments loses and
doubles nothing. Asking an outside process to kill the daemon "while a batch is between its last
statement and COMMIT" cannot hit that window reliably; a named point in the code can.
:func:`crash_point` marks such a window. It does nothing unless the daemon was armed with
``CLICKPHONE_AGI_CRASH_AT=<point>:<N>`` in its environment (read once, by
:meth:`clickphone_agi.app.Daemon.run`): then the N-th time the point is reached the process
writes one JSON line to stderr and sends itself SIGKILL — no ``finally``, no atexit, no flush,
exactly like the OOM killer or a power cut of the process.

Never set the variable in production. Unarmed, a point costs one global read and a comparison.
The state is module-global on purpose: points sit on the SQLite writer's thread and deep inside
adapters, and threading a test hook through every constructor would be worse than one global.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass

__all__ = ["ENV_VAR", "POINTS", "arm", "armed", "crash_point", "disarm", "parse"]

ENV_VAR = "CLICKPHONE_AGI_CRASH_AT"

#: Every point placed in the code, with the window it hits. Arming an unknown name is an error,
#: so a typo in a test schedule fails loudly instead of never firing.
POINTS: dict[str, str] = {
    "writer.after_unit": "a unit of work ran inside the batch's transaction; more may follow, no COMMIT yet",
    "writer.before_commit": "the batch's deferred rows are written, COMMIT not yet issued",
    "writer.after_commit": "COMMIT done; callers not told, the sender not woken for the new mail",
    "ingest.unit_applied": "a CDR claimed, recorded and charged inside its unit, before COMMIT",
    "ami.mid_frame": "the AMI reader holds half a frame; the frames before it are queued, not processed",
    "reconcile.row_applied": "a Master.csv row was applied; the cursor still points before it",
    "reconcile.cursor_saved": "a Master.csv pass saved its cursor; undecided missed calls are in memory",
    "notices.rendered": "a notice's MIME is rendered; its claim and outbox row not committed yet",
    "notices.scan_item": "the spool/fax scan is between two items",
    "smtp.before_data": "MAIL FROM and RCPT TO accepted, the message not transferred yet",
    "smtp.after_250": "the relay answered 250 to the message; the row is not marked sent yet",
    "smtp.after_mark_sent": "the row is marked sent and committed; after-send hooks not run yet",
}


@dataclass
class _Armed:
    name: str
    at: int
    hits: int = 0


_armed: _Armed | None = None
_lock = threading.Lock()  # the writer thread and the event loop both reach points


def parse(spec: str) -> tuple[str, int]:
    """``"writer.before_commit:3"`` → ``("writer.before_commit", 3)``; ValueError names the problem."""
    name, sep, count = spec.strip().rpartition(":")
    if not sep or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV_VAR}: expected '<point>:<N>' with N >= 1, got {spec!r}")
    if name not in POINTS:
        raise ValueError(f"{ENV_VAR}: unknown crash point {name!r} (known: {', '.join(sorted(POINTS))})")
    return name, int(count)


def arm(spec: str | None) -> None:
    """Arm from a ``<point>:<N>`` spec (the environment variable's value); None or '' disarms."""
    global _armed  # noqa: PLW0603 - the one switch of this test-only module (see the module doc)
    if not spec:
        _armed = None
        return
    name, at = parse(spec)
    _armed = _Armed(name, at)


def disarm() -> None:
    arm(None)


def armed() -> tuple[str, int, int] | None:
    """``(point, N, hits so far)`` when armed."""
    state = _armed
    return None if state is None else (state.name, state.at, state.hits)


def crash_point(name: str) -> None:
    """SIGKILL this process if armed for ``name`` and this is its N-th hit; otherwise nothing."""
    state = _armed
    if state is None or state.name != name:
        return
    with _lock:
        state.hits += 1
        if state.hits < state.at:
            return
    line = json.dumps({"event": "fault.crash_point", "point": name, "hit": state.hits, "pid": os.getpid()})
    # on a line of its own: this may run on the SQLite writer's thread while the event loop's
    # thread is half way through writing a log line (seen: the marker glued to a line's end)
    os.write(2, b"\n" + line.encode() + b"\n")
    os.kill(os.getpid(), signal.SIGKILL)
