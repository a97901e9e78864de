"""Health: the one computation behind ``GET /healthz`` and ``clickphone-agi status``.

Healthy means the AMI link is up (when AMI is enabled) and the database takes a write. The age
of the oldest pending mail is reported, not judged: a relay outage shows there first, and the
operator's monitoring picks its own threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from clickphone_agi.ports import Store

log = structlog.get_logger(__name__)


async def database_writable(store: Store) -> bool:
    """A trivial unit of work: the single writer runs and commits."""
    try:
        await store.write(lambda tx: tx.now)
    except Exception as exc:
        log.warning("health.database_not_writable", error=repr(exc))
        return False
    return True


async def health(store: Store, ami: Mapping[str, Any] | None, mail: Mapping[str, Any]) -> dict[str, Any]:
    """``ami`` is the AMI client's snapshot (None when AMI is disabled); ``mail`` the outbox figures."""
    writable = await database_writable(store)
    ami_ok = ami is None or bool(ami.get("connected"))
    return {
        "ok": ami_ok and writable,
        "ami": None
        if ami is None
        else {
            "connected": bool(ami.get("connected")),
            "state": ami.get("state"),
            "since": ami.get("connected_since"),
        },
        "outbox_oldest_pending_age_seconds": mail.get("oldest_pending_age_seconds"),
        "database_writable": writable,
    }
