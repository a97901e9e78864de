"""Read an account import file (YAML or CSV) into validated :class:`AccountImport` rows.

The format is chosen by extension: ``.yaml``/``.yml`` or ``.csv``.  Both carry the same
keys (see ``etc/accounts.example.yaml``, every key commented, and ``etc/accounts.example.csv``).
The whole file is checked before anything is returned: any invalid row makes
:func:`load_accounts` raise :class:`AccountsFileError` listing *every* problem, one line each,
naming file, line and field::

    accounts.csv:4: email: not an e-mail address: 'x'
    accounts.yaml:12: accounts[2].daily_limit: expected an amount like 50.00, got 'abc'

Rules beyond the per-field ones of :mod:`clickphone_agi.domain.accounts`:

* Unknown keys/columns are errors; so are duplicate keys in one YAML mapping and duplicate
  columns.  ``code``, ``name`` and ``email`` are required; an empty value (CSV cell, YAML
  ``null`` or ``""``) means "use the default".
* The same account code twice in one file is an error naming both lines; codes are
  compared ignoring case (``acct1001``/``ACCT1001`` would confuse every report; storage refuses
  a new code that differs only in case from a stored one).  A DID or a voicemail box claimed by
  two accounts is an error too.
* YAML scalars are read as the text written, never through YAML 1.1 typing: ``0.1`` is the
  amount 0,10 lei exactly (floats are constructed as their original string), ``0212345670``
  stays a number and does not become an octal int, ``1:30`` does not become 90.  Booleans
  accept YAML's words (``true``/``false``/``yes``/``no``/``on``/``off``) and, in CSV and quoted
  YAML, ``true``/``false``/``yes``/``no``/``1``/``0``.  Aliases of lists or mappings are refused.
* CSV: UTF-8 with or without BOM; comma-separated, or ``;``-separated when the header line
  has ``;`` and no comma (Excel with a Romanian locale).  List cells are separated by ``;``
  or spaces (only spaces in a ``;``-separated file unless the cell is quoted); mailboxes as
  ``100@default=box@example.ro;101@default``.  Lines starting with ``#`` and blank lines are
  skipped; a row with a different number of cells than the header is an error.
* DIDs are normalised to E.164 digits: ``+40212345678``, ``0040212345678`` and the national
  ``0212345678`` (country code 40) all become ``40212345678``; spaces, dots, dashes and
  parentheses inside are ignored (:func:`clickphone_agi.domain.numbers.normalise`).  Bare
  digits are accepted only as ``40`` + 9 digits; a ``+40`` number needs exactly 9 digits.
* Text values lose surrounding spaces; any other control character (CR, LF, TAB, NUL...)
  is an error, never silently cleaned.  Destination classes, ``language`` and ``billing``
  are lower-cased.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import yaml

from clickphone_agi.config.loader import construct_checked
from clickphone_agi.domain.accounts import (
    BILLING_MODES,
    LANGUAGES,
    MAX_CALL_SECONDS,
    MAX_CONCURRENT_CALLS,
    OPT_OUT_KINDS,
    Account,
    AccountImport,
    IPNetwork,
    Mailbox,
    check_code,
    check_destination_class,
    check_did,
    check_email,
    check_mailbox_box,
    check_name,
    parse_amount,
    parse_network,
    show,
)
from clickphone_agi.domain.numbers import InvalidNumber, compact, normalise

__all__ = ["FIELDS", "REQUIRED_FIELDS", "AccountsFileError", "load_accounts"]

FIELDS: tuple[str, ...] = (
    "code",
    "name",
    "email",
    "language",
    "billing",
    "daily_limit",
    "low_balance_threshold",
    "allowed_ips",
    "dids",
    "mailboxes",
    "blocked_classes",
    "max_concurrent_calls",
    "max_call_seconds",
    "marketing_consent",
    "enabled",
    "opt_out",
    "opening_balance",
)
"""Every key of a row, in the order of the example files."""

REQUIRED_FIELDS = frozenset({"code", "name", "email"})
_MAILBOX_FIELDS = ("box", "email")
_HOME_COUNTRY = "40"
_HOME_NSN_DIGITS = 9
_LIST_SEPARATORS = re.compile(r"[;\s]+")
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_NULL_TAG = "tag:yaml.org,2002:null"
_FLOAT_TAG = "tag:yaml.org,2002:float"

T = TypeVar("T")


class AccountsFileError(Exception):
    """The import file is unusable; ``problems`` holds one ``file:line: field: message`` each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_accounts(path: Path, default_language: str = "ro") -> list[AccountImport]:
    """Read and validate every row of ``path``; raise :class:`AccountsFileError` if any is wrong.
    A row without a language gets ``default_language`` (``notifications.default_language``)."""
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in {".yaml", ".yml", ".csv"}:
        raise AccountsFileError(
            [f"{source}: unsupported file type {suffix or '(none)'!r}: expected .yaml, .yml or .csv"]
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise AccountsFileError([f"{source}: file not found"]) from None
    except UnicodeDecodeError as exc:
        raise AccountsFileError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise AccountsFileError([f"{source}: cannot read: {exc.strerror}"]) from None
    problems = _Problems(source)
    rows = _yaml_rows(text, problems) if suffix in {".yaml", ".yml"} else _csv_rows(text, problems)
    builder = _Builder(problems, default_language)
    imports = [imp for row in rows if (imp := builder.build(row)) is not None]
    if problems.lines:
        raise AccountsFileError(problems.sorted())
    return imports


# --- the format-neutral shape both readers produce ----------------------------------------


@dataclass
class _Value:
    """One value as written, with where it was written."""

    where: str  # key path for messages: 'email', 'accounts[2].dids[1]'
    line: int
    text: str | None = None  # scalar text as written; None: empty / null / not a scalar
    flag: bool | None = None  # a YAML boolean
    items: list[_Value] | None = None  # a YAML sequence
    fields: dict[str, _Value] | None = None  # a YAML mapping (mailbox entries)
    kind: str = "scalar"  # 'scalar' | 'list' | 'mapping'


@dataclass
class _Row:
    line: int
    prefix: str  # 'accounts[2].' in YAML, '' in CSV
    values: dict[str, _Value]


@dataclass
class _Problems:
    source: str
    lines: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, where: str, message: str) -> None:
        text = f"{self.source}:{line}: {where}: {message}" if where else f"{self.source}:{line}: {message}"
        self.lines.append((line, text))

    def sorted(self) -> list[str]:
        """In file order; problems on one line keep the order they were found in."""
        return [text for _, text in sorted(self.lines, key=lambda item: item[0])]


