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
* **Erased numbers stay erased.** Master.csv read again (a catch-up after an AMI gap, a replay
  after a restart) brings back CDR legs from before the erasure; one without an account code that
  carries an erased subscriber's number would be recorded again with it. Erasure therefore keeps
  :func:`number_digest` of every spelling of the account's numbers with the moment of the erasure,
  and :func:`erased_leg` refuses such a leg if its call started before that moment (a later call
  to the number, perhaps reassigned, is recorded as usual). The digest is an HMAC under a random
  key kept in the same database: it links nothing across databases, but whoever holds the
  database can test a guessed number, so it is pseudonymous, like the address digests above, and
  kept for this one purpose only (honouring the erasure): never exported, never shown.
* **An erased account stays**, so money totals stay attributable and new events for its code do
  not crash: it keeps its code, language, billing mode and limits, loses everything personal
  (name, addresses, DIDs, mailboxes, allowed IPs), is disabled (FastAGI answers ``disabled``),
  receives no mail, and its code is never reused (a re-import of it is refused).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime

from clickphone_agi.domain.accounts import OPT_OUT_KINDS, Account

__all__ = [
    "ADDRESS_HASH_PREFIX",
    "ERASED_EMAIL",
    "ERASED_NAME",
    "address_forms",
    "address_hash",
    "anonymised",
    "ascii_lower",
    "erased_leg",
    "number_digest",
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


def number_digest(key: bytes, number: str) -> str:
    """How an erased number is kept: the hex HMAC-SHA256 under the database's ``key`` of the number
    as a CDR spells it (surrounding blanks trimmed; :func:`number_forms` gives each spelling)."""
    return hmac.digest(key, number.strip().encode("utf-8"), "sha256").hex()


def erased_leg(
    account: str, numbers: Iterable[str], started: datetime, erased: Mapping[str, datetime], key: bytes
) -> bool:
    """Whether a CDR leg must not be recorded: it has no account code, one of its ``numbers`` (source,
    destination) has a digest in ``erased`` (digest: when it was erased), and its call ``started``
    before that erasure. With nothing erased it hashes nothing."""
    if account or not erased:
        return False
    for number in numbers:
        if number:
            erased_at = erased.get(number_digest(key, number))
            if erased_at is not None and started < erased_at:
                return True
    return False


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
