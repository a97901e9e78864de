"""Tariff YAML: exact money from the file's text, every problem named by index and field."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clickphone_agi.adapters.tariff_file import TariffFileError, load_tariffs
from clickphone_agi.domain.rating import cost, rate
from clickphone_agi.domain.tariffs import TariffEntry, check

TZ = ZoneInfo("Europe/Bucharest")
SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "tariffs.yaml"

GOOD = """\
currency: RON
tariffs:
  - prefix: "+4021"
    name: Bucharest fixed
    class: national
    rate_per_minute: "0.0325"
    connection_fee: "0.10"
    increments: 60/1
    minimum_charge: "0.00"
    free: false
    effective_from: 2026-01-01
    effective_to: null
  - prefix: "0040 7"
    name: Romania mobile
    class: mobile
    rate_per_minute: 0.045
    increments: 60/60
    effective_from: "2026-01-01T00:00:00+02:00"
    effective_to: 2026-12-01 00:00:00
  - prefix: 4031860
    name: on-net
    class: onnet
    rate_per_minute: 0
    increments: 1/1
    free: true
    effective_from: 2026-01-01
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tariffs.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(TariffFileError) as info:
        load_tariffs(path, timezone=TZ)
    assert all(p.startswith(f"{path}:") for p in info.value.problems)
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def one_tariff(**fields: str) -> str:
    """A file with one valid entry, fields replaced (value "DELETE" drops the key)."""
    base = {
        "prefix": '"+4021"',
        "name": "Bucharest fixed",
        "class": "national",
        "rate_per_minute": '"0.0325"',
        "increments": "60/1",
        "effective_from": "2026-01-01",
    }
    base.update(fields)
    lines = "".join(f"    {key}: {value}\n" for key, value in base.items() if value != "DELETE")
    return "tariffs:\n  - " + lines.lstrip()


def test_valid_file_round_trip(tmp_path: Path) -> None:
    table = load_tariffs(write(tmp_path, GOOD), timezone=TZ)
    assert table.currency == "RON"
    bucharest, mobile, on_net = table.entries
    assert bucharest == TariffEntry(
        prefix="4021",
        name="Bucharest fixed",
        destination_class="national",
        rate_per_minute=Decimal("0.0325"),
        connection_fee=10,
        initial_block=60,
        step=1,
        minimum_charge=0,
        free=False,
        effective_from=datetime(2026, 1, 1, tzinfo=TZ),
        effective_to=None,
    )
    assert mobile.prefix == "407"
    assert mobile.rate_per_minute == Decimal("0.045")
    assert (mobile.initial_block, mobile.step) == (60, 60)
    assert mobile.connection_fee == 0
    assert mobile.minimum_charge == 0
    assert mobile.effective_from == datetime(2025, 12, 31, 22, 0, tzinfo=UTC)
    assert mobile.effective_to == datetime(2026, 12, 1, tzinfo=TZ)  # no offset: billing time zone
    assert on_net.prefix == "4031860"
    assert on_net.free
    assert check(table) == []
    rated = rate(table, "021 234 5678", 61, datetime(2026, 3, 1, tzinfo=TZ))
    assert rated is not None
    assert rated.cost == 10 + 4  # fee + ceil(0.0325 * 61 / 60 * 100 = 3.30...)


def test_shipped_example_loads_and_checks_clean() -> None:
    table = load_tariffs(SHIPPED, timezone=TZ)
    assert check(table) == []
    classes = {e.destination_class for e in table.entries}
    assert {"national", "mobile", "onnet", "international", "premium", "satellite"} <= classes
    at = datetime(2026, 6, 1, tzinfo=TZ)

    def tariff(number: str) -> TariffEntry:
        rated = rate(table, number, 60, at)
        assert rated is not None, number
        return rated.entry

    assert tariff("0212345678").destination_class == "national"
    assert tariff("0721234567").destination_class == "mobile"
    assert tariff("0900123456").destination_class == "premium"
    assert tariff("+870 123 456 789").destination_class == "satellite"
    assert tariff("+8816 1234 5678").destination_class == "satellite"
    assert tariff("0044 20 7946 0000").name == "United Kingdom fixed"
    assert tariff("+1 876 555 0100").name == "Jamaica"
    assert tariff("0318601234").free
    assert rate(table, "+86 138 0000 0000", 60, at) is None  # no catch-all: an unpriced destination is denied


