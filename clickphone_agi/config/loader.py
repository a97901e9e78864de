"""Layered YAML configuration with errors that name the file and the key path.

Layers, lowest first: packaged ``defaults.yaml`` < the main file (``-c FILE``, default
``/etc/clickphone-agi/clickphone-agi.yaml``) < ``conf.d/*.yaml`` beside it (sorted) < CLI
overrides. Every leaf remembers which layer set it, so a validation error points at the file a
human has to edit, not at the merged result.
"""

from __future__ import annotations

import difflib
import os
import pwd
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from clickphone_agi.config.schema import Config

DEFAULT_CONFIG_PATH = Path("/etc/clickphone-agi/clickphone-agi.yaml")
DEFAULTS_SOURCE = "<packaged defaults>"
DAEMON_GROUP = "clickphone-agi"  # the unit's Group=, named in the fix for a secret file's mode
DAEMON_USER = "clickphone-agi"  # the unit's User=: its group-writable secrets are its own
CLI_SOURCE = "<command line>"

KeyPath = tuple[str | int, ...]
# where each key path of one file was written: (line, column), both from 1
Marks = dict[KeyPath, tuple[int, int]]


class ConfigError(Exception):
    """One or more configuration problems; each line names file, key path and expectation."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Secrets:
    """Secret values, read from files or systemd credentials; never from the YAML itself."""

    ami_secret: str | None
    smtp_password: str | None
    api_token: str | None
    unsubscribe_secret: str | None = None  # HMAC key of the one-click unsubscribe tokens

    def __repr__(self) -> str:  # never print secrets, even in a traceback
        def shown(v: str | None) -> str:
            return "None" if v is None else "'***'"

        return (
            f"Secrets(ami_secret={shown(self.ami_secret)}, smtp_password={shown(self.smtp_password)},"
            f" api_token={shown(self.api_token)}, unsubscribe_secret={shown(self.unsubscribe_secret)})"
        )


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration plus where it came from."""

    config: Config
    secrets: Secrets
    main_file: Path
    files: tuple[str, ...]
    notes: tuple[str, ...] = ()


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def construct_checked(construct: Callable[..., Any], node: yaml.Node, deep: bool = False) -> Any:
    """``construct(node, deep)``, with PyYAML's own crashes on a malformed tagged scalar turned
    into the :class:`yaml.YAMLError` its callers handle: ``!!int ''`` raises IndexError,
    ``!!bool x`` KeyError, ``!!timestamp x`` AttributeError, ``!!int 0x`` ValueError."""
    try:
        return construct(node, deep)
    except yaml.YAMLError:
        raise
    except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read this {node.tag} value ({type(exc).__name__})", node.start_mark
        ) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML would silently keep the last one.

    Every YAML file a human types (configuration, tariffs) is read through it or a subclass."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        return construct_checked(super().construct_object, node, deep)


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:  # "? [a, b]": a list or mapping as a key (SafeLoader refuses it too)
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a single value, not a {type(key).__name__} (line {mark.line + 1})", mark
            ) from None
        if key in result:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark)
        result[key] = loader.construct_object(value_node, deep=True)
    return result


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], Marks]:
    """The file's top-level mapping and, for every key path in it, where that key was written."""
    try:
        data, node = _load_with_node(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    except RecursionError:  # PyYAML composes nested nodes recursively: "[[[[…" a few hundred deep
        raise ConfigError([f"{source}: invalid YAML: nested too deeply"]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}"])
    assert node is not None  # data came from it
    marks, problems = _key_marks(node, data, source)
    if problems:
        raise ConfigError(problems)
    return data, marks


def _load_with_node(text: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.load`` with :class:`UniqueKeyLoader` that also hands back the composed node tree."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    finally:
        loader.dispose()


def _key_marks(root: yaml.Node, data: dict[Any, Any], source: str) -> tuple[Marks, list[str]]:
    """Walk the node tree beside the data built from it: (line, column) of every text key and list
    item, and every key that is not text (``~: 1``, ``true: x``, ``1: 2``), named with its line.

    Left to the schema, ``~`` showed up as ``'None'`` and was blamed on the packaged defaults,
    and ``true`` as the list index ``[1]``. A node reached again through an alias is not walked
    twice (what is under it takes the line of the key holding the alias): the walk stays linear in
    the size of the file, "billion laughs" included, and iterative, for files nested as deep as
    PyYAML can read."""
    marks: Marks = {}
    problems: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[KeyPath, yaml.Node, Any] | str] = [((), root, data)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):  # a problem, kept in the order of the file
            problems.append(item)
            continue
        path, node, value = item
        if id(node) in seen:
            continue
        seen.add(id(node))
        later: list[tuple[KeyPath, yaml.Node, Any] | str] = []
        # after construction a mapping node holds its merged (<<) pairs, one per key, in dict order
        if isinstance(node, yaml.MappingNode) and isinstance(value, dict) and len(node.value) == len(value):
            for (key_node, value_node), (key, sub) in zip(node.value, value.items(), strict=True):
                if not isinstance(key, str):
                    at = _at(source, _mark_of(key_node))
                    later.append(f"{at}: {format_path(path)}: a key must be text, got {key!r} (quote it)")
                    continue
                marks[(*path, key)] = _mark_of(key_node)
                later.append(((*path, key), value_node, sub))
        elif isinstance(node, yaml.SequenceNode) and isinstance(value, list) and len(node.value) == len(value):
            for index, (item_node, sub) in enumerate(zip(node.value, value, strict=True)):
                marks[(*path, index)] = _mark_of(item_node)
                later.append(((*path, index), item_node, sub))
        stack.extend(reversed(later))
    return marks, problems


def _mark_of(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _at(source: str, mark: tuple[int, int] | None) -> str:
    """``FILE:LINE:COLUMN``, as for a YAML syntax error, or the bare source when not known."""
    return source if mark is None else f"{source}:{mark[0]}:{mark[1]}"


def _non_text_keys(value: Any, source: str, path: KeyPath) -> list[str]:
    """Every mapping key that is not text, in a ``--set`` value (no file, so no line)."""
    problems: list[str] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            if isinstance(key, str):
                problems.extend(_non_text_keys(sub, source, (*path, key)))
            else:
                where = format_path(path) if path else "(top level)"
                problems.append(f"{source}: {where}: a key must be text, got {key!r} (quote it)")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems.extend(_non_text_keys(item, source, (*path, index)))
    return problems


def _read_file(path: Path) -> tuple[dict[str, Any], Marks]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: configuration file not found"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return _parse_yaml(text, str(path))


def _merge(
    base: dict[str, Any], layer: Mapping[Any, Any], source: str, origin: dict[KeyPath, str], prefix: KeyPath = ()
) -> None:
    """Deep-merge ``layer`` into ``base``; mappings merge, everything else replaces."""
    for key, value in layer.items():
        path = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, origin, path)
        else:
            base[key] = _plain(value)
            for known in [p for p in origin if p[: len(path)] == path]:
                del origin[known]
            origin[path] = source
            if isinstance(value, Mapping):
                _mark(value, source, origin, path)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _mark(value: Mapping[Any, Any], source: str, origin: dict[KeyPath, str], prefix: KeyPath) -> None:
    for key, sub in value.items():
        origin[(*prefix, key)] = source
        if isinstance(sub, Mapping):
            _mark(sub, source, origin, (*prefix, key))


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """``section.key=value`` from the command line; the value is read as YAML (``10``, ``true``)."""
    key, sep, raw = text.partition("=")
    parts = tuple(p for p in key.strip().split("."))
    if not sep or not key.strip() or any(not p for p in parts):
        raise ConfigError([f"{CLI_SOURCE}: --set {text!r}: expected section.key=value"])
    try:
        # the files' loader: a malformed tagged scalar ("!!int" alone) is a YAML error, not a crash
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, RecursionError):
        value = raw
    return parts, value


