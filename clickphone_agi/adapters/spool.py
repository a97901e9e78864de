"""Read Asterisk's voicemail spool, safely. Reads only: nothing here writes, renames or deletes.

Layout (``app_voicemail``, file storage): ``<root>/<context>/<mailbox>/<folder>/msgNNNN.<ext>``
with one audio file per configured ``format=`` (``wav`` → ``.wav``, ``wav49`` → ``.WAV``,
``gsm`` → ``.gsm``…) and ``msgNNNN.txt``, the message's metadata, written with ``duration``
last (:mod:`clickphone_agi.domain.voicemail`). The daemon mails messages from ``INBOX`` and
``Urgent``; ``count`` serves the "mailbox nearly full" warning (``maxmsg`` is per folder).

The spool is written by another user (asterisk), paths can come from AMI events, and a
symlink planted there must not make the daemon mail ``/etc/shadow`` to a subscriber. So:

* Names are validated before any path is built: context and mailbox ``[A-Za-z0-9_-]{1,80}``
  (no ``.``, no ``/``: ``..`` cannot appear), folder from a fixed set, message ``msg\\d{4}``.
* The path built from them is resolved and must stay inside ``root.resolve()``.
* It is then opened one component at a time from a descriptor of the root
  (``openat``-style, ``dir_fd=``) with ``O_NOFOLLOW``: a symlink anywhere below the root (a
  message file, or a folder pointing inside or outside the root) fails the open (``ELOOP``)
  and is refused and reported, never followed, and no check-then-open race is possible.
* Files are opened ``O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK``: ``O_NONBLOCK`` so a
  FIFO planted as ``msg0000.wav`` cannot hang the reader in ``open``; then ``fstat`` on the
  opened descriptor must show a regular file, and the size cap is checked on that descriptor
  and enforced again while reading (a file growing meanwhile is cut off, not read whole).

Listing reports (structlog, ``warning``) and skips what it refuses or cannot parse; direct calls
with hostile names raise :class:`SpoolPathError`. The configured root itself may be a symlink
(the admin's choice): it is resolved once per call.

The helpers :func:`open_under_root` and :func:`read_capped` are shared with
:mod:`clickphone_agi.adapters.fax`. Everything is blocking: call it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog

from clickphone_agi.adapters.ami.protocol import decode_text
from clickphone_agi.domain.voicemail import MAX_TXT_CHARS, VoicemailMeta, VoicemailParseError, parse_message_txt

__all__ = [
    "FOLDERS",
    "MAX_ATTACHMENT_BYTES",
    "Folder",
    "SpoolError",
    "SpoolMessageMoved",
    "SpoolPathError",
    "VoicemailMessage",
    "VoicemailSpool",
    "open_under_root",
    "read_capped",
    "valid_box_name",
]

log = structlog.get_logger(__name__)

Folder = Literal["INBOX", "Urgent"]
FOLDERS: Final[tuple[Folder, ...]] = ("INBOX", "Urgent")
MAX_ATTACHMENT_BYTES: Final = 10 * 1024 * 1024

_BOX_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,80}")
_MSG_TXT_RE: Final = re.compile(r"msg([0-9]{4})\.txt")
_FORMAT_RE: Final = re.compile(r"[A-Za-z0-9]{1,16}")
_FORMAT_EXTENSIONS: Final = {"wav49": "WAV"}  # voicemail.conf format name → file extension
_MAX_TXT_BYTES: Final = MAX_TXT_CHARS  # latin-1 fallback: one character per byte at most

_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECTORY


class SpoolError(Exception):
    """A spool file or path was refused."""


class SpoolPathError(SpoolError):
    """Invalid name, a path outside the root, a symlink, or not a regular file/directory."""


class SpoolMessageMoved(SpoolError):
    """The message is no longer at the number it was listed under (deleted, or renumbered by
    Asterisk after an earlier one was deleted): what that number holds now is not its audio."""


def valid_box_name(name: str) -> bool:
    """A voicemail context or mailbox name that may become a path component."""
    return _BOX_NAME_RE.fullmatch(name) is not None


def _checked_name(kind: str, name: str) -> str:
    if not valid_box_name(name):
        raise SpoolPathError(f"{kind} {name[:100]!r}: expected 1-80 of A-Z a-z 0-9 _ -")
    return name


@contextmanager
def _closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _open_component(name: str, flags: int, dir_fd: int, shown: Path) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SpoolPathError(f"{shown}: is a symlink, refused") from None
        if e.errno == errno.ENOTDIR:
            raise SpoolPathError(f"{shown}: not a directory, refused") from None
        raise


@contextmanager
def _open_dir(root: Path, parts: Sequence[str]) -> Iterator[int]:
    """A descriptor of ``root/parts…``, each component opened without following symlinks.

    ``FileNotFoundError`` when a component is missing; :class:`SpoolPathError` for a symlink or a
    non-directory. ``root`` must already be resolved.
    """
    fd = os.open(root, _DIR_FLAGS)
    try:
        shown = root
        for part in parts:
            shown = shown / part
            next_fd = _open_component(part, _DIR_FLAGS, fd, shown)
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _inside(root: Path, parts: Sequence[str]) -> Path:
    """``root/parts…`` after checking, with symlinks resolved, that it stays inside ``root``."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root):
        raise SpoolPathError(f"{path}: leaves the spool root {root}, refused")
    return path


