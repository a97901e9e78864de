"""Read a tariff YAML file into a :class:`~clickphone_agi.domain.tariffs.TariffTable`.

Format (``etc/tariffs.yaml`` is the commented example)::

    currency: RON
    tariffs:
      - prefix: "+4021"             # any form normalise() accepts, or bare E.164 digits
        name: Bucharest fixed
        class: national
        rate_per_minute: "0.0325"   # RON per minute, sub-ban precision allowed
        connection_fee: "0.10"      # RON, whole bani only (default 0)
        increments: 60/1            # initial block / step, seconds
        minimum_charge: "0.00"      # RON, whole bani only (default 0)
        free: false                 # default false
        effective_from: 2026-01-01  # a date (local midnight) or an ISO datetime
        effective_to: null          # exclusive; default null = open-ended

Money is never read through a float. The loader builds YAML numbers from their source text:
an unquoted ``0.1`` becomes ``Decimal("0.1")`` (not the float 0.1000000000000000055…), and an
integer in a form YAML 1.1 would reinterpret (``010`` octal, ``0x10``, ``1:30`` base 60,
``0040``) stays the string it was written as (so ``prefix: 0040`` means ``+40``, not 32). A
float handed in by a caller is read as ``Decimal(str(value))``.

Times without a zone are local to ``timezone``; a local time that does not exist (the spring
DST gap) is an error, an ambiguous one (the autumn repeated hour) is its first occurrence.

Every problem is collected and raised together as :class:`TariffFileError`, one line each:
``FILE: tariffs[3].rate_per_minute: expected …, got …``. Unknown keys are errors. Semantic
problems of a valid table (overlaps, catch-alls) are :func:`~clickphone_agi.domain.tariffs.check`'s.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from clickphone_agi.config.loader import UniqueKeyLoader
from clickphone_agi.domain.numbers import InvalidNumber, normalise
from clickphone_agi.domain.tariffs import MAX_RATE_ADJUSTED, MIN_RATE_EXPONENT, TariffEntry, TariffTable

__all__ = ["TariffFileError", "load_tariffs", "parse_tariffs"]

_TOP_KEYS = ("currency", "tariffs")
_REQUIRED = ("prefix", "name", "class", "rate_per_minute", "increments", "effective_from")
_OPTIONAL = ("connection_fee", "minimum_charge", "free", "effective_to")
_ENTRY_KEYS = _REQUIRED + _OPTIONAL
_INCREMENTS = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")
_DECIMAL_TEXT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_CLASS = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_MISSING = object()


class TariffFileError(ValueError):
    """The tariff file cannot be used; ``problems`` has one line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_tariffs(
    path: Path,
    *,
    timezone: ZoneInfo,
    country_code: str = "40",
    national_prefix: str = "0",
    international_prefix: str = "00",
) -> TariffTable:
    """Read and validate ``path``; raises :class:`TariffFileError` listing every problem."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TariffFileError([f"{source}: cannot read: {exc}"]) from None
    return parse_tariffs(
        text,
        source=source,
        timezone=timezone,
        country_code=country_code,
        national_prefix=national_prefix,
        international_prefix=international_prefix,
    )


def parse_tariffs(
    text: str,
    *,
    source: str,
    timezone: ZoneInfo,
    country_code: str = "40",
    national_prefix: str = "0",
    international_prefix: str = "00",
) -> TariffTable:
    """:func:`load_tariffs` on text already read; ``source`` names it in messages."""
    try:
        data = yaml.load(text, Loader=_TariffLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise TariffFileError([f"{where}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise TariffFileError([f"{source}: invalid YAML: {exc}"]) from None
    numbering = _Numbering(country_code, national_prefix, international_prefix)
    reader = _Reader(source, timezone, numbering)
    table = reader.table(data)
    if reader.problems or table is None:
        raise TariffFileError(reader.problems)
    return table


# ---- YAML: no duplicate keys, numbers from their source text -----------------------------------


class _TariffLoader(UniqueKeyLoader):
    """The configuration's duplicate-refusing SafeLoader, which here also never makes a float."""


def _construct_float(loader: _TariffLoader, node: yaml.ScalarNode) -> Decimal | str:
    """``0.0325`` → ``Decimal("0.0325")`` from the text; ``.inf``, ``1:30.5`` stay strings."""
    raw = str(loader.construct_scalar(node))
    text = raw.replace("_", "")
    return Decimal(text) if _DECIMAL_TEXT.fullmatch(text) else raw


