"""SIGHUP reload in-process: what the log calls applied really is applied, a failed reload changes
nothing, and a change that waits for a restart stays visible until the restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import load_config

pytestmark = pytest.mark.slow


async def _daemon(cfg: Path) -> tuple[Daemon, asyncio.Task[int]]:
    d = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    return d, task


async def test_reloaded_notifications_and_sender_reach_the_notices(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    """`config.reloaded applied=[notifications, smtp]` must be true for the voicemail, fax and
    missed-call notices too, not only for the outbox sender."""
    cfg = write_config()
    d, task = await _daemon(cfg)
    try:
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
    finally:
        d.request_stop()
        assert await task == 0
