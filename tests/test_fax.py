"""Fax TIFF → PDF, the dialplan's result sidecar, and the start-up fax spool scan.

Fixtures (``fixtures/spool/fax``), both recorded in the lab's ``fax`` scenario (Asterisk 22,
spandsp): ``test-fax.tiff`` is what SendFAX sent (2 pages, CCITT G4, FillOrder 1, 1728x2156 px,
204x196 dpi) and ``received-g3.tif`` what ReceiveFAX wrote (2 pages, CCITT G3 2-D
(T4Options 5), FillOrder 2, 1728x2188 px, 204x196 dpi, one strip per page, each page's IFD after
its data). Page sizes are checked three ways: a small parser over the PDF's own objects (always),
pikepdf (installed with img2pdf) for the embedded images' pixels, and poppler's
pdfinfo/pdfimages when they are installed.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from PIL import Image, ImageChops, ImageDraw, TiffImagePlugin
from structlog.testing import capture_logs

from clickphone_agi.adapters.fax import (
    FaxConverter,
    FaxFileError,
    FaxSidecar,
    parse_sidecar,
    read_sidecar,
    scan_fax_spool,
    tiff_to_pdf,
)

FAX_FIXTURES = Path(__file__).parent / "fixtures" / "spool" / "fax"
G3 = "received-g3.tif"
G4 = "test-fax.tiff"

# what dialplan/clickphone-fax.conf's hangup handler writes for the recorded fax (values from the
# lab's LabFaxResult UserEvent and ReceiveFAX event of the receive leg)
REAL_SIDECAR = (
    "direction=receive\nstatus=SUCCESS\nerror=\nstatusstr=OK\npages=2\nrate=14400\nresolution=8031x7700\n"
    "local=+40212345679\nremote=+40212345678\naccount=acct1001\nuniqueid=1795882939.18\n"
    "linkedid=1795882939.17\nend=1\n"
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fax spool holding copies of both fixtures."""
    spool = tmp_path / "fax"
    shutil.copytree(FAX_FIXTURES, spool)
    return spool


def pdf_page_sizes(pdf: bytes) -> list[tuple[float, float]]:
    """Page sizes in points, in page order, read from the PDF's objects (Pages /Kids → /MediaBox)."""
    objects = {int(m[1]): m[2] for m in re.finditer(rb"(?s)(\d+) 0 obj(.*?)endobj", pdf)}
    [pages] = [body for body in objects.values() if re.search(rb"/Type\s*/Pages\b", body)]
    kids_match = re.search(rb"/Kids\s*\[([^\]]*)\]", pages)
    count_match = re.search(rb"/Count\s+(\d+)", pages)
    assert kids_match is not None
    assert count_match is not None
    kids = [int(k) for k in re.findall(rb"(\d+)\s+0\s+R", kids_match[1])]
    assert len(kids) == int(count_match[1])
    sizes = []
    for kid in kids:
        box = re.search(rb"/MediaBox\s*\[([^\]]*)\]", objects[kid])
        assert box is not None
        x0, y0, x1, y1 = map(float, box[1].split())
        sizes.append((x1 - x0, y1 - y0))
    return sizes


def tiff_bytes(pages: Sequence[tuple[Image.Image, tuple[int, int] | None]], compression: str = "group3") -> bytes:
    """A (multi-page) TIFF, each page with its own resolution (``None``: no resolution tags)."""
    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf, new=True) as tf:
        for im, dpi in pages:
            if dpi is None:
                im.save(tf, format="TIFF", compression=compression)
            else:
                im.save(tf, format="TIFF", compression=compression, dpi=dpi)
            tf.newFrame()
    return buf.getvalue()


def drawn_page(width: int, height: int) -> Image.Image:
    """A 1-bit page with a frame and a circle-ish ellipse, so a squashed page would be visible."""
    im = Image.new("1", (width, height), 1)
    draw = ImageDraw.Draw(im)
    draw.rectangle((20, 20, width - 21, height - 21), outline=0, width=6)
    draw.ellipse((200, 100, width - 200, height - 100), outline=0, width=8)
    return im