def _source_for(origin: Mapping[KeyPath, str], path: KeyPath, main_file: str) -> str:
    for cut in range(len(path), 0, -1):
        if path[:cut] in origin:
            return origin[path[:cut]]
    return main_file


def _locate(marks: Mapping[KeyPath, tuple[int, int]], path: KeyPath) -> tuple[int, int] | None:
    """Where ``path`` was written: the key itself, else its nearest parent in that file (a missing
    key, a list's entry type tag in pydantic's ``loc``), else nothing."""
    for cut in range(len(path), 0, -1):
        mark = marks.get(path[:cut])
        if mark is not None:
            return mark
    return None


@dataclass(frozen=True)
class _Locator:
    """Which layer set a key path and, when that layer is a file, its line and column there."""

    origin: Mapping[KeyPath, str]
    marks: Mapping[str, Marks]
    main_file: str

    def source(self, path: KeyPath) -> str:
        return _source_for(self.origin, path, self.main_file)

    def at(self, path: KeyPath) -> str:
        """``FILE:LINE:COLUMN`` (or ``FILE``, ``<command line>``) to put before the key path."""
        source = self.source(path)
        return _at(source, _locate(self.marks.get(source, {}), path))


_KEY_IN_TEXT = re.compile(r"\b([a-z][a-z_]*)\.([a-z][a-z_]*)\b")


