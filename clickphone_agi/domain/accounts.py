"""Subscriber accounts: who may call, from where, with which limits, and where their mail goes.

Pure: no I/O, no asyncio, no clock.  The import file is read by
:mod:`clickphone_agi.adapters.accounts_file`; this module holds the value types, the rules
every value must obey (enforced again in ``__post_init__``, so an invalid :class:`Account`
cannot exist) and :func:`parse_amount`, which turns a human-written RON amount into bani.

Decisions an operator should know:

* **Money is integer bani** (1 RON = 100 bani).  Amounts are written in lei, with ``.`` or
  ``,`` as the decimal mark and at most 2 decimals (``12.50``, ``12,50``, ``12``, ``0.5``).
  ``12.500`` is refused: with 3 decimals it might be Romanian thousands notation.  No
  thousands separators, no currency suffix, no exponent, no NaN/infinity.
* **Empty ``allowed_ips`` means any source address may use the account.**  That keeps a
  fresh import working, but it means a leaked SIP password can be used from anywhere: set
  the allow-list for every trunk/PBX account.  IPv4-mapped IPv6 addresses
  (``::ffff:192.0.2.10``) are checked against the IPv4 entries.
* ``daily_limit`` is ``None`` for "no daily limit"; ``0`` is refused (ambiguous: it would
  block every paid call, which is what ``enabled: false`` is for).
* ``email`` is one bare address (``ion.popescu@example.ro``): no display name, no list, no
  whitespace or control characters, no ``=?`` (encoded-word injection, CVE-2024-6923),
  ASCII only.  ``name`` may hold any letters (``Ștefan Țăran``) but no control, format or
  line-separator characters and no ``=?``: it ends up in mail headers.
* ``marketing_consent`` is only the current yes/no.  The record of *when*, *how* and under
  which policy version consent was given (Law 506/2004 art. 12, GDPR art. 7) is kept by the
  consent feature, not by this import.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Literal, get_args

__all__ = [
    "BILLING_MODES",
    "LANGUAGES",
    "MAX_AMOUNT_DIGITS",
    "MAX_CALL_SECONDS",
    "MAX_CONCURRENT_CALLS",
    "Account",
    "AccountConflict",
    "AccountImport",
    "Billing",
    "IPNetwork",
    "Language",
    "Mailbox",
    "check_code",
    "check_destination_class",
    "check_did",
    "check_email",
    "check_mailbox_box",
    "check_name",
    "parse_amount",
    "parse_network",
    "show",
]

Language = Literal["ro", "en"]
Billing = Literal["prepaid", "postpaid"]
IPNetwork = IPv4Network | IPv6Network

LANGUAGES: tuple[str, ...] = get_args(Language)
BILLING_MODES: tuple[str, ...] = get_args(Billing)

MAX_AMOUNT_DIGITS = 12
"""At most this many digits before the decimal mark (under 10**12 lei, far inside int64 bani)."""

MAX_CONCURRENT_CALLS = 1000
MAX_CALL_SECONDS = 86_400
_MAX_NAME = 200
_MAX_EMAIL = 254
_MAX_LOCAL_PART = 64

_CODE = re.compile(r"[A-Za-z0-9_.-]{1,40}", re.ASCII)
_BOX = re.compile(r"[A-Za-z0-9]{1,40}@[A-Za-z0-9_-]{1,79}", re.ASCII)
_DID = re.compile(r"[1-9][0-9]{6,14}", re.ASCII)  # E.164: at most 15 digits, no leading 0
_CLASS = re.compile(r"[a-z][a-z0-9_-]{0,39}", re.ASCII)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(
    rf"(?P<local>{_ATEXT}(?:\.{_ATEXT})*)@(?P<domain>(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?)",
    re.ASCII,
)
_AMOUNT = re.compile(r"(?P<sign>[+-]?)(?P<units>[0-9]+)(?:[.,](?P<frac>[0-9]+))?", re.ASCII)
# Cc control, Cf format (bidi overrides, zero-width), Cs/Co/Cn surrogates, private use,
# unassigned, Zl/Zp line and paragraph separators (str.splitlines breaks on them).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def show(value: object, limit: int = 60) -> str:
    """``repr`` of a value for an error message: one line (control characters escaped), bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-3:]


