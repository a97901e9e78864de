"""``clickphone-agi status``: health and key figures from the running daemon, for a human or as JSON;
exit 0 healthy, 1 unhealthy, 69 no daemon. /healthz reports the very same health object."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clickphone_agi.adapters.http_api import StatusCollector
from clickphone_agi.app import Daemon
from clickphone_agi.cli import EX_ERROR, EX_UNAVAILABLE
from clickphone_agi.config.loader import load_config
from clickphone_agi.sim.smtp_sink import SmtpSink
from clickphone_agi.status_view import format_status
from tests.api_harness import _free_port
from tests.conftest import write_secret
from tests.daemon_harness import run_cli

pytestmark = pytest.mark.slow


async def _daemon(cfg: Path) -> tuple[Daemon, asyncio.Task[int]]:
    d = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    return d, task


async def _retention_ran(d: Daemon) -> None:
    async with asyncio.timeout(20):
        while (await d._cmd_status({}))["retention"]["last_run"] is None:
            await asyncio.sleep(0.05)


async def test_status_healthy_human_and_json(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    cfg = write_config(smtp_port=smtp_sink.port)
    d, task = await _daemon(cfg)
    try:
        await _retention_ran(d)
        code, out, err = await run_cli("status", "-c", str(cfg))
        assert code == 0, err
        lines = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
        assert out.splitlines()[0].split() == ["health", "ok"]
        assert "writable" in out
        assert "NOT WRITABLE" not in out
        assert "AMI" in out
        assert "disabled" in out
        assert "last run" in out
        assert "purged outbox_bodies 0" in out
        assert lines["charges"].startswith("today")
        code, out, err = await run_cli("status", "--json", "-c", str(cfg))
        assert code == 0, err
        status = json.loads(out)
        assert status["health"] == {
            "ok": True, "ami": None, "outbox_oldest_pending_age_seconds": None, "database_writable": True,
            "storage_outage": None,
        }  # fmt: skip
        assert status["storage_outage"] is None
        assert status["held_for_storage"] == {"held": 0, "outages": 0, "retries": 0, "lost_at_stop": 0}
        assert status["charges_today"]["calls"] == 0
        assert status["retention"]["runs"] >= 1
        assert status["retention"]["next_run"] is not None
    finally:
        d.request_stop()
        assert await task == 0
    code, _, err = await run_cli("status", "-c", str(cfg))
    assert code == EX_UNAVAILABLE
    assert "not running" in err


async def test_status_and_healthz_agree_when_the_ami_link_is_down(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    port = _free_port()
    write_secret(short_tmp / "api-token", "t0ken\n")
    cfg = write_config(
        smtp_port=smtp_sink.port,
        ami_enabled=True,
        ami_port=_free_port(),  # nothing listens there
        extra=f"api:\n  enabled: true\n  port: {port}\n  token_file: {short_tmp / 'api-token'}\n",
    )
    d, task = await _daemon(cfg)
    try:
        code, out, err = await run_cli("status", "-c", str(cfg))
        assert code == EX_ERROR, err
        assert out.splitlines()[0].split() == ["health", "UNHEALTHY"]
        assert "NOT CONNECTED" in out
        code, out, _ = await run_cli("status", "--json", "-c", str(cfg))
        assert code == EX_ERROR
        health = json.loads(out)["health"]
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body.keys() == health.keys()
        assert body["ami"]["connected"] is health["ami"]["connected"] is False
        assert body["ami"]["since"] is None
    finally:
        d.request_stop()
        assert await task == 0


def test_human_view_of_a_connected_link_and_a_failed_retention() -> None:
    status: dict[str, Any] = {
        "version": "1.0",
        "uptime_seconds": 3725.0,
        "database": "/var/lib/clickphone-agi/clickphone-agi.db",
        "ami": {"connected": True, "connected_since": "2026-11-28T10:00:00+00:00", "connects": 2,
                "asterisk_version": "11.0.0", "state": "connected"},
        "health": {"ok": True, "database_writable": True},
        "mail": {"pending": 2, "sent": 40, "oldest_pending_age_seconds": 75.0},
        "queue": {"depth": 1, "high_water": 9, "dropped": 0},
        "events": {"Cdr": 12, "DialEnd": 3},
        "charges_today": {"day": "2026-11-28", "calls": 3, "bani": 1250},
        "retention": {"last_run": {"at": "2026-11-28T01:00:00+00:00", "ok": False, "error": "disk I/O error"}},
    }  # fmt: skip
    text = format_status(status)
    assert "connected since 2026-11-28T10:00:00+00:00, Asterisk AMI 11.0.0; connects 2" in text
    assert "up 1h 02m" in text
    assert "oldest pending 1m 15s; pending 2, sent 40" in text
    assert "Cdr 12, DialEnd 3" in text
    assert "2026-11-28: 3 calls, 12,50 lei" in text
    assert "LAST RUN FAILED at 2026-11-28T01:00:00+00:00: disk I/O error" in text
    assert "CDR CLOCK" not in text
    status["cdr_clock_skew_seconds"] = 7203  # Asterisk on UTC, the daemon on Europe/Bucharest
    clock = next(line for line in format_status(status).splitlines() if line.startswith("CDR CLOCK"))
    assert "Cdrs end 2.0 h before they arrive: is asterisk.timezone the zone Asterisk runs in?" in clock


def test_retention_metrics_parse() -> None:
    collector = StatusCollector()
    collector.status = {
        "retention": {
            "runs": 2, "failures": 0, "purged_since_start": {"cdrs": 5, "outbox_bodies": 7},
            "last_run": {"at": "2026-11-28T01:00:00+00:00", "ok": True},
        }
    }  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("clickphone_retention_purged_total", (("what", "cdrs"),))] == 5
    assert samples[("clickphone_retention_runs_total", ())] == 2
    assert samples[("clickphone_retention_last_success_timestamp_seconds", ())] == 1795827600.0