def pt(pixels: int, dpi: float) -> float:
    return pixels / dpi * 72


# -- TIFF → PDF ----------------------------------------------------------------------------------


def test_received_g3_fax_becomes_a_two_page_pdf_with_true_page_size(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.perf_counter()
    doc = tiff_to_pdf(root / G3, root=root)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[timing] received-g3.tif (2 pages G3 → G4) tiff_to_pdf: {elapsed * 1000:.1f} ms")
    assert doc.pdf.startswith(b"%PDF-")
    assert doc.pdf.rstrip().endswith(b"%%EOF")
    assert doc.pages == 2
    assert doc.dpi == ((204, 196), (204, 196))
    for width, height in pdf_page_sizes(doc.pdf):
        assert width == pytest.approx(pt(1728, 204), abs=0.01)  # 609.88 pt = 215.2 mm
        assert height == pytest.approx(pt(2188, 196), abs=0.01)  # 803.76 pt = 283.5 mm


def test_sent_g4_fax_becomes_a_two_page_pdf(root: Path) -> None:
    doc = tiff_to_pdf(root / G4, root=root)
    assert doc.pages == 2
    assert doc.dpi == ((204, 196), (204, 196))
    assert pdf_page_sizes(doc.pdf) == [pytest.approx((pt(1728, 204), pt(2156, 196)), abs=0.01)] * 2


@pytest.mark.parametrize("name", [G3, G4])
def test_conversion_is_lossless_pixel_for_pixel(root: Path, name: str) -> None:
    """G4 is embedded as is, G3 decoded and re-encoded as G4: the images in the PDF hold exactly
    the TIFF's pixels, at the TIFF's size, in CCITT (no re-sampling, no JPEG/Flate)."""
    pikepdf = pytest.importorskip("pikepdf")
    doc = tiff_to_pdf(root / name, root=root)
    with pikepdf.open(io.BytesIO(doc.pdf)) as pdf, Image.open(root / name) as original:
        assert len(pdf.pages) == 2
        for index, page in enumerate(pdf.pages):
            [xobject] = list(page.obj["/Resources"]["/XObject"].values())
            assert "/CCITTFaxDecode" in str(xobject["/Filter"])
            embedded = pikepdf.PdfImage(xobject).as_pil_image()
            original.seek(index)
            assert embedded.size == original.size
            assert ImageChops.difference(embedded.convert("L"), original.convert("L")).getbbox() is None


@pytest.mark.skipif(shutil.which("pdfinfo") is None or shutil.which("pdfimages") is None, reason="poppler-utils absent")
def test_poppler_reads_the_pdf_with_the_fax_resolution(root: Path) -> None:
    doc = tiff_to_pdf(root / G3, root=root)
    pdf_path = root / "out.pdf"
    pdf_path.write_bytes(doc.pdf)
    info = subprocess.run(
        ["pdfinfo", "-f", "1", "-l", "2", pdf_path], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^Pages:\s+2$", info, re.M)
    assert re.findall(r"^Page\s+\d size:\s+(.*) pts$", info, re.M) == ["609.882 x 803.755"] * 2
    images = subprocess.run(["pdfimages", "-list", pdf_path], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in images.splitlines()[2:]]
    # page num type width height color comp bpc enc interp object ID x-ppi y-ppi size ratio
    assert [(r[3], r[4], r[8], r[12], r[13]) for r in rows] == [("1728", "2188", "ccitt", "204", "196")] * 2


def test_standard_resolution_page_keeps_its_aspect(root: Path) -> None:
    """204x98 dpi: the page has half the rows of a fine page for the same paper; ignoring the
    resolution would give a page 1100/204*72 = 388 pt high instead of 808 pt."""
    (root / "standard.tif").write_bytes(tiff_bytes([(drawn_page(1728, 1100), (204, 98))]))
    doc = tiff_to_pdf(root / "standard.tif", root=root)
    assert doc.dpi == ((204, 98),)
    [(width, height)] = pdf_page_sizes(doc.pdf)
    assert width == pytest.approx(609.88, abs=0.01)
    assert height == pytest.approx(1100 / 98 * 72, abs=0.01)  # 808.16 pt, ~A4's 842
    assert height > 800


def test_mixed_resolutions_size_each_page_on_its_own(root: Path) -> None:
    pages = [
        (drawn_page(1728, 2200), (204, 196)),
        (drawn_page(1728, 700), (204, 98)),
        (drawn_page(1728, 900), (200, 100)),
    ]
    (root / "mixed.tif").write_bytes(tiff_bytes(pages))
    doc = tiff_to_pdf(root / "mixed.tif", root=root)
    assert doc.pages == 3
    assert doc.dpi == ((204, 196), (204, 98), (200, 100))
    assert pdf_page_sizes(doc.pdf) == [
        pytest.approx((pt(1728, 204), pt(2200, 196)), abs=0.01),
        pytest.approx((pt(1728, 204), pt(700, 98)), abs=0.01),
        pytest.approx((pt(1728, 200), pt(900, 100)), abs=0.01),
    ]


def test_missing_resolution_is_assumed_fine_for_fax_widths_and_logged(root: Path) -> None:
    """Without the tags Pillow reports (1, 1) dpi and img2pdf would use 96 dpi (18 in wide)."""
    (root / "notags.tif").write_bytes(tiff_bytes([(drawn_page(1728, 2200), None), (drawn_page(827, 1169), None)]))
    with capture_logs() as logs:
        doc = tiff_to_pdf(root / "notags.tif", root=root)
    assert doc.dpi == ((204, 196), (100, 100))  # 1728 px → fax fine; other widths → A4-wide, square
    assert pdf_page_sizes(doc.pdf) == [
        pytest.approx((pt(1728, 204), pt(2200, 196)), abs=0.01),
        pytest.approx((595.44, 841.68), abs=0.01),
    ]
    assert [(e["event"], e["pages"]) for e in logs] == [("fax_resolution_assumed", [1, 2])]


def test_resolution_in_centimetres_is_converted(root: Path) -> None:
    buf = io.BytesIO()
    drawn_page(1728, 1100).save(
        buf, format="TIFF", compression="group4", resolution_unit=3, x_resolution=80.31, y_resolution=38.58
    )
    (root / "cm.tif").write_bytes(buf.getvalue())
    doc = tiff_to_pdf(root / "cm.tif", root=root)
    assert doc.dpi == ((204, 98),)
    assert pdf_page_sizes(doc.pdf)[0] == pytest.approx((1728 / 203.99 * 72, 1100 / 97.99 * 72), abs=0.1)


def test_relative_path_is_taken_under_the_root(root: Path) -> None:
    assert tiff_to_pdf(Path(G3), root=root).pages == 2


def test_oversize_tiff_is_refused(root: Path) -> None:
    size = (root / G3).stat().st_size
    assert tiff_to_pdf(root / G3, root=root, max_bytes=size).pages == 2
    with pytest.raises(FaxFileError, match="larger than"):
        tiff_to_pdf(root / G3, root=root, max_bytes=size - 1)


def test_too_many_pages_is_refused(root: Path) -> None:
    with pytest.raises(FaxFileError, match="more than 1 pages"):
        tiff_to_pdf(root / G3, root=root, max_pages=1)


def test_symlinked_fax_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "inside.tif").symlink_to(root / G3)
    (root / "passwd.tif").symlink_to("/etc/passwd")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / G3, outside / G3)
    (root / "sub").symlink_to(outside)
    for name in ("inside.tif", "passwd.tif", f"sub/{G3}"):
        with capture_logs() as logs, pytest.raises(FaxFileError, match=r"symlink|leaves"):
            tiff_to_pdf(root / name, root=root)
        assert logs[0]["event"] == "fax_file_refused"


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", f"../fax/{G3}", f"sub/../{G3}", ".hidden.tif", "/", ""],
)
def test_paths_outside_or_odd_are_refused(root: Path, path: str) -> None:
    (root / ".hidden.tif").write_bytes((root / G3).read_bytes())
    with pytest.raises(FaxFileError):
        tiff_to_pdf(Path(path), root=root)