def test_shipped_example_changes_the_mobile_price_at_local_midnight() -> None:
    table = load_tariffs(SHIPPED, timezone=TZ)
    before = rate(table, "0721234567", 60, datetime(2026, 11, 30, 23, 59, 59, tzinfo=TZ))
    after = rate(table, "0721234567", 60, datetime(2026, 12, 1, 0, 0, 0, tzinfo=TZ))
    assert before is not None
    assert after is not None
    assert (before.entry.rate_per_minute, after.entry.rate_per_minute) == (Decimal("0.0450"), Decimal("0.0390"))


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("0.1", Decimal("0.1")),  # a YAML float, read from its text: not 0.1000000000000000055...
        ("0.0325", Decimal("0.0325")),
        ("0.30000000000000004", Decimal("0.30000000000000004")),
        ("0.123456789012345678", Decimal("0.123456789012345678")),  # beyond a float's 17 digits
        ("1e-2", Decimal("0.01")),
        ("2", Decimal("2")),
        ('"0.1"', Decimal("0.1")),
    ],
)
def test_yaml_numbers_are_read_exactly(tmp_path: Path, written: str, expected: Decimal) -> None:
    table = load_tariffs(write(tmp_path, one_tariff(rate_per_minute=written)), timezone=TZ)
    assert table.entries[0].rate_per_minute == expected
    assert str(table.entries[0].rate_per_minute) == str(expected)


@pytest.mark.parametrize(
    ("written", "bani"),
    [("0.10", 10), ('"0.10"', 10), ("0.1", 10), ("1", 100), ('"2.5"', 250), ("0", 0), ('"1.00000"', 100)],
)
def test_amounts_in_ron_become_exact_bani(tmp_path: Path, written: str, bani: int) -> None:
    table = load_tariffs(write(tmp_path, one_tariff(connection_fee=written, minimum_charge=written)), timezone=TZ)
    assert table.entries[0].connection_fee == bani
    assert table.entries[0].minimum_charge == bani


def test_yaml_int_traps_stay_text(tmp_path: Path) -> None:
    """``0040`` is not the octal 32 and ``+4021`` keeps its meaning."""
    for written, prefix in (("0040", "40"), ("+4021", "4021"), ("021", "4021"), ("4021", "4021")):
        table = load_tariffs(write(tmp_path, one_tariff(prefix=written)), timezone=TZ)
        assert table.entries[0].prefix == prefix


def test_errors_name_the_index_and_the_field(tmp_path: Path) -> None:
    text = one_tariff() + (
        '  - prefix: "+407"\n'
        "    name: mobile\n"
        "    class: mobile\n"
        '    rate_per_minute: "0,045"\n'
        "    increments: 60-1\n"
        '    connection_fee: "0.105"\n'
        "    minimum_charge: -1\n"
        '    free: "no"\n'
        "    effective_from: 2026-13-01\n"
        "    effective_to: 2025-01-01\n"
        '  - prefix: "+40 abc"\n'
        '    name: ""\n'
        "    class: Premium\n"
        "    rate_per_minute: .inf\n"
        "    increments: 0/1\n"
        "    effective_from: 2026-03-29T03:30:00\n"
    )
    problems = problems_of(tmp_path, text)
    assert problems == [
        "tariffs[1].rate_per_minute: expected RON per minute as a decimal >= 0, e.g. \"0.0325\", got '0,045'"
        " (use a dot as the decimal separator)",
        "tariffs[1].increments: expected 'initial/step' in whole seconds >= 1, e.g. '60/1', '60/60' or '1/1',"
        " got '60-1'",
        "tariffs[1].connection_fee: expected an amount of RON >= 0 in whole bani, e.g. \"0.10\", got '0.105'"
        " (sub-ban precision is not chargeable)",
        "tariffs[1].minimum_charge: expected an amount of RON >= 0 in whole bani, e.g. \"0.10\", got '-1'",
        "tariffs[1].free: expected true or false, got 'no'",
        "tariffs[1].effective_from: expected a date (2026-12-01, local midnight) or an ISO datetime"
        " (2026-12-01T00:00:00+02:00), got '2026-13-01'",
        "tariffs[2].prefix: expected a number prefix such as '+4021', '0040 7', '021' or bare E.164 digits"
        " ('' = catch-all), got '+40 abc' (not a telephone number: contains 'a', 'b', 'c')",
        "tariffs[2].name: expected a non-empty name, got ''",
        "tariffs[2].class: expected a lower-case class name such as national, mobile, international, premium,"
        " satellite, onnet, got 'Premium'",
        "tariffs[2].rate_per_minute: expected RON per minute as a decimal >= 0, e.g. \"0.0325\", got '.inf'",
        "tariffs[2].increments: expected 'initial/step' in whole seconds >= 1, e.g. '60/1', '60/60' or '1/1',"
        " got '0/1'",
        "tariffs[2].effective_from: expected a local time that exists in Europe/Bucharest,"
        " got 2026-03-29T03:30:00 (it falls in the DST gap)",
    ]
    # effective_to (2025-01-01) is only compared with a valid effective_from: no second problem


