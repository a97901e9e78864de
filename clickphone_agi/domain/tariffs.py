"""Tariffs: which price applies to an E.164 number at an instant. Pure, stdlib only.

A :class:`TariffEntry` prices every number that starts with its ``prefix`` (E.164 digits:
``40`` all of Romania, ``407`` mobile, ``4021`` Bucharest fixed; ``""`` is a catch-all) during
``[effective_from, effective_to)``. :meth:`TariffTable.match` picks, among the entries in force
at the instant, the one with the LONGEST matching prefix; when several entries with the same
prefix are in force (overlapping periods, which :func:`check` reports), the most recent
``effective_from`` wins, and for equal ``effective_from`` the one listed later in the table.
A number no entry matches has no tariff: the call is denied, never treated as free.

``match`` is a dictionary probe per digit of the number (at most 15 plus the catch-all), not a
scan of the table: FastAGI asks for it on every call attempt.

Amounts are integer bani (1 RON = 100 bani); ``rate_per_minute`` is a :class:`~decimal.Decimal`
number of RON per minute and may have sub-ban precision (``0.0325``). How a call is priced from
an entry is in :mod:`clickphone_agi.domain.rating`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

__all__ = [
    "DESTINATION_CLASSES",
    "MAX_RATE_ADJUSTED",
    "MIN_RATE_EXPONENT",
    "TariffEntry",
    "TariffTable",
    "check",
]

DESTINATION_CLASSES: frozenset[str] = frozenset(
    {"national", "mobile", "international", "premium", "satellite", "onnet", "free"}
)
"""The conventional classes; others are allowed, :func:`check` warns (a typo in ``premium``
would let calls through an account's class block)."""

MIN_RATE_EXPONENT = -18
"""At most 18 decimal places in ``rate_per_minute``."""
MAX_RATE_ADJUSTED = 6
"""``rate_per_minute`` below 10,000,000 RON per minute."""

_PREFIX = re.compile(r"(?:[1-9][0-9]{0,14})?")
_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True)
class TariffEntry:
    """The price of the numbers starting with ``prefix`` during ``[effective_from, effective_to)``.

    ``initial_block``/``step`` are the billing increments in seconds (60/60, 60/1, 1/1): the first
    ``initial_block`` seconds are charged whole, then whole ``step`` s. ``connection_fee`` and
    ``minimum_charge`` are bani; ``free`` entries (on-net, toll-free) cost 0 but are still a
    match, i.e. the call is allowed.
    """

    prefix: str
    name: str
    destination_class: str
    rate_per_minute: Decimal
    connection_fee: int
    initial_block: int
    step: int
    minimum_charge: int
    free: bool
    effective_from: datetime
    effective_to: datetime | None = None
    # rate_per_minute as the exact fraction num/den (Decimal is exact, so is this); the rating
    # module uses it to compute costs in integer arithmetic with no intermediate rounding
    rate_fraction: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_text(self)
        _check_amounts(self)
        if not _aware(self.effective_from):
            raise ValueError("effective_from must be a timezone-aware datetime")
        if self.effective_to is not None:
            if not _aware(self.effective_to):
                raise ValueError("effective_to must be a timezone-aware datetime or None")
            if self.effective_to <= self.effective_from:
                raise ValueError("effective_to must be later than effective_from")
        object.__setattr__(self, "rate_fraction", self.rate_per_minute.as_integer_ratio())

    def in_force(self, at: datetime) -> bool:
        """``effective_from <= at < effective_to`` (no end: open-ended)."""
        return self.effective_from <= at and (self.effective_to is None or at < self.effective_to)


