"""A real full disk for tests: a small tmpfs of its own, filled to the last byte and freed again.

Mounting needs root (CI runs as root; elsewhere the tests that need it skip and say why). SQLite
reuses its WAL file from the start after a checkpoint, so a write fits in a full disk when the
WAL has room left from before: :meth:`FullDisk.fill` first truncates the WAL (``checkpoint``),
so that every write must grow it and fails with SQLITE_FULL until :meth:`FullDisk.free`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class FullDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free byte (the database's WAL must be truncated first, see the module doc)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 1):
                chunk = b"\0" * size
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        assert self.free_bytes() == 0

    def free(self) -> None:
        self.filler.unlink()

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def mounted(path: Path, size: str = "8m") -> Iterator[FullDisk]:
    """A tmpfs of ``size`` at ``path`` (created), unmounted afterwards; skips the test without root."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs of its own: mounting it needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield FullDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
