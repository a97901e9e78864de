"""Fuzzing the number normaliser, the tariff matcher and the tariff file's prefixes.

tests/test_rating.py holds the example tables and the longest-prefix property on bare digits;
these add any text, any valid numbering plan and the path from what was dialled (or written in
a tariff file) to the entry that prices it:

* ``normalise`` returns 1-15 digits not starting with 0, or raises :class:`InvalidNumber`;
* it is idempotent: its result, read back as ``+digits`` or as bare E.164 (how a tariff file
  may write it), is itself; separators never change it; every written form of a number
  (``+…``, international prefix, national prefix) gives the same digits;
* ``is_emergency`` never raises, whatever the text and the configured extra numbers;
* ``rate`` of any dialled text raises only :class:`InvalidNumber`, and prices every written form
  of a number with the entry whose prefix is the longest that number starts with, in force then.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from clickphone_agi.adapters.tariff_file import load_tariffs
from clickphone_agi.domain.numbers import InvalidNumber, compact, is_emergency, normalise
from clickphone_agi.domain.rating import rate
from clickphone_agi.domain.tariffs import TariffEntry, TariffTable
from tests.fuzz.budget import fuzz

E164 = re.compile(r"[1-9][0-9]{0,14}")


@st.composite
def plans(draw: st.DrawFn) -> dict[str, str]:
    """A valid numbering plan (what billing.* accepts): Romania's most of the time."""
    if draw(st.integers(0, 2)) == 0:
        return {"country_code": "40", "national_prefix": "0", "international_prefix": "00"}
    country = draw(st.from_regex(r"[1-9][0-9]{0,2}", fullmatch=True))
    national = draw(st.sampled_from(["", "0", "1", "8", "06", "0"]) | st.from_regex(r"[0-9]{1,4}", fullmatch=True))
    international = draw(
        st.sampled_from(["00", "011", "810", "000", "0011"]) | st.from_regex(r"[0-9]{1,4}", fullmatch=True)
    )
    if international == national:
        international = national + "9"
    return {"country_code": country, "national_prefix": national, "international_prefix": international}


# digits and separators, the "(0)" notation, Arabic-Indic and fullwidth digits, odd spaces
_PIECES = [*"0123456789+ -.()\t", "(0)", "( 0 )", "\u0663", "\uff10", "x", "*", "#", "\u00a0", "\u2028"]
_DIALLED = st.lists(st.sampled_from(_PIECES), max_size=20).map("".join)
TEXT = _DIALLED | st.text(max_size=25)
_SEPARATORS = st.sampled_from([" ", "-", ".", "\t", "  ", " - "])


@fuzz(300)
@given(number=TEXT, plan=plans(), bare=st.booleans())
def test_normalise_returns_e164_digits_or_raises_invalid_number(number: str, plan: dict[str, str], bare: bool) -> None:
    try:
        digits = normalise(number, bare_is_e164=bare, **plan)
    except InvalidNumber:
        return
    assert E164.fullmatch(digits), digits


@fuzz(300)
@given(number=TEXT, plan=plans())
@example(number="+4021", plan={"country_code": "40", "national_prefix": "", "international_prefix": "00"})
@example(number="+81312345678", plan={"country_code": "7", "national_prefix": "8", "international_prefix": "810"})
def test_normalise_is_idempotent(number: str, plan: dict[str, str]) -> None:
    """Regression (the bare E.164 reading): with an empty or non-zero national prefix, bare E.164
    digits in a tariff file were read as a national number (``4021`` → ``404021`` with
    ``national_prefix: ""``; Japan's ``81…`` → ``71…`` with ``8``): the tariff never matched."""
    try:
        digits = normalise(number, **plan)
    except InvalidNumber:
        return
    assert normalise("+" + digits, **plan) == digits
    assert normalise(digits, bare_is_e164=True, **plan) == digits


@fuzz(200)
@given(
    e164=st.from_regex(r"[1-9][0-9]{3,12}", fullmatch=True),
    plan=plans(),
    seps=st.lists(st.tuples(st.integers(0, 20), _SEPARATORS), max_size=4),
)
def test_every_written_form_of_a_number_gives_the_same_digits(
    e164: str, plan: dict[str, str], seps: list[tuple[int, str]]
) -> None:
    country, national, international = plan["country_code"], plan["national_prefix"], plan["international_prefix"]
    forms = ["+" + e164, international + e164]
    rest = e164[len(country) :]
    # the national form, where the plan is unambiguous: a national number never starts with 0,
    # and trunk prefix + number must not read as the international prefix
    unambiguous = rest[:1] not in ("", "0") and not (national + rest).startswith(international)
    if national and e164.startswith(country) and unambiguous:
        forms.append(national + rest)
    expected = normalise(forms[0], **plan)
    assert expected == e164
    for form in forms:
        spaced = form
        for position, separator in seps:  # separators between digits change nothing
            cut = 1 + position % max(1, len(spaced) - 1)
            spaced = spaced[:cut] + separator + spaced[cut:]
        for written in (form, spaced, f"  {spaced}\t"):
            assert normalise(written, **plan) == expected, written


@fuzz(200)
@given(number=TEXT, extra=st.lists(TEXT | st.from_regex(r"[0-9]{2,6}", fullmatch=True), max_size=4), plan=plans())
def test_is_emergency_never_raises(number: str, extra: list[str], plan: dict[str, str]) -> None:
    assert is_emergency(number, extra, **plan) in (True, False)
    if number.strip().replace(" ", "") == "112":
        assert is_emergency(number, extra, **plan)


