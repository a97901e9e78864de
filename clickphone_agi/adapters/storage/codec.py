"""JSON (de)serialisation of domain objects stored as documents (accounts)."""

from __future__ import annotations

import functools
import ipaddress
import json
from typing import Any

from clickphone_agi.domain.accounts import Account, Mailbox


def account_to_json(account: Account) -> str:
    data: dict[str, Any] = {
        "code": account.code,
        "name": account.name,
        "email": account.email,
        "language": account.language,
        "billing": account.billing,
        "daily_limit": account.daily_limit,
        "low_balance_threshold": account.low_balance_threshold,
        "allowed_ips": [str(n) for n in account.allowed_ips],
        "dids": list(account.dids),
        "mailboxes": [{"box": m.box, "email": m.email} for m in account.mailboxes],
        "blocked_classes": sorted(account.blocked_classes),
        "max_concurrent_calls": account.max_concurrent_calls,
        "max_call_seconds": account.max_call_seconds,
        "marketing_consent": account.marketing_consent,
        "enabled": account.enabled,
        "opt_out": sorted(account.opt_out),
    }
    if account.erased:  # only then: every other account's stored text stays byte for byte the same
        data["erased"] = True
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def account_from_json(text: str) -> Account:
    """The :class:`Account` stored as ``text``; memoised by the text (an Account is immutable),
    since decoding and validating one costs more than the rest of charging a CDR."""
    d = json.loads(text)
    return Account(
        code=d["code"],
        name=d["name"],
        email=d["email"],
        language=d["language"],
        billing=d["billing"],
        daily_limit=d["daily_limit"],
        low_balance_threshold=d["low_balance_threshold"],
        allowed_ips=tuple(ipaddress.ip_network(n) for n in d["allowed_ips"]),
        dids=tuple(d["dids"]),
        mailboxes=tuple(Mailbox(box=m["box"], email=m["email"]) for m in d["mailboxes"]),
        blocked_classes=frozenset(d["blocked_classes"]),
        max_concurrent_calls=d["max_concurrent_calls"],
        max_call_seconds=d["max_call_seconds"],
        marketing_consent=d["marketing_consent"],
        enabled=d["enabled"],
        opt_out=frozenset(d.get("opt_out", ())),
        erased=bool(d.get("erased", False)),
    )
