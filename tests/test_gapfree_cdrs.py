"""Gap-free CDRs end to end: the AMI link dies mid-stream, Master.csv is rotated during the gap,
and the daemon still ends with every CDR recorded exactly once."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clickphone_agi.adapters.ami.protocol import AmiMessage
from clickphone_agi.adapters.storage import sqlite as db
from clickphone_agi.app import Daemon
from clickphone_agi.config.loader import load_config
from clickphone_agi.domain.keys import cdr_key
from clickphone_agi.sim.ami_server import AmiReplayServer, Transcript, load_transcript, packaged_scenarios
from clickphone_agi.sim.master_csv import csv_record

SYSTEM = "pbx1"


def cdrs_of(t: Transcript) -> list[AmiMessage]:
    return [f.message for f in t.replay_frames if f.message.event == "Cdr"]


def key_of(cdr: AmiMessage) -> str:
    return cdr_key(SYSTEM, cdr.get("UniqueID") or "", cdr.get("DestinationChannel") or "")


def ring_group_rows() -> list[bytes]:
    """A missed ring-group call only Master.csv knows: two forks share one UniqueID."""
    base = (
        '"acct1001","0744123456","200","from-trunk","""Vasile Ionescu"" <0744123456>","PJSIP/trunk-00000042",'
        '"{dst}","Dial","PJSIP/101&PJSIP/102,20","2026-11-28 16:40:00",,"2026-11-28 16:40:20",20,0,'
        '"NO ANSWER","DOCUMENTATION","1795883000.66",""\n'
    )
    return [base.format(dst=d).encode() for d in ("PJSIP/101-00000043", "PJSIP/102-00000044")]


@pytest.mark.slow
async def test_mid_stream_kill_and_logrotate_lose_nothing_and_double_nothing(
    write_config: Callable[..., Path], ami_server: AmiReplayServer, short_tmp: Path
) -> None:
    csv_dir = short_tmp / "cdr-csv"
    csv_dir.mkdir()
    master = csv_dir / "Master.csv"
    master.write_bytes(b"")
    cfg_path = write_config(
        ami_port=ami_server.port,
        ami_enabled=True,
        extra=f"asterisk:\n  system_name: {SYSTEM}\n  master_csv: {master}\n  reconcile_interval: 3600\n",
    )
    loaded = load_config(cfg_path)
    # the recorded calls happened on 2026-11-28 around 14:21 UTC: go live before them
    conn = db.connect_sync(loaded.config.database.path)
    db.migrate(conn, datetime(2026, 11, 28, 0, 0, tzinfo=UTC))
    conn.close()

    scenarios = {name: load_transcript(path) for name, path in packaged_scenarios().items()}
    answered, long_call, busy = scenarios["answered_call"], scenarios["long_call"], scenarios["busy_call"]

    daemon = Daemon(loaded, config_path=cfg_path, install_signal_handlers=False)
    run = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        await ami_server.wait_for_login(10)

        async def recorded() -> int:
            status = await daemon._cmd_status({})
            return int(status["cdrs"]["recorded"])

        async def until_recorded(n: int) -> None:
            async with asyncio.timeout(15):
                while await recorded() < n:
                    await asyncio.sleep(0.02)

        # 1. a call arrives on AMI and, as always (a moment later), in Master.csv too
        await ami_server.play(answered)
        await until_recorded(3)
        with master.open("ab") as fh:
            fh.writelines(csv_record(c) for c in cdrs_of(answered))

        # 2. the link dies in the middle of the long call, inside a frame, before its CDRs
        frames = long_call.replay_frames
        first_cdr = next(i for i, f in enumerate(frames) if f.message.event == "Cdr")
        partial = b"".join(f.raw for f in frames[:first_cdr]) + frames[first_cdr].raw[:40]
        await ami_server.send_raw(partial)
        await asyncio.sleep(0.05)
        await ami_server.drop_clients()

        # 3. during the gap Asterisk writes the long call's CDRs, logrotate rotates Master.csv
        #    (create mode), and the busy call and a ring-group call land in the new file
        with master.open("ab") as fh:
            fh.writelines(csv_record(c) for c in cdrs_of(long_call))
        os.rename(master, csv_dir / "Master.csv.1")
        with master.open("wb") as fh:
            fh.writelines(csv_record(c) for c in cdrs_of(busy))
            fh.writelines(ring_group_rows())

        # 4. the daemon reconnects (FullyBooted) and reconciles
        await ami_server.wait_for_login(15, logins=2)
        expected = 3 + 3 + 4 + 2
        await until_recorded(expected)

        # 5. late AMI twins of CSV-recovered CDRs change nothing
        await ami_server.play(long_call)
        await ami_server.play(busy)
        await asyncio.sleep(0.2)
        status = await daemon._cmd_status({})
        assert status["cdrs"]["recorded"] == expected
        assert status["cdrs"]["duplicates"] == 3 + 3 + 4  # answered call's CSV twins, then late AMI twins
        assert status["reconcile"]["recovered"] == 3 + 4 + 2
        assert status["reconcile"]["gaps_suspected"] == 0
    finally:
        daemon.request_stop()
        assert await run == 0

    conn = sqlite3.connect(loaded.config.database.path)
    rows = conn.execute("SELECT key, origin FROM cdrs").fetchall()
    conn.close()
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)) == expected
    want = {key_of(c) for t in (answered, long_call, busy) for c in cdrs_of(t)}
    want |= {cdr_key(SYSTEM, "1795883000.66", d) for d in ("PJSIP/101-00000043", "PJSIP/102-00000044")}
    assert set(keys) == want
    origins = dict(rows)
    assert {origins[key_of(c)] for c in cdrs_of(answered)} == {"ami"}
    assert {origins[key_of(c)] for c in cdrs_of(long_call)} == {"csv"}