class _Bad(Exception):
    """A value is invalid; the message is reported against the value's line and key path."""

    def __init__(self, value: _Value, message: str) -> None:
        super().__init__(message)
        self.value = value
        self.message = message


def _fail(value: _Value, message: str) -> NoReturn:
    raise _Bad(value, message)


# --- YAML ----------------------------------------------------------------------------------


class _TextFloatLoader(yaml.SafeLoader):
    """SafeLoader that constructs floats as the string written: money never goes through binary float."""


def _float_as_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


_TextFloatLoader.add_constructor(_FLOAT_TAG, _float_as_text)


def _yaml_rows(text: str, problems: _Problems) -> list[_Row]:
    try:
        loader = _TextFloatLoader(text)  # its reader refuses control characters up front
    except yaml.YAMLError as exc:
        problems.add(1, "", f"invalid YAML: {exc}")
        return []
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            problems.add(line, "", f"invalid YAML: {exc.problem or exc}")
            return []
        except yaml.YAMLError as exc:
            problems.add(1, "", f"invalid YAML: {exc}")
            return []
        return _YamlWalker(loader, problems).rows(root)
    finally:
        loader.dispose()


class _YamlWalker:
    def __init__(self, loader: yaml.SafeLoader, problems: _Problems) -> None:
        self.loader = loader
        self.problems = problems
        self.seen: set[int] = set()

    def rows(self, root: yaml.Node | None) -> list[_Row]:
        if root is None:
            self.problems.add(1, "", "empty file: expected 'accounts:' with a list of accounts")
            return []
        top = self.mapping(root, "")
        if top is None:
            return []
        for key, (key_node, _) in top.items():
            if key != "accounts":
                self.problems.add(_line(key_node), key, "unknown key (expected only 'accounts')")
        if "accounts" not in top:
            self.problems.add(_line(root), "accounts", "missing: expected a list of accounts")
            return []
        node = top["accounts"][1]
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problems.add(_line(node), "accounts", f"expected a list of accounts, got {_kind(node)}")
            return []
        if not self.first_visit(node, "accounts"):
            return []
        return [row for index, item in enumerate(node.value) if (row := self.row(item, index)) is not None]

    def row(self, node: yaml.Node, index: int) -> _Row | None:
        where = f"accounts[{index}]"
        mapping = self.mapping(node, where)
        if mapping is None:
            return None
        values = {}
        for key, (key_node, value_node) in mapping.items():
            if key not in FIELDS:
                self.problems.add(_line(key_node), f"{where}.{key}", _unknown(key, FIELDS))
                continue
            value = self.value(value_node, f"{where}.{key}", nested=key == "mailboxes")
            if value is not None:
                values[key] = value
        return _Row(_line(node), f"{where}.", values)

    def mapping(self, node: yaml.Node, where: str) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problems.add(_line(node), where, f"expected a mapping of keys, got {_kind(node)}")
            return None
        if not self.first_visit(node, where):
            return None
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.add(_line(key_node), where, f"unsupported key {show(_node_text(key_node))}")
                continue
            key = key_node.value
            if key in result:
                first = _line(result[key][0])
                key_where = f"{where}.{key}" if where else key
                self.problems.add(_line(key_node), key_where, f"duplicate key (first on line {first})")
                continue
            result[key] = (key_node, value_node)
        return result

    def value(self, node: yaml.Node, where: str, *, nested: bool) -> _Value | None:
        line = _line(node)
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _NULL_TAG:
                return _Value(where, line)
            try:
                constructed = construct_checked(self.loader.construct_object, node)
            except yaml.YAMLError as exc:  # "!!binary zz", "!!int ''", an unknown tag
                problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
                self.problems.add(line, where, f"invalid YAML value: {problem}")
                return None
            flag = constructed if isinstance(constructed, bool) else None
            return _Value(where, line, text=node.value, flag=flag)
        if isinstance(node, yaml.SequenceNode):
            if not self.first_visit(node, where):
                return None
            items = []
            for index, item in enumerate(node.value):
                item_where = f"{where}[{index}]"
                if nested and isinstance(item, yaml.MappingNode):
                    item_value = self.mailbox_mapping(item, item_where)
                elif isinstance(item, yaml.ScalarNode):
                    item_value = self.value(item, item_where, nested=False)
                else:
                    self.problems.add(_line(item), item_where, f"expected a single value, got {_kind(item)}")
                    continue
                if item_value is not None:
                    items.append(item_value)
            return _Value(where, line, items=items, kind="list")
        self.problems.add(line, where, f"expected a value or a list, got {_kind(node)}")
        return None

    def mailbox_mapping(self, node: yaml.MappingNode, where: str) -> _Value | None:
        mapping = self.mapping(node, where)
        if mapping is None:
            return None
        fields = {}
        for key, (key_node, value_node) in mapping.items():
            if key not in _MAILBOX_FIELDS:
                self.problems.add(_line(key_node), f"{where}.{key}", _unknown(key, _MAILBOX_FIELDS))
                continue
            if not isinstance(value_node, yaml.ScalarNode):
                self.problems.add(
                    _line(value_node), f"{where}.{key}", f"expected a single value, got {_kind(value_node)}"
                )
                continue
            value = self.value(value_node, f"{where}.{key}", nested=False)
            if value is not None:
                fields[key] = value
        return _Value(where, _line(node), fields=fields, kind="mapping")

    def first_visit(self, node: yaml.Node, where: str) -> bool:
        """Refuse a list/mapping reached twice (an alias): keeps the walk linear in the file size."""
        if id(node) in self.seen:
            self.problems.add(_line(node), where, "aliases (*name) of lists or mappings are not supported")
            return False
        self.seen.add(id(node))
        return True


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "nothing"
    return f"the value {show(_node_text(node))}"