def _set_elsewhere(locator: _Locator, path: KeyPath, message: str) -> str:
    """A packaged default refused because of a key the operator set (the retention a CDR's key must
    outlive, say): the default has no line in any file of theirs, so say where the other key is."""
    if locator.source(path) != DEFAULTS_SOURCE:
        return ""
    for match in _KEY_IN_TEXT.finditer(message):
        other: KeyPath = (match.group(1), match.group(2))
        if other != path and other in locator.origin and locator.source(other) != DEFAULTS_SOURCE:
            return (
                f" ({format_path(path)} is the packaged default; {format_path(other)} is set at"
                f" {locator.at(other)}: change that, or set {format_path(path)} as well)"
            )
    return ""


def _describe(error: Mapping[str, Any], model: type[BaseModel], path: KeyPath) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, path[:-1])
        hint = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        msg = "unknown key"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        elif allowed:
            msg += f" (expected one of: {', '.join(allowed)})"
        return msg
    if kind == "missing":
        return "required key is missing"
    got = error.get("input")
    if isinstance(got, dict):
        got_text = "a mapping"
    elif isinstance(got, list):
        got_text = "a list"
    else:
        got_text = repr(got)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    message = re.sub(r"a valid dictionary or instance of \w+", "a mapping of settings", message)
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    elif message and not message.startswith("expected"):
        message = message[0].lower() + message[1:]
    if kind == "string_type" and isinstance(got, int | float) and not isinstance(got, bool):
        # YAML turned what was typed into a number: 040 is the octal 32, 1:30 is 90, 1e3 is 1000.0
        return f"{message}, got the number {got_text}: put the value in quotes (YAML reads 040 as 32, 1:30 as 90)"
    if got_text in message:
        return message
    return f"{message}, got {got_text}"


def _allowed_keys(model: type[BaseModel], path: KeyPath) -> list[str]:
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def secret_file_problem(path: Path, st: os.stat_result, euid: int | None = None) -> str | None:
    """Why another local user could read or replace the secret in ``path`` (``st``: its stat, the
    link followed), or None. Group access is allowed: ``0640`` with the daemon's group is a usual
    setup. A group-writable file is refused when its owner is neither root, ``euid`` (the checking
    user by default) nor the unit's ``User=``: that owner and its group, not the administrator, set
    the secret."""
    mode = stat.S_IMODE(st.st_mode)
    quoted = shlex.quote(str(path))
    if mode & 0o007:
        rights = [word for bit, word in ((0o4, "readable"), (0o2, "writable"), (0o1, "executable")) if mode & bit]
        return (
            f"secret file {str(path)!r} is {' and '.join(rights)} by every local user (mode {mode:04o}):"
            f" run chmod 0600 {quoted}, or chmod 0640 {quoted} with the daemon's group"
            f" (chgrp {DAEMON_GROUP} {quoted})"
        )
    # the daemon's user counts whoever checks: check-config run as root judges as the daemon does
    owners = {0, os.geteuid() if euid is None else euid, _daemon_uid()}
    if mode & 0o020 and st.st_uid not in owners:
        return (
            f"secret file {str(path)!r} is owned by uid {st.st_uid}, neither root nor the daemon's user,"
            f" and writable by its group (mode {mode:04o}): run chmod 0640 {quoted}, or chown root {quoted}"
        )
    return None


