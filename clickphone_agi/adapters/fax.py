"""Received fax TIFFs → PDF for the subscriber's mail; the dialplan's result sidecars; the spool scan.

Conversion (:func:`tiff_to_pdf`) uses img2pdf, which never re-samples: every TIFF page becomes one
PDF page holding the page's bilevel image as a ``/CCITTFaxDecode`` stream. A CCITT G4 page with one
strip is copied byte for byte (bits reversed for ``FillOrder=2``); any other page (ReceiveFAX
writes G3, 2-D, ``FillOrder=2``) is decoded by Pillow/libtiff and re-encoded as G4, which is
lossless for 1-bit images (verified pixel for pixel in the tests) and about half the size.

Resolution. Fax pixels are not square: fine is 204x196 dpi, standard 204x98 dpi (a standard page
has half the rows of a fine one). The page size is computed here, per page and per axis, as
``pixels / dpi x 72`` points, and handed to img2pdf through ``layout_fun`` so its own defaults
never apply:

* ``XResolution``/``YResolution`` with ``ResolutionUnit`` inch (2, also the TIFF default when the
  unit tag is absent) or centimetre (3, x 2.54) are used as they are, if within 20..2400 dpi;
* otherwise (tags missing, unit "none", absurd values) the resolution is ASSUMED: 204x196 for the
  T.4 fax widths 1728/2048/2432 px (A4/B4/A3 at 8 dots/mm: every fax machine's fine mode), and for
  any other width square pixels sized so the page is A4-wide (8.27 in). The assumption is logged.

Without this, img2pdf would use 96 dpi for a TIFF lacking the tags (a 1728 px page would be
18 in wide) and Pillow's (1, 1) for one with unit "none".

Limits and safety: the TIFF is opened like the voicemail spool's files
(:func:`clickphone_agi.adapters.spool.open_under_root`: inside ``root``, no symlink anywhere,
regular file, size checked on the descriptor), at most ``max_bytes`` are read, page count and
pixels per page are capped before anything is decoded (Pillow's lazy open reads only headers),
and every failure (not a TIFF, truncated, too large, refused) is a :class:`FaxFileError`.
A TIFF whose sidecar has no ``end=1`` may still be being written: convert only complete ones.

Sidecar (:func:`read_sidecar`): ``<fax>.tif.result``, written by ``dialplan/clickphone-fax.conf``'s
hangup handler, ``key=value`` per line, ``end=1`` last. Values are already ``FILTER()``-ed by the
dialplan and cleaned again here.

Everything here is blocking. The daemon converts through :class:`FaxConverter`, in a process of
its own: decoding is CPU under the GIL (the G3 sample ~0.1 s, 30 such pages ~1.1 s), which in a
thread stretched the event loop's turns to 16-18 ms for as long, and the file comes from a
stranger's fax machine, so Pillow's C decoders parse it under a memory cap where a crash fails
that fax, not the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import img2pdf
import structlog
from PIL import Image, TiffImagePlugin, UnidentifiedImageError

from clickphone_agi.adapters.spool import SpoolError, SpoolPathError, open_under_root, read_capped
from clickphone_agi.domain.ami_translate import clean_text

__all__ = [
    "MAX_FAX_BYTES",
    "FaxConverter",
    "FaxDocument",
    "FaxFile",
    "FaxFileError",
    "FaxSidecar",
    "read_sidecar",
    "scan_fax_spool",
    "tiff_to_pdf",
]

log = structlog.get_logger(__name__)

MAX_FAX_BYTES: Final = 20 * 1024 * 1024
MAX_PAGES: Final = 500
MAX_PAGE_PIXELS: Final = 40_000_000  # A3 at 408 dpi is 4864 x 6750 ≈ 33 M; under Pillow's bomb warning
MAX_SIDECAR_BYTES: Final = 8 * 1024

FAX_WIDTHS: Final = frozenset({1728, 2048, 2432})  # T.4 A4/B4/A3 at 8 dots/mm (204 dpi)
FAX_FINE_DPI: Final = (204.0, 196.0)
_A4_WIDTH_INCHES: Final = 8.27
_MIN_DPI: Final = 20.0
_MAX_DPI: Final = 2400.0
_RESUNIT_INCH: Final = 2
_RESUNIT_CM: Final = 3

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,254}")
_MAX_DEPTH: Final = 8
_FAX_SUFFIXES: Final = (".tif", ".tiff")
_SIDECAR_SUFFIXES: Final = (".tif.result", ".tiff.result")
_RESOLUTION_RE: Final = re.compile(r"([0-9]{1,7})x([0-9]{1,7})")
_COUNT_RE: Final = re.compile(r"[0-9]{1,9}")


class FaxFileError(SpoolError):
    """A fax file that cannot be used: refused path, missing, too large, not a (readable) TIFF."""


@dataclass(frozen=True)
class FaxDocument:
    pdf: bytes
    pages: int
    dpi: tuple[tuple[int, int], ...]  # per page, (x, y) as used for the page size (rounded)


@dataclass(frozen=True)
class FaxSidecar:
    """The hangup handler's ``<fax>.tif.result`` (complete: it ended with ``end=1``), cleaned."""

    direction: str  # "receive" | "send"
    status: str  # FAXSTATUS: SUCCESS | FAILED
    error: str
    statusstr: str
    pages: int | None
    rate: int | None
    resolution: str  # FAXRESOLUTION as written, pixels per metre: "8031x7700"
    local: str
    remote: str
    account: str
    uniqueid: str
    linkedid: str

    @property
    def resolution_dpi(self) -> tuple[int, int] | None:
        """``8031x7700`` pixels per metre → ``(204, 196)``; ``None`` when empty or zero."""
        match = _RESOLUTION_RE.fullmatch(self.resolution)
        if match is None:
            return None
        x, y = int(match.group(1)), int(match.group(2))
        return None if x == 0 or y == 0 else (round(x * 0.0254), round(y * 0.0254))