def _is_emergency_entry_by_entry(number: str, extra: list[str], plan: dict[str, str]) -> bool:
    """The definition, one entry at a time (how is_emergency worked before its forms were cached)."""
    dialled = compact(number.strip())
    if not dialled:
        return False
    if dialled == "112":
        return True

    def full(n: str) -> str | None:
        try:
            return normalise(n, **plan)
        except InvalidNumber:
            return None

    for entry in extra:
        short = compact(entry.strip())
        if short == dialled:
            return True
        entry_e164 = full(short)
        if entry_e164 is not None and entry_e164 == (full(dialled) or ""):
            return True
    return False


@fuzz(200)
@given(
    number=TEXT | st.from_regex(r"\+?(00|0)?[0-9 ]{2,12}", fullmatch=True),
    extra=st.lists(TEXT | st.from_regex(r"\+?(00|0)?[0-9 ]{2,12}", fullmatch=True), max_size=4),
    plan=plans(),
)
def test_is_emergency_agrees_with_its_definition(number: str, extra: list[str], plan: dict[str, str]) -> None:
    assert is_emergency(number, extra, **plan) is _is_emergency_entry_by_entry(number, extra, plan)
    for entry in extra:  # every configured entry, dialled as written, is an emergency number
        if compact(entry.strip()):
            assert is_emergency(entry, extra, **plan)


# ---- tariffs: from the dialled text to the entry ------------------------------------------------------------

SINCE = datetime(2026, 1, 1, tzinfo=UTC)
MOMENTS = [SINCE + timedelta(days=d) for d in (0, 30, 60, 90, 365)]


def _entry(prefix: str, index: int, since: datetime, until: datetime | None) -> TariffEntry:
    return TariffEntry(
        prefix=prefix,
        name=f"e{index}",
        destination_class="national",
        rate_per_minute=Decimal(index + 1) / 100,
        connection_fee=0,
        initial_block=60,
        step=1,
        minimum_charge=0,
        free=False,
        effective_from=since,
        effective_to=until,
    )


@st.composite
def tables(draw: st.DrawFn) -> TariffTable:
    entries = []
    for index in range(draw(st.integers(1, 10))):
        prefix = draw(st.sampled_from(["", "4", "40", "402", "4021", "407", "1", "44", "4420"]))
        since = draw(st.sampled_from(MOMENTS))
        later = [m for m in MOMENTS if m > since]
        until = draw(st.none() | st.sampled_from(later)) if later else None
        entries.append(_entry(prefix, index, since, until))
    return TariffTable(tuple(entries))


@fuzz(250)
@given(
    table=tables(),
    national=st.from_regex(r"[1-9][0-9]{4,8}", fullmatch=True),
    at=st.sampled_from(MOMENTS) | st.datetimes(timezones=st.just(UTC)),
    seconds=st.integers(0, 100_000),
)
def test_every_dialled_form_is_priced_by_the_longest_prefix_in_force(
    table: TariffTable, national: str, at: datetime, seconds: int
) -> None:
    e164 = "40" + national
    prices = set()
    for dialled in ("+" + e164, "00" + e164, "0" + national, f"+40 {national[:2]} {national[2:]}", f"0040-{national}"):
        rated = rate(table, dialled, seconds, at)
        prices.add(None if rated is None else (rated.entry.name, rated.cost))
    assert len(prices) == 1  # the written form never changes the price
    in_force = [e for e in table.entries if e.in_force(at) and e164.startswith(e.prefix)]
    (price,) = prices
    if not in_force:
        assert price is None
        return
    longest = max(len(e.prefix) for e in in_force)
    candidates = [e for e in in_force if len(e.prefix) == longest]
    newest = max(e.effective_from for e in candidates)
    winner = [e for e in candidates if e.effective_from == newest][-1]  # equal starts: listed later wins
    assert price is not None
    assert price[0] == winner.name


@fuzz(200)
@given(table=tables(), dialled=TEXT, seconds=st.integers(0, 10**6))
def test_rate_of_any_text_raises_only_invalid_number(table: TariffTable, dialled: str, seconds: int) -> None:
    try:
        rated = rate(table, dialled, seconds, SINCE)
    except InvalidNumber:
        return
    if rated is not None:
        assert rated.cost >= 0
        assert rated.billed_seconds >= seconds


@fuzz(50)
@given(plan=plans(), e164=st.from_regex(r"[1-9][0-9]{1,6}", fullmatch=True))
@example(plan={"country_code": "40", "national_prefix": "", "international_prefix": "00"}, e164="4021")
def test_a_tariff_file_prefix_in_bare_e164_is_that_prefix(
    tmp_path_factory: pytest.TempPathFactory, plan: dict[str, str], e164: str
) -> None:
    """The tariff file's documented forms ('+4021', '004021', bare '4021') name the same prefix,
    under any numbering plan (regression: see test_normalise_is_idempotent). An international
    prefix that does not start with 0 cannot be told from E.164 digits: bare digits win."""
    directory = tmp_path_factory.mktemp("tariffs")
    prefixes = []
    forms = [f'"+{e164}"', f'"{e164}"']
    if plan["international_prefix"].startswith("0"):
        forms.append(f'"{plan["international_prefix"]}{e164}"')
    for written in forms:
        path = directory / "tariffs.yaml"
        path.write_text(
            "currency: RON\ntariffs:\n"
            f"  - prefix: {written}\n    name: x\n    class: national\n    rate_per_minute: '0.05'\n"
            "    increments: 60/1\n    effective_from: 2026-01-01\n"
        )
        table = load_tariffs(path, timezone=ZoneInfo("Europe/Bucharest"), **plan)
        prefixes.append(table.entries[0].prefix)
    assert prefixes == [e164] * len(forms)
