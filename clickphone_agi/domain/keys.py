"""Idempotency keys: the identity of each event across restarts, reconnects and replays.

Keys never contain times (AMI Cdr times are local, Master.csv may be GMT) and always contain
Asterisk's ``systemname`` so several nodes can share one database.
"""

from __future__ import annotations


def _clean(part: str) -> str:
    return "".join(c for c in part if c.isprintable() and c != ":")[:120]


def cdr_key(system_name: str, unique_id: str, destination_channel: str) -> str:
    """One CDR: UniqueID alone is shared by a ring group's forked CDRs, so add the far channel."""
    return f"cdr:{_clean(system_name)}:{_clean(unique_id)}:{_clean(destination_channel)}"
