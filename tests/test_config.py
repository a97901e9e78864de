"""Configuration: layering, typed validation, errors naming file and key path, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clickphone_agi.cli import EX_CONFIG, main
from clickphone_agi.config.loader import ConfigError, load_config
from clickphone_agi.config.schema import Config
from tests.conftest import SHIPPED_CONFIG


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _problems(path: Path, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={}, **kw)  # type: ignore[arg-type]
    return info.value.problems


def test_shipped_config_checks_ok_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(SHIPPED_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out
    assert "ami-secret" in out  # the note says where the secret will come from


def test_shipped_config_documents_every_key() -> None:
    """Every key of every section appears (commented or set) in etc/clickphone-agi.yaml."""
    text = SHIPPED_CONFIG.read_text()
    for section, model in Config.model_fields.items():
        assert f"\n{section}:" in text, section
        sub = model.annotation
        for key in sub.model_fields:  # type: ignore[union-attr]
            assert f"  {key}:" in text or f"  # {key}:" in text, f"{section}.{key}"


def test_layers_defaults_main_confd_cli(tmp_path: Path) -> None:
    main_file = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\n  port: 5039\nsmtp:\n  port: 2525\n")
    _write(tmp_path / "conf.d" / "20-b.yaml", "smtp:\n  port: 2626\n")
    _write(tmp_path / "conf.d" / "10-a.yaml", "smtp:\n  port: 9999\n  host: relay.local\n")
    loaded = load_config(main_file, overrides=["logging.level=debug"], environ={})
    cfg = loaded.config
    assert cfg.ami.port == 5039  # main file over defaults
    assert cfg.smtp.port == 2626  # conf.d sorted: 20-b wins over 10-a
    assert cfg.smtp.host == "relay.local"  # merged, not replaced
    assert cfg.logging.level == "debug"  # CLI on top
    assert cfg.database.busy_timeout == 5  # packaged default
    assert loaded.files[1].endswith("10-a.yaml")


def test_config_is_immutable(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "c.yaml", "ami:\n  enabled: false\n"), environ={}).config
    with pytest.raises(Exception, match="frozen"):
        cfg.ami.port = 1  # type: ignore[misc]


def test_typo_key_names_file_path_and_suggestion(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\n  prot: 5038\n")
    assert _problems(f) == [f"{f}:3:3: ami.prot: unknown key (did you mean 'port'?)"]


def test_a_number_yaml_made_of_text_says_to_quote_it(tmp_path: Path) -> None:
    """``country_code: 040`` read as the octal 32: the message showed a value nobody typed."""
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\nbilling:\n  country_code: 040\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:4:3: billing.country_code: expected a valid string, got the number 32")
    assert "put the value in quotes" in problem


def test_wrong_type_in_conf_d_names_that_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\n")
    extra = _write(tmp_path / "conf.d" / "50-smtp.yaml", "smtp:\n  port: abc\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{extra}:2:3: smtp.port: expected a valid integer")
    assert "got 'abc'" in problem


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "c.yaml",
        "ami:\n  enabled: maybe\nbilling:\n  timezone: Europe/Bucuresti\nlogging:\n  level: loud\nfoo: 1\n",
    )
    problems = _problems(f)
    assert len(problems) == 4
    joined = "\n".join(problems)
    assert "ami.enabled: expected a valid boolean" in joined
    assert "billing.timezone: unknown time zone 'Europe/Bucuresti'" in joined
    assert "logging.level: expected 'debug', 'info', 'warning' or 'error', got 'loud'" in joined
    assert "foo: unknown key" in joined


def test_dangerous_ami_event_class_refused(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\n  events: call,dialplan\n")
    (problem,) = _problems(f)
    assert "ami.events" in problem
    assert "dialplan" in problem


def test_trusted_proxies_are_networks_and_a_typo_names_its_entry(tmp_path: Path) -> None:
    ok = _write(tmp_path / "ok.yaml", 'ami:\n  enabled: false\napi:\n  trusted_proxies: ["192.0.2.10", "10.0.0.0/8"]\n')
    assert load_config(ok, environ={}).config.api.trusted_proxies == ("192.0.2.10/32", "10.0.0.0/8")
    bad = _write(tmp_path / "bad.yaml", 'ami:\n  enabled: false\napi:\n  trusted_proxies: ["10.0.0.1/8", "proxy"]\n')
    problems = "\n".join(_problems(bad))
    assert "api.trusted_proxies[0]: host bits set in '10.0.0.1/8'" in problems
    assert "api.trusted_proxies[1]: expected an IP address or network" in problems


def test_missing_secret_file_names_key_and_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", f"ami:\n  secret_file: {tmp_path}/nope\n")
    assert _problems(f) == [f"{f}:2:3: ami.secret_file: secret file '{tmp_path}/nope' does not exist"]


def test_secret_from_systemd_credential(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    _write(creds / "ami-secret", "s3cret\n")
    loaded = load_config(_write(tmp_path / "c.yaml", "{}\n"), environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert loaded.secrets.ami_secret == "s3cret"
    assert "s3cret" not in repr(loaded.secrets)


def test_no_secret_at_all_is_an_error_for_run(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "{}\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}: ami.secret_file: no secret configured")  # not in the file: no line
    assert "'ami-secret'" in problem


def test_invalid_yaml_and_duplicate_keys(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "ami:\n  port: [1\n")
    assert _problems(bad)[0].startswith(f"{bad}:")
    dup = _write(tmp_path / "dup.yaml", "smtp:\n  port: 1\n  port: 2\n")
    assert "duplicate key 'port'" in _problems(dup)[0]
    top = _write(tmp_path / "top.yaml", "- a\n")
    assert "expected a mapping of sections" in _problems(top)[0]


def test_bad_override_syntax(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\n")
    assert "expected section.key=value" in _problems(f, overrides=["ami.port"])[0]
    assert _problems(f, overrides=["ami.port=70000"])[0].startswith("<command line>: ami.port:")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("ami:\n  enabled: false\n  prot: 5038\n", "3:3: ami.prot: unknown key"),
        ("ami:\n  enabled: false\n  port: high\n", "3:3: ami.port: expected a valid integer"),
        (
            "ami:\n  secret_file: /nonexistent/secret\n",
            "2:3: ami.secret_file: secret file '/nonexistent/secret' does not exist",
        ),
        (
            "billing:\n  tariffs_file: /nonexistent/tariffs.yaml\n"
            "  billing_cdr:\n    destination_contexts: [clickphone-outbound]\n",
            "2:3: billing.tariffs_file: tariff file '/nonexistent/tariffs.yaml' does not exist",
        ),
    ],
)
def test_check_config_process_exits_78_and_names_key(tmp_path: Path, content: str, needle: str) -> None:
    f = _write(tmp_path / "c.yaml", content)
    proc = subprocess.run(
        [sys.executable, "-m", "clickphone_agi", "check-config", "-c", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == EX_CONFIG
    assert f"{f}:{needle}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_public_base_url_too_long_for_a_list_unsubscribe_line_is_refused(tmp_path: Path) -> None:
    """The unsubscribe link is base + /v1/unsubscribe/ + a token of up to 164 characters, on one
    header line of at most 998: a longer base would make every offer a dead letter."""
    base = "https://cont.clickphone.example/" + "a" * 668
    f = _write(tmp_path / "c.yaml", f"ami:\n  enabled: false\napi:\n  public_base_url: {base}\n")
    assert load_config(f, environ={}).config.api.public_base_url == base  # 700: still fine
    f.write_text(f"ami:\n  enabled: false\napi:\n  public_base_url: {base}a\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:4:3: api.public_base_url:")
    assert "at most 700 characters" in problem


def test_a_tariff_file_needs_a_billing_cdr_rule_that_excludes_other_legs(tmp_path: Path) -> None:
    """Without a context or trunk pattern every ANSWERED Dial CDR would be charged: an inbound call
    to a subscriber, and both halves of a Local-channel call."""
    tariffs = _write(tmp_path / "tariffs.yaml", "currency: RON\ntariffs: []\n")
    f = _write(tmp_path / "c.yaml", f"ami:\n  enabled: false\nbilling:\n  tariffs_file: {tariffs}\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:4:3: billing.tariffs_file: with a tariff file, set billing.billing_cdr.")
    assert "destination_channel_pattern" in problem
    for rule in ("destination_contexts: [clickphone-outbound]", "destination_channel_pattern: ^PJSIP/trunk-"):
        f.write_text(f"ami:\n  enabled: false\nbilling:\n  tariffs_file: {tariffs}\n  billing_cdr:\n    {rule}\n")
        assert load_config(f, environ={}).config.billing.tariffs_file == tariffs


def test_agi_allowed_peers_are_ip_networks_and_errors_name_the_entry(tmp_path: Path) -> None:
    """Who may reach FastAGI: loopback by default; an entry that is not an address or network,
    a network written with host bits, or an empty list (nobody: a disabled server in disguise)
    is an error naming the key and the entry."""
    assert Config().agi.allowed_peers == ("127.0.0.1/32", "::1/128")
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\nagi:\n  allowed_peers: [10.0.0.5, 2001:db8::/32]\n")
    assert load_config(f, environ={}).config.agi.allowed_peers == ("10.0.0.5/32", "2001:db8::/32")
    f.write_text("ami:\n  enabled: false\nagi:\n  allowed_peers: [10.0.0.5, 10.0.0.5/24, asterisk.lan]\n")
    assert _problems(f) == [
        f"{f}:4:29: agi.allowed_peers[1]: host bits set in '10.0.0.5/24': write the network address or a single host",
        f"{f}:4:42: agi.allowed_peers[2]: expected an IP address or network such as 192.0.2.10 or 198.51.100.0/24,"
        " got 'asterisk.lan'",
    ]
    f.write_text("ami:\n  enabled: false\nagi:\n  allowed_peers: []\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:4:3: agi.allowed_peers: expected at least one address or network")


def test_a_wrong_value_in_a_nested_key_names_its_line_in_the_file_that_set_it(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "c.yaml",
        "ami:\n  enabled: false\n\nbilling:\n  billing_cdr:\n    last_application: Dial\n"
        "    destination_channel_pattern: '(['\n",
    )
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:7:5: billing.billing_cdr.destination_channel_pattern: not a valid regular")
    # the same key set again in conf.d: that file's line, not the main file's
    extra = _write(
        tmp_path / "conf.d" / "50-x.yaml", "# a comment\nbilling:\n  billing_cdr: {destination_channel_pattern: '+'}\n"
    )
    (problem,) = _problems(f)
    assert problem.startswith(f"{extra}:3:17: billing.billing_cdr.destination_channel_pattern:")


def test_an_unknown_key_names_its_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\nbilling:\n  billing_cdr:\n\n    last_aplication: Dial\n")
    assert _problems(f) == [
        f"{f}:6:5: billing.billing_cdr.last_aplication: unknown key (did you mean 'last_application'?)"
    ]
    f.write_text("ami:\n  enabled: false\n# a section that does not exist\nbiling:\n  currency: RON\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:4:1: biling: unknown key (did you mean 'billing'?)")


def test_an_error_in_a_list_item_names_the_items_line(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "c.yaml",
        'ami:\n  enabled: false\nbilling:\n  emergency_numbers:\n    - "112"\n    - "911"\n    - "1a2"\n',
    )
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:7:7: billing.emergency_numbers[2]: ")
    f.write_text("ami:\n  enabled: false\nbilling:\n  daily_limit_warn_at: [80, 100, 0]\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:4:34: billing.daily_limit_warn_at[2]: ")


def test_a_key_path_not_in_the_file_takes_its_parents_line_or_none(tmp_path: Path) -> None:
    """A missing required key (the schema has none today, every key has a default) has no line of
    its own: its parent's, when the parent is in that file; else no line at all."""
    from clickphone_agi.config.loader import _Locator, _parse_yaml

    _, marks = _parse_yaml("ami:\n  enabled: false\nbilling:\n  billing_cdr: {}\n", "c.yaml")
    where = _Locator({("ami", "enabled"): "c.yaml"}, {"c.yaml": marks}, "c.yaml")
    assert where.at(("billing", "billing_cdr", "required")) == "c.yaml:4:3"
    assert where.at(("ami", "required")) == "c.yaml:1:1"
    assert where.at(("daemon", "required")) == "c.yaml"
    assert where.at(()) == "c.yaml"


