"""One unit of work that applies a request's effects and records its Idempotency-Key with them.

The intake API's rule, shared by every endpoint that needs no mail rendered before its
transaction (consent, suppressions): a repeat with the same key and body gets the first answer,
the same key with another body is 409, and a request is never applied without its key recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.intake import ApiError, Reply


def replayed(found: tuple[str, int, str], digest: str) -> Reply:
    """The stored first response of a key, or 409 if it was used with another request."""
    stored_hash, status, response = found
    if stored_hash != digest:
        raise ApiError(409, "this Idempotency-Key was used with a different request", "Idempotency-Key")
    return Reply(status, json.loads(response))


async def run_once(
    store: Store, key: str, digest: str, effects: Callable[[WriteTx], dict[str, Any]], status: int = 200
) -> Reply:
    """Replay ``key`` if known, else run ``effects`` and record the key with its response, in one unit."""

    def unit(tx: WriteTx) -> Reply:
        found = tx.api_request(key)
        if found is not None:
            return replayed(found, digest)
        body = effects(tx)
        tx.record_api_request(key, digest, status, json.dumps(body, sort_keys=True))
        return Reply(status, body)

    return await store.write(unit)
