"""Tail Asterisk's ``cdr_csv`` Master.csv to recover the CDRs an AMI gap lost.

Asterisk drops a slow AMI client and never replays, but every CDR still reaches the CDR backends.
After any AMI disconnect and at start-up the daemon reads Master.csv from a saved
:class:`CsvPosition` with :meth:`MasterCsvTailer.read_new` (synchronous: run it in a thread) and
feeds the events through the same idempotent processing as AMI ``Cdr`` events. A row's key is the
AMI twin's key, so a CDR seen on both paths counts once.

How the file is read:

* A position is ``(inode, byte offset)`` just after the last consumed record. Only COMPLETE
  records are consumed: Asterisk appends each record (at most 1 KiB, ``char buf[1024]`` in
  ``cdr_csv.c``) with one ``fputs`` and ends it with ``\\n``; a quoted field may hold a raw CR/LF
  (hostile caller names), so a record ends at the first LF outside double quotes. A last record
  without its LF is being written: it is left for the next call.
* Record boundaries are found on the BYTES, each complete record is parsed with :mod:`csv` on its
  latin-1 text (one character per byte) and each field is then decoded like an AMI header value
  (UTF-8, else latin-1: :func:`clickphone_agi.adapters.ami.protocol.decode_text`), so a multi-byte
  character split between two reads survives and the key fields decode exactly as on AMI.
* Rotation, logrotate ``create`` mode (the default): Master.csv is renamed (Master.csv.1) and a
  new Master.csv created. A saved inode that is no longer Master.csv is looked up among the plain
  (uncompressed) regular files matching ``rotated_glob`` in Master.csv's own directory; its
  remainder is read, then every plain sibling modified since (a second rotation during the gap),
  oldest first, then the new Master.csv from 0. logrotate must use ``delaycompress`` so the
  just-rotated file is still plain; with ``dateext`` pass ``rotated_glob="Master.csv-*"``. If no
  sibling has the inode, Master.csv is read from 0 and a possible gap is reported.
* Rotation, ``copytruncate``: the same inode becomes shorter than the saved offset (or the byte
  before the offset is no longer a record end because the file regrew): it is read again from 0
  and this is reported. copytruncate can lose records written between the copy and the
  truncation; prefer ``create`` mode.
* Bounded work: at most ``max_bytes`` are consumed per call (one record longer than that is still
  read whole); call again until :attr:`CsvBatch.at_end`.
* A malformed row is reported in :attr:`CsvBatch.errors` as ``file:line (byte N): reason`` and
  skipped. An unterminated record longer than ``max_record_bytes`` that is followed by more data
  (a write cut short by a crash or a full disk, with later records glued to it) is skipped up to
  the next line that starts a record, and reported.

Known limit: an inode number can be reused once its file is deleted; a position saved before the
file was rotated past the retention and deleted could then match an unrelated new Master.csv.
The byte-before-offset check catches most such cases; otherwise duplicates are harmless (keys)
but rows before the offset would be skipped. Keep the daemon's downtime below the retention.
"""

from __future__ import annotations

import csv
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import structlog

from clickphone_agi.adapters.ami.protocol import decode_text
from clickphone_agi.domain.cdr_csv import CsvRowError, call_ended_from_csv
from clickphone_agi.domain.events import CallEnded

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "CsvBatch",
    "CsvPosition",
    "MasterCsvTailer",
]

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_RECORD_BYTES = 8192  # Asterisk's own records are < 1 KiB
MAX_ERRORS_PER_BATCH = 100

# One complete record: anything but a quote or LF, or a quoted run (LF allowed inside; a doubled
# quote is two adjacent runs), then the LF that ends it. Possessive: no backtracking.
_RECORD = re.compile(rb'(?:[^"\n]++|"[^"]*+")*+\n')
_RESYNC = re.compile(rb'\n(?=")')  # every cdr_csv record starts with the quoted accountcode
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".lzo", ".z", ".zip", ".br", ".7z")
_COMPRESSED_MAGIC = (
    b"\x1f\x8b",  # gzip
    b"\x1f\x9d",  # compress
    b"BZh",  # bzip2
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\x04\x22\x4d\x18",  # lz4
    b"\x89LZO",  # lzop
    b"PK\x03\x04",  # zip
    b"7z\xbc\xaf",  # 7z
)
_LINE_COUNT_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class CsvPosition:
    """Where to resume: the file's inode and the byte offset just after the last consumed record.

    ``inode == 0`` means "no Master.csv existed yet": resume at the start of whatever file is
    there next time.
    """

    inode: int
    offset: int

    def __post_init__(self) -> None:
        if self.inode < 0 or self.offset < 0:
            raise ValueError(f"a Master.csv position is two non-negative integers, got {self.inode}:{self.offset}")

    def to_text(self) -> str:
        return f"{self.inode}:{self.offset}"

    @classmethod
    def from_text(cls, text: str) -> CsvPosition:
        inode, sep, offset = text.strip().partition(":")
        if not sep or not (inode.isascii() and inode.isdigit() and offset.isascii() and offset.isdigit()):
            raise ValueError(f"not a Master.csv position 'inode:offset': {text[:60]!r}")
        return cls(int(inode), int(offset))


