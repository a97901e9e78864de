"""Every notification kind's HTML part as a real browser draws it (Debian's headless chromium).

Skipped where chromium is not installed (CI installs nothing it does not need); run locally with
`apt-get install chromium`. Each screenshot must be a real page: not blank, content drawn.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.notices.render import preview

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed")


def screenshot(html: str, out: Path, workdir: Path) -> None:
    page = workdir / "page.html"
    page.write_text(html, encoding="utf-8")
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={workdir / 'profile'}", "--hide-scrollbars", "--window-size=760,1000",
            f"--screenshot={out}", page.as_uri(),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("language", ["ro", "en"])
def test_every_kind_renders_in_a_real_browser(tmp_path: Path, language: str) -> None:
    for kind in sorted(KINDS):
        msg = email.message_from_bytes(preview(kind, language), policy=email.policy.default)
        part = msg.get_body(("html",))  # type: ignore[attr-defined]
        assert part is not None, kind
        png = tmp_path / f"{kind}-{language}.png"
        screenshot(part.get_content(), png, tmp_path)
        with Image.open(png) as img:
            stat = ImageStat.Stat(img.convert("L"))
            assert stat.stddev[0] > 5, f"{kind}/{language}: the page looks blank"
        if kind == "voicemail" and language == "ro":
            shutil.copy(png, tmp_path / "keep.png")