@dataclass(frozen=True)
class FaxFile:
    path: Path
    sidecar: FaxSidecar | None  # None: no sidecar yet, incomplete, or refused
    written_at: datetime | None = None
    """The sidecar's mtime (UTC): its ``end=1`` line is written when the fax call hangs up, so
    this is when the fax ended (it holds no time of its own). ``None`` without a sidecar."""


# -- path safety ---------------------------------------------------------------------------------


def _relative_parts(path: Path, root: Path) -> tuple[str, ...]:
    """``path``'s components below ``root`` (lexically, against the root as configured or resolved),
    each a plain file name; a relative ``path`` not starting with ``root`` is taken relative to it."""
    for base in (root, root.resolve()):
        if path.is_relative_to(base):
            parts = path.relative_to(base).parts
            break
    else:
        if path.is_absolute():
            raise FaxFileError(f"{str(path)[:300]}: not under the fax spool {root}, refused")
        parts = path.parts
    if not parts or len(parts) > _MAX_DEPTH or not all(_NAME_RE.fullmatch(p) for p in parts):
        raise FaxFileError(f"{str(path)[:300]}: unexpected file name below {root}, refused")
    return tuple(parts)


def _read_file(root: Path, parts: Sequence[str], max_bytes: int, what: str) -> bytes | None:
    """``None`` if missing; :class:`FaxFileError` if refused or over ``max_bytes``."""
    shown = root.joinpath(*parts)
    try:
        fd = open_under_root(root, parts)
    except FileNotFoundError:
        return None
    except SpoolPathError as e:
        log.warning("fax_file_refused", path=str(shown), reason=str(e))
        raise FaxFileError(str(e)) from None
    except OSError as e:
        raise FaxFileError(f"{shown}: {e.strerror}") from None
    try:
        data = read_capped(fd, max_bytes)
    except OSError as e:
        raise FaxFileError(f"{shown}: {e.strerror}") from None
    finally:
        os.close(fd)
    if data is None:
        raise FaxFileError(f"{shown}: {what} larger than {max_bytes} bytes, refused")
    return data


# -- TIFF → PDF ----------------------------------------------------------------------------------