@dataclass(frozen=True)
class CsvBatch:
    """One :meth:`MasterCsvTailer.read_new` result.

    ``events`` are in file order; ``errors`` are skipped rows (``file:line (byte N): reason``) and
    file-level problems, for the caller to log; ``gap_suspected`` is set when some CDRs may be
    missing for good (unknown inode, truncation): log it loudly. ``position`` is where to resume;
    ``at_end`` is False when ``max_bytes`` stopped the call early: call again.
    """

    events: list[CallEnded]
    errors: list[str]
    position: CsvPosition
    at_end: bool
    gap_suspected: bool = False


@dataclass
class _File:
    path: Path
    fd: int
    inode: int
    size: int
    mtime_ns: int


@dataclass
class _Run:
    """The state of one read_new call."""

    budget: int
    events: list[CallEnded] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    suppressed: int = 0
    gap: bool = False

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_PER_BATCH:
            self.errors.append(message)
        else:
            self.suppressed += 1

    def batch(self, position: CsvPosition, *, at_end: bool) -> CsvBatch:
        errors = list(self.errors)
        if self.suppressed:
            errors.append(f"... and {self.suppressed} more Master.csv errors in this batch")
        return CsvBatch(self.events, errors, position, at_end, self.gap)


@dataclass(frozen=True)
class _Outcome:
    offset: int
    state: Literal["done", "budget", "waiting"]


