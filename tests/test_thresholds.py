"""Money warnings: daily-limit percentages, low balance with re-arming, no-funds rate limit, local days."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickphone_agi.domain.thresholds import (
    LowBalanceState,
    daily_limit_crossings,
    day_bounds,
    insufficient_funds_due,
    local_day,
    low_balance_step,
)

BUCHAREST = ZoneInfo("Europe/Bucharest")
LIMIT = 100_00  # 100,00 lei: 80 % = 8000 bani, 100 % = 10000 bani
PERCENTS = (80, 100)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- daily limit ---------------------------------------------------------------------------


def test_79_to_81_percent_fires_80() -> None:
    assert daily_limit_crossings(LIMIT, 7900, 8100, PERCENTS, already=()) == [80]


def test_79_to_100_percent_fires_80_and_100_ascending() -> None:
    assert daily_limit_crossings(LIMIT, 7900, 10000, (100, 80), already=()) == [80, 100]


def test_a_percentage_already_fired_today_is_not_repeated() -> None:
    assert daily_limit_crossings(LIMIT, 7900, 10000, PERCENTS, already={80}) == [100]
    assert daily_limit_crossings(LIMIT, 7900, 10000, PERCENTS, already={80, 100}) == []


def test_reaching_the_threshold_exactly_counts_starting_on_it_does_not() -> None:
    assert daily_limit_crossings(LIMIT, 7999, 8000, PERCENTS, already=()) == [80]
    assert daily_limit_crossings(LIMIT, 8000, 8500, PERCENTS, already=()) == []
    assert daily_limit_crossings(LIMIT, 9999, 10000, PERCENTS, already=()) == [100]


def test_threshold_is_rounded_up_to_whole_bani() -> None:
    # 80 % of 0,99 lei is 79,2 bani: the threshold is 80 bani, so 79 is still below it.
    assert daily_limit_crossings(99, 0, 79, PERCENTS, already=()) == []
    assert daily_limit_crossings(99, 79, 80, PERCENTS, already=()) == [80]


def test_no_limit_no_crossings_and_refunds_cross_nothing() -> None:
    assert daily_limit_crossings(None, 0, 10**9, PERCENTS, already=()) == []
    assert daily_limit_crossings(LIMIT, 10000, 7000, PERCENTS, already=()) == []
    assert daily_limit_crossings(LIMIT, 100, 100, PERCENTS, already=()) == []


def test_over_the_limit_and_duplicate_percentages() -> None:
    assert daily_limit_crossings(LIMIT, 0, 20000, (50, 80, 80, 100, 150), already=()) == [50, 80, 100, 150]


@pytest.mark.parametrize("bad", [0, -10])
def test_non_positive_percentages_are_a_configuration_bug(bad: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        daily_limit_crossings(LIMIT, 0, 100, (bad,), already=())


@given(
    limit=st.integers(1, 10**9),
    spends=st.lists(st.integers(0, 10**8), min_size=1, max_size=30),
    percents=st.lists(st.integers(1, 200), min_size=1, max_size=5),
)
def test_each_percentage_fires_at_most_once_and_exactly_when_reached(
    limit: int, spends: list[int], percents: list[int]
) -> None:
    """Any sequence of debits: a percentage fires once, on the debit that reaches its threshold."""
    already: set[int] = set()
    total = 0
    for amount in spends:
        fired = daily_limit_crossings(limit, total, total + amount, percents, already)
        assert fired == sorted(fired)
        assert not already & set(fired)
        already |= set(fired)
        total += amount
    assert already == {p for p in percents if total * 100 >= limit * p}


# --- low balance ---------------------------------------------------------------------------


def test_low_balance_fires_once_not_again_while_below_rearms_after_top_up_and_fires_again() -> None:
    state = LowBalanceState()
    threshold = 500

    fire, state = low_balance_step(threshold, 700, 450, state)  # crosses below
    assert fire
    assert state == LowBalanceState(armed=False)

    fire, state = low_balance_step(threshold, 450, 200, state)  # still below: silent
    assert not fire

    fire, state = low_balance_step(threshold, 200, 5200, state)  # top-up re-arms
    assert not fire
    assert state.armed

    fire, state = low_balance_step(threshold, 5200, 4800, state)  # above the threshold: nothing
    assert not fire

    fire, state = low_balance_step(threshold, 4800, 100, state)  # next crossing fires again
    assert fire
    assert not state.armed


def test_exactly_at_the_threshold_is_not_low_and_re_arms() -> None:
    fire, state = low_balance_step(500, 700, 500, LowBalanceState())
    assert not fire
    assert state.armed
    fire, state = low_balance_step(500, 500, 499, state)
    assert fire
    fire, state = low_balance_step(500, 499, 500, state)  # topped up to exactly the threshold
    assert not fire
    assert state.armed


def test_a_top_up_that_stays_below_neither_fires_nor_re_arms() -> None:
    fire, state = low_balance_step(500, 100, 300, LowBalanceState(armed=False))
    assert not fire
    assert not state.armed
    # An armed account imported below the threshold is not told "low balance" on a top-up...
    fire, state = low_balance_step(500, 100, 300, LowBalanceState())
    assert not fire
    assert state.armed
    # ...but on its first debit.
    fire, state = low_balance_step(500, 300, 250, state)
    assert fire


@given(st.lists(st.integers(-10_000, 10_000), max_size=50), st.integers(0, 5_000))
def test_low_balance_fires_at_most_once_between_recoveries(changes: list[int], threshold: int) -> None:
    balance, state, fired_since_recovery = threshold + 1000, LowBalanceState(), 0
    for change in changes:
        fire, state = low_balance_step(threshold, balance, balance + change, state)
        balance += change
        fired_since_recovery += fire
        assert fired_since_recovery <= 1
        assert not fire or balance < threshold
        if balance >= threshold:
            fired_since_recovery = 0
            assert state.armed


# --- insufficient funds --------------------------------------------------------------------


def test_insufficient_funds_is_sent_at_most_once_per_period() -> None:
    sent = utc("2026-03-01T10:00:00")
    assert insufficient_funds_due(None, sent)
    assert not insufficient_funds_due(sent, sent)
    assert not insufficient_funds_due(sent, sent + timedelta(hours=5, minutes=59, seconds=59))
    assert insufficient_funds_due(sent, sent + timedelta(hours=6))
    assert insufficient_funds_due(sent, sent + timedelta(days=3))


def test_insufficient_funds_period_is_configurable() -> None:
    sent = utc("2026-03-01T10:00:00")
    assert not insufficient_funds_due(sent, sent + timedelta(minutes=59), period=timedelta(hours=1))
    assert insufficient_funds_due(sent, sent + timedelta(hours=1), period=timedelta(hours=1))
    with pytest.raises(ValueError, match="positive"):
        insufficient_funds_due(sent, sent, period=timedelta(0))


def test_insufficient_funds_ignores_zone_of_the_stored_time_and_a_clock_stepped_far_back() -> None:
    sent = datetime(2026, 3, 1, 12, 0, tzinfo=BUCHAREST)  # 10:00Z
    assert not insufficient_funds_due(sent, utc("2026-03-01T15:59:00"))
    assert insufficient_funds_due(sent, utc("2026-03-01T16:00:00"))
    # The clock was stepped back a day: a "future" last_sent must not silence the warning forever.
    assert not insufficient_funds_due(sent, utc("2026-03-01T09:00:00"))
    assert insufficient_funds_due(sent, utc("2026-02-28T10:00:00"))


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        insufficient_funds_due(None, datetime(2026, 3, 1, 10, 0))
    with pytest.raises(ValueError, match="aware"):
        local_day(datetime(2026, 3, 1, 10, 0), BUCHAREST)


# --- local days and DST in Europe/Bucharest ------------------------------------------------


@pytest.mark.parametrize(
    ("instant", "day"),
    [
        # Autumn 2026-10-25: 04:00 EEST (UTC+3) becomes 03:00 EET (UTC+2).
        ("2026-10-24T21:30:00", date(2026, 10, 25)),  # 00:30 local (EEST)
        ("2026-10-24T20:59:59", date(2026, 10, 24)),  # 23:59:59 local
        ("2026-10-24T21:00:00", date(2026, 10, 25)),  # local midnight
        ("2026-10-25T00:30:00", date(2026, 10, 25)),  # 03:30 EEST, first pass
        ("2026-10-25T01:30:00", date(2026, 10, 25)),  # 03:30 EET, second pass
        ("2026-10-25T21:59:59", date(2026, 10, 25)),  # 23:59:59 EET
        ("2026-10-25T22:00:00", date(2026, 10, 26)),
        # Spring 2026-03-29: 03:00 EET (UTC+2) becomes 04:00 EEST (UTC+3).
        ("2026-03-28T21:59:59", date(2026, 3, 28)),
        ("2026-03-28T22:00:00", date(2026, 3, 29)),  # local midnight (EET)
        ("2026-03-29T00:59:59", date(2026, 3, 29)),  # 02:59:59 EET
        ("2026-03-29T01:00:00", date(2026, 3, 29)),  # 04:00 EEST
        ("2026-03-29T20:59:59", date(2026, 3, 29)),  # 23:59:59 EEST
        ("2026-03-29T21:00:00", date(2026, 3, 30)),
    ],
)
def test_local_day_around_the_dst_changes(instant: str, day: date) -> None:
    assert local_day(utc(instant), BUCHAREST) == day


def test_day_bounds_lengths_23_25_and_24_hours() -> None:
    start, end = day_bounds(date(2026, 3, 29), BUCHAREST)
    assert (start, end) == (utc("2026-03-28T22:00:00"), utc("2026-03-29T21:00:00"))
    assert end - start == timedelta(hours=23)

    start, end = day_bounds(date(2026, 10, 25), BUCHAREST)
    assert (start, end) == (utc("2026-10-24T21:00:00"), utc("2026-10-25T22:00:00"))
    assert end - start == timedelta(hours=25)

    start, end = day_bounds(date(2026, 7, 1), BUCHAREST)
    assert (start, end) == (utc("2026-06-30T21:00:00"), utc("2026-07-01T21:00:00"))
    assert end - start == timedelta(hours=24)
    assert start.tzinfo is UTC
    assert end.tzinfo is UTC


def test_day_bounds_when_midnight_is_skipped() -> None:
    # America/Havana springs forward at 00:00 (to 01:00): the day starts at the transition.
    havana = ZoneInfo("America/Havana")
    start, end = day_bounds(date(2026, 3, 8), havana)
    assert start == utc("2026-03-08T05:00:00")
    assert end - start == timedelta(hours=23)
    assert local_day(start, havana) == date(2026, 3, 8)
    assert local_day(start - timedelta(microseconds=1), havana) == date(2026, 3, 7)


@given(
    day=st.dates(min_value=date(1990, 1, 1), max_value=date(2100, 12, 31)),
    zone=st.sampled_from(["Europe/Bucharest", "UTC", "Europe/London", "America/New_York", "Asia/Kolkata"]),
)
def test_day_bounds_start_and_last_microsecond_belong_to_the_day(day: date, zone: str) -> None:
    tz = ZoneInfo(zone)
    start, end = day_bounds(day, tz)
    assert local_day(start, tz) == day
    assert local_day(end - timedelta(microseconds=1), tz) == day
    assert local_day(end, tz) == day + timedelta(days=1)
    assert local_day(start - timedelta(microseconds=1), tz) == day - timedelta(days=1)
    assert timedelta(hours=23) <= end - start <= timedelta(hours=25)


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)))
def test_every_instant_lies_within_the_bounds_of_its_local_day(moment: datetime) -> None:
    start, end = day_bounds(local_day(moment, BUCHAREST), BUCHAREST)
    assert start <= moment < end
