"""The operator's money verbs: accounts import/show/list/adjust/check, tariffs check/rate, export calls."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from clickphone_agi.cli import EX_CONFIG, EX_DATAERR
from tests.conftest import REPO
from tests.daemon_harness import run_cli

pytestmark = pytest.mark.slow
TARIFFS = REPO / "etc" / "tariffs.yaml"
ACCOUNTS = REPO / "etc" / "accounts.example.yaml"


def _cfg(write_config: Callable[..., Path]) -> str:
    rule = "  billing_cdr:\n    destination_contexts: [lab-outbound]\n"
    return str(write_config(extra=f"billing:\n  tariffs_file: {TARIFFS}\n{rule}"))


async def test_import_show_adjust_check_and_list(write_config: Callable[..., Path]) -> None:
    cfg = _cfg(write_config)
    code, out, err = await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    assert code == 0, err
    result = json.loads(out)
    assert "acct1001" in result["created"]
    code, out, _ = await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)  # idempotent upsert
    assert json.loads(out)["created"] == []

    code, out, _ = await run_cli("accounts", "show", "acct1001", "-c", cfg)
    shown = json.loads(out)
    opening = shown["balance"]
    assert shown["account"]["email"] == "ion.popescu@example.ro"

    code, out, err = await run_cli(
        "accounts", "adjust", "-c", cfg, "--reason", "goodwill fix", "--", "acct1001", "-2,50"
    )  # a negative amount follows "--"
    assert code == 0, err
    assert json.loads(out)["balance"] == opening - 250
    code, out, _ = await run_cli("accounts", "check", "-c", cfg)
    assert (code, json.loads(out)) == (0, {"mismatches": []})
    code, out, _ = await run_cli("accounts", "list", "-c", cfg)
    assert [a["code"] for a in json.loads(out)][:1] == ["acct1001"]


async def test_ledger_is_append_only(write_config: Callable[..., Path]) -> None:
    cfg = _cfg(write_config)
    await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    conn = sqlite3.connect(Path(cfg).parent / "db" / "test.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE ledger SET amount = 0")
    conn.close()


async def test_invalid_import_names_line_and_field(write_config: Callable[..., Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("code,name,email,daily_limit\nacct1,Ion,ion.popescu@example.ro,abc\n")
    code, _, err = await run_cli("accounts", "import", str(bad), "-c", _cfg(write_config))
    assert code == EX_DATAERR
    assert f"{bad}:2" in err
    assert "daily_limit" in err


async def test_tariffs_check_and_rate(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = _cfg(write_config)
    code, out, err = await run_cli("tariffs", "check", "-c", cfg)
    assert code == 0, out + err
    code, out, err = await run_cli("tariffs", "rate", "0040212345678", "65", "--at", "2026-12-01T12:00", "-c", cfg)
    assert code == 0, err
    rated = json.loads(out)
    assert rated["normalised"] == "40212345678"
    assert rated["billed_seconds"] >= 65
    assert isinstance(rated["cost_bani"], int)
    assert rated["cost"].endswith(" lei")
    code, out, _ = await run_cli("tariffs", "rate", "+999123", "10", "-c", cfg)
    assert code == EX_DATAERR
    assert json.loads(out)["tariff"] is None

    broken = tmp_path / "t.yaml"
    broken.write_text("tariffs:\n  - prefix: '+40'\n    rate_per_minute: abc\n")
    code, _, err = await run_cli("tariffs", "check", str(broken), "-c", cfg)
    assert code == EX_CONFIG
    assert "tariffs[0].rate_per_minute" in err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--", "-5"), "argument seconds: expected whole seconds"),
        (("--", "1.5"), "argument seconds: expected whole seconds"),
        (("--at", "2026-03-29T03:30", "--", "60"), "does not exist in Europe/Bucharest"),
        (("--at", "yesterday", "--", "60"), "--at: expected an ISO date and time"),
    ],
)
async def test_tariffs_rate_refuses_bad_seconds_and_times_as_usage_errors(
    write_config: Callable[..., Path], extra: tuple[str, ...], says: str
) -> None:
    cfg = _cfg(write_config)
    *options, seconds = extra
    code, _, err = await run_cli("tariffs", "rate", "-c", cfg, *options[:-1], "0212345678", seconds)
    assert code == 2, err
    assert says in err
    assert "Traceback" not in err


async def test_tariffs_rate_tells_emergency_and_malformed_numbers_apart(write_config: Callable[..., Path]) -> None:
    """112 is never rated but always allowed: ``tariffs rate`` must not tell the operator it is
    denied. A string that is no PSTN number is denied, and the answer says why, not "no tariff"."""
    cfg = _cfg(write_config)
    code, out, err = await run_cli("tariffs", "rate", "112", "60", "-c", cfg)
    assert code == 0, out + err
    result = json.loads(out)
    assert (result["emergency"], result["cost_bani"]) == (True, 0)
    assert "always allowed" in result["decision"]
    assert "denied" not in result["decision"]
    code, out, _ = await run_cli("tariffs", "rate", "07#1", "60", "-c", cfg)
    assert code == EX_DATAERR
    result = json.loads(out)
    assert (result["normalised"], result["tariff"]) == (None, None)
    assert "'#'" in result["decision"]
    assert "denied" in result["decision"]


async def test_check_config_reads_the_tariffs_in_the_configured_numbering_plan(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """check-config must judge the tariff file as the daemon will load it: with a NANP plan
    (international prefix 011) ``0044`` is no prefix at all, and the daemon refuses to start."""
    tariffs = tmp_path / "t.yaml"
    tariffs.write_text(
        "tariffs:\n  - prefix: '0044'\n    name: UK\n    class: international\n"
        "    rate_per_minute: '0.05'\n    increments: 60/1\n    effective_from: 2026-01-01\n"
    )
    plan = '  country_code: "1"\n  national_prefix: "1"\n  international_prefix: "011"\n'
    rule = "  billing_cdr:\n    destination_contexts: [lab-outbound]\n"
    cfg = str(write_config(extra=f"billing:\n  tariffs_file: {tariffs}\n{rule}{plan}"))
    code, out, err = await run_cli("check-config", "-c", cfg)
    assert code == EX_CONFIG, out + err
    assert "tariffs[0].prefix" in err


async def test_export_calls_is_csv_with_header(write_config: Callable[..., Path]) -> None:
    cfg = _cfg(write_config)
    await run_cli("db", "migrate", "-c", cfg)
    code, out, err = await run_cli("export", "calls", "--from", "2026-11-01", "--to", "2026-12-01", "-c", cfg)
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:3] == ["key", "account", "destination"]


async def test_preview_writes_eml_and_html(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = _cfg(write_config)
    code, _out, err = await run_cli("preview", "voicemail", "--lang", "ro", "--out", str(tmp_path / "v.eml"), "-c", cfg)
    assert code == 0, err
    raw = (tmp_path / "v.eml").read_bytes()
    assert b"Auto-Submitted: auto-generated" in raw
    assert b"X-ClickPhone-Kind: voicemail" in raw
    code, _, err = await run_cli("preview", "daily_limit", "--lang", "en", "--out", str(tmp_path / "d.html"), "-c", cfg)
    assert code == 0, err
    html = (tmp_path / "d.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    code, _, _ = await run_cli("preview", "nonsense", "-c", cfg)
    assert code == 2


async def test_an_import_clashing_with_a_stored_account_names_line_and_field(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """A DID or box another account already owns is refused like any invalid row: the file, the
    line and the field on one line, exit 65, no traceback hint, and nothing of the file imported."""
    cfg = _cfg(write_config)
    code, _, err = await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)  # acct1001 owns +40212345678
    assert code == 0, err
    clash = tmp_path / "clash.csv"
    clash.write_text(
        "code,name,email,dids,mailboxes\n"
        "acct2001,Ana Pop,ana@example.ro,,\n"
        "acct2002,Dan Radu,dan@example.ro,0212345678,\n"
    )
    code, out, err = await run_cli("accounts", "import", str(clash), "-c", cfg)
    assert code == EX_DATAERR, out + err
    assert f"{clash}:3: dids: +40212345678 already belongs to account acct1001" in err
    assert "--debug" not in err
    code, _, _ = await run_cli("accounts", "show", "acct2001", "-c", cfg)
    assert code == EX_DATAERR  # the valid row before it was not imported either

    boxes = tmp_path / "boxes.yaml"
    boxes.write_text("accounts:\n  - code: acct2003\n    name: Ana Pop\n    email: ana@example.ro\n"
                     "    mailboxes: [200@default]\n")  # fmt: skip
    code, _, err = await run_cli("accounts", "import", str(boxes), "-c", cfg)
    assert code == EX_DATAERR
    assert f"{boxes}:2: accounts[0].mailboxes: voicemail box 200@default already belongs to account acct1002" in err


async def test_a_code_differing_only_in_case_from_a_stored_account_is_refused(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Codes are unique ignoring case within a file; across imports too. An operator who writes
    ACCT1001 to disable acct1001 after a fraud must not get a second, new account with an
    opening balance while the real one stays enabled."""
    cfg = _cfg(write_config)
    code, _, err = await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    assert code == 0, err
    upper = tmp_path / "upper.csv"
    upper.write_text("code,name,email,enabled,opening_balance\nACCT1001,Ion Popescu,ion.popescu@example.ro,false,100\n")
    code, out, err = await run_cli("accounts", "import", str(upper), "-c", cfg)
    assert code == EX_DATAERR, out + err
    assert f"{upper}:2: code: 'ACCT1001' differs only in case from the stored account 'acct1001'" in err
    code, out, _ = await run_cli("accounts", "list", "-c", cfg)
    assert [a["code"] for a in json.loads(out)] == ["acct1001", "acct1002"]


