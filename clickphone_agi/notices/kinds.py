"""The catalogue of notification kinds: what each one is, who may switch it off, how long it is worth sending.

Pure data: no I/O, no Jinja2. Each kind has ``templates/<lang>/<kind>.{subject,txt,html}.j2`` and a
``sample`` of realistic, invented data used by ``clickphone_agi.notices.render.preview`` and the tests.

Data contract (what a caller puts in a notice's payload):

* money values are already formatted strings in the account's language
  (``clickphone_agi.domain.money.format_ron``: ``"12,50 lei"`` / ``"12.50 RON"``);
* moments (``at``, ``expires_at``) are aware ``datetime`` objects or their ISO 8601 strings (what a
  payload becomes after a JSON round trip through the outbox); templates show them in the account's
  language and the renderer's time zone (Europe/Bucharest by default);
* days (``day``, ``effective``, ``valid_until``) are ``date`` objects or ISO dates (``"2026-12-01"``);
* durations are whole seconds; counts (``pages``, ``percent``) are integers;
* an empty string means "unknown" for the optional-looking keys (``caller_name``, ``caller_number``,
  ``station``, ``source_ip``): the key must still be present;
* extra keys (``language``, say) are allowed and ignored; ``lang`` and ``subject`` are reserved.

Only the keys in ``multiline`` keep their line breaks; every other text value is made one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal

Category = Literal["service", "security", "money", "marketing"]

LANGUAGES: Final = ("ro", "en")
DEFAULT_LANGUAGE: Final = "ro"
DEFAULT_LIFETIME: Final = timedelta(days=5)


@dataclass(frozen=True)
class KindSpec:
    """One notification kind.

    ``opt_out``: the subscriber may switch this kind off (marketing is, in addition, opt-in: it needs
    recorded consent before the first message). ``lifetime``: how long a queued mail stays worth
    sending; after that the sender expires it instead of delivering stale news. ``bulk``: queued for
    many accounts at once (broadcasts, policy notices); the sender takes every other due mail first,
    so a 100,000-row broadcast never holds back a voicemail or a security alert.
    """

    name: str
    category: Category
    opt_out: bool
    lifetime: timedelta
    sample: Mapping[str, Any]
    required: frozenset[str]
    multiline: frozenset[str] = frozenset()
    bulk: bool = False


def _at(hour: int, minute: int, day: int = 28) -> datetime:
    """An instant on an invented November day, in UTC (Bucharest is UTC+2 then: 14:21Z shows as 16:21)."""
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def _kind(
    name: str,
    category: Category,
    sample: Mapping[str, Any],
    *,
    opt_out: bool = False,
    lifetime: timedelta = DEFAULT_LIFETIME,
    multiline: frozenset[str] = frozenset(),
    bulk: bool = False,
) -> KindSpec:
    return KindSpec(
        name=name,
        category=category,
        opt_out=opt_out,
        lifetime=lifetime,
        sample=MappingProxyType(dict(sample)),
        required=frozenset(sample),
        multiline=multiline,
        bulk=bulk,
    )


_SPECS: Final = (
    # -- service: calls, voicemail, fax ------------------------------------------------------------
    _kind(
        "missed_call",
        "service",
        {
            "name": "Ion Popescu",
            "caller_number": "0721000002",
            "caller_name": "Maria Ionescu",
            "number": "0310000001",
            "at": _at(14, 21),
            "rang": 12,
        },
        opt_out=True,
        lifetime=timedelta(days=2),
    ),
    _kind(
        "voicemail",
        "service",
        {
            "name": "Ion Popescu",
            "caller_number": "0721000002",
            "caller_name": "Maria Ionescu",
            "mailbox": "0310000001",
            "duration": 65,
            "at": _at(14, 21),
            "attached": True,
        },
        lifetime=timedelta(days=5),
    ),
    _kind(
        "fax_received",
        "service",
        {
            "name": "Ion Popescu",
            "caller_number": "0210000003",
            "station": "CONTABILITATE SRL",
            "number": "0310000009",
            "pages": 3,
            "at": _at(9, 5),
            "attached": True,
        },
    ),
    _kind(
        "fax_sent",
        "service",
        {"name": "Ion Popescu", "destination": "0210000004", "pages": 2, "at": _at(10, 40)},
        opt_out=True,
        lifetime=timedelta(days=2),
    ),
    _kind(
        "fax_failed",
        "service",
        {
            "name": "Ion Popescu",
            "destination": "0210000004",
            "pages": 2,
            "reason": "NO CARRIER",
            "at": _at(10, 40),
        },
    ),
    # -- money -----------------------------------------------------------------------------------
    _kind(
        "daily_limit",
        "money",
        {
            "name": "Ion Popescu",
            "percent": 80,
            "day": "2026-11-28",
            "limit": "50,00 lei",
            "spent": "40,00 lei",
        },
        lifetime=timedelta(days=1),
    ),
    _kind(
        "low_balance",
        "money",
        {"name": "Ion Popescu", "balance": "4,20 lei", "threshold": "5,00 lei"},
        lifetime=timedelta(days=2),
    ),
    _kind(
        "insufficient_funds",
        "money",
        {"name": "Ion Popescu", "reason": "no_credit", "number": "0040740000005", "balance": "0,35 lei"},
        lifetime=timedelta(days=1),
    ),
    _kind(
        "balance_info",
        "money",
        {"name": "Ion Popescu", "balance": "12,50 lei", "spent_today": "3,40 lei", "at": _at(6, 0)},
        lifetime=timedelta(days=1),
    ),
    _kind(
        "topup",
        "money",
        {
            "name": "Ion Popescu",
            "amount": "20,00 lei",
            "balance": "32,50 lei",
            "reference": "TOP-2026-000123",
            "at": _at(11, 2),
        },
    ),
    _kind(
        "payment_confirmed",
        "money",
        {
            "name": "Ion Popescu",
            "amount": "45,90 lei",
            "invoice": "CP-2026-004567",
            "method": "card",
            "at": _at(12, 30),
        },
    ),
    # -- security --------------------------------------------------------------------------------
    _kind(
        "ip_denied",
        "security",
        {
            "name": "Ion Popescu",
            "source_ip": "203.0.113.45",
            "number": "0040740000005",
            "at": "2026-11-28T14:21:09+00:00",  # ISO text: what the money service puts in the payload
        },
        lifetime=timedelta(days=2),
    ),
    _kind(
        "password_changed",
        "security",
        {"name": "Ion Popescu", "source_ip": "198.51.100.7", "at": _at(14, 21)},
    ),
    _kind(
        "password_recovery",
        "security",
        {
            "name": "Ion Popescu",
            "reset_url": "https://cont.clickphone.example/parola/resetare?token=Zx81kQ2mP0aLr7",
            "expires_at": _at(15, 21),
            "source_ip": "198.51.100.7",
        },
        lifetime=timedelta(hours=1),  # the link in it expires
    ),
    _kind(
        "pin_created",
        "security",
        {"name": "Ion Popescu", "number": "0310000001", "at": _at(14, 21)},
    ),
    _kind(
        "allowed_ip_changed",
        "security",
        {
            "name": "Ion Popescu",
            "allowed_ips": ("198.51.100.7", "203.0.113.0/28"),
            "old_allowed_ips": ("198.51.100.7",),
            "source_ip": "198.51.100.7",
            "at": _at(14, 21),
        },
    ),
    # -- contract and policy (service: no consent needed, no offers allowed) ----------------------
    _kind(
        "tariff_change",
        "service",
        {
            "name": "Ion Popescu",
            "tariff": "ClickPhone Standard",
            "effective": date(2027, 1, 1),
            "changes": "Apeluri către rețele mobile naționale: de la 0,05 lei/min la 0,06 lei/min.\n"
            "Apeluri către rețele fixe naționale: neschimbat, 0,03 lei/min.",
            "url": "https://www.clickphone.example/tarife/2027",
        },
        bulk=True,
        multiline=frozenset({"changes"}),
    ),
    _kind(
        "policy_changed",
        "service",
        {
            "name": "Ion Popescu",
            "version": "3.2",
            "effective": date(2026, 12, 15),
            "summary": "Am redus la 6 luni perioada de păstrare a jurnalelor de apeluri.\n"
            "Am adăugat lista actualizată a furnizorilor care prelucrează date în numele nostru.",
            "url": "https://www.clickphone.example/confidentialitate/v3.2",
        },
        bulk=True,
        multiline=frozenset({"summary"}),
    ),
    _kind("mail_test", "service", {"at": _at(14, 21)}, lifetime=timedelta(days=1)),
    # -- marketing: only with recorded consent, always with an unsubscribe -------------------------
    _kind(
        "offer",
        "marketing",
        {
            "name": "Ion Popescu",
            "title": "Pachetul Internațional Europa",
            "body": "Sunați în rețelele fixe din 40 de țări europene cu 0,04 lei/min.\n"
            "Activarea este gratuită și puteți renunța oricând.",
            "url": "https://www.clickphone.example/oferte/europa",
            "valid_until": date(2026, 12, 31),
            "unsubscribe_url": "https://cont.clickphone.example/dezabonare?t=Qm93LmV4YW1wbGU",
        },
        opt_out=True,
        lifetime=timedelta(days=2),
        bulk=True,
        multiline=frozenset({"body"}),
    ),
)

KINDS: Final[Mapping[str, KindSpec]] = MappingProxyType({spec.name: spec for spec in _SPECS})
