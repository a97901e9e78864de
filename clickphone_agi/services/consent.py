"""Marketing consent, one-click unsubscribe and the marketing suppression list (transport-neutral).

Consent is appended, never overwritten: each grant or withdrawal records when (the transaction's
time), how (the channel — api, cli, unsubscribe, import — and the caller's own words), under
which privacy-policy version, and the caller's address as evidence. The account's
``marketing_consent`` mirrors the newest record in the same transaction. Withdrawing takes the
same single call as granting (GDPR art. 7(3)); the suppression list wins over any consent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from clickphone_agi.domain.accounts import Account, check_email
from clickphone_agi.domain.consent import MAX_HOW, ConsentRecord, check_policy_version
from clickphone_agi.domain.unsubscribe import ForgedToken, MalformedToken, Unsubscribe, verify_token
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.idempotency import run_once
from clickphone_agi.services.intake import ApiError, Reply

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ConsentSettings:
    timezone: str = "Europe/Bucharest"
    unsubscribe_secret: bytes | None = None


def _one_line(raw: Any, field: str, limit: int = MAX_HOW) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip() or len(raw) > limit or any(ord(c) < 32 for c in raw):
        raise ApiError(400, f"expected one line of text (at most {limit} characters)", field)
    return raw.strip()


def _evidence(how: str | None, ip: str) -> str:
    return json.dumps({"how": how, "ip": ip or None}, sort_keys=True, ensure_ascii=False)


def record_json(record: ConsentRecord) -> dict[str, Any]:
    evidence = json.loads(record.evidence) if record.evidence else {}
    return {
        "id": record.id,
        "marketing": record.granted,
        "recorded_at": record.recorded_at.isoformat(),
        "source": record.source,
        "how": evidence.get("how"),
        "ip": evidence.get("ip"),
        "policy_version": record.policy_version,
    }


def apply_consent(
    tx: WriteTx, account: Account, granted: bool, *, source: str, policy_version: str | None, evidence: str | None
) -> ConsentRecord:
    """Append the record and mirror it on the account (same transaction)."""
    record = tx.record_consent(account.code, granted, source, policy_version, evidence)
    if account.marketing_consent != granted:
        tx.upsert_account(replace(account, marketing_consent=granted), 0)
    return record


class ConsentService:
    """Consent changes, the one-click unsubscribe and the suppression list (see the module doc)."""

    def __init__(self, store: Store, settings: Callable[[], ConsentSettings]) -> None:
        self._store = store
        self._settings = settings
        self.changes: dict[str, int] = {"granted": 0, "withdrawn": 0}
        self.unsubscribes = 0
        self.unsubscribe_refused = 0

    def _today(self, now: datetime) -> str:
        return now.astimezone(ZoneInfo(self._settings().timezone)).date().isoformat()

    async def put_consent(
        self, key: str, digest: str, code: str, body: Any, caller_ip: str, *, source: str = "api"
    ) -> Reply:
        """``{"marketing": true|false, "how": "...", "policy_version": "..."}`` → a new record."""
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object", None)
        for name in body:
            if name not in ("marketing", "how", "policy_version"):
                raise ApiError(400, f"unknown field {name!r}", str(name))
        granted = body.get("marketing")
        if not isinstance(granted, bool):
            raise ApiError(400, "expected true (grant) or false (withdraw)", "marketing")
        how = _one_line(body.get("how"), "how")
        version = _one_line(body.get("policy_version"), "policy_version", 40)
        if version is not None:
            try:
                check_policy_version(version)
            except ValueError as exc:
                raise ApiError(400, str(exc), "policy_version") from None

        def effects(tx: WriteTx) -> dict[str, Any]:
            account = tx.get_account(code)
            if account is None:
                raise ApiError(404, f"no account {code!r}", None)
            if account.erased:  # a record would keep the caller's IP about an erased account
                raise ApiError(410, f"account {code!r} was erased (privacy erase): its consent is not recorded", None)
            if version is not None and tx.policy(version) is None:
                raise ApiError(400, f"no published policy version {version!r}", "policy_version")
            in_force = version or tx.policy_in_force(self._today(tx.now))
            evidence = _evidence(how, caller_ip)
            record = apply_consent(tx, account, granted, source=source, policy_version=in_force, evidence=evidence)
            return {"account": code, **record_json(record)}

        reply = await run_once(self._store, key, digest, effects)
        self.changes["granted" if granted else "withdrawn"] += 1
        log.info("consent.recorded", account=code, marketing=granted, source=source)
        return reply

    async def history(self, code: str) -> Reply:
        account = await self._store.write(lambda tx: tx.get_account(code))
        if account is None:
            raise ApiError(404, f"no account {code!r}", None)
        records = await self._store.consent_history(code)
        suppressed = await self._store.marketing_suppression(account.email)
        current = records[0].granted if records else False
        return Reply(
            200,
            {
                "account": code,
                "marketing": current and suppressed is None,
                "consent": current,
                "suppressed": suppressed is not None,
                "history": [record_json(r) for r in records],
            },
        )

    def check_token(self, token: str, caller_ip: str = "") -> Unsubscribe:
        """The token's account, or 400 (not a token) / 404 (forged, or no secret configured)."""
        secret = self._settings().unsubscribe_secret
        try:
            if secret is None:
                raise ForgedToken("no unsubscribe secret configured")
            return verify_token(secret, token)
        except MalformedToken:
            self.unsubscribe_refused += 1
            raise ApiError(400, "this is not an unsubscribe link", "token") from None
        except ForgedToken:
            self.unsubscribe_refused += 1
            log.warning("unsubscribe.refused", ip=caller_ip)
            raise ApiError(404, "unknown unsubscribe link", None) from None

    async def unsubscribe(self, token: str, caller_ip: str) -> Reply:
        """The one-click POST: verify the token, record the withdrawal (once). The answer is the
        same whatever the account's state, so it tells nothing about which accounts exist."""
        target = self.check_token(token, caller_ip)

        def unit(tx: WriteTx) -> bool:
            account = tx.get_account(target.account)
            if account is None or account.erased or tx.consent(account.code) is False:
                return False  # unknown, erased, or already withdrawn: nothing to record
            in_force = tx.policy_in_force(self._today(tx.now))
            evidence = _evidence("one-click unsubscribe", caller_ip)
            apply_consent(tx, account, False, source="unsubscribe", policy_version=in_force, evidence=evidence)
            return True

        recorded = await self._store.write(unit)
        self.unsubscribes += 1
        if recorded:
            self.changes["withdrawn"] += 1
        log.info("unsubscribe.done", account=target.account, recorded=recorded)
        return Reply(200, {"unsubscribed": True})

    async def suppress(self, body: Any) -> Reply:
        """``{"address": "...", "reason": "..."}``: no marketing to that address, whatever consent says."""
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object", None)
        for name in body:
            if name not in ("address", "reason"):
                raise ApiError(400, f"unknown field {name!r}", str(name))
        address = self._address(body.get("address"))
        reason = _one_line(body.get("reason"), "reason") or "objection"
        added = await self._store.write(lambda tx: tx.add_marketing_suppression(address, reason))
        log.info("suppression.added", to=address, added=added)
        return Reply(201 if added else 200, {"address": address, "suppressed": True, "added": added})

    async def unsuppress(self, address: Any) -> Reply:
        checked = self._address(address)
        removed = await self._store.write(lambda tx: tx.remove_marketing_suppression(checked))
        log.info("suppression.removed", to=checked, removed=removed)
        return Reply(200, {"address": checked, "suppressed": False, "removed": removed})

    @staticmethod
    def _address(raw: Any) -> str:
        if not isinstance(raw, str):
            raise ApiError(400, "expected an e-mail address", "address")
        try:
            check_email(raw)
        except ValueError as exc:
            raise ApiError(400, str(exc), "address") from None
        return raw.lower()
