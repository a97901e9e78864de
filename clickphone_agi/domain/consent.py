"""Marketing consent, suppression and who a broadcast reaches (pure: no I/O, time as a parameter).

* Consent is a history (when, how, under which policy version); its newest record is the current
  state. No record means no consent: marketing is opt-in (Law 506/2004 art. 12).
* A marketing suppression (an objection, GDPR art. 21) or a bounce suppression wins over any
  consent. Service notices (a tariff change, a policy change) need no consent and carry no offer.
* A contract change is announced at least one calendar month ahead (EU electronic-communications
  code art. 105(4)): :func:`earliest_effective`.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Final

from clickphone_agi.domain.accounts import Account

SOURCES: Final = ("api", "cli", "unsubscribe", "import", "ami")
MAX_HOW: Final = 200
_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}", re.ASCII)


@dataclass(frozen=True)
class ConsentRecord:
    """One grant or withdrawal, as the history keeps it."""

    id: int
    account: str
    granted: bool
    recorded_at: datetime
    source: str
    policy_version: str | None
    evidence: str | None


@dataclass(frozen=True)
class Candidate:
    """An account as a broadcast sees it: its settings and what may stop marketing to it."""

    account: Account
    consent: bool | None  # the newest consent record; None: never recorded
    marketing_suppressed: bool  # its address is on the marketing suppression list
    bounce_suppressed: bool  # its address hard-bounced past the limit: no mail of any kind


class Skip(StrEnum):
    NO_CONSENT = "no_consent"
    WITHDRAWN = "consent_withdrawn"
    SUPPRESSED = "suppressed"
    BOUNCED = "bounced"


def marketing_skip(candidate: Candidate) -> Skip | None:
    """Why an offer must not go to this account, or None when it may. Suppression wins."""
    if candidate.bounce_suppressed:
        return Skip.BOUNCED
    if candidate.marketing_suppressed:
        return Skip.SUPPRESSED
    if candidate.consent is None:
        return Skip.NO_CONSENT
    if not candidate.consent:
        return Skip.WITHDRAWN
    return None


def add_months(day: date, months: int) -> date:
    """The same day ``months`` later, clamped to the month's end (31 Jan + 1 → 28/29 Feb)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def earliest_effective(today: date) -> date:
    """The first day a contract change announced ``today`` (local day) may take effect."""
    return add_months(today, 1)


def check_policy_version(version: str) -> None:
    """A policy version label: 1-40 of letters, digits, ``.`` ``_`` ``-`` (it appears in URLs)."""
    if not _VERSION.fullmatch(version):
        raise ValueError("expected 1-40 of A-Z a-z 0-9 . _ - (starting with a letter or digit), such as 3.2")


def audience_matches(account: Account, codes: frozenset[str] | None, billing: str | None) -> bool:
    """Whether a broadcast's filter (explicit account codes and/or billing mode) selects the account.
    An erased account is nobody's audience: no address is left to mail, so it is not a recipient."""
    if account.erased:
        return False
    return (codes is None or account.code in codes) and (billing is None or account.billing == billing)
