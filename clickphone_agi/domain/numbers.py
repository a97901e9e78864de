"""Telephone numbers as the rating engine sees them: E.164 digits without ``+``. Pure, stdlib only.

:func:`normalise` turns what a subscriber dialled (or what a tariff file names) into international
digits: with the Romanian defaults ``+40 21 234 5678``, ``0040212345678`` and ``021-234.56.78``
all become ``40212345678``, and ``00441234567`` becomes ``441234567``.

Accepted forms, checked in this order after spaces, tabs, dashes, dots and parentheses are removed:

1. ``+`` then digits: already international (``+40 (0) 21 …``: the ``(0)`` national-prefix
   notation after a country code is dropped before the parentheses are);
2. the international prefix (``00``) then digits: international;
3. the national prefix (``0``) then digits: national, the country code is prepended;
4. anything else (bare digits such as ``40212345678``, ``112``, ``1234``) is refused unless
   ``bare_is_e164=True``. In Romania a dialled string without ``+``/``00``/``0`` is a short
   number (``112``, ``118xxx``, ``19xx``) or an internal extension, never an international
   number: taking ``1930`` as E.164 would rate it against the ``1`` (North America) tariff.
   Pass ``bare_is_e164=True`` where bare digits are known to be E.164 already (tariff files, a
   dialplan that hands over E.164 digits). With an empty ``national_prefix`` every number that
   is not international is national, so step 4 is never reached — except with
   ``bare_is_e164=True``, where steps 2 and 3 apply only to prefixes that start with ``0``
   (text starting with ``0`` cannot be E.164) and any other digits are E.164 as written: with
   an empty or non-zero prefix (``8`` as a trunk prefix) bare ``81…`` is Japan, never a national
   number, so the result of :func:`normalise` always reads back as itself.

The result is 1 to 15 digits and does not start with ``0`` (E.164 §6); anything else raises
:class:`InvalidNumber` (a :class:`ValueError`): empty input, letters, ``*``/``#``, a ``+`` that
is not the first character, a national prefix with nothing after it, more than 15 digits.

Internal extensions are not PSTN destinations: the dialplan only asks ``authorize`` about
outbound PSTN calls, and a number that reaches rating anyway either fails to normalise or finds
no tariff, and is denied (no tariff never means free).

Emergency numbers (:func:`is_emergency`) are short codes without a country code, so they are
compared on the raw dialled digits; ``112`` always counts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

__all__ = [
    "EMERGENCY_NUMBERS",
    "MAX_DIGITS",
    "InvalidNumber",
    "compact",
    "is_emergency",
    "normalise",
    "normalise_or_none",
]

MAX_DIGITS = 15
"""E.164 allows at most 15 digits, country code included."""

EMERGENCY_NUMBERS: frozenset[str] = frozenset({"112"})
"""Always emergency, whatever the configuration says (EU single emergency number)."""

_SEPARATORS = re.compile(r"[\s\-.()]+")
_DIALLED = re.compile(r"\+?[0-9]+")
_E164 = re.compile(r"[1-9][0-9]{0,14}")
_PARAM_DIGITS = re.compile(r"[0-9]*")


class InvalidNumber(ValueError):
    """The string is not a telephone number this module can turn into E.164 digits."""


def compact(number: str) -> str:
    """``number`` without spaces, tabs, dashes, dots and parentheses (no other check)."""
    return _SEPARATORS.sub("", number)


def normalise(
    number: str,
    *,
    country_code: str = "40",
    national_prefix: str = "0",
    international_prefix: str = "00",
    bare_is_e164: bool = False,
) -> str:
    """``number`` as E.164 digits without ``+``; raises :class:`InvalidNumber`. See the module doc."""
    _check_params(country_code, national_prefix, international_prefix)
    text = number.strip()
    if not text:
        raise InvalidNumber("empty number")
    if national_prefix and "(" in text and (text.startswith("+") or text.startswith(international_prefix)):
        # "+40 (0) 21 …": the bracketed national prefix is not dialled from abroad
        text = re.sub(r"\(\s*" + national_prefix + r"\s*\)", "", text, count=1)
    dialled = compact(text)
    if not _DIALLED.fullmatch(dialled):
        raise InvalidNumber(f"not a telephone number: {_describe(dialled)}")

    if dialled.startswith("+"):
        digits = dialled[1:]
    elif dialled.startswith(international_prefix) and _prefix_applies(international_prefix, bare_is_e164):
        digits = dialled[len(international_prefix) :]
    elif dialled.startswith(national_prefix) and _prefix_applies(national_prefix, bare_is_e164):
        national = dialled[len(national_prefix) :]
        if not national:
            raise InvalidNumber("a national prefix with no number after it")
        digits = country_code + national
    elif bare_is_e164:
        digits = dialled
    else:
        raise InvalidNumber(
            f"{len(dialled)} digits without '+', {international_prefix!r} or {national_prefix!r}:"
            " a short number or an extension, not a PSTN number"
        )

    if not digits:
        raise InvalidNumber("no digits after the international prefix")
    if len(digits) > MAX_DIGITS:
        raise InvalidNumber(f"{len(digits)} digits; E.164 allows at most {MAX_DIGITS}")
    if not _E164.fullmatch(digits):
        raise InvalidNumber("an international number cannot start with 0")
    return digits


def is_emergency(
    number: str,
    extra: Iterable[str] = (),
    *,
    country_code: str = "40",
    national_prefix: str = "0",
    international_prefix: str = "00",
) -> bool:
    """True if ``number`` is ``112`` or one of ``extra``; never raises for any ``number``.

    An entry matches when it equals the dialled digits with separators removed (``112``,
    ``1 1 2``), or when the entry and ``number`` are both full numbers (``+…``, ``00…``, ``0…``)
    that normalise to the same E.164 digits, so ``+40 21 311 1111`` in ``extra`` also catches
    ``021 311 1111``. A short code is never compared after normalisation: ``+112`` and ``0112``
    are not ``112``.
    """
    dialled = compact(number.strip())
    if not dialled:
        return False
    if dialled in EMERGENCY_NUMBERS:
        return True
    shorts, fulls = _emergency_forms(tuple(extra), country_code, national_prefix, international_prefix)
    if dialled in shorts:
        return True
    return bool(fulls) and normalise_or_none(dialled, country_code, national_prefix, international_prefix) in fulls


def normalise_or_none(number: str, country_code: str, national_prefix: str, international_prefix: str) -> str | None:
    """:func:`normalise`, or None for what is not a PSTN number (the caller decides what that means)."""
    try:
        return normalise(
            number,
            country_code=country_code,
            national_prefix=national_prefix,
            international_prefix=international_prefix,
        )
    except InvalidNumber:
        return None


@functools.lru_cache(maxsize=32)  # the configured list: worked out once, not on every call authorised
def _emergency_forms(
    extra: tuple[str, ...], country_code: str, national_prefix: str, international_prefix: str
) -> tuple[frozenset[str], frozenset[str]]:
    """The entries of ``extra`` as dialled digits, and those that are full numbers as E.164."""
    shorts = frozenset(compact(entry.strip()) for entry in extra)
    fulls = {normalise_or_none(short, country_code, national_prefix, international_prefix) for short in shorts}
    return shorts, frozenset(e for e in fulls if e is not None)


def _prefix_applies(prefix: str, bare_is_e164: bool) -> bool:
    """With bare E.164 allowed, only a prefix starting with 0 tells a number apart from E.164."""
    return not bare_is_e164 or prefix.startswith("0")


@functools.lru_cache(maxsize=16)  # the configured plan, checked once instead of on every number rated
def _check_params(country_code: str, national_prefix: str, international_prefix: str) -> None:
    if not re.fullmatch(r"[1-9][0-9]{0,2}", country_code):
        raise ValueError(f"country_code must be 1-3 digits not starting with 0, got {country_code!r}")
    if not _PARAM_DIGITS.fullmatch(national_prefix):
        raise ValueError(f"national_prefix must be digits or empty, got {national_prefix!r}")
    if not international_prefix or not _PARAM_DIGITS.fullmatch(international_prefix):
        raise ValueError(f"international_prefix must be digits, got {international_prefix!r}")
    if international_prefix == national_prefix:
        raise ValueError("international_prefix and national_prefix must differ")


def _describe(dialled: str) -> str:
    """What is wrong, without echoing the whole (personal) number into logs."""
    if not dialled:
        return "no digits"
    if "+" in dialled[1:]:
        return "'+' is only allowed as the first character"
    bad = sorted({c for c in dialled if not (c.isascii() and (c.isdigit() or c == "+"))})
    return "contains " + ", ".join(repr(c) for c in bad[:5]) if bad else "no digits"