def test_a_packaged_default_refused_because_of_a_key_set_in_a_file_names_that_keys_line(tmp_path: Path) -> None:
    """The default has no line in any file of the operator's: the error used to end at
    ``<packaged defaults>``, and the line to change was the other key's."""
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\nprivacy:\n  cdr_retention_days: 500\n")
    (problem,) = _problems(f)
    assert problem.startswith("<packaged defaults>: privacy.processed_event_retention_days: expected at least")
    assert problem.endswith(
        f"(privacy.processed_event_retention_days is the packaged default; privacy.cdr_retention_days is set at"
        f" {f}:4:3: change that, or set privacy.processed_event_retention_days as well)"
    )
    f = _write(tmp_path / "d.yaml", "ami:\n  enabled: false\nsmtp:\n  retry_min: 7200\n  retry_max: 3600\n")
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:5:3: smtp.retry_max: expected at least smtp.retry_min (7200 s)")
    assert "packaged default" not in problem  # both set by the operator: the refused key's own line


def test_a_key_that_is_not_text_names_its_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.yaml", "ami:\n  enabled: false\n  ~: 1\n")
    assert _problems(f) == [f"{f}:3:3: ami: a key must be text, got None (quote it)"]


def test_anchors_and_merge_keys_still_load_and_point_at_the_written_lines(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "c.yaml",
        "base: &b\n  port: 70000\nami:\n  enabled: false\n  <<: *b\n",
    )
    problems = _problems(f)
    assert any(p.startswith(f"{f}:1:1: base: unknown key") for p in problems), problems
    # the merged key keeps the line where it was written, under the anchor
    assert f"{f}:2:3: ami.port: expected less than or equal to 65535, got 70000" in problems
    g = _write(tmp_path / "g.yaml", "ami:\n  enabled: false\n  allowed: &x [1, 2]\nagi:\n  allowed_peers: *x\n")
    joined = "\n".join(_problems(g))
    assert f"{g}:3:3: ami.allowed: unknown key" in joined
    assert f"{g}:5:3: agi.allowed_peers[0]:" in joined  # the items of an alias: where the alias is