def test_missing_fax_is_a_fax_file_error(root: Path) -> None:
    with pytest.raises(FaxFileError, match="missing"):
        tiff_to_pdf(root / "rx-1.tif", root=root)


@pytest.mark.parametrize("warnings_as", ["error", "ignore"])
@pytest.mark.parametrize(
    "content",
    [b"", b"%PDF-1.4 not a tiff", b"II*\x00" + b"\xff" * 100, "truncated-ifd", "cut-before-last-ifd"],
)
def test_not_a_usable_tiff_is_a_fax_file_error(
    root: Path, content: bytes | str, warnings_as: Literal["error", "ignore"]
) -> None:
    """Whatever Pillow does with its warnings (errors under pytest, printed in production)."""
    truncations = {"truncated-ifd": 12000, "cut-before-last-ifd": 11254}  # page 1's IFD ends at 11634
    data = (root / G3).read_bytes()[: truncations[content]] if isinstance(content, str) else content
    (root / "bad.tif").write_bytes(data)
    png = io.BytesIO()
    drawn_page(600, 400).save(png, format="PNG")
    (root / "image.tif").write_bytes(png.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_as)
        for name in ("bad.tif", "image.tif"):
            with pytest.raises(FaxFileError, match="not a"):
                tiff_to_pdf(root / name, root=root)


