"""Account import files: exact values from YAML and CSV, and every refusal names file:line and field."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest
import yaml

from clickphone_agi.adapters.accounts_file import FIELDS, AccountsFileError, _TextFloatLoader, load_accounts
from clickphone_agi.domain.accounts import Account, AccountImport, Mailbox, parse_amount

REPO = Path(__file__).resolve().parent.parent

ION = Account(
    code="acct1001",
    name="Ion Popescu",
    email="ion.popescu@example.ro",
    language="ro",
    billing="prepaid",
    daily_limit=5000,
    low_balance_threshold=500,
    allowed_ips=(IPv4Network("127.0.0.1/32"), IPv4Network("198.51.100.0/24"), IPv6Network("2001:db8:100::/48")),
    dids=("40212345678",),
    mailboxes=(Mailbox("100@default"), Mailbox("101@default", "receptie@example.ro")),
    blocked_classes=frozenset({"premium", "satellite"}),
    max_concurrent_calls=2,
    max_call_seconds=7200,
    marketing_consent=False,
    enabled=True,
)
MARIA = Account(
    code="acct1002",
    name="Maria Ionescu",
    email="maria.ionescu@example.ro",
    language="en",
    billing="postpaid",
    low_balance_threshold=0,
    allowed_ips=(IPv4Network("192.0.2.10/32"),),
    dids=("40312345678",),
    mailboxes=(Mailbox("200@default"),),
    max_concurrent_calls=4,
    marketing_consent=True,
)

VALID_YAML = """\
accounts:
  - code: acct1001
    name: Ion Popescu
    email: ion.popescu@example.ro
    language: ro
    billing: prepaid
    daily_limit: "50.00"
    low_balance_threshold: 5
    allowed_ips: ["127.0.0.1", "198.51.100.0/24", "2001:db8:100::/48"]
    dids: ["+40212345678"]
    mailboxes:
      - box: 100@default
      - {box: 101@default, email: receptie@example.ro}
    blocked_classes: [premium, Satellite]
    max_concurrent_calls: 2
    max_call_seconds: 7200
    marketing_consent: false
    enabled: true
    opening_balance: "25.00"
  - code: acct1002
    name: Maria Ionescu
    email: maria.ionescu@example.ro
    language: EN
    billing: postpaid
    low_balance_threshold: 0
    allowed_ips: 192.0.2.10
    dids: [0312345678]
    mailboxes: ["200@default"]
    max_concurrent_calls: 4
    marketing_consent: yes
