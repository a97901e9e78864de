"""The shipped unit file: the directives the daemon relies on, and its sandbox score."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from clickphone_agi.cli import EX_CONFIG, EX_DATAERR

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "clickphone-agi.service"
MAX_EXPOSURE = 1.5


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections → (key, value) in order. Keys repeat in units (LoadCredential=), and an empty
    value resets a list, so configparser's one-value-per-key model does not fit."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not expected: {raw!r}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= expected once, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT)


def test_unit_declares_notify_watchdog_and_reload(unit: dict[str, list[tuple[str, str]]]) -> None:
    svc = unit["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert int(one(svc, "WatchdogSec")) > 0
    reload = one(svc, "ExecReload")
    assert "-HUP" in reload.split()
    assert "$MAINPID" in reload
    assert one(svc, "ExecStart").endswith("clickphone-agi run")
    assert one(svc, "Restart") == "on-failure"
    # what fails the same way every time is not retried forever (cli's EX_DATAERR, EX_CONFIG)
    assert set(one(svc, "RestartPreventExitStatus").split()) == {str(EX_DATAERR), str(EX_CONFIG)}


def test_stop_timeout_exceeds_drain_bound(unit: dict[str, list[tuple[str, str]]]) -> None:
    """systemd must not SIGKILL the daemon while it is still draining (default 10 s)."""
    assert int(one(unit["Service"], "TimeoutStopSec")) >= 20


def test_unit_runs_as_its_own_user_with_spool_group(
    unit: dict[str, list[tuple[str, str]]],
) -> None:
    svc = unit["Service"]
    assert one(svc, "User") == "clickphone-agi"
    assert one(svc, "Group") == "clickphone-agi"
    assert one(svc, "SupplementaryGroups").split() == ["asterisk"]
    assert one(svc, "StateDirectory") == "clickphone-agi"
    assert one(svc, "RuntimeDirectory") == "clickphone-agi"
    assert one(svc, "ConfigurationDirectory") == "clickphone-agi"
    # systemd mounts ConfigurationDirectory= read-write under ProtectSystem=strict (seen under
    # systemd 252 by tests/systemd_boot): read-only again, as are the spool's recordings
    assert {"/etc/clickphone-agi", "-/var/spool/asterisk"} <= set(values(svc, "ReadOnlyPaths"))
    # PrivateUsers=yes would map the asterisk group to nobody and lose the spool.
    assert values(svc, "PrivateUsers") in ([], ["no"])


def test_secrets_come_from_load_credential(unit: dict[str, list[tuple[str, str]]]) -> None:
    creds = dict(v.split(":", 1) for v in values(unit["Service"], "LoadCredential"))
    assert creds == {
        "ami-secret": "/etc/clickphone-agi/secrets/ami-secret",
        "smtp-password": "/etc/clickphone-agi/secrets/smtp-password",
        "api-token": "/etc/clickphone-agi/secrets/api-token",
        "unsubscribe-secret": "/etc/clickphone-agi/secrets/unsubscribe-secret",
    }


def test_unit_is_installable_and_ordered(unit: dict[str, list[tuple[str, str]]]) -> None:
    after = " ".join(values(unit["Unit"], "After")).split()
    assert {"network-online.target", "asterisk.service"} <= set(after)
    # the default relay is the local MTA: up before the first mail (seen under systemd: the mail
    # found at start met a refused connection and waited retry_min)
    assert {"postfix.service", "exim4.service"} <= set(after)
    assert "network-online.target" in " ".join(values(unit["Unit"], "Wants")).split()
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_sysusers_adds_daemon_to_asterisk_group() -> None:
    lines = [
        line.split()
        for line in (SYSTEMD_DIR / "clickphone-agi.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["m", "clickphone-agi", "asterisk"] in lines
    user = next(fields for fields in lines if fields[:2] == ["u", "clickphone-agi"])
    assert user[-1] == "/var/lib/clickphone-agi"


def test_security_exposure_is_low() -> None:
    """`systemd-analyze security --offline=yes` must rate the sandbox at most 1.5 ("OK")."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not on PATH")
    env = {**os.environ, "SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [exe, "security", "--no-pager", "--offline=yes", str(UNIT)],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0 and re.search(r"unrecognized option|unknown option", err, re.I):
        pytest.skip(f"systemd-analyze does not support --offline: {err.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert match, f"no exposure figure (rc={proc.returncode}):\n{out}\n{err}"
    assert float(match.group(1)) <= MAX_EXPOSURE, out
