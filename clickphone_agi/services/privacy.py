"""Data rights: ``privacy export`` (everything held about an account) and ``privacy erase``.

Both run in the daemon (control socket) or, with the daemon stopped, in the CLI as the writer;
the SQL is in :mod:`clickphone_agi.adapters.storage.privacy`, the rules in
:mod:`clickphone_agi.domain.privacy`. An erasure is one unit of work — the account can never be
seen half-erased — followed by a WAL checkpoint, so the old page images leave the ``-wal`` file
too (``secure_delete`` already zeroes what is deleted in the database file).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog

from clickphone_agi.adapters.storage.privacy import ErasureDeferred
from clickphone_agi.clock import Clock
from clickphone_agi.domain.charging import Numbering
from clickphone_agi.domain.privacy import number_forms
from clickphone_agi.ports import Store

log = structlog.get_logger(__name__)

_ATTEMPTS = 10


class UnknownAccount(LookupError):
    """No account with that code."""


def forms_for(numbering: Numbering) -> Callable[[str], tuple[str, ...]]:
    """How a DID is looked for in CDRs under this numbering plan."""
    return partial(
        number_forms,
        country_code=numbering.country_code,
        national_prefix=numbering.national_prefix,
        international_prefix=numbering.international_prefix,
    )


async def export_account(store: Store, clock: Clock, code: str, numbering: Numbering) -> dict[str, Any]:
    """Everything stored about ``code`` as JSON-ready data; :class:`UnknownAccount` if none."""
    found = await store.export_account(code, forms_for(numbering))
    if found is None:
        raise UnknownAccount(f"no account {code!r}")
    log.info("privacy.exported", account=code, cdrs=len(found["cdrs"]), mails=len(found["outbox"]))
    return {"generated_at": clock.now().isoformat(), **found}


async def erase_account(store: Store, code: str, numbering: Numbering) -> dict[str, Any]:
    """Anonymise ``code`` (money totals kept), then checkpoint the WAL; :class:`UnknownAccount` if none."""
    outbox_ids, seen_up_to = await store.erasure_candidates(code)
    salt = os.urandom(16)  # links the rows of one call to each other, then is forgotten
    forms = forms_for(numbering)
    done: dict[str, Any] | None = None
    for _ in range(_ATTEMPTS):
        try:
            done = await store.write(
                lambda tx: tx.erase_account(
                    code, forms=forms, outbox_ids=outbox_ids, outbox_seen_up_to=seen_up_to, salt=salt
                )
            )
        except ErasureDeferred:
            await asyncio.sleep(0.01)  # the batch holding the account's deferred rows commits first
            continue
        break
    else:
        raise RuntimeError(f"{code}: the account kept receiving charges; erase again")
    if done is None:
        raise UnknownAccount(f"no account {code!r}")
    busy, frames, copied = await store.checkpoint()
    done["wal_checkpoint"] = {"complete": busy == 0, "frames": frames, "checkpointed": copied}
    log.info("privacy.erased", **{k: v for k, v in done.items() if k != "wal_checkpoint"}, wal_complete=busy == 0)
    if busy:
        log.warning("privacy.checkpoint_incomplete", account=code, note="a reader held the WAL; it empties later")
    return done
