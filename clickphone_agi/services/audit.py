"""The notification audit trail: what was queued for an account, its outcome and the SMTP reply.

Read from the outbox, never the bodies (they are purged by retention anyway); newest first,
paged with ``before`` (the smallest id of the previous page).
"""

from __future__ import annotations

from typing import Any

from clickphone_agi.domain.outbox import OutboxRow, OutboxStatus
from clickphone_agi.ports import Store
from clickphone_agi.services.intake import ApiError, Reply

MAX_LIMIT = 200


def _int(raw: str | None, name: str, default: int | None, low: int, high: int) -> int | None:
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"expected a whole number from {low} to {high}", name)
    return int(raw)


def row_json(row: OutboxRow) -> dict[str, Any]:
    suppressed = row.status is OutboxStatus.DEAD and (row.last_error or "").startswith("suppressed:")
    return {
        "id": row.id,
        "kind": row.kind,
        "recipient": row.recipient,
        "created_at": row.created_at.isoformat(),
        "status": "suppressed" if suppressed else str(row.status),
        "attempts": row.attempts,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "smtp_reply": row.smtp_reply,
        "last_error": row.last_error,
    }


async def notifications(store: Store, code: str, limit: str | None, before: str | None) -> Reply:
    count = _int(limit, "limit", 50, 1, MAX_LIMIT)
    below = _int(before, "before", None, 1, 2**62)
    assert count is not None
    if await store.write(lambda tx: tx.get_account(code)) is None:
        raise ApiError(404, f"no account {code!r}", None)
    rows = await store.notifications(code, count, below)
    return Reply(
        200,
        {
            "account": code,
            "notifications": [row_json(r) for r in rows],
            "next_before": rows[-1].id if len(rows) == count else None,
        },
    )
