"""Account provisioning and manual adjustments as units of work (daemon or CLI writer)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from clickphone_agi.domain.accounts import Account, AccountConflict
from clickphone_agi.domain.charging import low_balance_notice
from clickphone_agi.ports import WriteTx
from clickphone_agi.services.money import low_balance_state, save_low_balance_state


class ImportRefused(ValueError):
    """A row of an import clashes with a stored account; nothing of the import was written.

    The message names the row as the operator wrote it: ``accounts.csv:3: dids: +40212345678
    already belongs to account acct1001``."""


class UnknownAccount(LookupError):
    """The account code names no stored account (an operator's typo, usually)."""


def import_unit(items: list[tuple[Account, int]], wheres: Sequence[str] = ()) -> Any:
    """Idempotent upsert of every account; an opening balance only for new accounts.

    ``wheres[i]`` says where item ``i`` was written (``accounts.csv:3: `` or ``accounts.yaml:24:
    accounts[1].``), so a clash with a stored account names the file, the line and the field; the
    unit then raises :class:`ImportRefused` and none of the items is stored.
    """

    def unit(tx: WriteTx) -> dict[str, Any]:
        created: list[str] = []
        updated: list[str] = []
        for index, (account, opening) in enumerate(items):
            stored = consent_for_upsert(tx, account, "import", "accounts import")
            try:
                is_new = tx.upsert_account(stored, opening)
            except AccountConflict as exc:
                where = wheres[index] if index < len(wheres) else f"{account.code}: "
                raise ImportRefused(f"{where}{exc.field}: {exc}") from None
            (created if is_new else updated).append(account.code)
        return {"created": created, "updated": updated}

    return unit


def adjust_unit(code: str, amount: int, reason: str, ref: str) -> Any:
    """A manual ledger adjustment with its reason; ``ref`` makes a retried command harmless.

    Raises :class:`ValueError` at once for a blank reason (the ledger row must say why) or a
    zero amount (it would book a row that moves nothing).
    """
    if not reason.strip():
        raise ValueError("reason: required (say why the balance moves)")
    if amount == 0:
        raise ValueError("amount: must not be 0")

    def unit(tx: WriteTx) -> dict[str, Any]:
        account = tx.get_account(code)
        if account is None:
            raise UnknownAccount(f"no account {code!r}")
        before = tx.balance(code)
        booked = tx.post_ledger(code, amount, "adjustment", ref, reason)
        after = tx.balance(code)
        if booked:
            # a correction moves the balance like a call or a top-up: one that takes it below the
            # threshold warns, one that lifts it back re-arms the warning for the next fall
            armed = low_balance_state(tx, code)
            notice, state = low_balance_notice(account, ref, before, after, armed)
            if notice is not None:
                tx.enqueue_notice(notice)
            save_low_balance_state(tx, code, armed, state)
        return {"account": code, "amount": amount, "booked": booked, "balance": after}

    return unit


def consent_for_upsert(tx: WriteTx, account: Account, source: str, how: str) -> Account:
    """An account about to be imported or PUT: the consent history decides ``marketing_consent``.

    Without any record the file's ``marketing_consent: true`` is recorded as a grant (policy
    version unknown; ``how`` says where it came from). With a history the account keeps what the
    history says: re-importing an old file never re-subscribes someone who unsubscribed. Consent
    changes go through the consent endpoint, the CLI ``consent`` verb or the unsubscribe link.
    """
    recorded = tx.consent(account.code)
    if recorded is None:
        if account.marketing_consent:
            tx.record_consent(account.code, True, source, None, json.dumps({"how": how, "ip": None}, sort_keys=True))
        return account
    return account if recorded == account.marketing_consent else replace(account, marketing_consent=recorded)
