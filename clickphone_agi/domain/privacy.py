"""Data rights: the pure rules behind ``privacy export`` and ``privacy erase``.

Pure: no I/O. Storage applies these rules (``clickphone_agi.adapters.storage.privacy``); this
module decides what an erased account looks like, which spellings of a subscriber's numbers and
addresses to look for, and how a suppressed address is kept without keeping the address.

* **Suppressions outlive erasure.** An address on a suppression list (hard bounces, marketing
  objections) must stay suppressed after its owner's data is erased, or a later account with the
  same address would be mailed again (GDPR art. 21: an objection is absolute). Erasure therefore
  replaces the address by :func:`address_hash` (``sha256:`` + the hex digest of the
  ASCII-lowercased address) and every lookup checks both forms (:func:`address_forms`).
  A digest of an address is pseudonymous, not anonymous: it is kept for this one purpose only.
* **An erased account stays**, so money totals stay attributable and new events for its code do
  not crash: it keeps its code, language, billing mode and limits, loses everything personal
  (name, addresses, DIDs, mailboxes, allowed IPs), is disabled (FastAGI answers ``disabled``),
  receives no mail, and its code is never reused (a re-import of it is refused).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from clickphone_agi.domain.accounts import OPT_OUT_KINDS, Account

__all__ = [
    "ADDRESS_HASH_PREFIX",
    "ERASED_EMAIL",
    "ERASED_NAME",
    "address_forms",
    "address_hash",
    "anonymised",
    "ascii_lower",
    "number_forms",
]

ADDRESS_HASH_PREFIX = "sha256:"
ERASED_NAME = "erased"
ERASED_EMAIL = "erased@erased.invalid"
"""RFC 2606 reserves ``.invalid``: nothing is ever deliverable there (and no mail is queued for an
erased account in the first place)."""

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case A-Z only: the same as SQLite's ``lower()``, which the suppression tables use."""
    return text.translate(_ASCII_LOWER)


def address_hash(address: str) -> str:
    """How an erased subscriber's address is kept on a suppression list: ``sha256:<hex>``."""
    return ADDRESS_HASH_PREFIX + hashlib.sha256(ascii_lower(address.strip()).encode("utf-8")).hexdigest()


def address_forms(address: str) -> tuple[str, str]:
    """Both forms a suppression list may hold ``address`` in: (lowercased, hashed)."""
    return ascii_lower(address.strip()), address_hash(address)


def number_forms(did: str, country_code: str, national_prefix: str, international_prefix: str) -> tuple[str, ...]:
    """The ways a DID (E.164 digits, no ``+``) shows up in CDRs: ``40212345678``, ``+40212345678``,
    ``0040212345678`` and, for a national number, ``0212345678``."""
    forms = [did, f"+{did}", f"{international_prefix}{did}"]
    if national_prefix and did.startswith(country_code) and len(did) > len(country_code):
        forms.append(f"{national_prefix}{did[len(country_code) :]}")
    return tuple(dict.fromkeys(forms))


def anonymised(account: Account) -> Account:
    """The account as erasure leaves it: no personal field, disabled, no mail, marked erased.

    Kept: the code (the money totals are booked under it), language, billing mode, limits and
    blocked classes (settings, not personal data). Every optional notice is opted out as well, so
    even a path that ignored the erased mark would have nothing to send.
    """
    return replace(
        account,
        name=ERASED_NAME,
        email=ERASED_EMAIL,
        allowed_ips=(),
        dids=(),
        mailboxes=(),
        marketing_consent=False,
        enabled=False,
        opt_out=OPT_OUT_KINDS,
        erased=True,
    )