def tiff_to_pdf(path: Path, *, root: Path, max_bytes: int = MAX_FAX_BYTES, max_pages: int = MAX_PAGES) -> FaxDocument:
    """Convert the fax TIFF at ``path`` (inside ``root``) to a PDF, one page per TIFF page, each
    page sized from its own resolution. :class:`FaxFileError` for anything unusable."""
    parts = _relative_parts(path, root)
    data = _read_file(root, parts, max_bytes, "TIFF")
    if data is None:
        raise FaxFileError(f"{root.joinpath(*parts)}: missing")
    shown = root.joinpath(*parts)
    try:
        dpis, assumed = _page_resolutions(data, max_pages)
        pdf = _convert(data, dpis)
    except FaxFileError as e:
        raise FaxFileError(f"{shown}: {e}") from None
    except UnidentifiedImageError:
        raise FaxFileError(f"{shown}: not a TIFF image (or its first directory is missing)") from None
    except (
        OSError,
        ValueError,
        SyntaxError,  # Pillow's TIFF parser signals some corrupt headers this way
        EOFError,
        TypeError,
        KeyError,
        IndexError,
        ZeroDivisionError,
        Image.DecompressionBombError,
        img2pdf.ImageOpenError,
        img2pdf.AlphaChannelError,
        # Pillow warns ("Corrupt EXIF data", "Truncated File Read") about broken TIFFs: harmless
        # with the default filters, but a Warning raised under -W error is still a bad file here.
        # (warnings.catch_warnings is not used: it is not thread-safe on 3.11 and this runs in a
        # worker thread.)
        Warning,
    ) as e:
        raise FaxFileError(f"{shown}: not a usable fax TIFF ({type(e).__name__}: {str(e)[:200]})") from None
    if assumed:
        log.info("fax_resolution_assumed", path=str(shown), pages=assumed)
    return FaxDocument(pdf=pdf, pages=len(dpis), dpi=tuple((round(x), round(y)) for x, y in dpis))


CONVERTER_MEMORY: Final = 1 << 30
"""Address space the converter process may use (bytes): pages are capped in pixels before they are
decoded, so a fax needs far less; this bounds what a decoder bug could take."""
_PARENT_POLL: Final = 0.5  # seconds between the converter process's looks at its parent
CONVERTER_TASKS: Final = 100
"""Conversions before the converter process is replaced (whatever a decoder leaks goes with it)."""


def _converter_init(memory: int, daemon: int) -> None:
    """In the converter process: die with the daemon, cap its memory, give the daemon the CPU first.

    A daemon killed outright (SIGKILL, the OOM killer) runs no cleanup: its worker would live on,
    holding the daemon's stdout and stderr open, so whoever reads them (a supervisor's pipe) never
    sees them close. A thread here watches the parent and ends the process within half a second
    of the daemon's death. (Not prctl(PR_SET_PDEATHSIG) through ctypes: importing ctypes makes a
    callback, which MemoryDenyWriteExecute=yes in the shipped unit may refuse.)"""
    import resource
    import threading

    def watch() -> None:
        while os.getppid() == daemon:
            time.sleep(_PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="fax-parent-watch", daemon=True).start()
    # defence in depth, not a condition: the shipped unit's seccomp filter (~@resources) refuses
    # the nice (setpriority: EPERM) and, on a libc that calls setrlimit rather than prlimit64,
    # the cap; the conversion goes on without either. Under systemd 252 with glibc the cap holds
    # and the nice is refused (tests/systemd_boot/run.sh)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    with contextlib.suppress(OSError):
        os.nice(10)