# -- sidecar -------------------------------------------------------------------------------------


def test_complete_sidecar_is_parsed(root: Path) -> None:
    (root / f"{G3}.result").write_text(REAL_SIDECAR)
    sidecar = read_sidecar(root / G3)
    assert sidecar == FaxSidecar(
        direction="receive",
        status="SUCCESS",
        error="",
        statusstr="OK",
        pages=2,
        rate=14400,
        resolution="8031x7700",
        local="+40212345679",
        remote="+40212345678",
        account="acct1001",
        uniqueid="1795882939.18",
        linkedid="1795882939.17",
    )
    assert sidecar.resolution_dpi == (204, 196)
    assert read_sidecar(root / G3, root=root) == sidecar


def test_failed_fax_sidecar_with_empty_counts(root: Path) -> None:
    text = REAL_SIDECAR.replace("SUCCESS", "FAILED").replace("error=\n", "error=The call dropped prematurely\n")
    sidecar = parse_sidecar(text.replace("pages=2", "pages=").replace("resolution=8031x7700", "resolution=").encode())
    assert sidecar is not None
    assert (sidecar.status, sidecar.error, sidecar.pages, sidecar.resolution_dpi) == (
        "FAILED",
        "The call dropped prematurely",
        None,
        None,
    )


@pytest.mark.parametrize(
    "text",
    [
        REAL_SIDECAR.replace("end=1\n", ""),  # the handler is still writing
        REAL_SIDECAR.split("rate=", maxsplit=1)[0],
        "",
        REAL_SIDECAR + "direction=send\n",  # rewritten after end=1: end=1 is no longer last
        REAL_SIDECAR.replace("end=1", "end=0"),
    ],
)
def test_incomplete_sidecar_is_none(root: Path, text: str) -> None:
    (root / f"{G3}.result").write_text(text)
    assert read_sidecar(root / G3, root=root) is None


def test_absent_sidecar_is_none(root: Path) -> None:
    assert read_sidecar(root / G3) is None
    assert read_sidecar(root / G3, root=root) is None


def test_hostile_sidecar_values_are_cleaned_and_bounded() -> None:
    text = REAL_SIDECAR.replace("remote=+40212345678", "remote=" + "A" * 5000).replace(
        "local=+40212345679", "local=Evil\x1b[31m=?UTF-8?Q?=0A?=Bcc: x\x00\u2028name"
    )
    text = text.replace("pages=2", "pages=2; rm -rf /").replace("rate=14400", "rate=99999999999999")
    sidecar = parse_sidecar(("junk line without equals\nunknown=1\n" + text).replace("\n", "\r\n").encode())
    assert sidecar is not None
    assert sidecar.remote == "A" * 80
    assert "=?" not in sidecar.local
    assert all(c.isprintable() for c in sidecar.local)
    assert sidecar.local.startswith("Evil")
    assert (sidecar.pages, sidecar.rate) == (None, None)
    assert parse_sidecar(b"\xff\xfe" + REAL_SIDECAR.encode()) is not None  # undecodable bytes replaced