def open_under_root(root: Path, parts: Sequence[str]) -> int:
    """Open the regular file ``root/parts…`` for reading; the caller closes the descriptor.

    ``parts`` must already be validated names (no ``/``, ``.`` or ``..``). The path is resolved
    and checked against ``root.resolve()``, then opened component by component with
    ``O_NOFOLLOW``; the descriptor must be a regular file (``fstat``). Raises
    ``FileNotFoundError`` when missing and :class:`SpoolPathError` when refused.
    """
    if not parts or any(p in ("", ".", "..") or "/" in p or "\x00" in p for p in parts):
        raise SpoolPathError(f"{list(parts)!r}: invalid path components")
    base = root.resolve()
    path = _inside(base, parts)
    with _open_dir(base, parts[:-1]) as dir_fd:
        fd = _open_component(parts[-1], _FILE_FLAGS, dir_fd, path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpoolPathError(f"{path}: not a regular file, refused")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(fd: int, max_bytes: int) -> bytes | None:
    """The whole file behind ``fd``, or ``None`` if it is (or grows while read) over ``max_bytes``.

    The size is first taken with ``fstat`` on the descriptor itself, then reading stops after
    ``max_bytes + 1`` bytes whatever the file does meanwhile.
    """
    if os.fstat(fd).st_size > max_bytes:
        return None
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        chunk = os.read(fd, min(1024 * 1024, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return None if total > max_bytes else b"".join(chunks)


@dataclass(frozen=True)
class VoicemailMessage:
    """One message whose ``.txt`` exists and parses. ``audio`` is the configured format's file,
    ``None`` when it is missing or was refused (a symlink): the notice then goes without it."""

    context: str
    mailbox: str
    folder: Folder
    number: int  # NNNN of msgNNNN
    meta: VoicemailMeta
    audio: Path | None
    txt: Path

    @property
    def name(self) -> str:
        return f"msg{self.number:04d}"


class VoicemailSpool:
    """Read-only access to ``root`` (``/var/spool/asterisk/voicemail``)."""

    def __init__(
        self, root: Path, *, audio_format: str = "wav", max_attachment_bytes: int = MAX_ATTACHMENT_BYTES
    ) -> None:
        """``audio_format`` is the file extension of the format to attach (``wav``, ``WAV``,
        ``gsm``…; voicemail.conf's ``wav49`` is accepted and means ``WAV``). Case matters:
        ``.wav`` is PCM, ``.WAV`` is GSM in a WAV container."""
        ext = _FORMAT_EXTENSIONS.get(audio_format, audio_format)
        if not _FORMAT_RE.fullmatch(ext):
            raise ValueError(f"audio_format {audio_format!r}: expected a file extension such as wav, WAV, gsm")
        if max_attachment_bytes < 0:
            raise ValueError("max_attachment_bytes must not be negative")
        self.root = root
        self.audio_ext = ext
        self.max_attachment_bytes = max_attachment_bytes

    # -- listing -----------------------------------------------------------------------------

    def boxes(self) -> list[tuple[str, str]]:
        """Every ``(context, mailbox)`` directory under the root, sorted, for the periodic scan.

        Entries with other names (Asterisk's ``tmp``… are below the mailbox, not here) are skipped
        silently; symlinked directories are skipped and reported.
        """
        base = self.root.resolve()
        found: list[tuple[str, str]] = []
        for context in self._subdirs(base, ()):
            found.extend((context, mailbox) for mailbox in self._subdirs(base, (context,)))
        return sorted(found)

    def list_messages(self, context: str, mailbox: str) -> list[VoicemailMessage]:
        """The complete messages in ``INBOX`` and ``Urgent``, by folder then number.

        Asterisk writes the audio first and the ``.txt`` last (``duration`` at its end), so a
        message without a parseable ``.txt`` is not (yet) one: skipped, and reported when the
        ``.txt`` exists but is refused or broken. A missing box or folder gives ``[]``.
        Raises :class:`SpoolPathError` for an invalid context or mailbox name.
        """
        _checked_name("context", context)
        _checked_name("mailbox", mailbox)
        messages: list[VoicemailMessage] = []
        for folder in FOLDERS:
            for number in self._message_numbers(context, mailbox, folder):
                message = self._load(context, mailbox, folder, number)
                if message is not None:
                    messages.append(message)
        return messages

    def message(self, context: str, mailbox: str, folder: Folder, number: int) -> VoicemailMessage | None:
        """One message, ``None`` if it is not there (yet) or broken (reported)."""
        _checked_name("context", context)
        _checked_name("mailbox", mailbox)
        _checked_folder(folder)
        _checked_number(number)
        return self._load(context, mailbox, folder, number)

    def message_at(self, message_file: str | Path) -> VoicemailMessage | None:
        """The message named by a dialplan's ``VM_MESSAGEFILE`` (``<root>/<ctx>/<box>/<folder>/msgNNNN``,
        no extension), e.g. from ``UserEvent: ClickPhoneVoicemail``.

        The hint is trusted for nothing but its four names: it must be absolute, lie lexically
        under the configured or resolved root, and each name must validate; otherwise
        :class:`SpoolPathError`. ``None`` when the message is not there or broken.
        """
        path = Path(message_file)
        if not path.is_absolute() or len(str(path)) > 4096:
            raise SpoolPathError(f"{str(path)[:200]!r}: expected an absolute path under {self.root}")
        rel: tuple[str, ...] | None = None
        for base in (self.root, self.root.resolve()):
            if path.is_relative_to(base):
                rel = path.relative_to(base).parts
                break
        if rel is None or len(rel) != 4:
            raise SpoolPathError(f"{str(path)[:200]!r}: not <context>/<mailbox>/<folder>/msgNNNN under {self.root}")
        context, mailbox, folder, name = rel
        match = re.fullmatch(r"msg([0-9]{4})", name)
        if match is None:
            raise SpoolPathError(f"{name[:100]!r}: expected msgNNNN")
        return self.message(context, mailbox, _checked_folder(folder), int(match.group(1)))

    def count(self, context: str, mailbox: str) -> int:
        """Messages in ``INBOX`` (``msgNNNN.txt`` files, as ``app_voicemail`` counts them)."""
        _checked_name("context", context)
        _checked_name("mailbox", mailbox)
        return len(self._message_numbers(context, mailbox, "INBOX"))

    # -- reading -----------------------------------------------------------------------------

    def read_audio(self, msg: VoicemailMessage) -> bytes | None:
        """The message's audio in the configured format; ``None`` when it is missing or larger
        than ``max_attachment_bytes`` (the notice then says so: if ``msg.audio`` was set, the file
        was too large or vanished). The path is rebuilt from ``msg``'s validated parts, never
        taken from ``msg.audio``. :class:`SpoolPathError` when refused (symlink, invalid names).

        Files are found by number, and Asterisk renumbers a folder when a message in it is
        deleted (``msg0001.*`` becomes ``msg0000.*``). So once the audio is read, the ``.txt`` at
        that number must still name ``msg``'s ``msg_id``, or :class:`SpoolMessageMoved`: the
        bytes (or their absence) belong to another message. (Asterisk renames the audio before
        the ``.txt``: a read between those two renames cannot be told apart.)
        """
        parts = self._parts(
            msg.context, msg.mailbox, msg.folder, f"msg{_checked_number(msg.number):04d}.{self.audio_ext}"
        )
        try:
            fd = open_under_root(self.root, parts)
        except FileNotFoundError:
            self._still_there(msg)
            return None
        except SpoolPathError as e:
            log.warning("voicemail_file_refused", reason=str(e))
            raise
        with _closing_fd(fd):
            data = read_capped(fd, self.max_attachment_bytes)
        self._still_there(msg)
        if data is None:
            log.info(
                "voicemail_audio_too_large",
                context=msg.context,
                mailbox=msg.mailbox,
                message=msg.name,
                max_bytes=self.max_attachment_bytes,
            )
        return data

    # -- internals ---------------------------------------------------------------------------

    def _still_there(self, msg: VoicemailMessage) -> None:
        now = self._load(msg.context, msg.mailbox, msg.folder, msg.number)
        if now is None or now.meta.msg_id != msg.meta.msg_id:
            log.info("voicemail_message_moved", context=msg.context, mailbox=msg.mailbox, message=msg.name)
            raise SpoolMessageMoved(
                f"{msg.mailbox}@{msg.context} {msg.folder}/{msg.name}: no longer the message listed"
            )

    def _parts(self, context: str, mailbox: str, folder: str, filename: str) -> tuple[str, str, str, str]:
        return (_checked_name("context", context), _checked_name("mailbox", mailbox), _checked_folder(folder), filename)

    def _subdirs(self, base: Path, parts: tuple[str, ...]) -> list[str]:
        try:
            with _open_dir(base, parts) as fd:
                entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in os.scandir(fd)]
        except (FileNotFoundError, SpoolPathError):
            return []  # a refused symlink was reported by the parent's listing
        except OSError as e:
            log.warning("voicemail_dir_unreadable", path=str(base.joinpath(*parts)), reason=e.strerror)
            return []
        names: list[str] = []
        for name, is_dir, is_link in entries:
            if not valid_box_name(name):
                continue
            if is_link:
                log.warning("voicemail_dir_refused", path=str(base.joinpath(*parts, name)), reason="symlink")
            elif is_dir:
                names.append(name)
        return names

    def _message_numbers(self, context: str, mailbox: str, folder: Folder) -> list[int]:
        """Numbers of the ``msgNNNN.txt`` entries of one folder (names only), sorted."""
        base = self.root.resolve()
        parts = (context, mailbox, folder)
        try:
            _inside(base, parts)
            with _open_dir(base, parts) as fd:
                names = [e.name for e in os.scandir(fd)]
        except FileNotFoundError:
            return []
        except SpoolPathError as e:
            log.warning("voicemail_dir_refused", path=str(base.joinpath(*parts)), reason=str(e))
            return []
        except OSError as e:  # EACCES: the daemon's user is not in the asterisk group?
            log.warning("voicemail_dir_unreadable", path=str(base.joinpath(*parts)), reason=e.strerror)
            return []
        return sorted(int(m.group(1)) for m in map(_MSG_TXT_RE.fullmatch, names) if m is not None)

    def _load(self, context: str, mailbox: str, folder: Folder, number: int) -> VoicemailMessage | None:
        base = self.root.resolve()
        name = f"msg{number:04d}"
        txt_parts = (context, mailbox, folder, f"{name}.txt")
        txt_path = base.joinpath(*txt_parts)
        try:
            fd = open_under_root(base, txt_parts)
            with _closing_fd(fd):
                raw = read_capped(fd, _MAX_TXT_BYTES)
            if raw is None:
                raise VoicemailParseError(f"larger than {_MAX_TXT_BYTES} bytes")
            meta = parse_message_txt(decode_text(raw))
        except FileNotFoundError:
            return None
        except (SpoolPathError, VoicemailParseError, OSError) as e:
            log.warning("voicemail_message_skipped", path=str(txt_path), reason=str(e))
            return None
        return VoicemailMessage(
            context=context,
            mailbox=mailbox,
            folder=folder,
            number=number,
            meta=meta,
            audio=self._audio_path(base, (context, mailbox, folder, f"{name}.{self.audio_ext}")),
            txt=txt_path,
        )

    def _audio_path(self, base: Path, parts: tuple[str, str, str, str]) -> Path | None:
        """The audio file's path if it is a regular file now (``read_audio`` checks again)."""
        try:
            fd = open_under_root(base, parts)
        except FileNotFoundError:
            return None
        except (SpoolPathError, OSError) as e:
            log.warning("voicemail_file_refused", path=str(base.joinpath(*parts)), reason=str(e))
            return None
        os.close(fd)
        return base.joinpath(*parts)


def _checked_folder(folder: str) -> Folder:
    if folder not in FOLDERS:
        raise SpoolPathError(f"folder {folder[:40]!r}: expected one of {', '.join(FOLDERS)}")
    return folder


def _checked_number(number: int) -> int:
    if isinstance(number, bool) or not 0 <= number <= 9999:
        raise SpoolPathError(f"message number {number!r}: expected 0..9999")
    return number