@dataclass(frozen=True)
class TariffTable:
    """All tariff entries of one currency, indexed by prefix for :meth:`match`."""

    entries: tuple[TariffEntry, ...]
    currency: str = "RON"
    # prefix -> its entries, most recent effective_from first (equal: later in ``entries`` first)
    _by_prefix: dict[str, tuple[TariffEntry, ...]] = field(init=False, repr=False, compare=False)
    _lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)  # prefix lengths, longest first

    def __post_init__(self) -> None:
        entries = tuple(self.entries)
        object.__setattr__(self, "entries", entries)
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise ValueError(f"currency must be an ISO 4217 code such as 'RON', got {self.currency!r}")
        grouped: dict[str, list[tuple[int, TariffEntry]]] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, TariffEntry):
                raise TypeError(f"entries[{index}] is a {type(entry).__name__}, not a TariffEntry")
            grouped.setdefault(entry.prefix, []).append((index, entry))
        by_prefix = {
            prefix: tuple(e for _, e in sorted(items, key=lambda ie: (ie[1].effective_from, ie[0]), reverse=True))
            for prefix, items in grouped.items()
        }
        object.__setattr__(self, "_by_prefix", by_prefix)
        object.__setattr__(self, "_lengths", tuple(sorted({len(p) for p in by_prefix}, reverse=True)))

    def match(self, e164: str, at: datetime) -> TariffEntry | None:
        """The entry for ``e164`` (digits, as :func:`~clickphone_agi.domain.numbers.normalise`
        returns them) at the aware instant ``at``: longest prefix among the entries in force;
        None if no entry matches."""
        if at.tzinfo is None:
            raise ValueError("at must be a timezone-aware datetime")
        by_prefix = self._by_prefix
        size = len(e164)
        for length in self._lengths:  # only the lengths some prefix has: a handful, not 16
            if length > size:
                continue
            candidates = by_prefix.get(e164[:length])
            if candidates is None:
                continue
            for entry in candidates:
                if entry.effective_from <= at and (entry.effective_to is None or at < entry.effective_to):
                    return entry
        return None

    def in_force_during(self, e164: str, start: datetime, end: datetime) -> tuple[TariffEntry, ...]:
        """Every entry :meth:`match` returns for ``e164`` at some instant of ``[start, end]``, in
        time order: the one in force at ``start``, then each that takes over before ``end``.

        ``authorize`` prices a call before it is answered, and the tariff in force at the answer
        prices it: a rate change during the ringing must not let a call cost more than its budget.
        """
        return self.priced_during(e164, start, end)[0]

    def lapses_during(self, e164: str, start: datetime, end: datetime) -> bool:
        """True if at some instant of ``[start, end]`` no entry matches ``e164``.

        :meth:`in_force_during` leaves such instants out; ``authorize`` must not let a call ring
        into a moment where no tariff prices it (its CDR could not be charged: the call would be
        free), just as it denies a number without a tariff now.
        """
        return self.priced_during(e164, start, end)[1]

    def priced_during(self, e164: str, start: datetime, end: datetime) -> tuple[tuple[TariffEntry, ...], bool]:
        """(:meth:`in_force_during`, :meth:`lapses_during`) from one walk over the changes: what
        ``authorize`` asks for every call."""
        found: list[TariffEntry] = []
        lapses = False
        for moment in self._changes(e164, start, end):
            current = self.match(e164, moment)
            if current is None:
                lapses = True
            elif current not in found:
                found.append(current)
        return tuple(found), lapses

    def _changes(self, e164: str, start: datetime, end: datetime) -> list[datetime]:
        """``start`` and every instant of ``(start, end]`` where an entry for ``e164`` begins or
        ends, in time order: between two of them :meth:`match` gives the same answer."""
        if end < start:
            raise ValueError("end must not be before start")
        instants = {start}
        size = len(e164)
        for length in self._lengths:
            if length > size:
                continue
            for entry in self._by_prefix.get(e164[:length], ()):
                for moment in (entry.effective_from, entry.effective_to):
                    if moment is not None and start < moment <= end:
                        instants.add(moment)
        return sorted(instants)


_Indexed = tuple[int, TariffEntry]


def check(table: TariffTable) -> list[str]:
    """Human-readable problems in ``table``, in a stable order; ``[]`` when there are none.

    Entries are named ``tariffs[i]``, ``i`` being the position in ``table.entries`` (the order of
    the tariff file). Reported:

    * two entries with the same prefix whose periods overlap (``match`` then takes the more
      recent ``effective_from``; that is almost always a forgotten ``effective_to``);
    * an entry that can never match: for its whole period, entries with the same prefix that
      win over it (a later ``effective_from``, or the same one and listed later) are in force.
      An exact duplicate is the simplest case. A prefix covered by longer prefixes for all ten
      following digits is NOT reported: it still rates numbers that end right after the prefix
      and costs nothing to keep;
    * a gap between two consecutive periods of one prefix (calls then fall back to a shorter
      prefix, or find no tariff);
    * a catch-all (empty prefix): every number without a longer match is priced by it, including
      mistyped and fraud destinations;
    * a zero ``rate_per_minute`` on an entry not marked ``free``; charges on a ``free`` entry
      (they are ignored);
    * a ``destination_class`` outside :data:`DESTINATION_CLASSES`.
    """
    problems: list[str] = []
    indexed = list(enumerate(table.entries))
    grouped: dict[str, list[_Indexed]] = {}
    for item in indexed:
        grouped.setdefault(item[1].prefix, []).append(item)
    for prefix in sorted(grouped, key=lambda p: (len(p), p)):
        problems.extend(_check_versions(prefix, grouped[prefix]))
    for item in indexed:
        problems.extend(_check_entry(item))
    return problems


def _label(item: _Indexed) -> str:
    i, entry = item
    return f"tariffs[{i}] {entry.name!r} (prefix {entry.prefix or '(catch-all)'}, {_period(entry)})"