# (key, the YAML that sets it to {file}): every *_file key that names a secret
SECRET_KEYS = [
    ("ami.secret_file", "ami:\n  secret_file: {file}\n"),
    ("smtp.password_file", "ami:\n  enabled: false\nsmtp:\n  username: clickphone\n  password_file: {file}\n"),
    ("api.token_file", "ami:\n  enabled: false\napi:\n  token_file: {file}\n"),
    ("api.unsubscribe_secret_file", "ami:\n  enabled: false\napi:\n  unsubscribe_secret_file: {file}\n"),
    ("smtp.verp_key_file", "ami:\n  enabled: false\nsmtp:\n  verp_key_file: {file}\n"),
]


@pytest.mark.parametrize(("key", "text"), SECRET_KEYS, ids=[k for k, _ in SECRET_KEYS])
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666, 0o601])
def test_a_secret_file_other_users_can_read_or_write_is_refused(tmp_path: Path, key: str, text: str, mode: int) -> None:
    """A world-readable AMI secret hands Asterisk to every local user: refused, naming the key,
    the file, its mode and the chmod that fixes it."""
    secret = _write(tmp_path / "secret", "x" * 40 + "\n")
    secret.chmod(mode)
    f = _write(tmp_path / "c.yaml", text.format(file=secret))
    (problem,) = _problems(f)
    assert problem.startswith(f"{f}:"), problem  # the file and line of the key
    assert f": {key}: secret file '{secret}' is " in problem
    assert f"by every local user (mode 0{mode:o})" in problem
    assert f"chmod 0600 {secret}" in problem
    assert "chmod 0640" in problem
    if mode & 0o4:
        assert "readable" in problem