def test_oversize_or_symlinked_sidecar_is_refused(root: Path) -> None:
    (root / f"{G3}.result").write_text("x=" + "y" * 9000 + "\n" + REAL_SIDECAR)
    with pytest.raises(FaxFileError, match="larger than"):
        read_sidecar(root / G3, root=root)
    (root / f"{G4}.result").symlink_to("/etc/passwd")
    with capture_logs(), pytest.raises(FaxFileError, match="symlink"):
        read_sidecar(root / G4)
    with capture_logs(), pytest.raises(FaxFileError):
        read_sidecar(Path("/etc/passwd"), root=root)


# -- spool scan ----------------------------------------------------------------------------------


def test_scan_lists_plain_tiffs_with_their_sidecars(root: Path, tmp_path: Path) -> None:
    (root / f"{G3}.result").write_text(REAL_SIDECAR)
    (root / f"{G4}.result").write_text(REAL_SIDECAR.replace("end=1\n", ""))  # incomplete
    shutil.copy(root / G3, root / "rx-2.TIF")
    (root / "rx-3.tif").symlink_to(root / G3)
    (root / "rx-4.tif").symlink_to("/etc/passwd")
    (root / "notes.txt").write_text("not a fax")
    (root / "sub").mkdir()
    shutil.copy(root / G3, root / "sub" / "rx-5.tif")  # no recursion
    (root / "dir.tif").mkdir()
    os.mkfifo(root / "fifo.tif")
    with capture_logs() as logs:
        found = scan_fax_spool(root)
    assert [(f.path.name, f.sidecar is not None) for f in found] == [
        (G3, True),
        ("rx-2.TIF", False),
        (G4, False),
    ]
    assert found[0].path == root.resolve() / G3
    assert found[0].sidecar is not None
    assert found[0].sidecar.uniqueid == "1795882939.18"
    refused = sorted(e["path"].rsplit("/", 1)[1] for e in logs if e["event"] == "fax_file_refused")
    assert refused == ["dir.tif", "fifo.tif", "rx-3.tif", "rx-4.tif"]
    assert scan_fax_spool(tmp_path / "absent") == []


def test_scan_lists_a_lone_sidecar_whose_reception_left_no_tiff(root: Path) -> None:
    """A reception that failed before the first page leaves only the sidecar; the scan must still
    report it (regression: it listed TIFFs only, so the "fax failed" notice was lost)."""
    failed = REAL_SIDECAR.replace("SUCCESS", "FAILED").replace("pages=2", "pages=0")
    (root / "rx-9.tif.result").write_text(failed)
    (root / "rx-10.tiff.result").write_text(failed.replace("end=1\n", ""))  # still being written
    (root / "rx-11.tif.result").symlink_to(root / "rx-9.tif.result")
    with capture_logs() as logs:
        found = scan_fax_spool(root)
    assert [(f.path.name, f.sidecar is not None) for f in found] == [(G3, False), ("rx-9.tif", True), (G4, False)]
    lone = found[1]
    assert lone.path == root.resolve() / "rx-9.tif"
    assert not lone.path.exists()
    assert lone.sidecar is not None
    assert (lone.sidecar.status, lone.sidecar.pages) == ("FAILED", 0)
    assert [e["path"].rsplit("/", 1)[1] for e in logs if e["event"] == "fax_sidecar_refused"] == ["rx-11.tif.result"]


