"""Account provisioning and manual adjustments as units of work (daemon or CLI writer)."""

from __future__ import annotations

from typing import Any

from clickphone_agi.domain.accounts import Account
from clickphone_agi.ports import WriteTx


def import_unit(items: list[tuple[Account, int]]) -> Any:
    """Idempotent upsert of every account; an opening balance only for new accounts."""

    def unit(tx: WriteTx) -> dict[str, Any]:
        created: list[str] = []
        updated: list[str] = []
        for account, opening in items:
            (created if tx.upsert_account(account, opening) else updated).append(account.code)
        return {"created": created, "updated": updated}

    return unit


def adjust_unit(code: str, amount: int, reason: str, ref: str) -> Any:
    """A manual ledger adjustment with its reason; ``ref`` makes a retried command harmless."""

    def unit(tx: WriteTx) -> dict[str, Any]:
        if tx.get_account(code) is None:
            raise LookupError(f"no account {code!r}")
        booked = tx.post_ledger(code, amount, "adjustment", ref, reason)
        return {"account": code, "amount": amount, "booked": booked, "balance": tx.balance(code)}

    return unit