def _check_versions(prefix: str, items: list[_Indexed]) -> list[str]:
    """Overlaps, never-matching entries and gaps among the entries of one prefix."""
    problems: list[str] = []
    # the order match() prefers, reversed: older effective_from first, then table order
    versions = sorted(items, key=lambda ie: (ie[1].effective_from, ie[0]))
    for i, older in enumerate(versions):
        for newer in versions[i + 1 :]:
            if _overlaps(older[1], newer[1]):
                problems.append(
                    f"{_label(older)} overlaps {_label(newer)}; the later effective_from wins while both apply"
                )
    for i, item in enumerate(versions):
        if _covered(item[1], [e for _, e in versions[i + 1 :]]):
            problems.append(f"{_label(item)} can never match: entries with the same prefix cover its whole period")
    ends: datetime | None = versions[0][1].effective_to
    for _, entry in versions[1:]:
        if ends is None:
            break
        if ends < entry.effective_from:
            problems.append(
                f"prefix {prefix or '(catch-all)'} has no entry from {ends.isoformat()} to"
                f" {entry.effective_from.isoformat()}; calls fall back to a shorter prefix or find no tariff"
            )
        ends = None if entry.effective_to is None else max(ends, entry.effective_to)
    return problems


def _check_entry(item: _Indexed) -> list[str]:
    """Problems of one entry on its own."""
    problems: list[str] = []
    entry = item[1]
    if entry.prefix == "":
        problems.append(
            f"{_label(item)} is a catch-all: every number without a longer prefix is priced by it,"
            " including mistyped and fraud destinations"
        )
    if entry.free:
        if entry.rate_per_minute or entry.connection_fee or entry.minimum_charge:
            problems.append(f"{_label(item)} is free: its rate, connection fee and minimum charge are ignored")
    elif entry.rate_per_minute == 0:
        problems.append(f"{_label(item)} has a zero rate_per_minute but is not marked free")
    if entry.destination_class not in DESTINATION_CLASSES:
        known = ", ".join(sorted(DESTINATION_CLASSES))
        problems.append(f"{_label(item)} has an unusual destination_class {entry.destination_class!r} (known: {known})")
    return problems


def _check_text(entry: TariffEntry) -> None:
    if not isinstance(entry.prefix, str) or not _PREFIX.fullmatch(entry.prefix):
        raise ValueError(f"prefix must be E.164 digits (or '' for a catch-all), got {entry.prefix!r}")
    if not isinstance(entry.name, str) or not entry.name.strip():
        raise ValueError("name must be a non-empty string")
    if not isinstance(entry.destination_class, str) or not entry.destination_class.strip():
        raise ValueError("destination_class must be a non-empty string")
    if type(entry.free) is not bool:
        raise ValueError(f"free must be a bool, got {entry.free!r}")


def _check_amounts(entry: TariffEntry) -> None:
    rate = entry.rate_per_minute
    if not isinstance(rate, Decimal) or not rate.is_finite() or rate < 0:
        raise ValueError(f"rate_per_minute must be a finite Decimal >= 0, got {rate!r}")
    if rate and not (int(rate.as_tuple().exponent) >= MIN_RATE_EXPONENT and rate.adjusted() <= MAX_RATE_ADJUSTED):
        # bounded so that the exact fraction stays small (1E+999999999 would exhaust memory)
        raise ValueError(
            f"rate_per_minute must be below 1E+{MAX_RATE_ADJUSTED + 1} with at most"
            f" {-MIN_RATE_EXPONENT} decimal places, got {rate!r}"
        )
    for name in ("connection_fee", "minimum_charge"):
        value = getattr(entry, name)
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} must be an int of bani >= 0, got {value!r}")
    for name in ("initial_block", "step"):
        value = getattr(entry, name)
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be an int of seconds >= 1, got {value!r}")


def _aware(value: object) -> bool:
    return isinstance(value, datetime) and value.tzinfo is not None and value.utcoffset() is not None


def _period(entry: TariffEntry) -> str:
    end = "open-ended" if entry.effective_to is None else f"to {entry.effective_to.isoformat()}"
    return f"from {entry.effective_from.isoformat()} {end}"


def _overlaps(a: TariffEntry, b: TariffEntry) -> bool:
    a_before_b_ends = b.effective_to is None or a.effective_from < b.effective_to
    b_before_a_ends = a.effective_to is None or b.effective_from < a.effective_to
    return a_before_b_ends and b_before_a_ends


def _covered(entry: TariffEntry, winners: Iterable[TariffEntry]) -> bool:
    """The union of ``winners``' periods (none starts before ``entry``) covers ``entry``'s period."""
    reached = entry.effective_from  # covered up to here (exclusive)
    for other in sorted(winners, key=lambda e: e.effective_from):
        if other.effective_from > reached:
            return False
        if other.effective_to is None:
            return True
        reached = max(reached, other.effective_to)
        if entry.effective_to is not None and reached >= entry.effective_to:
            return True
    return False
