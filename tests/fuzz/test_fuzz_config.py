"""Fuzzing the configuration loader: any file, any value, any ``--set`` → a config or ConfigError.

* arbitrary YAML text and bytes (token soup, non-UTF-8, deep nesting, complex keys, aliases)
  in the main file or in ``conf.d``: a :class:`LoadedConfig` or :class:`ConfigError`, nothing else;
* arbitrary YAML documents (any nesting of mappings, lists and scalars, known and unknown keys);
* the shipped configuration with one value replaced by anything, or an unknown key added:
  valid, or a ConfigError whose problems name that key path (and the file that set it);
* arbitrary ``--set`` overrides.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from clickphone_agi.config.loader import ConfigError, LoadedConfig, format_path, load_config
from tests.conftest import SHIPPED_CONFIG
from tests.fuzz.budget import fuzz

SHIPPED: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
_counter = itertools.count()


def load(directory: Path, main: bytes, *, conf_d: bytes | None = None, overrides: tuple[str, ...] = ()) -> Any:
    """Write the files and load them; returns the LoadedConfig or the ConfigError."""
    here = directory / f"c{next(_counter)}"
    here.mkdir()
    path = here / "clickphone-agi.yaml"
    path.write_bytes(main)
    if conf_d is not None:
        (here / "conf.d").mkdir()
        (here / "conf.d" / "50-extra.yaml").write_bytes(conf_d)
    try:
        return load_config(path, overrides=overrides, environ={}, require_secrets=False)
    except ConfigError as exc:
        error = exc
    assert error.problems
    assert all(isinstance(p, str) and p.strip() for p in error.problems)
    return error


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


_YAML_TOKENS = st.sampled_from(
    [
        "ami:", "smtp:", "billing:", "database:", "logging:", "notifications:", "api:", "daemon:",
        "\n", "\n  ", "\n    ", "  ", " ", ": ", ":", "- ", "-", "[", "]", "{", "}", ",", "?", "? ", "&a ", "*a",
        "!!str ", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!python/object:os.system ",
        "|", ">", "'", '"', "#", "---", "...",
        "%YAML 1.1", "port", "host", "enabled", "true", "~", "null", "1e400", ".inf", ".nan", "0x1F", "0o17",
        "010", "1:30", "2026-01-01", "-1", "65536", "99999999999999999999", "\t", "\x00", "\ufeff", "\u2028",
        "ș", "<<: *a", "level: debug", "format: json",
    ]
)  # fmt: skip
YAML_SOUP = st.lists(_YAML_TOKENS | st.text(max_size=5), max_size=40).map("".join)
# shapes token soup rarely reaches: deep nesting, and collections used as mapping keys
_NESTED = st.builds(
    lambda n, pair: pair[0] * n + pair[1] * n,
    st.integers(1, 600),
    st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]),
)
_COMPLEX_KEY = st.builds(
    "{}? {}\n{}: {}\n".format,
    st.sampled_from(["", "ami:\n  "]),
    st.sampled_from(["[a, b]", "{x: 1}", "[]", "{}", "!!set {a}", "[[1]]"]),
    st.sampled_from(["", "  "]),
    st.sampled_from(["1", "x", "[2]"]),
)
YAML_TEXT = YAML_SOUP | _NESTED | _COMPLEX_KEY


@fuzz(120)
@given(text=YAML_TEXT, where=st.sampled_from(["main", "conf.d"]))
@example(text="? [a, b]\n: 1\n", where="main")  # regression: an unhashable key raised TypeError
@example(text="ami: {? {x: 1} : 2}\n", where="conf.d")
@example(text="[" * 400 + "]" * 400, where="main")  # regression: RecursionError
@example(text="ami:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 400)), where="conf.d")
@example(text="ami:\n  port: !!int ''\n", where="main")  # regression: PyYAML's own IndexError
@example(text="smtp: {enabled: !!bool x, host: !!timestamp x}\n", where="conf.d")  # KeyError, AttributeError
def test_any_yaml_text_loads_or_raises_config_error(directory: Path, text: str, where: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    outcome = load(directory, data, conf_d=None) if where == "main" else load(directory, b"", conf_d=data)
    assert isinstance(outcome, LoadedConfig | ConfigError)


@fuzz(80)
@given(data=st.binary(max_size=200), where=st.sampled_from(["main", "conf.d"]))
@example(data=b"ami:\n  host: caf\xe9\n", where="main")
def test_any_bytes_load_or_raise_config_error(directory: Path, data: bytes, where: str) -> None:
    outcome = load(directory, data) if where == "main" else load(directory, b"", conf_d=data)
    assert isinstance(outcome, LoadedConfig | ConfigError)


_KEYS = st.sampled_from(sorted({k for section in SHIPPED.values() if isinstance(section, dict) for k in section}))
_SECTIONS = st.sampled_from(sorted(SHIPPED))
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "127.0.0.1", "Europe/Bucharest", "Mars/Olympus", "json", "a@b.c", "/tmp/x"]),
)
VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS | st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@fuzz(80)
@given(document=st.dictionaries(_SECTIONS | st.text(max_size=8), VALUES, max_size=5))
def test_any_yaml_document_loads_or_raises_config_error(directory: Path, document: dict[str, Any]) -> None:
    outcome = load(directory, yaml.safe_dump(document, allow_unicode=True).encode())
    assert isinstance(outcome, LoadedConfig | ConfigError)


def _leaves(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))] or [path]
    return [path]


LEAVES = [p for p in _leaves(SHIPPED) if len(p) >= 2]


def _replace(document: Any, path: tuple[str | int, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(document)
    copy[path[0]] = _replace(document.get(path[0], {}), path[1:], value)
    return copy


@fuzz(120)
@given(path=st.sampled_from(LEAVES), value=VALUES, in_conf_d=st.booleans())
def test_a_bad_value_anywhere_is_a_config_error_naming_its_key_and_file(
    directory: Path, path: tuple[str, ...], value: Any, in_conf_d: bool
) -> None:
    if in_conf_d:
        layer = _replace({}, path, value)
        outcome = load(
            directory, SHIPPED_CONFIG.read_bytes(), conf_d=yaml.safe_dump(layer, allow_unicode=True).encode()
        )
    else:
        outcome = load(directory, yaml.safe_dump(_replace(SHIPPED, path, value), allow_unicode=True).encode())
    if isinstance(outcome, LoadedConfig):
        return
    key = format_path(path)
    text = "\n".join(outcome.problems)
    # the changed key is named (or, for a mapping put in a leaf's place, a key under it; for a
    # cross-field rule such as retry_max >= retry_min, the other key of the same section)
    named = [p for p in outcome.problems if key in p or f"{path[0]}." in p]
    assert named, text
    for problem in named:
        assert problem.startswith(("/", "<")), problem  # a file (or <command line>) comes first
        if in_conf_d and key in problem:
            assert "conf.d/50-extra.yaml" in problem, problem


@fuzz(60)
@given(
    section=_SECTIONS,
    # printable names: YAML itself folds line breaks such as U+0085 in a key to a space
    name=st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=12),
    value=_SCALARS,
)
def test_an_unknown_key_is_named(directory: Path, section: str, name: str, value: Any) -> None:
    if name in SHIPPED[section]:
        return
    document = _replace(SHIPPED, (section, name), value)
    outcome = load(directory, yaml.safe_dump(document, allow_unicode=True).encode())
    assert isinstance(outcome, ConfigError)
    assert any(f"{section}.{name}" in p and "unknown key" in p for p in outcome.problems), outcome.problems


@fuzz(60)
@given(
    overrides=st.lists(st.text(max_size=30) | st.builds("{}={}".format, st.text(max_size=15), YAML_SOUP), max_size=3)
)
@example(overrides=["ami.port=!!int"])  # regression: PyYAML's IndexError escaped parse_override
@example(overrides=["ami.host=" + "[" * 500])
def test_any_set_override_loads_or_raises_config_error(directory: Path, overrides: list[str]) -> None:
    outcome = load(directory, SHIPPED_CONFIG.read_bytes(), overrides=tuple(overrides))
    assert isinstance(outcome, LoadedConfig | ConfigError)


_ODD_KEYS = st.sampled_from(["~", "true", "false", "1", "1.5", "2026-01-01", ".inf", "0x10", "!!binary aGk="])


@fuzz(40)
@given(section=_SECTIONS, odd=_ODD_KEYS, where=st.sampled_from(["main", "conf.d", "set"]))
@example(section="ami", odd="~", where="conf.d")  # regression: blamed on <packaged defaults>, as 'ami.None'
@example(section="ami", odd="true", where="main")  # regression: shown as the list index 'ami[1]'
def test_a_key_that_is_not_text_is_named_in_the_file_that_wrote_it(
    directory: Path, section: str, odd: str, where: str
) -> None:
    layer = f"{section}:\n  {odd}: 1\n".encode()
    if where == "set":
        outcome = load(directory, b"", overrides=(f"{section}={{{odd}: 1}}",))
    else:
        outcome = load(directory, layer) if where == "main" else load(directory, b"", conf_d=layer)
    assert isinstance(outcome, ConfigError)
    (problem,) = outcome.problems
    source = {"main": "clickphone-agi.yaml", "conf.d": "conf.d/50-extra.yaml", "set": "<command line>"}[where]
    assert source in problem.split(": ")[0]
    assert f": {section}: a key must be text" in problem


def _accounts_and_tariffs(directory: Path, text: str) -> None:
    from zoneinfo import ZoneInfo

    from clickphone_agi.adapters.accounts_file import AccountsFileError, load_accounts
    from clickphone_agi.adapters.tariff_file import TariffFileError, load_tariffs

    here = directory / f"r{next(_counter)}"
    here.mkdir()
    accounts, tariffs = here / "accounts.yaml", here / "tariffs.yaml"
    accounts.write_text(f"accounts:\n  - code: acct1\n    name: {text}\n    email: a@b.ro\n")
    tariffs.write_text(
        f"currency: RON\ntariffs:\n  - prefix: {text}\n    name: x\n    class: national\n"
        "    rate_per_minute: '0.05'\n    increments: 60/1\n    effective_from: 2026-01-01\n"
    )
    with contextlib.suppress(AccountsFileError):
        load_accounts(accounts)
    with contextlib.suppress(TariffFileError):
        load_tariffs(tariffs, timezone=ZoneInfo("Europe/Bucharest"))


@fuzz(100)
@given(text=YAML_SOUP.filter(lambda t: "\n" not in t and "\r" not in t))
@example(text="!!int ''")  # regression: IndexError out of both readers
@example(text="!!binary zz")  # regression: the accounts reader's ConstructorError escaped it
@example(text="!!bool x")
@example(text="\x1f")  # regression: the accounts reader's ReaderError (raised building the loader) escaped
def test_the_accounts_and_tariff_readers_raise_only_their_typed_errors(directory: Path, text: str) -> None:
    """The other two YAML files a human writes share the loader's scalar handling."""
    _accounts_and_tariffs(directory, text)