@pytest.mark.parametrize(("key", "text"), SECRET_KEYS, ids=[k for k, _ in SECRET_KEYS])
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_secret_file_for_the_owner_or_its_group_is_accepted(tmp_path: Path, key: str, text: str, mode: int) -> None:
    """Group-readable stays allowed: LoadCredential sources and a clickphone-agi group use it."""
    secret = _write(tmp_path / "secret", "x" * 40 + "\n")
    secret.chmod(mode)
    loaded = load_config(_write(tmp_path / "c.yaml", text.format(file=secret)), environ={})
    if key == "ami.secret_file":
        assert loaded.secrets.ami_secret == "x" * 40


def test_the_mode_checked_is_the_files_behind_a_symlink(tmp_path: Path) -> None:
    secret = _write(tmp_path / "secret", "s3cret\n")
    link = tmp_path / "link"
    link.symlink_to(secret)  # a link itself is 0777: that says nothing
    secret.chmod(0o600)
    f = _write(tmp_path / "c.yaml", f"ami:\n  secret_file: {link}\n")
    assert load_config(f, environ={}).secrets.ami_secret == "s3cret"
    secret.chmod(0o644)
    (problem,) = _problems(f)
    assert f"ami.secret_file: secret file '{link}' is readable by every local user (mode 0644)" in problem