@pytest.mark.parametrize("amount", ["1e3", "NaN", "0.001", "12.5.0", "1.250", "0", "-0,00"])
async def test_adjust_refuses_a_bad_amount_as_a_usage_error(write_config: Callable[..., Path], amount: str) -> None:
    """An amount that is not exact bani (or moves nothing) is a usage error on one line, not
    "error: ValueError ... run again with --debug for the traceback"."""
    cfg = _cfg(write_config)
    await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    code, _, err = await run_cli("accounts", "adjust", "-c", cfg, "--reason", "fix", "--", "acct1001", amount)
    assert code == 2, err
    assert "argument amount: " in err
    assert "run again with --debug" not in err


@pytest.mark.parametrize("reason", ["", "   "])
async def test_adjust_requires_a_reason(write_config: Callable[..., Path], reason: str) -> None:
    """A manual adjustment is booked with its reason: a blank one leaves the ledger unexplained."""
    cfg = _cfg(write_config)
    await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    code, _, err = await run_cli("accounts", "adjust", "-c", cfg, "--reason", reason, "acct1001", "5")
    assert code == 2, err
    assert "--reason" in err
    _, out, _ = await run_cli("accounts", "show", "acct1001", "-c", cfg)
    assert [row["kind"] for row in json.loads(out)["ledger_last_20"]] == ["opening"]