class FaxConverter:
    """:func:`tiff_to_pdf` in a worker process of its own, started at the first fax (see the module
    doc for why). Every failure is a :class:`FaxFileError`; a worker that died (out of memory, a
    decoder crash) fails that fax and is replaced for the next one."""

    def __init__(self, *, memory: int = CONVERTER_MEMORY, tasks: int = CONVERTER_TASKS) -> None:
        self._memory = memory
        self._tasks = tasks
        self._pool: ProcessPoolExecutor | None = None
        self.conversions = 0
        self.worker_deaths = 0

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the daemon has threads (SQLite's writer, the WAL sync), and a fork
            # copies their locks in whatever state they are
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_converter_init,
                initargs=(self._memory, os.getpid()), max_tasks_per_child=self._tasks,
            )  # fmt: skip
        return self._pool

    async def convert(self, path: Path, *, root: Path) -> FaxDocument:
        pool = self._started()
        try:
            doc = await asyncio.get_running_loop().run_in_executor(pool, _convert_file, path, root)
        except FaxFileError:
            raise
        except BrokenProcessPool:
            self.worker_deaths += 1
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            died = "the converter process died on it (out of memory, or a decoder crash)"
            raise FaxFileError(f"{path}: {died}") from None
        except MemoryError:
            raise FaxFileError(f"{path}: needs more than {self._memory} bytes of memory to convert") from None
        self.conversions += 1
        return doc

    def close(self) -> None:
        """Stop the worker process (a conversion under way is abandoned)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _convert_file(path: Path, root: Path) -> FaxDocument:
    """What the converter process runs (a module-level function: it is pickled by name)."""
    return tiff_to_pdf(path, root=root)


def _page_resolutions(data: bytes, max_pages: int) -> tuple[list[tuple[float, float]], list[int]]:
    """Per page ``(x_dpi, y_dpi)`` and the 1-based numbers of the pages whose dpi was assumed.

    Reads only the TIFF directories (Pillow decodes nothing until asked)."""
    dpis: list[tuple[float, float]] = []
    assumed: list[int] = []
    with Image.open(io.BytesIO(data), formats=["TIFF"]) as im:
        index = 0
        while True:
            try:
                im.seek(index)
            except EOFError:
                break
            if index >= max_pages:
                raise FaxFileError(f"more than {max_pages} pages, refused")
            width, height = im.size
            if width <= 0 or height <= 0 or width * height > MAX_PAGE_PIXELS:
                raise FaxFileError(f"page {index + 1}: {width}x{height} pixels, refused")
            dpi = _tiff_dpi(im)
            if dpi is None:
                dpi = _assumed_dpi(width)
                assumed.append(index + 1)
            dpis.append(dpi)
            index += 1
    if not dpis:
        raise FaxFileError("no pages")
    return dpis, assumed


def _tiff_dpi(im: Image.Image) -> tuple[float, float] | None:
    tags = getattr(im, "tag_v2", None)
    if not isinstance(tags, TiffImagePlugin.ImageFileDirectory_v2):
        return None
    try:
        x = float(tags[TiffImagePlugin.X_RESOLUTION])
        y = float(tags[TiffImagePlugin.Y_RESOLUTION])
        unit = int(tags.get(TiffImagePlugin.RESOLUTION_UNIT, _RESUNIT_INCH))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if unit == _RESUNIT_CM:
        x, y = x * 2.54, y * 2.54
    elif unit != _RESUNIT_INCH:
        return None  # "no absolute unit": only the aspect is known
    if not (_MIN_DPI <= x <= _MAX_DPI and _MIN_DPI <= y <= _MAX_DPI):
        return None
    return x, y


def _assumed_dpi(width: int) -> tuple[float, float]:
    if width in FAX_WIDTHS:
        return FAX_FINE_DPI
    square = min(max(width / _A4_WIDTH_INCHES, _MIN_DPI), _MAX_DPI)
    return square, square


def _convert(data: bytes, dpis: list[tuple[float, float]]) -> bytes:
    pages = iter(dpis)
    calls = 0

    def layout(width_px: int, height_px: int, _img2pdf_dpi: object) -> tuple[float, float, float, float]:
        nonlocal calls
        calls += 1
        x_dpi, y_dpi = next(pages, FAX_FINE_DPI)
        width_pt, height_pt = width_px * 72.0 / x_dpi, height_px * 72.0 / y_dpi
        return width_pt, height_pt, width_pt, height_pt

    pdf = img2pdf.convert(data, layout_fun=layout, nodate=True, first_frame_only=False)
    if calls != len(dpis):
        raise FaxFileError(f"img2pdf made {calls} pages of {len(dpis)}")
    if not isinstance(pdf, bytes) or not pdf.startswith(b"%PDF-"):
        raise FaxFileError("img2pdf produced no PDF")
    return pdf


# -- sidecar -------------------------------------------------------------------------------------

_SIDECAR_TEXT: Final = {
    "direction": 16,
    "status": 32,
    "error": 200,
    "statusstr": 200,
    "resolution": 32,
    "local": 80,
    "remote": 80,
    "account": 80,
    "uniqueid": 80,
    "linkedid": 80,
}
_SIDECAR_COUNTS: Final = ("pages", "rate")
_MAX_SIDECAR_LINES: Final = 64


def read_sidecar(tif_path: Path, *, root: Path | None = None) -> FaxSidecar | None:
    """Parse ``<tif_path>.result``; ``None`` if absent or incomplete (last line not ``end=1``).

    With ``root`` the sidecar gets the full spool check (inside ``root``, no symlink anywhere);
    without, only its own name is opened with ``O_NOFOLLOW`` (its directory is trusted: pass
    ``root`` for a path taken from an event). :class:`FaxFileError` if refused or larger than
    8 KiB (a real one is ~300 bytes).
    """
    sidecar = tif_path.with_name(tif_path.name + ".result")
    if root is not None:
        parts = _relative_parts(sidecar, root)
        data = _read_file(root, parts, MAX_SIDECAR_BYTES, "sidecar")
    else:
        if not _NAME_RE.fullmatch(sidecar.name):
            raise FaxFileError(f"{str(sidecar)[:300]}: unexpected file name, refused")
        data = _read_file(sidecar.parent, (sidecar.name,), MAX_SIDECAR_BYTES, "sidecar")
    return None if data is None else parse_sidecar(data)


def parse_sidecar(data: bytes) -> FaxSidecar | None:
    """The sidecar's bytes → :class:`FaxSidecar`, ``None`` when it does not end with ``end=1``.

    Unknown keys and lines without ``=`` are ignored, a repeated key's last value wins, text
    values are cleaned (control characters, ``=?``) and bounded, counts that are not plain
    numbers become ``None``.
    """
    text = data[:MAX_SIDECAR_BYTES].decode("utf-8", errors="replace")
    lines = [line.removesuffix("\r").strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if not lines or lines[-1] != "end=1" or len(lines) > _MAX_SIDECAR_LINES:
        return None
    fields: dict[str, str] = {}
    for line in lines[:-1]:
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if sep and (key in _SIDECAR_TEXT or key in _SIDECAR_COUNTS):
            fields[key] = value.strip()
    text_values = {key: clean_text(fields.get(key, ""), limit) for key, limit in _SIDECAR_TEXT.items()}
    return FaxSidecar(
        direction=text_values["direction"],
        status=text_values["status"],
        error=text_values["error"],
        statusstr=text_values["statusstr"],
        pages=_count(fields.get("pages", "")),
        rate=_count(fields.get("rate", "")),
        resolution=text_values["resolution"],
        local=text_values["local"],
        remote=text_values["remote"],
        account=text_values["account"],
        uniqueid=text_values["uniqueid"],
        linkedid=text_values["linkedid"],
    )


def _count(raw: str) -> int | None:
    return int(raw) if _COUNT_RE.fullmatch(raw) else None


# -- spool scan ----------------------------------------------------------------------------------


def scan_fax_spool(root: Path) -> list[FaxFile]:
    """The ``*.tif``/``*.tiff`` regular files directly under ``root`` (no recursion; symlinks and
    odd names skipped and reported), sorted by name, each with its sidecar if complete. For the
    start-up scan that finds faxes received while the daemon was down.

    A sidecar whose TIFF does not exist is listed too (its ``path`` names the absent TIFF): a
    reception that failed before the first page leaves no TIFF, only the dialplan's ``.result``,
    and that "fax failed" notice must not be lost because the daemon was down when it happened.
    Each fax with a sidecar has its :attr:`FaxFile.written_at`, for the go-live baseline.
    """
    base = root.resolve()
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        entries = [(e.name, e.is_file(follow_symlinks=False), e.is_symlink()) for e in os.scandir(fd)]
    finally:
        os.close(fd)
    names = {name for name, _, _ in entries}
    found: list[FaxFile] = []
    for name, is_file, is_link in sorted(entries):
        lower = name.lower()
        if lower.endswith(_SIDECAR_SUFFIXES) and name[: -len(".result")] not in names:
            orphan = _orphan_sidecar(base, name, is_file=is_file, is_link=is_link)
            if orphan is not None:
                found.append(orphan)
            continue
        if not lower.endswith(_FAX_SUFFIXES):
            continue
        path = base / name
        if is_link or not is_file or not _NAME_RE.fullmatch(name):
            log.warning("fax_file_refused", path=str(path)[:300], reason="symlink" if is_link else "not a plain file")
            continue
        try:
            sidecar = read_sidecar(path, root=base)
        except FaxFileError as e:
            log.warning("fax_sidecar_refused", path=str(path), reason=str(e))
            sidecar = None
        found.append(FaxFile(path=path, sidecar=sidecar, written_at=_written_at(path) if sidecar else None))
    return sorted(found, key=lambda f: f.path.name)


def _written_at(tif: Path) -> datetime | None:
    """The mtime of ``tif``'s sidecar (just read and checked: a regular file), ``None`` if gone."""
    try:
        st = os.stat(tif.with_name(tif.name + ".result"), follow_symlinks=False)
    except OSError:
        return None
    return datetime.fromtimestamp(st.st_mtime, UTC)


def _orphan_sidecar(base: Path, name: str, *, is_file: bool, is_link: bool) -> FaxFile | None:
    """A complete sidecar without its TIFF, or None (incomplete, refused: reported)."""
    if is_link or not is_file or not _NAME_RE.fullmatch(name):
        log.warning("fax_sidecar_refused", path=str(base / name)[:300], reason="not a plain file")
        return None
    tif = base / name[: -len(".result")]
    try:
        sidecar = read_sidecar(tif, root=base)
    except FaxFileError as e:
        log.warning("fax_sidecar_refused", path=str(base / name), reason=str(e))
        return None
    return None if sidecar is None else FaxFile(path=tif, sidecar=sidecar, written_at=_written_at(tif))