def _bad_char(text: str) -> str | None:
    for ch in text:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return f"U+{ord(ch):04X}"
    return None


def check_code(code: str) -> None:
    """An Asterisk ``accountcode``: 1-40 of ``A-Z a-z 0-9 _ . -``."""
    if not _CODE.fullmatch(code):
        raise ValueError(f"expected 1-40 of A-Z a-z 0-9 _ . -, got {show(code)}")


def check_name(name: str) -> None:
    """A display name: non-empty, no surrounding spaces, no control/format characters, no ``=?``."""
    if not name.strip():
        raise ValueError("must not be empty")
    bad = _bad_char(name)
    if bad is not None:
        raise ValueError(f"contains a control or invisible character ({bad}): {show(name)}")
    if name != name.strip():
        raise ValueError(f"has leading or trailing spaces: {show(name)}")
    if "=?" in name:
        raise ValueError(f"must not contain '=?' (MIME encoded-word): {show(name)}")
    if len(name) > _MAX_NAME:
        raise ValueError(f"longer than {_MAX_NAME} characters")


def check_email(email: str) -> None:
    """One bare addr-spec (``local@domain.tld``), ASCII, no display name, no list."""
    bad = _bad_char(email)
    if bad is not None:
        raise ValueError(f"contains a control or invisible character ({bad}): {show(email)}")
    if any(c in email for c in ' <>,;:"()[]\\'):
        raise ValueError(f"not a bare e-mail address (one address, no display name or list): {show(email)}")
    match = _EMAIL.fullmatch(email)
    if match is None or len(email) > _MAX_EMAIL or len(match["local"]) > _MAX_LOCAL_PART:
        raise ValueError(f"not an e-mail address: {show(email)}")
    if "=?" in email:
        raise ValueError(f"must not contain '=?' (MIME encoded-word): {show(email)}")


def check_mailbox_box(box: str) -> None:
    """``mailbox@context`` as Asterisk names it: letters/digits ``@`` letters/digits/``_``/``-``."""
    if not _BOX.fullmatch(box):
        raise ValueError(
            f"expected mailbox@context such as 100@default (letters, digits; '_' '-' in the context), got {show(box)}"
        )


def check_did(did: str) -> None:
    """An E.164 number as digits without ``+``: 7-15 digits, not starting with 0."""
    if not _DID.fullmatch(did):
        raise ValueError(f"expected E.164 digits without '+' such as 40212345678, got {show(did)}")


def check_destination_class(name: str) -> None:
    """A tariff destination class name: lower case letter, then letters, digits, ``_``, ``-``."""
    if not _CLASS.fullmatch(name):
        raise ValueError(f"expected a destination class such as premium or satellite, got {show(name)}")