def unsafe_secret(path: Path, st: os.stat_result, environ: Mapping[str, str] | None = None) -> str | None:
    """:func:`secret_file_problem` for a secret read after start-up (the mailer's VERP key), with
    systemd's credentials exempt as at start-up."""
    if _in_credentials(path, os.environ if environ is None else environ):
        return None
    return secret_file_problem(path, st)


def _daemon_uid() -> int | None:
    """The uid of the unit's ``User=`` (``clickphone-agi``), or None where there is no such user."""
    try:
        return pwd.getpwnam(DAEMON_USER).pw_uid
    except KeyError:
        return None


def _in_credentials(path: Path, environ: Mapping[str, str]) -> bool:
    """Under ``$CREDENTIALS_DIRECTORY``: systemd made it (0400, the service's own), not a human."""
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        return False
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(cred_dir))


@dataclass(frozen=True)
class _SecretContext:
    environ: Mapping[str, str]
    locator: _Locator
    problems: list[str]


def _read_secret(
    explicit: Path | None,
    key: KeyPath,
    credential: str,
    where: _SecretContext,
) -> str | None:
    """A secret from the ``*_file`` key if set, else from systemd's credential directory."""
    environ, problems = where.environ, where.problems
    if explicit is not None:
        source = where.locator.at(key)
        try:
            with explicit.open(encoding="utf-8") as fh:
                unsafe = (
                    None if _in_credentials(explicit, environ) else secret_file_problem(explicit, os.fstat(fh.fileno()))
                )
                value = "" if unsafe else fh.read().strip()
        except FileNotFoundError:
            problems.append(f"{source}: {format_path(key)}: secret file {str(explicit)!r} does not exist")
            return None
        except OSError as exc:
            problems.append(f"{source}: {format_path(key)}: cannot read secret file {str(explicit)!r}: {exc.strerror}")
            return None
        except UnicodeDecodeError:
            problems.append(f"{source}: {format_path(key)}: secret file {str(explicit)!r} is not UTF-8 text")
            return None
        if unsafe:  # refused before it is even read: a secret others can read is no secret
            problems.append(f"{source}: {format_path(key)}: {unsafe}")
            return None
        if not value:
            problems.append(f"{source}: {format_path(key)}: secret file {str(explicit)!r} is empty")
            return None
        return value
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        candidate = Path(cred_dir) / credential
        try:
            value = candidate.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return value or None
    return None


def _check_verp_key_file(path: Path | None, where: _SecretContext) -> None:
    """``smtp.verp_key_file`` is read by the mailer and the ``bounce`` verb, not here (a missing
    one falls back to no bounce tracking); but one that exists is held to the secrets' modes."""
    if path is None or _in_credentials(path, where.environ):
        return
    try:
        st = path.stat()
    except OSError:
        return
    unsafe = secret_file_problem(path, st)
    if unsafe:
        where.problems.append(f"{where.locator.at(('smtp', 'verp_key_file'))}: smtp.verp_key_file: {unsafe}")


def _override_layer(text: str) -> dict[Any, Any]:
    """One ``--set a.b=value`` as a nested layer ``{"a": {"b": value}}``."""
    key, value = parse_override(text)
    odd_keys = _non_text_keys(value, CLI_SOURCE, key)
    if odd_keys:
        raise ConfigError(odd_keys)
    layer: dict[Any, Any] = {}
    node = layer
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    return layer


