"""Signed one-click unsubscribe tokens (RFC 8058 links), pure.

A token names one account and one purpose and carries an HMAC-SHA256 over both, keyed with the
operator's unsubscribe secret: ``<base64url(purpose:account)>.<base64url(mac)>``. It needs no
database row (every offer to an account carries the same link), cannot be forged or moved to
another account without the secret, and is compared in constant time. It does not expire: an
unsubscribe link in an old mail must keep working (RFC 8058 §3.2, GDPR art. 7(3)).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final

from clickphone_agi.domain.accounts import check_code

PURPOSES: Final = ("marketing",)
MAX_TOKEN: Final = 200
_DOMAIN: Final = b"clickphone-agi unsubscribe v1\n"  # separates these MACs from any other use of the key
_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{4,120}\.[A-Za-z0-9_-]{43}")


class MalformedToken(ValueError):
    """Not a token's shape at all (a truncated or mangled link)."""


class ForgedToken(ValueError):
    """A well-formed token whose signature does not match: forged, tampered or from another key."""


@dataclass(frozen=True)
class Unsubscribe:
    account: str
    purpose: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, _DOMAIN + payload, hashlib.sha256).digest()


def make_token(secret: bytes, account: str, purpose: str = "marketing") -> str:
    """The account's unsubscribe token for ``purpose`` (deterministic: same input, same token)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown unsubscribe purpose {purpose!r}")
    check_code(account)
    if len(secret) < 16:
        raise ValueError("the unsubscribe secret is too short")
    payload = f"{purpose}:{account}".encode("ascii")
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def verify_token(secret: bytes, token: str) -> Unsubscribe:
    """The account and purpose a token was made for; :class:`MalformedToken` or :class:`ForgedToken`."""
    if len(token) > MAX_TOKEN or not _SHAPE.fullmatch(token):
        raise MalformedToken("not an unsubscribe token")
    encoded, _, given = token.partition(".")
    try:
        payload = _unb64(encoded)
        mac = _unb64(given)
    except (binascii.Error, ValueError):
        raise MalformedToken("not an unsubscribe token") from None
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        raise ForgedToken("the unsubscribe token's signature does not match")
    # only our own payloads reach this point: the shape below holds unless the key leaked
    purpose, _, account = payload.decode("ascii", "replace").partition(":")
    if purpose not in PURPOSES:
        raise ForgedToken("unknown purpose")
    return Unsubscribe(account=account, purpose=purpose)


def unsubscribe_url(base_url: str, token: str) -> str:
    """``<public_base_url>/v1/unsubscribe/<token>`` (the path the HTTP API serves)."""
    return f"{base_url.rstrip('/')}/v1/unsubscribe/{token}"