class _Lines:
    """Physical line number of a byte offset, counted lazily (only when a row is reported)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._offset = 0
        self._line = 1

    def at(self, offset: int) -> int:
        if offset < self._offset:
            self._offset, self._line = 0, 1
        while self._offset < offset:
            chunk = os.pread(self._fd, min(_LINE_COUNT_CHUNK, offset - self._offset), self._offset)
            if not chunk:
                break
            self._line += chunk.count(b"\n")
            self._offset += len(chunk)
        return self._line


class MasterCsvTailer:
    """Reads the CDRs appended to Master.csv since a saved position, across logrotate rotations."""

    def __init__(
        self,
        path: Path,
        *,
        system_name: str,
        timezone: ZoneInfo,
        gmt: bool = False,
        rotated_glob: str = "Master.csv.*",
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        settle_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``gmt``: cdr.conf ``[csv] usegmtime=yes``. ``rotated_glob``: a file-name pattern (no
        directory part) for the rotated siblings in Master.csv's directory. ``settle_seconds``: how
        long an unterminated last record in a just-rotated file is waited for before it is reported
        and skipped (Asterisk may still be finishing a write it started before the rename)."""
        if not rotated_glob or "/" in rotated_glob or os.sep in rotated_glob or rotated_glob in {".", ".."}:
            raise ValueError(f"rotated_glob must be a file-name pattern without a directory: {rotated_glob!r}")
        if max_bytes < 1 or max_record_bytes < 1:
            raise ValueError("max_bytes and max_record_bytes must be positive")
        self._path = path
        self._system_name = system_name
        self._timezone = timezone
        self._gmt = gmt
        self._rotated_glob = rotated_glob
        self._max_bytes = max_bytes
        self._max_record_bytes = max_record_bytes
        self._settle_seconds = settle_seconds
        self._clock = clock
        self._told_no_linkedid = False

    @property
    def path(self) -> Path:
        return self._path

    def read_new(self, position: CsvPosition | None, *, max_bytes: int | None = None) -> CsvBatch:
        """Complete records after ``position`` (None: from the start of the current Master.csv).

        Blocking file I/O: call it in a worker thread. Raises OSError only for a Master.csv that
        exists but cannot be read (permissions): the caller should log it and retry later.
        """
        run = _Run(budget=self._max_bytes if max_bytes is None else max_bytes)
        if run.budget < 1:
            raise ValueError("max_bytes must be positive")
        files: list[_File] = []
        try:
            current = self._open(self._path, follow=True)
            if current is not None:
                files.append(current)
            offset = 0
            if position is not None and position.inode != 0:
                if current is not None and current.inode == position.inode:
                    offset = self._resume_offset(run, current, position.offset)
                else:
                    chain = self._rotated_chain(position.inode, current)
                    if chain:
                        files[:0] = chain
                        offset = self._resume_offset(run, chain[0], position.offset)
                    else:
                        run.gap = True
                        run.error(
                            f"{self._path}: possible gap: the saved position (inode {position.inode}, "
                            f"byte {position.offset}) is not {self._path.name} and matches no plain file "
                            f"{self._rotated_glob!r} beside it (logrotate needs delaycompress); CDRs written "
                            f"to that file after that byte cannot be recovered from here; reading "
                            f"{self._path.name} from the start"
                        )
            for index, file in enumerate(files):
                outcome = self._consume(run, file, offset if index == 0 else 0, rotated=file is not current)
                if outcome.state != "done":
                    at_end = outcome.state == "waiting"
                    return run.batch(CsvPosition(file.inode, outcome.offset), at_end=at_end)
            if current is None:
                return run.batch(CsvPosition(0, 0), at_end=True)
            return run.batch(CsvPosition(current.inode, current.size), at_end=True)
        finally:
            for file in files:
                os.close(file.fd)

    # -- files -----------------------------------------------------------------------------

    def _open(self, path: Path, *, follow: bool) -> _File | None:
        # O_NONBLOCK: a FIFO swapped in under the name must not hang the open (no effect on files)
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path}: not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return _File(path, fd, st.st_ino, st.st_size, st.st_mtime_ns)

    def _rotated_chain(self, inode: int, current: _File | None) -> list[_File]:
        """The rotated file holding ``inode``, then every plain sibling written since, oldest first."""
        candidates = self._plain_siblings(current)
        saved = next((c for c in candidates if c[1].st_ino == inode), None)
        if saved is None:
            return []
        later = sorted(
            (c for c in candidates if c is not saved and c[1].st_mtime_ns >= saved[1].st_mtime_ns),
            key=lambda c: (c[1].st_mtime_ns, c[0].name),
        )
        chain: list[_File] = []
        try:
            for index, (path, st) in enumerate([saved, *later]):
                try:
                    file = self._open(path, follow=False)
                except OSError:
                    continue
                if file is None:
                    continue
                chain.append(file)
                if file.inode != st.st_ino or (index > 0 and self._compressed(file)):
                    chain.pop()
                    os.close(file.fd)
        except BaseException:
            for file in chain:
                os.close(file.fd)
            raise
        if not chain or chain[0].inode != inode:  # renamed away between lstat and open
            for file in chain:
                os.close(file.fd)
            return []
        return chain

    def _plain_siblings(self, current: _File | None) -> list[tuple[Path, os.stat_result]]:
        """Regular files (not symlinks, not compressed by name) matching the glob beside Master.csv."""
        directory = self._path.parent
        found: list[tuple[Path, os.stat_result]] = []
        for path in sorted(directory.glob(self._rotated_glob)):
            if path.parent != directory or path.name.lower().endswith(_COMPRESSED_SUFFIXES):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (current is None or st.st_ino != current.inode):
                found.append((path, st))
        return found

    @staticmethod
    def _compressed(file: _File) -> bool:
        head = os.pread(file.fd, 8, 0)
        return any(head.startswith(magic) for magic in _COMPRESSED_MAGIC)

    def _resume_offset(self, run: _Run, file: _File, offset: int) -> int:
        """The saved offset, or 0 if the file no longer fits it (copytruncate)."""
        if offset > file.size:
            run.gap = True
            run.error(
                f"{file.path}: the file is shorter ({file.size} bytes) than the saved offset {offset}: "
                f"truncated (logrotate copytruncate?); reading it again from the start; records "
                f"written between the copy and the truncation may be missing"
            )
            return 0
        if offset > 0 and os.pread(file.fd, 1, offset - 1) != b"\n":
            run.gap = True
            run.error(
                f"{file.path}: the saved offset {offset} is no longer just after a record (the file "
                f"was rewritten: copytruncate and regrown?); reading it again from the start"
            )
            return 0
        return offset

    # -- records ---------------------------------------------------------------------------

    def _consume(self, run: _Run, file: _File, offset: int, *, rotated: bool) -> _Outcome:
        """Consume complete records of ``file`` from ``offset`` within the run's byte budget."""
        lines = _Lines(file.fd)
        while True:
            if offset >= file.size:
                return _Outcome(offset, "done")
            if run.budget <= 0:
                return _Outcome(offset, "budget")
            data = self._read(file, offset, min(file.size - offset, run.budget))
            consumed = 0
            while consumed < run.budget and (match := _RECORD.match(data, consumed)) is not None:
                self._record(run, file, lines, offset + consumed, match.group())
                consumed = match.end()  # the record that crosses the budget is still taken whole
            tail = len(data) - consumed
            at_eof = offset + len(data) >= file.size
            if tail and consumed < run.budget and (at_eof or consumed == 0):
                skip = self._unterminated(run, file, lines, offset + consumed, data[consumed:], rotated=rotated)
                if skip is None:
                    run.budget -= consumed
                    return _Outcome(offset + consumed, "waiting")
                consumed += skip
            run.budget -= consumed
            offset += consumed

    def _read(self, file: _File, offset: int, want: int) -> bytes:
        """``want`` bytes, grown until they hold one whole record (or EOF, or a corrupt record)."""
        while True:
            data = os.pread(file.fd, want, offset)
            grown = min(file.size - offset, max(2 * want, self._max_record_bytes + 1))
            if len(data) < want or grown <= want or _RECORD.match(data) is not None:
                return data
            if len(data) > self._max_record_bytes:
                return data
            want = grown

    def _unterminated(
        self, run: _Run, file: _File, lines: _Lines, start: int, tail: bytes, *, rotated: bool
    ) -> int | None:
        """Bytes at ``start`` that do not end a record: None to wait for them, else how many to skip."""
        at_eof = start + len(tail) >= file.size
        if len(tail) > self._max_record_bytes:
            cut = self._resync(file, start, tail)
            if cut:
                run.error(
                    f"{file.path}:{lines.at(start)} (byte {start}): {cut} bytes without a complete record "
                    f"(a write cut short?) skipped up to the next record"
                )
                return cut
            # no LF at all up to the end of the file: like an unterminated last record
        elif not at_eof:
            return None  # a short read: the file changed under us; look again next time
        if not rotated:
            return None  # Asterisk is still writing it
        if self._clock() - file.mtime_ns / 1e9 < self._settle_seconds:
            return None  # Asterisk may still be finishing a write started before the rename
        run.error(
            f"{file.path}:{lines.at(start)} (byte {start}): the rotated file ends in an unterminated "
            f"record of {file.size - start} bytes; skipped"
        )
        return file.size - start

    @staticmethod
    def _resync(file: _File, start: int, tail: bytes) -> int:
        """Bytes from ``start`` to just after the LF that most likely ends the corrupt run, 0 if none."""
        match = _RESYNC.search(tail)
        if match is not None:
            return match.end()
        newline = tail.find(b"\n")
        if newline != -1:
            return newline + 1
        offset = start + len(tail)
        while offset < file.size:
            chunk = os.pread(file.fd, min(_LINE_COUNT_CHUNK, file.size - offset), offset)
            if not chunk:
                break
            newline = chunk.find(b"\n")
            if newline != -1:
                return offset + newline + 1 - start
            offset += len(chunk)
        return 0

    def _record(self, run: _Run, file: _File, lines: _Lines, start: int, record: bytes) -> None:
        body = record[:-1]
        if not body.strip(b"\r"):
            return  # a blank line carries nothing
        try:
            row = next(csv.reader([body.decode("latin-1")], strict=True))
            fields = [decode_text(value.encode("latin-1")) for value in row]
            event = call_ended_from_csv(fields, system_name=self._system_name, timezone=self._timezone, gmt=self._gmt)
        except (csv.Error, CsvRowError, StopIteration) as exc:
            run.error(f"{file.path}:{lines.at(start)} (byte {start}): {exc}")
            return
        if event.linked_id is None and not self._told_no_linkedid:
            self._told_no_linkedid = True  # once per tailer: the layout is the file's, not the row's
            log.warning(
                "cdr_csv.no_linkedid",
                path=str(file.path),
                note="cdr.conf [csv] newcdrcolumns=yes adds the linkedid that groups a call's CDRs; without"
                " it, calls missed while AMI was down are recovered and charged but not mailed as missed",
            )
        run.events.append(event)