def _read_layers(main: Path, overrides: Iterable[str]) -> tuple[dict[str, Any], list[str], _Locator]:
    """Every layer merged, the files read, and where each key path was set."""
    origin: dict[KeyPath, str] = {}
    marks: dict[str, Marks] = {}  # by file; the packaged defaults and the command line get no line
    merged: dict[str, Any] = {}
    defaults_text = resources.files("clickphone_agi.config").joinpath("defaults.yaml").read_text("utf-8")
    _merge(merged, _parse_yaml(defaults_text, DEFAULTS_SOURCE)[0], DEFAULTS_SOURCE, origin)
    files = [str(main)]
    layer, marks[str(main)] = _read_file(main)
    _merge(merged, layer, str(main), origin)
    conf_d = main.parent / "conf.d"
    if conf_d.is_dir():
        for extra in sorted(conf_d.glob("*.yaml")):
            files.append(str(extra))
            layer, marks[str(extra)] = _read_file(extra)
            _merge(merged, layer, str(extra), origin)
    for text in overrides:
        _merge(merged, _override_layer(text), CLI_SOURCE, origin)
    return merged, files, _Locator(origin, marks, str(main))


def load_config(
    path: Path | None = None,
    *,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    require_secrets: bool = True,
) -> LoadedConfig:
    """Read, merge and validate every layer; raise :class:`ConfigError` listing all problems.

    ``require_secrets=False`` (``check-config`` outside systemd) reports a secret that would
    come from a systemd credential as a note instead of an error; an explicit ``*_file`` that
    is missing is an error either way.
    """
    env = os.environ if environ is None else environ
    main = path or DEFAULT_CONFIG_PATH
    merged, files, locator = _read_layers(main, overrides)

    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            loc: KeyPath = tuple(err["loc"])
            message = _describe(err, Config, loc)
            found.append(f"{locator.at(loc)}: {format_path(loc)}: {message}{_set_elsewhere(locator, loc, message)}")
        raise ConfigError(found) from None

    problems: list[str] = []
    notes: list[str] = []
    where = _SecretContext(env, locator, problems)
    ami_secret = _read_secret(config.ami.secret_file, ("ami", "secret_file"), "ami-secret", where)
    smtp_password = None
    if config.smtp.username:
        smtp_password = _read_secret(config.smtp.password_file, ("smtp", "password_file"), "smtp-password", where)
    api_token = _read_secret(config.api.token_file, ("api", "token_file"), "api-token", where)
    unsubscribe_secret = _read_secret(
        config.api.unsubscribe_secret_file, ("api", "unsubscribe_secret_file"), "unsubscribe-secret", where
    )
    _check_verp_key_file(config.smtp.verp_key_file, where)
    if unsubscribe_secret is not None and len(unsubscribe_secret) < 32:
        problems.append(
            f"{locator.at(('api', 'unsubscribe_secret_file'))}: api.unsubscribe_secret_file:"
            f" the unsubscribe secret is {len(unsubscribe_secret)} characters; use 32 or more random ones"
        )

    def missing(enabled: bool, value: str | None, key: KeyPath, credential: str) -> None:
        if not enabled or value is not None or any(format_path(key) in p for p in problems):
            return
        where_set = str(main) if locator.source(key) == DEFAULTS_SOURCE else locator.at(key)
        text = (
            f"{where_set}: {format_path(key)}: no secret configured: set "
            f"{format_path(key)} or provide the systemd credential {credential!r} (LoadCredential=)"
        )
        (problems if require_secrets else notes).append(text)

    missing(config.ami.enabled, ami_secret, ("ami", "secret_file"), "ami-secret")
    missing(
        config.smtp.enabled and bool(config.smtp.username), smtp_password, ("smtp", "password_file"), "smtp-password"
    )
    missing(config.api.enabled, api_token, ("api", "token_file"), "api-token")
    tariffs = config.billing.tariffs_file
    if tariffs is not None and not tariffs.is_file():  # its content is the tariff loader's to judge
        kind = "is not a file" if tariffs.exists() else "does not exist"
        where_set = locator.at(("billing", "tariffs_file"))
        problems.append(f"{where_set}: billing.tariffs_file: tariff file {str(tariffs)!r} {kind}")
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(
        config=config,
        secrets=Secrets(
            ami_secret=ami_secret,
            smtp_password=smtp_password,
            api_token=api_token,
            unsubscribe_secret=unsubscribe_secret,
        ),
        main_file=main,
        files=tuple(files),
        notes=tuple(notes),
    )
