"""SIGHUP reload in-process: what the log calls applied really is applied, a failed reload changes
nothing, and a change that waits for a restart stays visible until the restart."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import load_config
from clickphone_agi.status_view import format_status
from tests.conftest import REPO, write_secret
from tests.daemon_harness import in_process

pytestmark = pytest.mark.slow

BILLING = "billing:\n  tariffs_file: {tariffs}\n  billing_cdr:\n    destination_contexts: [lab-outbound]\n"


def _daemon(cfg: Path) -> contextlib.AbstractAsyncContextManager[Daemon]:
    return in_process(load_config(cfg), cfg)


async def test_reloaded_notifications_and_sender_reach_the_notices(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """`config.reloaded applied=[notifications, smtp]` must be true for the voicemail, fax and
    missed-call notices too, not only for the outbox sender."""
    cfg = write_config()
    async with _daemon(cfg) as d:
        assert d._parts is not None
        cfg.write_text(
            cfg.read_text()
            + "notifications:\n  scan_interval: 7\n  inbound_contexts: [from-trunk]\n"
            + "  max_attachment_bytes: 2048\n"
        )
        cfg.write_text(cfg.read_text().replace("smtp:\n", "smtp:\n  from_address: Voicemail <vm@clickphone.ro>\n"))
        assert await d.reload()
        settings = d._parts.notifier.settings
        assert settings.scan_interval == 7
        assert settings.inbound_contexts == ("from-trunk",)
        assert settings.max_attachment_bytes == 2048
        assert settings.sender == "Voicemail <vm@clickphone.ro>"


async def test_a_reload_refused_for_its_tariff_file_adopts_no_other_change(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """A reload reported as failed ("running on previous tariffs") must not have switched the
    rest of the configuration: either all of it applies or none."""
    tariffs = short_tmp / "tariffs.yaml"
    tariffs.write_text((REPO / "etc" / "tariffs.yaml").read_text())
    cfg = write_config(extra=BILLING.format(tariffs=tariffs))
    async with _daemon(cfg) as d:
        before = d.config
        tariffs.write_text("tariffs:\n  - prefix: '+40'\n    rate_per_minute: lots\n")
        cfg.write_text(cfg.read_text() + "privacy:\n  retention_hour: 5\n")
        cfg.write_text(cfg.read_text().replace("smtp:\n", "smtp:\n  timeout: 11\n"))
        assert not await d.reload()
        assert d.reload_failures == 1
        assert d.config == before
        assert d.config.privacy.retention_hour == 3
        assert d.config.smtp.timeout == 30


async def test_a_change_that_needs_a_restart_stays_in_status_until_then(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """`restart_required` was only a log line: `clickphone-agi status` and systemd's STATUS= said
    nothing, so an operator who reloaded a new AMI port saw "ok" while the old one was in use."""
    cfg = write_config()
    async with _daemon(cfg) as d:
        cfg.write_text(cfg.read_text().replace("port: 5038", "port: 5040"))
        assert await d.reload()
        status = await d._cmd_status({})
        assert status["restart_required"] == ["ami"]
        assert "RESTART REQUIRED" in format_status(status)
        assert "restart required (ami)" in d._status_text()
        cfg.write_text(cfg.read_text().replace("port: 5040", "port: 5038"))  # reverted: nothing pending
        assert await d.reload()
        assert (await d._cmd_status({}))["restart_required"] == []
        assert "restart" not in d._status_text()


async def test_a_rotated_api_token_is_reported_as_needing_a_restart(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """The HTTP API keeps the token it was started with: after a SIGHUP with a new token file the
    old token still works, so the reload must not look complete."""
    token = short_tmp / "api-token"
    write_secret(token, "first-token-0123456789\n")
    cfg = write_config(extra=f"api:\n  token_file: {token}\n")
    async with _daemon(cfg) as d:
        token.write_text("second-token-0123456789\n")
        assert await d.reload()
        assert (await d._cmd_status({}))["restart_required"] == ["api.token_file"]
        assert "second-token" not in d._status_text()


async def test_a_new_templates_dir_or_zone_is_reported_as_needing_a_restart(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """The mail renderer keeps the template directory and the zone (mail times) it was built with,
    though both sit in sections that reload live: a change was neither applied nor reported."""
    cfg = write_config()
    async with _daemon(cfg) as d:
        templates = short_tmp / "templates"
        templates.mkdir()
        cfg.write_text(
            cfg.read_text() + f"notifications:\n  templates_dir: {templates}\nbilling:\n  timezone: Europe/London\n"
        )
        assert await d.reload()
        assert (await d._cmd_status({}))["restart_required"] == ["notifications.templates_dir", "billing.timezone"]


async def test_a_reload_refuses_a_secret_file_made_world_readable(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """The mode of a secret file is checked on every load: a chmod 0644 after the start is caught
    by the next SIGHUP, which keeps the running configuration."""
    cfg = write_config()
    async with _daemon(cfg) as d:
        (short_tmp / "ami-secret").chmod(0o644)
        failures = d.reload_failures
        assert not await d.reload()
        assert d.reload_failures == failures + 1
        (short_tmp / "ami-secret").chmod(0o640)
        assert await d.reload()