def parse_network(text: str) -> IPNetwork:
    """``192.0.2.10`` (one host), ``198.51.100.0/24``, ``2001:db8::/32`` → a network; an IPv4-mapped
    one (``::ffff:192.0.2.0/120``) → its IPv4 network (``192.0.2.0/24``).

    Host bits set (``198.51.100.5/24``) are refused rather than silently widened: the
    operator meant either the host or the network, and we cannot tell which.
    """
    try:
        net = ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError(f"host bits set in {show(text)}: write the network address or a single host") from None
        raise ValueError(
            f"expected an IP address or network such as 192.0.2.10 or 198.51.100.0/24, got {show(text)}"
        ) from None
    mapped = net.network_address.ipv4_mapped if isinstance(net, IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:
        # a source address ::ffff:a.b.c.d is checked as a.b.c.d (ip_allowed): so is this network,
        # which as written would never match anything
        return IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def parse_amount(text: str | int, *, allow_negative: bool = False) -> int:
    """A RON amount written by a human → bani, exactly.

    ``"12.50"``, ``"12,50"`` → 1250; ``12`` (an int is whole lei) → 1200; ``"0.5"`` → 50.
    Refused with :class:`ValueError`: more than 2 decimals, thousands separators, exponents,
    NaN/infinity, a sign where ``allow_negative`` is false (``-0`` included is fine: 0), more
    than :data:`MAX_AMOUNT_DIGITS` digits of lei.  A Python ``float`` (or ``bool``) is a
    :class:`TypeError`: binary floats cannot hold 0.1 exactly, so read amounts as text.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise TypeError(f"an amount must be given as text or whole lei (int), not {type(text).__name__}")
    if isinstance(text, int):
        if text < 0 and not allow_negative:
            raise ValueError(f"must not be negative, got {text}")
        if abs(text) >= 10**MAX_AMOUNT_DIGITS:
            raise ValueError(f"too large: {text}")
        return text * 100
    stripped = text.strip(" ")
    match = _AMOUNT.fullmatch(stripped)
    if match is None:
        raise ValueError(f"expected an amount like 50.00, got {show(text)}")
    if len(match["units"].lstrip("0")) > MAX_AMOUNT_DIGITS:
        raise ValueError(f"too large: {show(text)}")
    frac = match["frac"]
    if frac is not None and len(frac) > 2:
        raise ValueError(f"at most 2 decimals (bani), got {show(text)}")
    value = Decimal(f"{match['sign']}{match['units']}.{frac or '0'}") * 100
    if value < 0 and not allow_negative:
        raise ValueError(f"must not be negative, got {show(text)}")
    # Exact: at most 2 decimals times 100 is integral.
    return int(value)


@dataclass(frozen=True)
class Mailbox:
    """One voicemail box of an account."""

    box: str
    """``mailbox@context`` as Asterisk reports it, e.g. ``100@default``."""
    email: str | None = None
    """Where this box's voicemail goes; ``None``: the account's address."""

    def __post_init__(self) -> None:
        _field("box", check_mailbox_box, self.box)
        if self.email is not None:
            _field("email", check_email, self.email)


OPT_OUT_KINDS = frozenset({"missed_call", "fax_sent"})
"""Service notices a subscriber may switch off; voicemail, faxes received, security, limit,
balance and payment notices cannot be."""


@dataclass(frozen=True)
class Account:
    """A subscriber account as imported; balances and spend live in storage, not here."""

    code: str
    """Asterisk ``accountcode``: 1-40 of ``A-Z a-z 0-9 _ . -``."""
    name: str
    email: str
    """Bare address for service mail (limits, balance, voicemail unless a box has its own)."""
    language: Language = "ro"
    billing: Billing = "prepaid"
    daily_limit: int | None = None
    """Bani per local day; ``None``: no daily limit."""
    low_balance_threshold: int = 500
    """Bani; a low-balance warning is sent when the balance falls below it (5,00 lei)."""
    allowed_ips: tuple[IPNetwork, ...] = ()
    """Source networks allowed to use the account; EMPTY MEANS ANY (set it)."""
    dids: tuple[str, ...] = ()
    """Inbound numbers, E.164 digits without ``+`` (``40212345678``)."""
    mailboxes: tuple[Mailbox, ...] = ()
    blocked_classes: frozenset[str] = field(default_factory=frozenset)
    """Tariff destination classes this account may not call, e.g. ``{"premium", "satellite"}``."""
    max_concurrent_calls: int = 2
    max_call_seconds: int = 7200
    marketing_consent: bool = False
    enabled: bool = True
    opt_out: frozenset[str] = field(default_factory=frozenset)
    """Non-essential service notices the subscriber switched off (only kinds in OPT_OUT_KINDS)."""
    erased: bool = False
    """Personal data erased (``privacy erase``): no mail, calls denied, the code is never reused."""

    def __post_init__(self) -> None:
        _field("code", check_code, self.code)
        _field("name", check_name, self.name)
        _field("email", check_email, self.email)
        if self.language not in LANGUAGES:
            raise ValueError(f"language: expected one of {', '.join(LANGUAGES)}, got {show(self.language)}")
        if self.billing not in BILLING_MODES:
            raise ValueError(f"billing: expected one of {', '.join(BILLING_MODES)}, got {show(self.billing)}")
        if self.daily_limit is not None:
            _int_in("daily_limit", self.daily_limit, 1, None)
        _int_in("low_balance_threshold", self.low_balance_threshold, 0, None)
        _int_in("max_concurrent_calls", self.max_concurrent_calls, 1, MAX_CONCURRENT_CALLS)
        _int_in("max_call_seconds", self.max_call_seconds, 1, MAX_CALL_SECONDS)
        for net in self.allowed_ips:
            if not isinstance(net, IPv4Network | IPv6Network):
                raise TypeError(f"allowed_ips: expected IPv4Network/IPv6Network, got {type(net).__name__}")
        _each("dids", check_did, self.dids)
        _unique("dids", self.dids)
        for box in self.mailboxes:
            if not isinstance(box, Mailbox):
                raise TypeError(f"mailboxes: expected Mailbox, got {type(box).__name__}")
        _unique("mailboxes", [m.box for m in self.mailboxes])
        _each("blocked_classes", check_destination_class, self.blocked_classes)
        for kind in self.opt_out:
            if kind not in OPT_OUT_KINDS:
                raise ValueError(
                    f"opt_out: {show(kind)} cannot be switched off (only {', '.join(sorted(OPT_OUT_KINDS))};"
                    " security, limit, balance and payment notices always go)"
                )
        for flag in ("marketing_consent", "enabled", "erased"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag}: expected a bool")

    def ip_allowed(self, ip: str) -> bool:
        """May a request from source address ``ip`` use this account?

        An empty allow-list allows every address.  A string that is not an IP address is
        refused.  ``::ffff:a.b.c.d`` is checked as ``a.b.c.d``.
        """
        if not self.allowed_ips:
            return True
        addr = _source_address(ip)
        return addr is not None and any(addr in net for net in self.allowed_ips)

    def mailbox_email(self, box: str) -> str | None:
        """Address for voicemail of ``box`` (``100@default``): the box's own, else the account's.

        ``None`` when ``box`` is not one of this account's mailboxes.
        """
        for mailbox in self.mailboxes:
            if mailbox.box == box:
                return mailbox.email if mailbox.email is not None else self.email
        return None


class AccountConflict(ValueError):
    """An account cannot be stored as given because of another stored account (a DID or box it
    owns) or the code's own history (erased); ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class AccountImport:
    """One row of an import file."""

    account: Account
    opening_balance: int
    """Bani; applied only when the account is new, never to an existing balance."""
    line: int
    """Line in the source file where the row starts (1-based)."""


def _field(name: str, check: Callable[[str], None], value: str) -> None:
    try:
        check(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _each(name: str, check: Callable[[str], None], values: Iterable[str]) -> None:
    for value in values:
        _field(name, check, value)


def _unique(name: str, values: Iterable[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{name}: {show(value)} appears twice")
        seen.add(value)


def _int_in(name: str, value: int, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and at most {high}"
        raise ValueError(f"{name}: must be at least {low}{upper}, got {value}")


@lru_cache(maxsize=4096)
def _source_address(ip: str) -> IPv4Address | IPv6Address | None:
    """``ip`` parsed (``::ffff:a.b.c.d`` as ``a.b.c.d``), or None if it is not an address.

    Cached: every FastAGI ``authorize`` checks the caller's address, and a PBX sees few of them.
    """
    try:
        addr = ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