"""

HEADER = (
    "code,name,email,language,billing,daily_limit,low_balance_threshold,allowed_ips,dids,mailboxes,"
    "blocked_classes,max_concurrent_calls,max_call_seconds,marketing_consent,enabled,opening_balance"
)
VALID_CSV = (
    HEADER + "\n"
    'acct1001,Ion Popescu,ion.popescu@example.ro,ro,prepaid,"50,00",5.00,'
    "127.0.0.1;198.51.100.0/24 2001:db8:100::/48,+40212345678,100@default;101@default=receptie@example.ro,"
    "premium;satellite,2,7200,false,true,25\n"
    "acct1002,Maria Ionescu,maria.ionescu@example.ro,en,postpaid,,0,192.0.2.10,0312345678,200@default,,4,,yes,,\n"
)


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(AccountsFileError) as info:
        load_accounts(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_account_yaml(**overrides: str) -> str:
    """An account of 4 lines (code on line 2); each override adds ``key: value`` from line 5 on."""
    lines = ["accounts:", "  - code: acct1001", "    name: Ion Popescu", "    email: ion.popescu@example.ro"]
    lines += [f"    {key}: {value}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def one_account_csv(**overrides: str) -> str:
    """Header on line 1, the account on line 2, with the given extra columns."""
    columns = {"code": "acct1001", "name": "Ion Popescu", "email": "ion.popescu@example.ro", **overrides}
    return ",".join(columns) + "\n" + ",".join(columns.values()) + "\n"


# --- valid files ---------------------------------------------------------------------------


def test_valid_yaml_gives_exact_accounts(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.yaml", VALID_YAML)
    assert load_accounts(path) == [
        AccountImport(account=ION, opening_balance=2500, line=2),
        AccountImport(account=MARIA, opening_balance=0, line=20),
    ]


def test_valid_csv_gives_the_same_accounts_with_row_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.csv", VALID_CSV)
    assert load_accounts(path) == [
        AccountImport(account=ION, opening_balance=2500, line=2),
        AccountImport(account=MARIA, opening_balance=0, line=3),
    ]


def test_csv_with_bom_crlf_comments_and_semicolon_lists(tmp_path: Path) -> None:
    text = "# exported from the CRM\r\n\r\n" + VALID_CSV.replace("\n", "\r\n")
    path = write(tmp_path, "accounts.csv", text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    imports = load_accounts(path)
    assert [imp.account for imp in imports] == [ION, MARIA]
    assert [imp.line for imp in imports] == [4, 5]


def test_semicolon_separated_csv_from_excel_with_romanian_locale(tmp_path: Path) -> None:
    text = (
        "code;name;email;daily_limit;allowed_ips;dids\n"
        "acct1001;Ion Popescu;ion.popescu@example.ro;12,50;127.0.0.1 198.51.100.0/24;0212345678 +40212345679\n"
    )
    [imp] = load_accounts(write(tmp_path, "accounts.csv", text))
    assert imp.account.daily_limit == 1250
    assert imp.account.allowed_ips == (IPv4Network("127.0.0.1/32"), IPv4Network("198.51.100.0/24"))
    assert imp.account.dids == ("40212345678", "40212345679")


def test_semicolon_csv_takes_a_quoted_list_cell_with_semicolons(tmp_path: Path) -> None:
    """Excel with a Romanian locale quotes a cell in which the operator typed
    ``100@default;101@default``: as documented, a quoted cell may use ';' between items."""
    text = (
        "code;name;email;dids;mailboxes\n"
        'acct1001;Ion Popescu;ion.popescu@example.ro;"0212345678;0212345679";"100@default;101@default=r@example.ro"\n'
    )
    [imp] = load_accounts(write(tmp_path, "accounts.csv", text))
    assert imp.account.dids == ("40212345678", "40212345679")
    assert imp.account.mailboxes == (Mailbox("100@default"), Mailbox("101@default", "r@example.ro"))


def test_shipped_examples_load_and_agree() -> None:
    from_yaml = load_accounts(REPO / "etc" / "accounts.example.yaml")
    from_csv = load_accounts(REPO / "etc" / "accounts.example.csv")
    assert [imp.account for imp in from_yaml] == [imp.account for imp in from_csv]
    assert [imp.opening_balance for imp in from_yaml] == [imp.opening_balance for imp in from_csv] == [2500, 0]
    assert from_yaml[0].account.code == "acct1001"
    assert from_yaml[0].account.ip_allowed("127.0.0.1")
    assert from_yaml[0].account.mailbox_email("100@default") == "ion.popescu@example.ro"


def test_defaults_apply_when_only_required_keys_are_given(tmp_path: Path) -> None:
    [imp] = load_accounts(write(tmp_path, "accounts.yml", one_account_yaml()))
    assert imp == AccountImport(
        account=Account(code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro"), opening_balance=0, line=2
    )
    assert imp.account.low_balance_threshold == 500
    assert imp.account.daily_limit is None
    assert imp.account.allowed_ips == ()


def test_empty_account_list_is_no_accounts(tmp_path: Path) -> None:
    assert load_accounts(write(tmp_path, "a.yaml", "accounts: []\n")) == []
    assert load_accounts(write(tmp_path, "a.csv", HEADER + "\n")) == []


# --- exact money from YAML -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "bani"),
    [("0.1", 10), ("0.29", 29), ("1.10", 110), ("12,5", 1250), ("'12.50'", 1250), ("50", 5000), ("050", 5000)],
)
def test_yaml_amounts_are_read_as_written_not_through_binary_float(tmp_path: Path, written: str, bani: int) -> None:
    [imp] = load_accounts(write(tmp_path, "a.yaml", one_account_yaml(daily_limit=written, opening_balance=written)))
    assert imp.account.daily_limit == bani
    assert imp.opening_balance == bani


def test_the_yaml_loader_constructs_floats_as_their_text() -> None:
    data = yaml.load("a: 0.1\nb: 1.0e+3\nc: .inf\nd: 7\n", Loader=_TextFloatLoader)
    assert data == {"a": "0.1", "b": "1.0e+3", "c": ".inf", "d": 7}
    assert yaml.safe_load("a: 0.1") == {"a": 0.1}  # the stock SafeLoader is untouched


def test_yaml_1_1_typing_does_not_mangle_numbers(tmp_path: Path) -> None:
    # To YAML 1.1, 0212345670 is an octal int and 1:30 a sexagesimal 90; both are read as written.
    text = one_account_yaml(dids="[0212345670]", max_call_seconds="0100")
    [imp] = load_accounts(write(tmp_path, "a.yaml", text))
    assert imp.account.dids == ("40212345670",)
    assert imp.account.max_call_seconds == 100
    path = write(tmp_path, "b.yaml", one_account_yaml(max_call_seconds="1:30"))
    assert problems_of(path) == [
        f"{path}:5: accounts[0].max_call_seconds: expected a whole number from 1 to 86400, got '1:30'"
    ]


# --- parse_amount --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bani"),
    [
        ("12.50", 1250),
        ("12,50", 1250),
        (12, 1200),
        ("12", 1200),
        ("0.5", 50),
        ("0,05", 5),
        (" 7.00 ", 700),
        ("+3", 300),
        ("-0", 0),
        ("0", 0),
        ("999999999999.99", 99999999999999),
    ],
)
def test_parse_amount_exact(text: str | int, bani: int) -> None:
    assert parse_amount(text) == bani


@pytest.mark.parametrize(
    "text",
    ["12.505", "12.500", "1.000,50", "1,000", "abc", "", "NaN", "inf", "Infinity", "1e3", "12 lei", ".5", "5.",
     "1_000", "٣", "0x10", "-1", "-0.01", "1000000000000"],
)  # fmt: skip
def test_parse_amount_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_amount(text)


def test_parse_amount_negative_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_amount("-12.50")
    with pytest.raises(ValueError, match="negative"):
        parse_amount(-3)
    assert parse_amount("-12.50", allow_negative=True) == -1250
    assert parse_amount(-3, allow_negative=True) == -300


@pytest.mark.parametrize("value", [0.1, 12.0, True, None, b"12"])
def test_parse_amount_refuses_floats_and_other_types(value: object) -> None:
    with pytest.raises(TypeError):
        parse_amount(value)  # type: ignore[arg-type]


def test_parse_amount_error_text_matches_the_file_messages() -> None:
    with pytest.raises(ValueError, match=r"^expected an amount like 50\.00, got 'abc'$"):
        parse_amount("abc")
    with pytest.raises(ValueError, match=r"^at most 2 decimals \(bani\), got '12\.505'$"):
        parse_amount("12.505")


# --- every error names file:line and field -------------------------------------------------


@pytest.mark.parametrize(
    ("key", "written", "message"),
    [
        ("daily_limit", "abc", "expected an amount like 50.00, got 'abc'"),
        ("daily_limit", "'12.505'", "at most 2 decimals (bani), got '12.505'"),
        ("daily_limit", "0", "must be more than 0 (leave it empty for no daily limit)"),
        ("low_balance_threshold", "'-1'", "must not be negative, got '-1'"),
        ("opening_balance", ".nan", "expected an amount like 50.00, got '.nan'"),
        ("language", "fr", "expected one of ro, en, got 'fr'"),
        ("billing", "credit", "expected one of prepaid, postpaid, got 'credit'"),
        ("max_concurrent_calls", "0", "expected a whole number from 1 to 1000, got 0"),
        ("max_concurrent_calls", "two", "expected a whole number from 1 to 1000, got 'two'"),
        ("max_call_seconds", "1.5", "expected a whole number from 1 to 86400, got '1.5'"),
        ("marketing_consent", "maybe", "expected true or false, got 'maybe'"),
        ("enabled", "[true]", "expected a single value, got a list"),
        ("blocked_classes", "[premium, 'pre mium!']", None),
        ("code", "[a, b]", "expected a single value, got a list"),
        ("allowed_ips", "{a: 1}", "expected a value or a list, got a mapping"),
    ],
)
def test_yaml_field_errors_name_file_line_and_key_path(
    tmp_path: Path, key: str, written: str, message: str | None
) -> None:
    if key == "code":
        text = one_account_yaml().replace("code: acct1001", f"code: {written}")
    else:
        text = one_account_yaml(**{key: written})
    path = write(tmp_path, "accounts.yaml", text)
    [problem] = problems_of(path)
    line = 2 if key == "code" else 5
    assert problem.startswith(f"{path}:{line}: accounts[0].{key}"), problem
    if message is not None:
        assert message in problem, problem


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("email", "x", "email: not an e-mail address: 'x'"),
        ("daily_limit", "abc", "daily_limit: expected an amount like 50.00, got 'abc'"),
        ("allowed_ips", "198.51.100.0/33", "allowed_ips: expected an IP address or network"),
        ("dids", "12345", "dids: expected a number such as +40212345678"),
        ("mailboxes", "100@default=not-an-address", "mailboxes: not an e-mail address: 'not-an-address'"),
        ("mailboxes", "../etc@default", "mailboxes: expected mailbox@context"),
        ("enabled", "nu", "enabled: expected true or false, got 'nu'"),
        ("code", "acct 1001", "code: expected 1-40 of A-Z a-z 0-9 _ . -, got 'acct 1001'"),
        ("code", "", "code: missing (required)"),
    ],
)
def test_csv_field_errors_name_file_line_and_column(tmp_path: Path, column: str, cell: str, message: str) -> None:
    good = one_account_csv(code="acct0999")  # line 2: a valid row first
    bad = one_account_csv(**{column: cell}).splitlines()[1]
    header = good.splitlines()[0] + ("" if column in {"code", "name", "email"} else f",{column}")
    rows = [good.splitlines()[1] + ("" if column in {"code", "name", "email"} else ","), bad]
    path = write(tmp_path, "accounts.csv", header + "\n\n" + "\n".join(rows) + "\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:4: {message}"), problem


def test_the_example_messages_of_the_brief(tmp_path: Path) -> None:
    csv_path = write(
        tmp_path,
        "accounts.csv",
        HEADER.split(",daily", maxsplit=1)[0] + "\n\n\n" + "acct1001,Ion Popescu,x,ro,prepaid\n",
    )
    assert problems_of(csv_path) == [f"{csv_path}:4: email: not an e-mail address: 'x'"]
    accounts = "".join(f"  - code: acct100{i}\n    name: Ion Popescu\n    email: ion{i}@example.ro\n" for i in range(2))
    yaml_path = write(
        tmp_path,
        "accounts.yaml",
        "accounts:\n" + accounts + "\n" * 4 + "  - code: acct1003\n    name: I P\n    email: ion@example.ro\n"
        "    daily_limit: abc\n",
    )
    assert problems_of(yaml_path) == [
        f"{yaml_path}:15: accounts[2].daily_limit: expected an amount like 50.00, got 'abc'"
    ]


def test_every_problem_of_every_row_is_reported(tmp_path: Path) -> None:
    text = (
        "accounts:\n"
        "  - code: acct1001\n"
        "    name: Ion Popescu\n"
        "    email: bad\n"
        "    dids: ['+40212345678', '123', 'abc']\n"
        "  - code: 'no spaces allowed'\n"
        "    name: Maria\n"
        "    email: maria.ionescu@example.ro\n"
        "    colour: blue\n"
    )
    path = write(tmp_path, "accounts.yaml", text)
    assert problems_of(path) == [
        f"{path}:4: accounts[0].email: not an e-mail address: 'bad'",
        f"{path}:5: accounts[0].dids[1]: expected a number such as +40212345678, 0040212345678 or 0212345678 "
        "(3 digits without '+', '00' or '0': a short number or an extension, not a PSTN number), got '123'",
        f"{path}:5: accounts[0].dids[2]: expected a number such as +40212345678, 0040212345678 or 0212345678 "
        "(not a telephone number: contains 'a', 'b', 'c'), got 'abc'",
        f"{path}:6: accounts[1].code: expected 1-40 of A-Z a-z 0-9 _ . -, got 'no spaces allowed'",
        f"{path}:9: accounts[1].colour: unknown key 'colour' (known: code, name, email, language, billing, "
        "daily_limit, low_balance_threshold, allowed_ips, dids, mailboxes, blocked_classes, max_concurrent_calls, "
        "max_call_seconds, marketing_consent, enabled, opt_out, opening_balance)",
    ]


def test_required_keys_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.yaml", "accounts:\n  - code: acct1001\n    name: ~\n")
    assert problems_of(path) == [
        f"{path}:2: accounts[0].email: missing (required)",
        f"{path}:3: accounts[0].name: missing (required)",
    ]


def test_unknown_and_missing_csv_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.csv", "code,name,e-mail,Colour\nacct1001,Ion,ion@example.ro,blue\n")
    problems = problems_of(path)
    assert problems[0].startswith(f"{path}:1: e-mail: unknown column (known: code, name, email,")
    assert problems[1].startswith(f"{path}:1: colour: unknown column")
    assert problems[2] == f"{path}:1: email: required column missing from the header"


def test_duplicate_csv_column_and_wrong_cell_count(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.csv", "code,name,email,name\nacct1001,Ion,ion@example.ro,Ion\n")
    assert problems_of(path) == [f"{path}:1: name: duplicate column"]
    path = write(tmp_path, "accounts.csv", "code,name,email\nacct1001,Ion,ion@example.ro,extra\n")
    assert problems_of(path) == [f"{path}:2: row has 4 cells, the header has 3"]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path, "accounts.yaml", one_account_yaml(daily_limit="10", opening_balance="1") + "    daily_limit: 20\n"
    )
    assert problems_of(path) == [f"{path}:7: accounts[0].daily_limit: duplicate key (first on line 5)"]


def test_unknown_top_level_key_and_missing_accounts(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.yaml", "acounts:\n  - code: acct1001\n")
    assert problems_of(path) == [
        f"{path}:1: acounts: unknown key (expected only 'accounts')",
        f"{path}:1: accounts: missing: expected a list of accounts",
    ]
    path = write(tmp_path, "empty.yaml", "# nothing\n")
    assert problems_of(path) == [f"{path}:1: empty file: expected 'accounts:' with a list of accounts"]


def test_invalid_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.yaml", "accounts:\n  - code: acct1001\n    name: [unclosed\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:4: invalid YAML:")


def test_yaml_aliases_of_collections_are_refused(tmp_path: Path) -> None:
    text = one_account_yaml(allowed_ips="&ips ['192.0.2.10']") + (
        "  - code: acct1002\n    name: Maria\n    email: maria@example.ro\n    allowed_ips: *ips\n"
    )
    path = write(tmp_path, "accounts.yaml", text)
    assert problems_of(path) == [
        f"{path}:5: accounts[1].allowed_ips: aliases (*name) of lists or mappings are not supported"
    ]


def test_file_level_errors(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, "accounts.txt", "x")) == [
        f"{tmp_path / 'accounts.txt'}: unsupported file type '.txt': expected .yaml, .yml or .csv"
    ]
    assert problems_of(tmp_path / "missing.yaml") == [f"{tmp_path / 'missing.yaml'}: file not found"]
    latin1 = write(tmp_path, "latin1.csv", "code,name,email\nacct1001,Ștefan,s@example.ro\n", encoding="utf-16")
    assert problems_of(latin1)[0].startswith(f"{latin1}: not UTF-8 text")
    nul = write(tmp_path, "nul.csv", "code,name,email\nacct1001,Ion\x00,ion@example.ro\n")
    assert problems_of(nul)[0].startswith(f"{nul}:")


# --- duplicates across rows ----------------------------------------------------------------


def test_duplicate_codes_name_both_lines_yaml(tmp_path: Path) -> None:
    text = one_account_yaml() + "  - code: ACCT1001\n    name: Maria Ionescu\n    email: maria@example.ro\n"
    path = write(tmp_path, "accounts.yaml", text)
    assert problems_of(path) == [f"{path}:5: accounts[1].code: duplicate account code 'ACCT1001' (also on line 2)"]


def test_duplicate_codes_name_both_lines_csv(tmp_path: Path) -> None:
    text = "code,name,email\nacct1001,Ion,ion@example.ro\nacct1002,Ana,ana@example.ro\nacct1001,Dan,dan@example.ro\n"
    path = write(tmp_path, "accounts.csv", text)
    assert problems_of(path) == [f"{path}:4: code: duplicate account code 'acct1001' (also on line 2)"]


def test_a_did_or_mailbox_on_two_accounts_is_an_error(tmp_path: Path) -> None:
    text = (
        "code,name,email,dids,mailboxes\n"
        "acct1001,Ion,ion@example.ro,+40212345678,100@default\n"
        "acct1002,Ana,ana@example.ro,0212345678,100@default\n"
    )
    path = write(tmp_path, "accounts.csv", text)
    assert problems_of(path) == [
        f"{path}:3: dids: DID +40212345678 is also on line 2 (acct1001)",
        f"{path}:3: mailboxes: voicemail box 100@default is also on line 2 (acct1001)",
    ]


def test_the_same_did_twice_in_one_account(tmp_path: Path) -> None:
    path = write(tmp_path, "accounts.yaml", one_account_yaml(dids="['+40212345678', '0212345678']"))
    assert problems_of(path) == [f"{path}:2: accounts[0]: dids: '40212345678' appears twice"]


# --- DIDs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        "+40212345678",
        "0040212345678",
        "0212345678",
        "40212345678",
        "+40 21 234 5678",
        "+40 (0) 21 234 5678",
        "021-234.56.78",
        "(021) 2345678",
    ],
)
def test_dids_are_normalised_to_e164_digits(tmp_path: Path, written: str) -> None:
    [imp] = load_accounts(write(tmp_path, "a.yaml", one_account_yaml(dids=f"[{written!r}]")))
    assert imp.account.dids == ("40212345678",)


def test_foreign_dids_keep_their_country_code(tmp_path: Path) -> None:
    [imp] = load_accounts(write(tmp_path, "a.yaml", one_account_yaml(dids="['+442071234567', '00493012345678']")))
    assert imp.account.dids == ("442071234567", "493012345678")


@pytest.mark.parametrize("written", ["212345678", "+400212345678", "02123456", "+40abc", "0", "+0123456789"])
def test_bad_dids_are_refused(tmp_path: Path, written: str) -> None:
    path = write(tmp_path, "a.yaml", one_account_yaml(dids=f"[{written!r}]"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5: accounts[0].dids[0]: "), problem


# --- hostile values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["Ion\r\nBcc: victim@example.ro", "Ion\nPopescu", "Ion\tPopescu", "Ion\x00", "Ion\u2028Bcc: x", "\u202eucsepoP",
     "=?UTF-8?Q?=0A?=Bcc: x@example.ro", "Ion\x1b[31m"],
)  # fmt: skip
def test_control_characters_in_names_are_refused_not_cleaned(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, "a.yaml", one_account_yaml().replace("name: Ion Popescu", f"name: {yaml_quoted(name)}"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:3: accounts[0].name: ")
    assert "\n" not in problem
    assert "\r" not in problem


@pytest.mark.parametrize(
    "email",
    [
        "attacker@evil, Boss",
        "attacker@evil.ro, boss@example.ro",
        "Boss <attacker@evil.ro>",
        '"Boss" attacker@evil.ro',
        "ion.popescu@example.ro\r\nBcc: victim@example.ro",
        "ion.popescu@example.ro\n",
        "ion popescu@example.ro",
        "ion@@example.ro",
        "ion@example",
        "=?utf-8?q?=0A?=@example.ro",
        "ion@-example.ro",
        "ion..popescu@example.ro",
        "ștefan@example.ro",
        "a" * 65 + "@example.ro",
    ],
)
def test_hostile_or_malformed_emails_are_refused(tmp_path: Path, email: str) -> None:
    path = write(
        tmp_path, "a.yaml", one_account_yaml().replace("email: ion.popescu@example.ro", f"email: {yaml_quoted(email)}")
    )
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:4: accounts[0].email: ")
    assert "\n" not in problem


def test_hostile_email_in_a_quoted_csv_cell(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", 'code,name,email\nacct1001,Ion,"ion@example.ro\r\nBcc: victim@example.ro"\n')
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:2: email: contains a control or invisible character (U+000D)")


def test_names_with_romanian_letters_and_surrounding_spaces(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "code,name,email\nacct1001,  Ștefan Țăran-Îonescu  , ion@example.ro \n")
    [imp] = load_accounts(path)
    assert imp.account.name == "Ștefan Țăran-Îonescu"
    assert imp.account.email == "ion@example.ro"


def yaml_quoted(text: str) -> str:
    """A YAML double-quoted scalar that decodes to exactly ``text``."""
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


# --- IP allow-list -------------------------------------------------------------------------


def test_ip_allow_list_parsing_ipv4_ipv6_and_hosts(tmp_path: Path) -> None:
    text = one_account_yaml(allowed_ips="['192.0.2.10', '198.51.100.0/24', '2001:db8::/32', '::1']")
    [imp] = load_accounts(write(tmp_path, "a.yaml", text))
    assert imp.account.allowed_ips == (
        IPv4Network("192.0.2.10/32"),
        IPv4Network("198.51.100.0/24"),
        IPv6Network("2001:db8::/32"),
        IPv6Network("::1/128"),
    )


def test_a_row_without_a_language_takes_the_configured_default(tmp_path: Path) -> None:
    """``notifications.default_language`` was documented ("language for accounts that have none")
    and read by nothing: every such account got Romanian."""
    [plain] = load_accounts(write(tmp_path, "a.yaml", one_account_yaml()), default_language="en")
    [chosen] = load_accounts(write(tmp_path, "b.csv", one_account_csv(language="ro")), default_language="en")
    [csv] = load_accounts(write(tmp_path, "c.csv", one_account_csv()), default_language="en")
    assert (plain.account.language, chosen.account.language, csv.account.language) == ("en", "ro", "en")
    [default] = load_accounts(write(tmp_path, "d.yaml", one_account_yaml()))
    assert default.account.language == "ro"


def test_an_ipv4_mapped_allow_list_entry_is_read_as_ipv4_and_matches(tmp_path: Path) -> None:
    """Sources are checked as IPv4 when mapped (::ffff:a.b.c.d): an entry written that way never
    matched, and the account failed closed without saying why."""
    text = one_account_yaml(allowed_ips="['::ffff:198.51.100.0/120', '::ffff:192.0.2.10']")
    [imp] = load_accounts(write(tmp_path, "a.yaml", text))
    assert imp.account.allowed_ips == (IPv4Network("198.51.100.0/24"), IPv4Network("192.0.2.10/32"))
    assert imp.account.ip_allowed("198.51.100.7")
    assert imp.account.ip_allowed("::ffff:192.0.2.10")
    assert not imp.account.ip_allowed("192.0.2.11")


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("198.51.100.0/33", "expected an IP address or network such as 192.0.2.10 or 198.51.100.0/24, got '198.51"),
        ("198.51.100.5/24", "host bits set in '198.51.100.5/24': write the network address or a single host"),
        ("300.1.1.1", "expected an IP address or network"),
        ("2001:db8::/129", "expected an IP address or network"),
        ("192.168.001.1", "expected an IP address or network"),
        ("example.ro", "expected an IP address or network"),
    ],
)  # fmt: skip
def test_invalid_allow_list_entries_are_refused(tmp_path: Path, written: str, message: str) -> None:
    path = write(tmp_path, "a.yaml", one_account_yaml(allowed_ips=f"['127.0.0.1', '{written}']"))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:5: accounts[0].allowed_ips[1]: {message}"), problem


def test_ip_allowed() -> None:
    account = Account(
        code="acct1001",
        name="Ion Popescu",
        email="ion.popescu@example.ro",
        allowed_ips=(IPv4Network("198.51.100.0/24"), IPv6Network("2001:db8::/32")),
    )
    assert account.ip_allowed("198.51.100.7")
    assert account.ip_allowed("::ffff:198.51.100.7")  # IPv4-mapped IPv6 is checked as IPv4
    assert account.ip_allowed("2001:db8::5")
    assert not account.ip_allowed("192.0.2.10")
    assert not account.ip_allowed("2001:db9::5")
    assert not account.ip_allowed("not an ip")
    assert not account.ip_allowed("")
    assert not account.ip_allowed("198.51.100.7 ")


def test_empty_allow_list_allows_any_source() -> None:
    account = Account(code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro")
    assert account.ip_allowed("203.0.113.99")
    assert account.ip_allowed("2001:db8::1")
    assert account.ip_allowed("garbage")  # no list: the source is not checked at all


# --- the domain types guard themselves ----------------------------------------------------


def test_mailbox_email_prefers_the_box_address() -> None:
    account = Account(
        code="acct1001",
        name="Ion Popescu",
        email="ion.popescu@example.ro",
        mailboxes=(Mailbox("100@default"), Mailbox("101@default", "receptie@example.ro")),
    )
    assert account.mailbox_email("100@default") == "ion.popescu@example.ro"
    assert account.mailbox_email("101@default") == "receptie@example.ro"
    assert account.mailbox_email("102@default") is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"code": "a b"}, "code: "),
        ({"email": "attacker@evil, Boss"}, "email: "),
        ({"name": "Ion\nPopescu"}, "name: "),
        ({"daily_limit": 0}, "daily_limit: "),
        ({"low_balance_threshold": -1}, "low_balance_threshold: "),
        ({"dids": ("0212345678",)}, "dids: "),
        ({"blocked_classes": frozenset({"Premium"})}, "blocked_classes: "),
        ({"max_concurrent_calls": 0}, "max_concurrent_calls: "),
        ({"language": "fr"}, "language: "),
    ],
)
def test_an_invalid_account_cannot_be_built(overrides: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"code": "acct1001", "name": "Ion Popescu", "email": "ion.popescu@example.ro"}
    with pytest.raises(ValueError, match=f"^{message}"):
        Account(**{**fields, **overrides})  # type: ignore[arg-type]


def test_an_invalid_mailbox_cannot_be_built() -> None:
    with pytest.raises(ValueError, match=r"^box: "):
        Mailbox("../../etc@default")
    with pytest.raises(ValueError, match=r"^email: "):
        Mailbox("100@default", "x")


def test_yaml_example_comments_every_key() -> None:
    text = (REPO / "etc" / "accounts.example.yaml").read_text()
    first = text.split("\n  - code: acct1002")[0]
    lines = first.splitlines()
    for key in FIELDS:
        index = next(i for i, line in enumerate(lines) if line.strip().removeprefix("- ").startswith(f"{key}:"))
        assert lines[index - 1].strip().startswith("#") or lines[index - 1].strip().startswith("- #"), key