@pytest.mark.parametrize("written", ["1e999999999", '"1e-999999999"', '"12345678"', '"0.0000000000000000001"'])
def test_absurd_magnitudes_are_refused_before_any_arithmetic(tmp_path: Path, written: str) -> None:
    [problem] = problems_of(tmp_path, one_tariff(rate_per_minute=written))
    assert problem.startswith("tariffs[0].rate_per_minute: expected RON per minute")
    assert "at most 18 decimal places" in problem


def test_effective_to_must_follow_effective_from(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, one_tariff(effective_to="2025-12-31"))
    assert problems == [
        "tariffs[0].effective_to: expected a time after effective_from (2026-01-01T00:00:00+02:00),"
        " got 2025-12-31T00:00:00+02:00"
    ]


def test_unknown_and_missing_keys_are_rejected(tmp_path: Path) -> None:
    text = "currency: RON\nextra: 1\n" + one_tariff(rate="0.01", rate_per_minute="DELETE", increments="DELETE")
    assert problems_of(tmp_path, text) == [
        "extra: unknown key (known: currency, tariffs)",
        "tariffs[0].rate: unknown key (did you mean 'rate_per_minute'?)",
        "tariffs[0].rate_per_minute: required key missing",
        "tariffs[0].increments: required key missing",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tariffs: []\n", "tariffs: expected a non-empty list of tariffs, got []"),
        ("currency: ron\n" + one_tariff(), "currency: expected an ISO 4217 currency code such as 'RON', got 'ron'"),
        ("- 1\n", "(top level): expected a mapping with 'currency' and 'tariffs', got list"),
        ("tariffs:\n  - 42\n", "tariffs[0]: expected a mapping of tariff keys, got 42"),
    ],
)
def test_file_shape_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert problems_of(tmp_path, text) == [expected]


def test_duplicate_keys_and_bad_yaml_are_errors(tmp_path: Path) -> None:
    duplicated = one_tariff() + '    rate_per_minute: "0.05"\n'
    [problem] = problems_of(tmp_path, duplicated)
    assert "duplicate key 'rate_per_minute'" in problem
    [problem] = problems_of(tmp_path, "tariffs: [\n")
    assert "invalid YAML" in problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TariffFileError, match="cannot read"):
        load_tariffs(tmp_path / "absent.yaml", timezone=TZ)


def test_an_ambiguous_local_time_is_its_first_occurrence(tmp_path: Path) -> None:
    table = load_tariffs(write(tmp_path, one_tariff(effective_from="2026-10-25T03:30:00")), timezone=TZ)
    assert table.entries[0].effective_from.utcoffset() == ZoneInfo("Europe/Bucharest").utcoffset(
        datetime(2026, 10, 25, 3, 30, fold=0)
    )
    assert table.entries[0].effective_from.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def test_a_loaded_table_prices_exactly(tmp_path: Path) -> None:
    table = load_tariffs(write(tmp_path, one_tariff(rate_per_minute="0.05", connection_fee="0.10")), timezone=TZ)
    assert cost(table.entries[0], 65) == 10 + 6