def test_scan_dates_each_fax_by_its_sidecar_written_at_hangup(root: Path) -> None:
    """The sidecar holds no time; its mtime (the ``end=1`` line, written when the call hung up) is
    what the notifier holds against the go-live baseline and the key floor."""
    (root / f"{G3}.result").write_text(REAL_SIDECAR)
    (root / "rx-9.tif.result").write_text(REAL_SIDECAR)  # a lone sidecar: dated the same way
    ended = datetime(2026, 11, 28, 16, 22, 46, tzinfo=UTC)
    for name in (f"{G3}.result", "rx-9.tif.result"):
        os.utime(root / name, (ended.timestamp(), ended.timestamp()))
    os.utime(root / G3, (0, 0))  # the TIFF's own time plays no part
    found = {f.path.name: f for f in scan_fax_spool(root)}
    assert (found[G3].written_at, found["rx-9.tif"].written_at, found[G4].written_at) == (ended, ended, None)


# -- the converter process -----------------------------------------------------------------------


async def test_the_converter_converts_in_a_process_of_its_own_exactly_as_in_line(root: Path) -> None:
    """Decoding is CPU under the GIL: in a thread it held up the event loop (and every FastAGI
    session) for as long. The worker's result is the in-line conversion's, byte for byte."""
    converter = FaxConverter()
    try:
        doc = await converter.convert(root / G3, root=root)
        assert doc == tiff_to_pdf(root / G3, root=root)
        assert converter.conversions == 1
        workers = list(converter._pool._processes.values()) if converter._pool is not None else []  # type: ignore[union-attr]
        assert len(workers) == 1
        assert workers[0].pid != os.getpid()
        assert workers[0].is_alive()
        # a file that is no TIFF: the worker's FaxFileError crosses over with its message
        (root / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
        with pytest.raises(FaxFileError, match=r"junk\.tif"):
            await converter.convert(root / "junk.tif", root=root)
        assert (await converter.convert(root / G4, root=root)).pages == 2  # and the worker goes on
    finally:
        converter.close()


async def test_a_converter_worker_that_dies_fails_that_fax_only(root: Path) -> None:
    """A decoder crash or the memory cap kills the worker: that fax goes without its PDF (the
    notice says so), the daemon lives, and the next fax gets a new worker."""
    converter = FaxConverter()
    try:
        await converter.convert(root / G3, root=root)
        assert converter._pool is not None
        (worker,) = converter._pool._processes.values()  # type: ignore[union-attr]
        os.kill(worker.pid, 9)
        worker.join(10)
        with pytest.raises(FaxFileError, match="converter process died"):
            await converter.convert(root / G3, root=root)
        assert converter.worker_deaths == 1
        doc = await converter.convert(root / G3, root=root)
        assert doc.pages == 2
    finally:
        converter.close()


_CHILD = """
import asyncio, sys, time
from pathlib import Path
from clickphone_agi.adapters.fax import FaxConverter

async def main():
    converter = FaxConverter()
    root = Path(sys.argv[1])
    await converter.convert(root / "received-g3.tif", root=root)
    (worker,) = converter._pool._processes.values()
    print(worker.pid, flush=True)
    time.sleep(60)

if __name__ == "__main__":
    asyncio.run(main())
"""


async def test_a_daemon_killed_outright_takes_its_converter_worker_with_it(root: Path, tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the worker used to live on, holding the daemon's stdout open, and
    the chaos test's harness waited for that pipe to close until its timeout."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), str(root), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    worker = int((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
    os.kill(worker, 0)  # alive
    proc.kill()
    await proc.wait()
    assert await asyncio.wait_for(proc.stdout.read(), 10) == b""  # the pipe closes: nobody else holds it
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        os.kill(worker, 9)
        pytest.fail("the converter worker outlived the process that started it")


def test_the_converter_starts_where_seccomp_refuses_its_memory_cap_and_nice() -> None:
    """The shipped unit's SystemCallFilter=~@resources answers setrlimit/setpriority with EPERM:
    the worker's start-up must go on without them, or every fax would go without its PDF."""
    script = (
        "import errno, os, resource\n"
        "def refused(*_a):\n"
        "    raise PermissionError(errno.EPERM, 'Operation not permitted')\n"
        "resource.setrlimit = refused\n"
        "os.nice = refused\n"
        "from clickphone_agi.adapters.fax import _converter_init\n"
        "_converter_init(1 << 30, os.getppid())\n"
        "print('started')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "started"), done.stderr
