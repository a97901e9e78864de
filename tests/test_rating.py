"""Numbers, tariff matching and rating: exact bani, one rounding rule, no float anywhere."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal, localcontext
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickphone_agi.domain.numbers import InvalidNumber, is_emergency, normalise
from clickphone_agi.domain.rating import Rated, billed_seconds, cost, max_seconds, rate
from clickphone_agi.domain.tariffs import TariffEntry, TariffTable, check

TZ = ZoneInfo("Europe/Bucharest")
SINCE = datetime(2026, 1, 1, tzinfo=TZ)
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=TZ)


def entry(
    prefix: str = "40",
    rate_per_minute: str = "0.05",
    increments: str = "60/1",
    *,
    fee: int = 0,
    minimum: int = 0,
    free: bool = False,
    cls: str = "national",
    since: datetime = SINCE,
    until: datetime | None = None,
    name: str | None = None,
) -> TariffEntry:
    initial, step = (int(x) for x in increments.split("/"))
    return TariffEntry(
        prefix=prefix,
        name=name or f"test {prefix}",
        destination_class=cls,
        rate_per_minute=Decimal(rate_per_minute),
        connection_fee=fee,
        initial_block=initial,
        step=step,
        minimum_charge=minimum,
        free=free,
        effective_from=since,
        effective_to=until,
    )


# ---- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("+40212345678", "40212345678"),
        ("0040212345678", "40212345678"),
        ("0212345678", "40212345678"),
        ("00441234567", "441234567"),
        ("+40 21 234 5678", "40212345678"),
        ("021-234.56.78", "40212345678"),
        ("(021) 234 56 78", "40212345678"),
        ("  0721 234 567\t", "40721234567"),
        ("+40 (0) 21 234 5678", "40212345678"),  # the "(0)" notation is not dialled from abroad
        ("0040 (0)21 234 5678", "40212345678"),
        ("+1 (212) 555-0100", "12125550100"),
        ("+123456789012345", "123456789012345"),  # 15 digits: the E.164 maximum
    ],
)
def test_normalise_accepts_the_usual_forms(dialled: str, expected: str) -> None:
    assert normalise(dialled) == expected


@pytest.mark.parametrize(
    "dialled",
    [
        "",
        "   ",
        "+",
        "00",
        "0",  # a national prefix with nothing after it
        "021234567a",
        "O212345678",  # letter O, not zero
        "40+212345678",  # '+' in the middle
        "++40212345678",
        "0212*345",
        "#21",
        "+1234567890123456",  # 16 digits
        "00 1234 5678 9012 3456",
        "+0212345678",  # a country code never starts with 0
        "000212345678",
        "40212345678",  # bare digits: not +, 00 or 0
        "112",
        "1234",  # an internal extension
        "+٤٠٢١٢٣٤٥٦٧٨",  # non-ASCII digits
    ],
)
def test_normalise_rejects_with_a_typed_error(dialled: str) -> None:
    with pytest.raises(InvalidNumber):
        normalise(dialled)


def test_invalid_number_is_a_value_error() -> None:
    assert issubclass(InvalidNumber, ValueError)


def test_bare_digits_are_e164_only_on_request() -> None:
    """Bare digits are short codes when dialled in Romania, E.164 where the caller says so."""
    assert normalise("40212345678", bare_is_e164=True) == "40212345678"
    assert normalise("0212345678", bare_is_e164=True) == "40212345678"  # the national prefix still applies
    with pytest.raises(InvalidNumber):
        normalise("0212345678a", bare_is_e164=True)


def test_normalise_uses_the_numbering_plan_parameters() -> None:
    assert normalise("020 7946 0000", country_code="44") == "442079460000"
    assert normalise("011 49 30 1234", country_code="1", national_prefix="1", international_prefix="011") == (
        "49301234"
    )
    assert normalise("2125550100", country_code="1", national_prefix="") == "12125550100"


def test_normalise_rejects_a_bad_numbering_plan() -> None:
    with pytest.raises(ValueError, match="country_code"):
        normalise("0212345678", country_code="040")
    with pytest.raises(ValueError, match="international_prefix"):
        normalise("0212345678", international_prefix="")


@given(st.from_regex(r"[1-9][0-9]{0,14}", fullmatch=True))
def test_normalise_round_trips_e164(e164: str) -> None:
    assert normalise("+" + e164) == e164
    assert normalise("00" + e164) == e164
    assert normalise(e164, bare_is_e164=True) == e164


@pytest.mark.parametrize(
    ("dialled", "extra", "expected"),
    [
        ("112", (), True),
        (" 1 1 2 ", (), True),
        ("112", ("911",), True),  # 112 always counts
        ("911", ("911",), True),
        ("0212345678", (), False),
        ("+112", (), False),  # not a short code any more
        ("0112", (), False),
        ("", (), False),
        ("abc", ("112",), False),
        ("021 311 1111", ("+40 21 311 1111",), True),  # full numbers compare as E.164
        ("0040213111111", ("0213111111",), True),
        ("0213111112", ("+40213111111",), False),
    ],
)
def test_is_emergency(dialled: str, extra: tuple[str, ...], expected: bool) -> None:
    assert is_emergency(dialled, extra) is expected


# ---- cost: a table of exact bani --------------------------------------------------------------

COST_CASES = [
    # (description, entry, billable seconds, billed seconds, bani)
    ("60/60: 3 s is one whole minute", entry(increments="60/60"), 3, 60, 5),
    ("60/60: 60 s", entry(increments="60/60"), 60, 60, 5),
    ("60/60: 65 s is two minutes", entry(increments="60/60"), 65, 120, 10),
    ("60/1: 3 s is the first 60 s", entry(), 3, 60, 5),
    ("60/1: 65 s = 5.4166... bani, up to 6", entry(), 65, 65, 6),
    ("60/1: 72 s = exactly 6 bani, no rounding", entry(), 72, 72, 6),
    ("60/1: 73 s = 6.0833... bani, up to 7", entry(), 73, 73, 7),
    ("1/1: 1 s = 0.0833... bani, up to 1", entry(increments="1/1"), 1, 1, 1),
    ("1/1: 12 s = exactly 1 ban", entry(increments="1/1"), 12, 12, 1),
    ("1/1: 13 s = 1.0833... bani, up to 2", entry(increments="1/1"), 13, 13, 2),
    ("30/6: 31 s is 36 s", entry(increments="30/6"), 31, 36, 3),
    ("connection fee 10 bani + 60/1 65 s", entry(fee=10), 65, 65, 16),
    ("minimum charge 3 bani beats 1/1 1 s", entry(increments="1/1", minimum=3), 1, 1, 3),
    ("minimum charge 3 bani, 1/1 60 s = 5", entry(increments="1/1", minimum=3), 60, 60, 5),
    ("minimum applies to fee + variable", entry(increments="1/1", fee=2, minimum=5), 12, 12, 5),
    ("free number", entry("4031860", "0.05", free=True, fee=10, minimum=5), 3600, 3600, 0),
    ("0 seconds: nothing, not even the fee", entry(fee=10, minimum=3), 0, 0, 0),
    ("4 decimals: 0.0325 RON/min, 60/1, 61 s = 3.3041... -> 4", entry(rate_per_minute="0.0325"), 61, 61, 4),
    ("4 decimals: 0.0325 RON/min, 1 hour = 195 bani exactly", entry(rate_per_minute="0.0325"), 3600, 3600, 195),
    ("satellite 45 RON/min, 60/60, 61 s", entry("870", "45.00", "60/60"), 61, 120, 9000),
    ("zero rate with a flat fee", entry(rate_per_minute="0", fee=25), 600, 600, 25),
    ("sub-ban rate 0.00001 RON/min, 1 s is still 1 ban", entry(rate_per_minute="0.00001", increments="1/1"), 1, 1, 1),
]


@pytest.mark.parametrize(
    ("tariff", "seconds", "billed", "bani"),
    [case[1:] for case in COST_CASES],
    ids=[case[0] for case in COST_CASES],
)
def test_cost_table(tariff: TariffEntry, seconds: int, billed: int, bani: int) -> None:
    assert billed_seconds(tariff, seconds) == billed
    charged = cost(tariff, seconds)
    assert charged == bani
    assert type(charged) is int


def decimal_reference(tariff: TariffEntry, seconds: int) -> int:
    """The documented rule computed the slow way: Decimal, one ROUND_CEILING at the end."""
    billed = billed_seconds(tariff, seconds)
    if billed == 0 or tariff.free:
        return 0
    with localcontext() as ctx:
        ctx.prec = 200
        exact = tariff.rate_per_minute * billed * 100 / 60
        variable = int(exact.to_integral_value(rounding=ROUND_CEILING))
    return max(tariff.minimum_charge, tariff.connection_fee + variable)


def test_negative_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="billable_seconds"):
        cost(entry(), -1)


# ---- tariff entries and tables ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prefix": "+40"}, "prefix"),
        ({"prefix": "040"}, "prefix"),
        ({"rate_per_minute": Decimal("-0.01")}, "rate_per_minute"),
        ({"rate_per_minute": Decimal("NaN")}, "rate_per_minute"),
        ({"rate_per_minute": 0.05}, "rate_per_minute"),  # a float is refused outright
        ({"connection_fee": -1}, "connection_fee"),
        ({"minimum_charge": 1.5}, "minimum_charge"),
        ({"initial_block": 0}, "initial_block"),
        ({"step": 0}, "step"),
        ({"effective_from": datetime(2026, 1, 1)}, "aware"),
        ({"effective_to": SINCE}, "later"),
        ({"name": " "}, "name"),
    ],
)
def test_tariff_entry_validates(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(entry(), **change)  # type: ignore[arg-type]


def test_a_catch_all_prefix_is_allowed() -> None:
    table = TariffTable((entry("", "1.00", cls="international"),))
    matched = table.match("8613800000000", NOW)
    assert matched is not None
    assert matched.prefix == ""


TABLE = TariffTable(
    (
        entry("40", "0.05", name="Romania"),
        entry("407", "0.045", cls="mobile", name="Romania mobile"),
        entry("4072", "0.04", cls="mobile", name="Romania mobile 072"),
        entry("4031860", "0", free=True, cls="onnet", name="ClickPhone on-net"),
    )
)


@pytest.mark.parametrize(
    ("e164", "expected"),
    [
        ("40212345678", "Romania"),
        ("40745123456", "Romania mobile"),
        ("40721234567", "Romania mobile 072"),
        ("4072", "Romania mobile 072"),  # the number may end right at the prefix
        ("407", "Romania mobile"),
        ("40318601234", "ClickPhone on-net"),
        ("40318611234", "Romania"),
        ("4", None),
        ("441234567", None),
    ],
)
def test_longest_prefix_wins(e164: str, expected: str | None) -> None:
    matched = TABLE.match(e164, NOW)
    assert (matched.name if matched else None) == expected


def test_no_tariff_is_none_not_free() -> None:
    assert rate(TABLE, "00441234567", 60, NOW) is None


def test_rate_a_dialled_number() -> None:
    rated = rate(TABLE, "0721 234 567", 65, NOW)
    assert rated == Rated(TABLE.entries[2], 65, 5)  # 0.04 * 65 / 60 = 4.33... -> 5
    on_net = rate(TABLE, "+40 31 860 1234", 3600, NOW)
    assert on_net is not None
    assert on_net.cost == 0
    assert on_net.entry.free


def test_rate_refuses_what_is_not_a_number() -> None:
    with pytest.raises(InvalidNumber):
        rate(TABLE, "100", 60, NOW)  # an extension is not a PSTN destination


def test_match_needs_an_aware_time() -> None:
    with pytest.raises(ValueError, match="aware"):
        TABLE.match("40212345678", datetime(2026, 6, 1))


CHANGE = datetime(2026, 12, 1, tzinfo=TZ)  # 2026-11-30T22:00:00Z
PRICE_CHANGE = TariffTable(
    (
        entry("407", "0.06", cls="mobile", until=CHANGE, name="mobile 2026"),
        entry("407", "0.04", cls="mobile", since=CHANGE, name="mobile from December"),
        entry("40", "0.05", name="Romania"),
    )
)


@pytest.mark.parametrize(
    ("answered", "expected"),
    [
        (datetime(2026, 11, 30, 23, 59, 59, tzinfo=TZ), "mobile 2026"),
        (datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=TZ), "mobile 2026"),
        (datetime(2026, 12, 1, 0, 0, 0, tzinfo=TZ), "mobile from December"),
        (datetime(2026, 11, 30, 21, 59, 59, tzinfo=UTC), "mobile 2026"),  # the same instants in UTC
        (datetime(2026, 11, 30, 22, 0, 0, tzinfo=UTC), "mobile from December"),
    ],
)
def test_tariff_change_at_local_midnight(answered: datetime, expected: str) -> None:
    matched = PRICE_CHANGE.match("40721234567", answered)
    assert matched is not None
    assert matched.name == expected


def test_a_call_is_priced_at_its_answer_time_even_across_a_change() -> None:
    """A long call answered before the change keeps the old rate for all its seconds."""
    rated = rate(PRICE_CHANGE, "0721234567", 3600, datetime(2026, 11, 30, 23, 30, tzinfo=TZ))
    assert rated is not None
    assert rated.cost == 360  # 0.06 RON/min * 60 min


def test_before_any_entry_and_after_an_end_there_is_no_tariff() -> None:
    table = TariffTable((entry("40", since=SINCE, until=CHANGE),))
    assert table.match("40212345678", SINCE - timedelta(microseconds=1)) is None
    assert table.match("40212345678", SINCE) is not None
    assert table.match("40212345678", CHANGE) is None


def test_an_expired_longer_prefix_falls_back_to_a_shorter_one() -> None:
    table = TariffTable((entry("40", name="Romania"), entry("407", until=CHANGE, name="old mobile")))
    matched = table.match("40721234567", CHANGE)
    assert matched is not None
    assert matched.name == "Romania"


def test_overlapping_versions_most_recent_effective_from_wins() -> None:
    old = entry("407", "0.06", name="open-ended old")
    new = entry("407", "0.04", since=CHANGE, name="new")
    table = TariffTable((new, old))  # the table order does not matter
    assert table.match("40721234567", CHANGE) is new
    assert table.match("40721234567", CHANGE - timedelta(seconds=1)) is old


def test_equal_effective_from_the_later_entry_wins() -> None:
    first, second = entry("407", "0.06", name="first"), entry("407", "0.04", name="second")
    assert TariffTable((first, second)).match("407", NOW) is second


# ---- check() ----------------------------------------------------------------------------------


def test_check_is_quiet_on_a_clean_table() -> None:
    assert check(TABLE) == []
    assert check(PRICE_CHANGE) == []


def test_check_reports_overlapping_periods() -> None:
    table = TariffTable(
        (
            entry("407", "0.06", until=datetime(2026, 12, 2, tzinfo=TZ), name="old"),
            entry("407", "0.04", since=CHANGE, name="new"),
        )
    )
    problems = check(table)
    assert len(problems) == 1
    assert "tariffs[0] 'old'" in problems[0]
    assert "overlaps tariffs[1] 'new'" in problems[0]


def test_check_reports_an_exact_duplicate_that_can_never_match() -> None:
    table = TariffTable((entry("407", name="a"), entry("407", name="b")))
    problems = check(table)
    assert any("overlaps" in p for p in problems)
    assert any(p.startswith("tariffs[0] 'a'") and "can never match" in p for p in problems)
    assert not any(p.startswith("tariffs[1]") and "can never match" in p for p in problems)


def test_check_reports_an_entry_covered_piecewise() -> None:
    table = TariffTable(
        (
            entry("407", name="whole year", until=datetime(2027, 1, 1, tzinfo=TZ)),
            entry("407", name="first half", until=datetime(2026, 7, 1, tzinfo=TZ)),
            entry("407", name="second half", since=datetime(2026, 7, 1, tzinfo=TZ)),
        )
    )
    never = [p for p in check(table) if "can never match" in p]
    assert len(never) == 1
    assert "'whole year'" in never[0]


def test_check_reports_gaps_catch_alls_zero_rates_and_odd_classes() -> None:
    table = TariffTable(
        (
            entry("407", until=datetime(2026, 11, 30, tzinfo=TZ), name="old"),
            entry("407", since=CHANGE, name="new"),
            entry("", "2.00", cls="international", name="rest of the world"),
            entry("4080", "0", name="forgot free"),
            entry("40900", "1.50", cls="premuim", name="typo"),
            entry("4031860", "0.01", free=True, cls="onnet", name="free with a rate"),
        )
    )
    text = "\n".join(check(table))
    assert "prefix 407 has no entry from 2026-11-30T00:00:00+02:00 to 2026-12-01T00:00:00+02:00" in text
    assert "'rest of the world' (prefix (catch-all)" in text
    assert "is a catch-all" in text
    assert "'forgot free'" in text
    assert "zero rate_per_minute but is not marked free" in text
    assert "unusual destination_class 'premuim'" in text
    assert "'free with a rate'" in text
    assert "are ignored" in text


# ---- max_seconds ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tariff", "budget", "cap", "expected"),
    [
        (entry(increments="60/60"), 5, 3600, 60),  # one minute fits, two do not
        (entry(increments="60/60"), 9, 3600, 60),
        (entry(increments="60/60"), 10, 3600, 120),
        (entry(), 4, 3600, 0),  # the first 60 s cost 5
        (entry(), 5, 3600, 60),
        (entry(), 6, 3600, 72),  # 72 s = exactly 6 bani
        (entry(), 10**6, 3600, 3600),  # capped
        (entry(), 5, 30, 30),  # the cap is inside the first block
        (entry(), 4, 30, 0),
        (entry(fee=10), 15, 3600, 60),
        (entry(fee=10), 14, 3600, 0),
        (entry(minimum=20), 19, 3600, 0),
        (entry(minimum=20), 20, 3600, 240),  # 240 s = 20 bani, the minimum no longer binds
        (entry(free=True), 0, 3600, 3600),
        (entry(rate_per_minute="0", fee=5), 5, 7200, 7200),
        (entry(rate_per_minute="0", fee=5), 4, 7200, 0),
        (entry(), -10, 3600, 0),
        (entry(), 100, 0, 0),
    ],
)
def test_max_seconds_table(tariff: TariffEntry, budget: int, cap: int, expected: int) -> None:
    assert max_seconds(tariff, budget, cap=cap) == expected


# ---- properties -------------------------------------------------------------------------------

rates = st.decimals(min_value=0, max_value=50, places=5, allow_nan=False, allow_infinity=False)
entries = st.builds(
    TariffEntry,
    prefix=st.just("40"),
    name=st.just("prop"),
    destination_class=st.just("national"),
    rate_per_minute=rates,
    connection_fee=st.integers(0, 100),
    initial_block=st.sampled_from([1, 6, 30, 60]) | st.integers(1, 120),
    step=st.sampled_from([1, 6, 60]) | st.integers(1, 120),
    minimum_charge=st.integers(0, 200),
    free=st.sampled_from([False, False, False, True]),
    effective_from=st.just(SINCE),
    effective_to=st.none(),
)
seconds = st.integers(0, 20_000)


@given(entries, seconds, seconds)
def test_cost_is_monotone_in_seconds(tariff: TariffEntry, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert cost(tariff, low) <= cost(tariff, high)


@given(entries, seconds)
def test_billed_seconds_cover_the_call_on_whole_increments(tariff: TariffEntry, s: int) -> None:
    billed = billed_seconds(tariff, s)
    assert billed >= s
    if s:
        assert billed >= tariff.initial_block
        assert (billed - tariff.initial_block) % tariff.step == 0
        assert billed - s < max(tariff.initial_block, tariff.step)


@given(entries, seconds)
def test_cost_equals_the_decimal_rule(tariff: TariffEntry, s: int) -> None:
    assert cost(tariff, s) == decimal_reference(tariff, s)


@given(entries, st.integers(-5, 50_000), st.integers(0, 20_000))
def test_max_seconds_is_the_longest_affordable_duration(tariff: TariffEntry, budget: int, cap: int) -> None:
    limit = max_seconds(tariff, budget, cap=cap)
    assert 0 <= limit <= cap
    if limit > 0:
        assert cost(tariff, limit) <= budget
    if limit < cap:
        # one more second (and so the next whole step, or the first block from 0) is over budget
        assert cost(tariff, limit + 1) > budget
        assert cost(tariff, limit + (tariff.step if limit else tariff.initial_block)) > budget


@settings(max_examples=50)
@given(entries, st.integers(0, 400), st.integers(0, 600))
def test_max_seconds_agrees_with_brute_force(tariff: TariffEntry, budget: int, cap: int) -> None:
    best = max((s for s in range(cap + 1) if cost(tariff, s) <= budget), default=0)
    assert max_seconds(tariff, budget, cap=cap) == best


prefixes = st.text(alphabet="1234", min_size=0, max_size=4)
DATES = [datetime(2026, m, 1, tzinfo=TZ) for m in (1, 3, 6, 9, 12)]
dates = st.sampled_from(DATES)


@st.composite
def tables(draw: st.DrawFn) -> TariffTable:
    items = []
    for i in range(draw(st.integers(1, 12))):
        since = draw(dates)
        later = [d for d in DATES if d > since]
        until = draw(st.none() | st.sampled_from(later)) if later else None
        items.append(entry(draw(prefixes), since=since, until=until, name=f"e{i}"))
    return TariffTable(tuple(items))


@given(tables(), st.text(alphabet="1234", min_size=1, max_size=8), dates)
def test_match_is_the_longest_prefix_in_force(table: TariffTable, e164: str, at: datetime) -> None:
    matched = table.match(e164, at)
    in_force = [e for e in table.entries if e.in_force(at) and e164.startswith(e.prefix)]
    if matched is None:
        assert in_force == []
        return
    assert e164.startswith(matched.prefix)
    assert matched.in_force(at)
    assert all(len(e.prefix) <= len(matched.prefix) for e in in_force)
    same = [e for e in in_force if e.prefix == matched.prefix]
    assert matched.effective_from == max(e.effective_from for e in same)


def test_entries_in_force_during_a_window_in_time_order() -> None:
    """What may price a call authorised now and answered within the window: the entry in force now,
    then each one that takes over before the window ends (on this number's prefixes only)."""
    cut = datetime(2026, 12, 1, tzinfo=TZ)
    old = entry("40", "0.05", name="old", until=cut)
    new = entry("40", "0.60", name="new", since=cut)
    mobile = entry("407", "0.10", name="mobile")
    mobile_new = entry("407", "0.20", name="mobile new", since=cut + timedelta(minutes=2))
    table = TariffTable((old, new, mobile, mobile_new))
    eve = cut - timedelta(seconds=30)
    assert table.in_force_during("40212345678", eve, eve + timedelta(minutes=5)) == (old, new)
    assert table.in_force_during("40212345678", eve, eve + timedelta(seconds=29)) == (old,)  # before the cut
    assert table.in_force_during("40212345678", cut, cut + timedelta(minutes=5)) == (new,)
    assert table.in_force_during("40721000001", eve, eve + timedelta(minutes=5)) == (mobile, mobile_new)
    assert table.in_force_during("44", eve, eve + timedelta(minutes=5)) == ()
    with pytest.raises(ValueError, match="end"):
        table.in_force_during("40212345678", eve, eve - timedelta(seconds=1))


def test_a_tariff_ending_without_a_successor_lapses_within_the_window() -> None:
    """The moments where no entry prices the number (ignored by ``in_force_during``) are found."""
    cut = datetime(2026, 12, 1, tzinfo=TZ)
    eve = cut - timedelta(seconds=30)
    window = timedelta(minutes=5)
    ending = entry("40", "0.05", name="ending", until=cut)
    assert TariffTable((ending,)).lapses_during("40212345678", eve, eve + window)
    assert not TariffTable((ending,)).lapses_during("40212345678", eve, eve + timedelta(seconds=29))
    fallback = entry("4", "0.50", name="fallback")  # a shorter prefix takes over at the cut
    assert not TariffTable((ending, fallback)).lapses_during("40212345678", eve, eve + window)
    late = entry("40", "0.06", name="late", since=cut + timedelta(minutes=1))  # a minute without a tariff
    assert TariffTable((ending, late)).lapses_during("40212345678", eve, eve + window)
    assert TariffTable((late,)).lapses_during("40212345678", eve, eve + window)  # none at the start
    assert not TariffTable((entry("40", "0.05"),)).lapses_during("40212345678", eve, eve + window)
