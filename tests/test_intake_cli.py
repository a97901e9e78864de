"""The intake verbs from the command line: through the running daemon's control socket to the same
service layer as the HTTP API (a key used over HTTP and the CLI is one key)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clickphone_agi.cli import EX_DATAERR, EX_OK, EX_UNAVAILABLE, main
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.api_harness import Api, settle
from tests.test_marketing_api import far


async def cli(api: Api, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    config = str(api.daemon.config_path)
    code = await asyncio.to_thread(main, [*argv, "-c", config])
    out, err = capsys.readouterr()
    # the in-process daemon's own log lines (e.g. the start-up retention run) may share stdout
    lines = out.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(("{", "["))), None)
    return code, (json.loads("".join(lines[start:])) if start is not None else out), err


async def test_event_verb_and_key_shared_with_http(
    api: Api, smtp_sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await cli(api, capsys, "event", "acct1001", "topup", "--data", '{"amount": "5.00"}', "--key", "t1")
    assert (code, out["amount"], out["mails"]) == (EX_OK, 500, 1)
    again = await api.call(
        "POST", "/v1/accounts/acct1001/events", {"type": "topup", "data": {"amount": "5.00"}}, key="t1"
    )
    assert again == (200, out)  # the same key over HTTP: the first answer, nothing booked twice
    code, _, err = await cli(api, capsys, "event", "acct1001", "topup", "--data", '{"amount": "5.001"}', "--key", "t2")
    assert code == EX_DATAERR
    assert "data.amount" in err
    await settle(smtp_sink, 1)


async def test_policy_verbs(api: Api, smtp_sink: SmtpSink, short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "Politica v7\r\nfără BOM, cu diacritice: ăîșțâ\n".encode()
    (short_tmp / "p7.txt").write_bytes(text)
    code, out, _ = await cli(
        api, capsys, "policy", "publish", str(short_tmp / "p7.txt"), "--version", "7", "--effective", "2027-02-01",
        "--summary", "Mai puține date.",
    )  # fmt: skip
    assert (code, out["version"], out["queued"]) == (EX_OK, "7", 2)
    code, out, _ = await cli(api, capsys, "policy", "list")
    assert (code, [p["version"] for p in out["policies"]]) == (EX_OK, ["7"])
    code = await asyncio.to_thread(main, ["policy", "show", "7", "--raw", "-c", str(api.daemon.config_path)])
    raw, _ = capsys.readouterr()
    assert code == EX_OK
    assert raw.encode() == text
    code, _, err = await cli(api, capsys, "policy", "show", "8")
    assert code == EX_DATAERR
    assert "no policy version" in err
    await settle(smtp_sink, 2)


async def test_consent_and_broadcast_verbs(api: Api, smtp_sink: SmtpSink, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await cli(api, capsys, "consent", "acct1001", "grant", "--how", "phone call, ticket 42")
    assert (code, out["marketing"], out["source"], out["how"]) == (EX_OK, True, "cli", "phone call, ticket 42")
    code, out, _ = await cli(
        api, capsys, "broadcast", "offer", "--id", "cli-offer", "--title", "Europa", "--body", "0,04 lei/min",
        "--url", "https://www.clickphone.example/o", "--valid-until", far().isoformat(),
    )  # fmt: skip
    assert (code, out["recipients"]) == (EX_OK, 2)
    code, out, _ = await cli(api, capsys, "consent", "acct1001", "withdraw")
    assert code == EX_OK
    code, _, err = await cli(
        api, capsys, "broadcast", "tariff-change", "--id", "cli-t", "--tariff", "Standard",
        "--effective", "2020-01-01", "--changes", "x", "--url", "https://www.clickphone.example/t",
    )  # fmt: skip
    assert code == EX_DATAERR
    assert "effective" in err
    await settle(smtp_sink, 2)


def test_intake_verbs_need_the_daemon(write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "list", "-c", str(write_config())]) == EX_UNAVAILABLE