def _node_text(node: yaml.Node) -> str:
    return node.value if isinstance(node, yaml.ScalarNode) else _kind(node)


def _unknown(key: str, known: tuple[str, ...]) -> str:
    return f"unknown key {show(key)} (known: {', '.join(known)})"


# --- CSV -----------------------------------------------------------------------------------


def _csv_rows(text: str, problems: _Problems) -> list[_Row]:
    delimiter = _csv_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[_Row] = []
    for line, cells in _records(reader, problems):
        if not any(cell.strip() for cell in cells) or cells[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = _csv_header(cells, line, problems)
            if header is None:
                return []
            continue
        if len(cells) != len(header):
            problems.add(line, "", f"row has {len(cells)} cells, the header has {len(header)}")
            continue
        values = {}
        for column, cell in zip(header, cells, strict=True):
            stripped = cell.strip(" ")
            values[column] = _Value(column, line, text=stripped or None)
        rows.append(_Row(line, "", values))
    if header is None:
        problems.add(1, "", f"no header row: expected the columns {', '.join(FIELDS)}")
    return rows


def _records(reader: Any, problems: _Problems) -> Iterator[tuple[int, list[str]]]:
    """Records with the line each starts on (a quoted cell may span lines)."""
    end = 0
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problems.add(reader.line_num, "", f"malformed CSV: {exc}")
            return
        end = reader.line_num
        yield start, cast(list[str], cells)


def _csv_delimiter(text: str) -> str:
    for raw in io.StringIO(text, newline=""):
        line = raw.strip()
        if line and not line.startswith("#"):
            return ";" if ";" in line and "," not in line else ","
    return ","


def _csv_header(cells: list[str], line: int, problems: _Problems) -> list[str] | None:
    header = [cell.strip().lower() for cell in cells]
    bad = False
    seen: set[str] = set()
    for column in header:
        if column not in FIELDS:
            problems.add(line, column or "(empty column name)", f"unknown column (known: {', '.join(FIELDS)})")
            bad = True
        elif column in seen:
            problems.add(line, column, "duplicate column")
            bad = True
        seen.add(column)
    for column in FIELDS:
        if column in REQUIRED_FIELDS and column not in seen:
            problems.add(line, column, "required column missing from the header")
            bad = True
    return None if bad else header


# --- building and validating a row ---------------------------------------------------------


@dataclass
class _Claim:
    line: int
    code: str


class _Builder:
    def __init__(self, problems: _Problems, default_language: str = "ro") -> None:
        self.problems = problems
        self.default_language = default_language
        self.codes: dict[str, _Claim] = {}
        self.dids: dict[str, _Claim] = {}
        self.boxes: dict[str, _Claim] = {}

    def build(self, row: _Row) -> AccountImport | None:
        before = len(self.problems.lines)
        parsed: dict[str, Any] = {}
        for name in FIELDS:
            value = row.values.get(name) or _Value(f"{row.prefix}{name}", row.line)
            try:
                parsed[name] = _PARSERS[name](value)
            except _ManyBad as many:
                for bad in many.bads:
                    self.problems.add(bad.value.line, bad.value.where, bad.message)
            except _Bad as bad:
                self.problems.add(bad.value.line, bad.value.where, bad.message)
        if len(self.problems.lines) > before:
            return None
        opening_balance = parsed.pop("opening_balance")
        kwargs = {name: val for name, val in parsed.items() if val is not None}
        kwargs.setdefault("language", self.default_language)
        dids: list[tuple[str, _Value]] = kwargs.pop("dids", [])
        boxes: list[tuple[Mailbox, _Value]] = kwargs.pop("mailboxes", [])
        try:
            account = Account(
                **kwargs,
                dids=tuple(did for did, _ in dids),
                mailboxes=tuple(box for box, _ in boxes),
            )
        except (ValueError, TypeError) as exc:
            self.problems.add(row.line, row.prefix.rstrip("."), str(exc))
            return None
        code_value = row.values.get("code") or _Value(f"{row.prefix}code", row.line)
        self.claim(self.codes, account.code.lower(), code_value, code=account.code, what="account code")
        for did, value in dids:
            self.claim(self.dids, did, value, code=account.code, what=f"DID +{did}")
        for box, value in boxes:
            self.claim(self.boxes, box.box, value, code=account.code, what=f"voicemail box {box.box}")
        if len(self.problems.lines) > before:
            return None
        return AccountImport(account=account, opening_balance=opening_balance, line=row.line)

    def claim(self, claims: dict[str, _Claim], key: str, value: _Value, *, code: str, what: str) -> None:
        """Record that ``code`` claims ``key``; a second claim in the file is an error naming both lines."""
        first = claims.get(key)
        if first is None:
            claims[key] = _Claim(value.line, code)
        elif what == "account code":
            self.problems.add(value.line, value.where, f"duplicate {what} {show(code)} (also on line {first.line})")
        else:
            self.problems.add(value.line, value.where, f"{what} is also on line {first.line} ({first.code})")


# --- per-field parsers: raise _Bad, return the domain value (None: use the default) -----------


def _text(value: _Value) -> str | None:
    if value.kind != "scalar":
        _fail(value, "expected a single value, got a list" if value.kind == "list" else "expected a single value")
    if value.text is None or not value.text.strip(" "):
        return None
    return value.text.strip(" ")


def _required(check: Callable[[str], None]) -> Callable[[_Value], str]:
    def parse(value: _Value) -> str:
        text = _text(value)
        if text is None:
            _fail(value, "missing (required)")
        _check(value, check, text)
        return text

    return parse


def _check(value: _Value, check: Callable[[str], None], text: str) -> None:
    try:
        check(text)
    except ValueError as exc:
        _fail(value, str(exc))


def _choice(choices: tuple[str, ...]) -> Callable[[_Value], str | None]:
    def parse(value: _Value) -> str | None:
        text = _text(value)
        if text is None:
            return None
        if text.lower() not in choices:
            _fail(value, f"expected one of {', '.join(choices)}, got {show(text)}")
        return text.lower()

    return parse


def _amount(*, zero_ok: bool) -> Callable[[_Value], int | None]:
    def parse(value: _Value) -> int | None:
        text = _text(value)
        if text is None:
            return None
        try:
            bani = parse_amount(text)
        except ValueError as exc:
            _fail(value, str(exc))
        if bani == 0 and not zero_ok:
            _fail(value, "must be more than 0 (leave it empty for no daily limit)")
        return bani

    return parse


def _opening_balance(value: _Value) -> int:
    amount = _amount(zero_ok=True)(value)
    return 0 if amount is None else amount


def _integer(low: int, high: int) -> Callable[[_Value], int | None]:
    def parse(value: _Value) -> int | None:
        text = _text(value)
        if text is None:
            return None
        if not re.fullmatch(r"[0-9]{1,9}", text, re.ASCII):
            _fail(value, f"expected a whole number from {low} to {high}, got {show(text)}")
        number = int(text)
        if not low <= number <= high:
            _fail(value, f"expected a whole number from {low} to {high}, got {number}")
        return number

    return parse


def _boolean(value: _Value) -> bool | None:
    if value.flag is not None:
        return value.flag
    text = _text(value)
    if text is None:
        return None
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    _fail(value, f"expected true or false, got {show(text)}")


def _list_items(value: _Value) -> list[_Value]:
    """The items of a list value: a YAML sequence, or a scalar split on ';'/spaces."""
    if value.kind == "list":
        return value.items or []
    if value.kind == "mapping":
        _fail(value, "expected a list")
    if value.text is None:
        return []
    # a ';' left inside a cell of a ';'-separated file was quoted: it separates items there too
    parts = [part for part in _LIST_SEPARATORS.split(value.text.strip()) if part]
    if len(parts) == 1:
        return [value]
    return [_Value(f"{value.where}[{index}]", value.line, text=part) for index, part in enumerate(parts)]


def _each(parse_item: Callable[[_Value], T]) -> Callable[[_Value], list[T]]:
    def parse(value: _Value) -> list[T]:
        results: list[T] = []
        first_bad: _Bad | None = None
        extra: list[_Bad] = []
        for item in _list_items(value):
            try:
                results.append(parse_item(item))
            except _Bad as bad:
                if first_bad is None:
                    first_bad = bad
                else:
                    extra.append(bad)
        if first_bad is not None:
            raise _ManyBad([first_bad, *extra])
        return results

    return parse


class _ManyBad(_Bad):
    """Several items of one list are invalid; each is reported."""

    def __init__(self, bads: list[_Bad]) -> None:
        super().__init__(bads[0].value, bads[0].message)
        self.bads = bads


def _list_text(value: _Value) -> str:
    text = _text(value)
    if text is None:
        _fail(value, "empty list item")
    return text


def _network(value: _Value) -> IPNetwork:
    text = _list_text(value)
    try:
        return parse_network(text)
    except ValueError as exc:
        _fail(value, str(exc))


def _did(value: _Value) -> tuple[str, _Value]:
    text = _list_text(value)
    try:
        return _normalise_did(text), value
    except ValueError as exc:
        _fail(value, str(exc))


def _destination_class(value: _Value) -> str:
    text = _list_text(value).lower()
    _check(value, check_destination_class, text)
    return text


def _mailbox(value: _Value) -> tuple[Mailbox, _Value]:
    if value.kind == "mapping":
        fields = value.fields or {}
        box_value = fields.get("box") or _Value(f"{value.where}.box", value.line)
        box = _text(box_value)
        if box is None:
            _fail(box_value, "missing (required)")
        email_value = fields.get("email")
        email = _text(email_value) if email_value is not None else None
    else:
        text = _list_text(value)
        box, _, email_text = text.partition("=")
        box_value = email_value = value
        email = email_text.strip(" ") or None
    _check(box_value, check_mailbox_box, box)
    if email is not None and email_value is not None:
        _check(email_value, check_email, email)
    return Mailbox(box=box, email=email), value


def _normalise_did(text: str) -> str:
    """``+40212345678`` / ``0040212345678`` / ``0212345678`` → ``40212345678`` (E.164 digits).

    :func:`clickphone_agi.domain.numbers.normalise` with the Romanian defaults (country code
    40, national prefix 0), plus two import rules: bare digits are taken as E.164 only as
    ``40`` + 9 digits (anything else bare is ambiguous), and a ``+40`` number must have 9
    digits after the country code.
    """
    bare = compact(text)
    if bare.startswith(_HOME_COUNTRY) and len(bare) == len(_HOME_COUNTRY) + _HOME_NSN_DIGITS and bare.isdigit():
        text = "+" + bare
    try:
        digits = normalise(text, country_code=_HOME_COUNTRY)
    except InvalidNumber as exc:
        raise ValueError(
            f"expected a number such as +40212345678, 0040212345678 or 0212345678 ({exc}), got {show(text)}"
        ) from None
    check_did(digits)
    if digits.startswith(_HOME_COUNTRY) and len(digits) != len(_HOME_COUNTRY) + _HOME_NSN_DIGITS:
        raise ValueError(f"a Romanian number has 9 digits after +40 (10 with the leading 0), got {show(text)}")
    return digits


def _opt_out_kind(value: _Value) -> str:
    text = _list_text(value).lower()

    def check(kind: str) -> None:
        if kind not in OPT_OUT_KINDS:
            raise ValueError(f"expected one of {', '.join(sorted(OPT_OUT_KINDS))}, got {show(kind)}")

    _check(value, check, text)
    return text


_PARSERS: dict[str, Callable[[_Value], Any]] = {
    "code": _required(check_code),
    "name": _required(check_name),
    "email": _required(check_email),
    "language": _choice(LANGUAGES),
    "billing": _choice(BILLING_MODES),
    "daily_limit": _amount(zero_ok=False),
    "low_balance_threshold": _amount(zero_ok=True),
    "allowed_ips": lambda value: tuple(_each(_network)(value)),
    "dids": _each(_did),
    "mailboxes": _each(_mailbox),
    "blocked_classes": lambda value: frozenset(_each(_destination_class)(value)),
    "max_concurrent_calls": _integer(1, MAX_CONCURRENT_CALLS),
    "max_call_seconds": _integer(1, MAX_CALL_SECONDS),
    "marketing_consent": _boolean,
    "enabled": _boolean,
    "opt_out": lambda value: frozenset(_each(_opt_out_kind)(value)),
    "opening_balance": _opening_balance,
}