def test_a_secret_file_under_the_credentials_directory_is_systemds_and_not_judged(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    secret = _write(creds / "ami-secret", "s3cret\n")
    secret.chmod(0o644)
    f = _write(tmp_path / "c.yaml", f"ami:\n  secret_file: {secret}\n")
    assert load_config(f, environ={"CREDENTIALS_DIRECTORY": str(creds)}).secrets.ami_secret == "s3cret"
    assert "mode 0644" in _problems(f)[0]  # outside systemd's directory the same file is refused


def test_a_group_writable_secret_file_must_belong_to_root_or_the_daemons_user() -> None:
    """Another user owning a group-writable secret (and that group) decides what the secret is."""
    from clickphone_agi.config.loader import secret_file_problem

    def st(mode: int, uid: int) -> os.stat_result:
        return os.stat_result((0o100000 | mode, 1, 1, 1, uid, 0, 10, 0, 0, 0))

    path = Path("/etc/clickphone-agi/secrets/ami-secret")
    for uid in (0, 990):  # root, the daemon's user
        assert secret_file_problem(path, st(0o660, uid), euid=990) is None
    problem = secret_file_problem(path, st(0o660, 1000), euid=990)
    assert problem is not None
    assert "owned by uid 1000, neither root nor the daemon's user, and writable by its group (mode 0660)" in problem
    assert f"chmod 0640 {path}" in problem
    assert secret_file_problem(path, st(0o640, 1000), euid=990) is None  # only readable: allowed


def test_check_config_as_root_judges_a_group_writable_secret_as_the_daemon_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run as root, check-config refused a 0660 secret owned by the daemon's user, which the
    daemon itself accepts: the daemon's user (the unit's User=) counts whoever checks."""
    from clickphone_agi.config import loader

    def st(mode: int, uid: int) -> os.stat_result:
        return os.stat_result((0o100000 | mode, 1, 1, 1, uid, 0, 10, 0, 0, 0))

    path = Path("/etc/clickphone-agi/secrets/ami-secret")
    monkeypatch.setattr(loader, "_daemon_uid", lambda: 990)
    assert loader.secret_file_problem(path, st(0o660, 990), euid=0) is None
    assert loader.secret_file_problem(path, st(0o660, 1000), euid=0) is not None
    monkeypatch.setattr(loader, "_daemon_uid", lambda: None)  # no such user on this machine
    assert loader.secret_file_problem(path, st(0o660, 990), euid=0) is not None


def test_check_config_refuses_a_world_readable_secret_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = _write(tmp_path / "ami-secret", "s3cret\n")
    secret.chmod(0o644)
    f = _write(tmp_path / "c.yaml", f"ami:\n  secret_file: {secret}\n")
    assert main(["check-config", "-c", str(f)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert f"config error: {f}:2:3: ami.secret_file: secret file '{secret}' is readable by every local user" in err
    secret.chmod(0o600)
    assert main(["check-config", "-c", str(f)]) == 0


def test_the_configured_zones_exist_on_a_host_without_a_zone_database(tmp_path: Path) -> None:
    """Slim images ship no /usr/share/zoneinfo: the shipped configuration was refused there with
    "unknown time zone 'Europe/Bucharest' (expected an IANA name such as Europe/Bucharest)". The
    tzdata package is zoneinfo's fallback; days must stay DST-correct with it."""
    env = {**os.environ, "PYTHONTZPATH": str(tmp_path / "no-zoneinfo")}
    checked = subprocess.run(
        [sys.executable, "-m", "clickphone_agi", "check-config", "-c", str(SHIPPED_CONFIG)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "configuration OK" in checked.stderr + checked.stdout
    offsets = subprocess.run(
        [
            sys.executable, "-c",
            "from datetime import datetime; from zoneinfo import ZoneInfo, TZPATH; z = ZoneInfo('Europe/Bucharest');"
            " print(TZPATH, z.utcoffset(datetime(2026, 1, 15)), z.utcoffset(datetime(2026, 7, 15)))",
        ],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert offsets.stdout.split()[-2:] == ["2:00:00", "3:00:00"]  # EET in winter, EEST in summer
    assert "no-zoneinfo" in offsets.stdout  # the host's database was really out of reach
