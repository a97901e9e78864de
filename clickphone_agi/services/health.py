"""Health: the one computation behind ``GET /healthz`` and ``clickphone-agi status``.

Healthy means the AMI link is up (when AMI is enabled), the database takes a write, and the
ingest holds no events the database refused (a full disk). The age of the oldest pending mail is
reported, not judged: a relay outage shows there first, and the operator's monitoring picks its
own threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from clickphone_agi.ports import Store, WriteTx

log = structlog.get_logger(__name__)


PROBE_KEY = "health_probe"


async def database_writable(store: Store) -> bool:
    """A unit of work that writes one row: the single writer runs and commits. (A transaction that
    writes nothing commits on a full disk too.)"""

    def probe(tx: WriteTx) -> None:
        tx.set_meta(PROBE_KEY, tx.now.isoformat())

    try:
        await store.write(probe, durable=False)  # the WAL write fails on a full disk all the same
    except Exception as exc:
        log.warning("health.database_not_writable", error=repr(exc))
        return False
    return True


async def health(
    store: Store,
    ami: Mapping[str, Any] | None,
    mail: Mapping[str, Any],
    storage_outage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``ami`` is the AMI client's snapshot (None when AMI is disabled); ``mail`` the outbox figures;
    ``storage_outage`` the ingest's events held for want of storage (None: none)."""
    writable = await database_writable(store)
    ami_ok = ami is None or bool(ami.get("connected"))
    return {
        "ok": ami_ok and writable and storage_outage is None,
        "ami": None
        if ami is None
        else {
            "connected": bool(ami.get("connected")),
            "state": ami.get("state"),
            "since": ami.get("connected_since"),
        },
        "outbox_oldest_pending_age_seconds": mail.get("oldest_pending_age_seconds"),
        "database_writable": writable,
        "storage_outage": None if storage_outage is None else dict(storage_outage),
    }