def _construct_int(loader: _TariffLoader, node: yaml.ScalarNode) -> int | str:
    """Plain decimal integers only; ``010``, ``0x10``, ``1:30``, ``+4021`` stay strings."""
    raw = str(loader.construct_scalar(node))
    return int(raw) if re.fullmatch(r"0|[1-9][0-9]*", raw) else raw


def _construct_timestamp(loader: _TariffLoader, node: yaml.ScalarNode) -> date | str:
    """PyYAML's date/datetime, or the text when it is no real date (``2026-13-01``)."""
    try:
        value: date = loader.construct_yaml_timestamp(node)
    except ValueError:
        return str(loader.construct_scalar(node))
    return value


_TariffLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)
_TariffLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_TariffLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


# ---- validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Numbering:
    country_code: str
    national_prefix: str
    international_prefix: str


class _Invalid(Exception):
    """One field's problem: ``expected``, and optionally a hint after the shown value."""

    def __init__(self, expected: str, hint: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.hint = hint


def _shown(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return repr(value)


class _Reader:
    def __init__(self, source: str, timezone: ZoneInfo, numbering: _Numbering) -> None:
        self.source = source
        self.timezone = timezone
        self.numbering = numbering
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def field(self, where: str, raw: object, parse: Callable[[Any], Any]) -> Any:
        """``parse(raw)``, or None after recording ``expected …, got …`` (a missing key: None)."""
        if raw is _MISSING:  # already reported as missing
            return None
        try:
            return parse(raw)
        except _Invalid as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            self.problem(where, f"expected {exc.expected}, got {_shown(raw)}{hint}")
            return None

    def unknown_keys(self, where: str, mapping: Mapping[Any, Any], known: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1) or [
                    k for k in known if str(key) and (k.startswith(str(key)) or str(key).startswith(k))
                ]
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
                name = f"{where}.{key}" if where else str(key)
                self.problem(name, f"unknown key{hint}")

    def table(self, data: object) -> TariffTable | None:
        if not isinstance(data, dict):
            self.problem("(top level)", f"expected a mapping with 'currency' and 'tariffs', got {type(data).__name__}")
            return None
        self.unknown_keys("", data, _TOP_KEYS)
        currency = self.field("currency", data.get("currency", "RON"), _currency)
        raw_entries = data.get("tariffs")
        if not isinstance(raw_entries, list) or not raw_entries:
            self.problem("tariffs", f"expected a non-empty list of tariffs, got {_shown(raw_entries)}")
            return None
        entries = [self.entry(i, raw) for i, raw in enumerate(raw_entries)]
        if self.problems or currency is None:
            return None
        return TariffTable(tuple(e for e in entries if e is not None), currency)

    def entry(self, index: int, raw: object) -> TariffEntry | None:
        at = f"tariffs[{index}]"
        if not isinstance(raw, dict):
            self.problem(at, f"expected a mapping of tariff keys, got {_shown(raw)}")
            return None
        before = len(self.problems)
        self.unknown_keys(at, raw, _ENTRY_KEYS)
        for key in _REQUIRED:
            if key not in raw:
                self.problem(f"{at}.{key}", "required key missing")
        values: dict[str, Any] = {
            "prefix": self.field(f"{at}.prefix", raw.get("prefix", _MISSING), self._prefix),
            "name": self.field(f"{at}.name", raw.get("name", _MISSING), _name),
            "class": self.field(f"{at}.class", raw.get("class", _MISSING), _destination_class),
            "rate": self.field(f"{at}.rate_per_minute", raw.get("rate_per_minute", _MISSING), _rate),
            "increments": self.field(f"{at}.increments", raw.get("increments", _MISSING), _increments),
            "fee": self.field(f"{at}.connection_fee", raw.get("connection_fee", 0), _bani),
            "minimum": self.field(f"{at}.minimum_charge", raw.get("minimum_charge", 0), _bani),
            "free": self.field(f"{at}.free", raw.get("free", False), _flag),
            "from": self.field(f"{at}.effective_from", raw.get("effective_from", _MISSING), self._instant),
            "to": self.field(f"{at}.effective_to", raw.get("effective_to"), self._optional_instant),
        }
        if len(self.problems) > before or any(v is None for k, v in values.items() if k != "to"):
            return None
        if values["to"] is not None and values["to"] <= values["from"]:
            self.problem(
                f"{at}.effective_to",
                f"expected a time after effective_from ({values['from'].isoformat()}), got {values['to'].isoformat()}",
            )
            return None
        initial, step = values["increments"]
        try:
            return TariffEntry(
                prefix=values["prefix"],
                name=values["name"],
                destination_class=values["class"],
                rate_per_minute=values["rate"],
                connection_fee=values["fee"],
                initial_block=initial,
                step=step,
                minimum_charge=values["minimum"],
                free=values["free"],
                effective_from=values["from"],
                effective_to=values["to"],
            )
        except ValueError as exc:  # the domain's own checks; the field checks above should catch all
            self.problem(at, str(exc))
            return None

    # -- parsers that need the reader's settings

    def _prefix(self, raw: object) -> str:
        expected = "a number prefix such as '+4021', '0040 7', '021' or bare E.164 digits ('' = catch-all)"
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise _Invalid(expected)
        if raw.strip() == "":
            return ""
        n = self.numbering
        try:
            return normalise(
                raw,
                country_code=n.country_code,
                national_prefix=n.national_prefix,
                international_prefix=n.international_prefix,
                bare_is_e164=True,
            )
        except InvalidNumber as exc:
            raise _Invalid(expected, str(exc)) from None

    def _instant(self, raw: object) -> datetime:
        expected = "a date (2026-12-01, local midnight) or an ISO datetime (2026-12-01T00:00:00+02:00)"
        value: object = raw
        if isinstance(raw, str):
            try:
                value = datetime.fromisoformat(raw.strip())
            except ValueError:
                raise _Invalid(expected) from None
        if isinstance(value, datetime):
            if value.tzinfo is None:
                return _local(value, self.timezone)
            return value.astimezone(self.timezone)
        if isinstance(value, date):
            return _local(datetime.combine(value, time()), self.timezone)
        raise _Invalid(expected)

    def _optional_instant(self, raw: object) -> datetime | None:
        return None if raw is None else self._instant(raw)


def _local(naive: datetime, timezone: ZoneInfo) -> datetime:
    aware = naive.replace(tzinfo=timezone)
    if aware.astimezone(UTC).astimezone(timezone).replace(tzinfo=None) != naive:
        raise _Invalid(f"a local time that exists in {timezone.key}", "it falls in the DST gap")
    return aware


def _decimal(raw: object, expected: str) -> Decimal:
    """An exact Decimal from a YAML number or string; floats via ``str``, never arithmetic."""
    if isinstance(raw, bool):
        raise _Invalid(expected)
    if isinstance(raw, Decimal):
        value = raw
    elif isinstance(raw, (int, float)):
        value = Decimal(str(raw))
    elif isinstance(raw, str):
        text = raw.strip()
        if re.fullmatch(r"[0-9]+,[0-9]+", text):
            raise _Invalid(expected, "use a dot as the decimal separator")
        if not _DECIMAL_TEXT.fullmatch(text):
            raise _Invalid(expected)
        try:
            value = Decimal(text)
        except InvalidOperation:
            raise _Invalid(expected) from None
    else:
        raise _Invalid(expected)
    if not value.is_finite() or value < 0:
        raise _Invalid(expected)
    if value and not (int(value.as_tuple().exponent) >= MIN_RATE_EXPONENT and value.adjusted() <= MAX_RATE_ADJUSTED):
        raise _Invalid(expected, f"below 1E+{MAX_RATE_ADJUSTED + 1}, at most {-MIN_RATE_EXPONENT} decimal places")
    return value


def _rate(raw: object) -> Decimal:
    return _decimal(raw, 'RON per minute as a decimal >= 0, e.g. "0.0325"')


def _bani(raw: object) -> int:
    expected = 'an amount of RON >= 0 in whole bani, e.g. "0.10"'
    num, den = _decimal(raw, expected).as_integer_ratio()
    bani, rest = divmod(num * 100, den)  # exact: Decimal arithmetic would round at 28 digits
    if rest:
        raise _Invalid(expected, "sub-ban precision is not chargeable")
    return bani


def _increments(raw: object) -> tuple[int, int]:
    expected = "'initial/step' in whole seconds >= 1, e.g. '60/1', '60/60' or '1/1'"
    match = _INCREMENTS.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise _Invalid(expected)
    initial, step = int(match[1]), int(match[2])
    if initial < 1 or step < 1:
        raise _Invalid(expected)
    return initial, step


def _name(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _Invalid("a non-empty name")
    return raw.strip()


def _destination_class(raw: object) -> str:
    if not isinstance(raw, str) or not _CLASS.fullmatch(raw):
        raise _Invalid("a lower-case class name such as national, mobile, international, premium, satellite, onnet")
    return raw


def _flag(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise _Invalid("true or false")
    return raw


def _currency(raw: object) -> str:
    if not isinstance(raw, str) or not _CURRENCY.fullmatch(raw):
        raise _Invalid("an ISO 4217 currency code such as 'RON'")
    return raw