async def test_adjust_of_an_unknown_account_says_so_plainly(write_config: Callable[..., Path]) -> None:
    cfg = _cfg(write_config)
    await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    code, _, err = await run_cli("accounts", "adjust", "-c", cfg, "--reason", "fix", "acct9999", "5")
    assert (code, err.strip()) == (65, "clickphone-agi: no account 'acct9999'")


async def test_adjust_with_a_key_books_once_when_repeated(write_config: Callable[..., Path]) -> None:
    """An operator whose adjust timed out on a busy daemon (it may have booked) runs it again:
    with the same --key the second run books nothing, the balance moves once."""
    cfg = _cfg(write_config)
    await run_cli("accounts", "import", str(ACCOUNTS), "-c", cfg)
    _, out, _ = await run_cli("accounts", "show", "acct1001", "-c", cfg)
    opening = json.loads(out)["balance"]
    args = ("accounts", "adjust", "-c", cfg, "--reason", "bank transfer 42", "--key", "pay-42", "acct1001", "12,50")
    code, out, err = await run_cli(*args)
    assert code == 0, err
    assert (json.loads(out)["booked"], json.loads(out)["balance"]) == (True, opening + 1250)
    code, out, err = await run_cli(*args)
    assert code == 0, err
    assert (json.loads(out)["booked"], json.loads(out)["balance"]) == (False, opening + 1250)
    code, out, _ = await run_cli("accounts", "check", "-c", cfg)
    assert (code, json.loads(out)) == (0, {"mismatches": []})


async def test_export_file_is_readable_by_its_owner_only(write_config: Callable[..., Path], tmp_path: Path) -> None:
    """The export holds every number each subscriber called (traffic data, Law 506/2004): like
    `privacy export`, the file is mode 0600 whatever the umask, also when it already existed."""
    cfg = _cfg(write_config)
    await run_cli("db", "migrate", "-c", cfg)
    out = tmp_path / "calls.csv"
    out.write_text("old\n")
    out.chmod(0o644)
    code, _, err = await run_cli(
        "export", "calls", "--from", "2026-11-01", "--to", "2026-12-01", "--out", str(out), "-c", cfg
    )
    assert code == 0, err
    assert out.read_text().startswith("key,account,destination")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-13-01", "2026-12-01", "--from: expected a date"),
        ("2026-11-01", "yesterday", "--to: expected a date"),
        ("2026-12-01", "2026-11-01", "--to must be after --from"),
        ("2026-11-01", "2026-11-01", "--to must be after --from"),
    ],
)
async def test_export_refuses_bad_bounds_as_a_usage_error(
    write_config: Callable[..., Path], start: str, end: str, message: str
) -> None:
    """A typo in a bound is a usage error on one line; swapped bounds are not an empty export
    that the billing system would take for a month without calls."""
    cfg = _cfg(write_config)
    await run_cli("db", "migrate", "-c", cfg)
    code, out, err = await run_cli("export", "calls", "--from", start, "--to", end, "-c", cfg)
    assert (code, out) == (2, ""), err
    assert message in err
    assert "run again with --debug" not in err


async def test_show_prints_opt_out_as_a_list(write_config: Callable[..., Path], tmp_path: Path) -> None:
    """`accounts show` is JSON an operator or a script reads back: opt_out is a list of kinds,
    not the Python repr of a frozenset."""
    accounts = tmp_path / "a.yaml"
    accounts.write_text(
        "accounts:\n  - code: acct7\n    name: Ion\n    email: ion@example.ro\n    opt_out: [missed_call, fax_sent]\n"
    )
    cfg = _cfg(write_config)
    code, _, err = await run_cli("accounts", "import", str(accounts), "-c", cfg)
    assert code == 0, err
    code, out, err = await run_cli("accounts", "show", "acct7", "-c", cfg)
    assert code == 0, err
    assert json.loads(out)["account"]["opt_out"] == ["fax_sent", "missed_call"]
