"""Asterisk voicemail ``msgNNNN.txt`` → :class:`VoicemailMeta`. Pure: stdlib only, no I/O.

``app_voicemail`` (Asterisk 22, ``leave_voicemail``) writes the file like this, in this order,
``duration`` last, once the recording has ended::

    ;
    ; Message Information file
    ;
    [message]
    origmailbox=100
    context=lab-inbound
    exten=vm100
    rdnis=unknown
    priority=5
    callerchan=Local/vm100@lab-inbound-00000006;2
    callerid="Vasile Ionescu" <0744123456>
    origdate=Sat Nov 28 04:22:03 PM UTC 2026
    origtime=1795882923
    category=
    msg_id=1795882923-00000000
    flag=
    duration=13

(older versions also wrote ``macrocontext=`` after ``context``.) How it is read:

* Lines end at ``\\n``; a ``\\r`` before it is dropped (CRLF copies). A bare ``\\r`` (or U+2028,
  ``\\v``…) does NOT end a line, unlike :meth:`str.splitlines`: Asterisk's own reader splits on
  ``\\n`` only, and a hostile caller name must not gain lines it could not gain there. Such
  characters stay in the value and :func:`~clickphone_agi.domain.ami_translate.clean_text`
  turns them into spaces.
* Only whole-line comments (``;`` first). An inline ``;`` is data: ``callerchan`` holds
  ``…-00000006;2`` and a caller name may hold one.
* ``key=value`` (or ``key => value``), keys case-insensitive, unknown keys ignored. Lines before
  the first ``[message]`` header are ignored; a file without one is garbage. Asterisk writes no
  other section, so a later ``[…]`` line is data, not a section change: a caller name holding
  ``<LF>[x]`` cannot hide the real ``duration`` line behind a forged header.
* The caller name is written raw (``ast_callerid_merge``: no escaping), so a name holding a LF
  splits the ``callerid`` line and can forge ``key=value`` lines. Defence: for the keys Asterisk
  writes *before* ``callerid`` (and ``callerid`` itself) the first occurrence wins, for the keys
  it writes *after* (``origdate`` … ``duration``) the last one wins: a forged line always loses to
  the real one. A line without ``=`` right after ``callerid`` is the rest of a split caller id
  and is joined back to it (``"Bob<LF>Smith" <07…>`` keeps its number).
* Required: ``msg_id`` (it keys the notice; NOT unique across mailboxes: a forwarded message
  keeps its id, so key by mailbox + msg_id), ``origtime`` (epoch seconds → aware UTC) and
  ``duration`` (written last: a file without it is incomplete). Anything else missing is ``''``.
* ``callerid`` → ``(name, number)`` with :func:`~clickphone_agi.domain.ami_translate.parse_caller_id`
  (control characters and ``=?`` removed, bounded); Asterisk's ``Unknown`` (no caller id) → ``("", "")``.

Garbage (too long, NUL bytes, no ``[message]`` section, a required key missing or malformed)
raises :class:`VoicemailParseError`; nothing else is raised for any ``str``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from clickphone_agi.domain.ami_translate import clean_text, parse_caller_id

__all__ = ["MAX_TXT_CHARS", "VoicemailMeta", "VoicemailParseError", "parse_message_txt"]

MAX_TXT_CHARS: Final = 64 * 1024
"""A real msgNNNN.txt is ~300 bytes; anything this long is not one."""

_MAX_LINES: Final = 512
_MAX_ORIGTIME: Final = 253_402_300_799  # 9999-12-31T23:59:59Z: fromtimestamp() stays in range
_MAX_DURATION: Final = 10_000_000
_MAX_FIELD: Final = 80
_MAX_FLAG: Final = 32

_SECTION_RE: Final = re.compile(r"\[([^\]]*)\].*")
_KEY_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_INT_RE: Final = re.compile(r"[0-9]{1,15}")
# Asterisk: "%ld-%08x" (epoch seconds, counter); allow a little more, never ':' '/' or spaces
_MSG_ID_RE: Final = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,63}")

# the keys app_voicemail writes after callerid: a line forged by a caller name comes before the
# real one, so the last occurrence wins; for every other key the first occurrence wins
_LAST_WINS: Final = frozenset({"origdate", "origtime", "category", "msg_id", "flag", "duration"})
_NO_CALLER_ID: Final = frozenset({"", "unknown"})


class VoicemailParseError(ValueError):
    """A msgNNNN.txt that is not a complete Asterisk message file."""


@dataclass(frozen=True)
class VoicemailMeta:
    """What a message's ``.txt`` says, cleaned. Text fields are safe to display, never empty-checked
    for meaning by this module (``flag`` is ``''``, ``Urgent`` or ``PRIORITY``)."""

    msg_id: str
    callerid_name: str
    callerid_num: str
    origtime: datetime  # aware, UTC
    duration: int  # seconds
    origmailbox: str
    context: str
    flag: str
    category: str


def parse_message_txt(text: str) -> VoicemailMeta:
    """Parse one ``msgNNNN.txt``; :class:`VoicemailParseError` for garbage or an incomplete file."""
    fields = _read_message_section(text)
    msg_id = fields.get("msg_id", "")
    if not _MSG_ID_RE.fullmatch(msg_id):
        raise VoicemailParseError(f"msg_id: expected Asterisk's <epoch>-<counter>, got {_show(msg_id)}")
    origtime = _integer(fields, "origtime", _MAX_ORIGTIME)
    duration = _integer(fields, "duration", _MAX_DURATION)
    raw_cid = fields.get("callerid", "")
    name, number = ("", "") if raw_cid.strip().lower() in _NO_CALLER_ID else parse_caller_id(raw_cid)
    return VoicemailMeta(
        msg_id=msg_id,
        callerid_name=name,
        callerid_num=number,
        origtime=datetime.fromtimestamp(origtime, tz=UTC),
        duration=duration,
        origmailbox=clean_text(fields.get("origmailbox", ""), _MAX_FIELD),
        context=clean_text(fields.get("context", ""), _MAX_FIELD),
        flag=clean_text(fields.get("flag", ""), _MAX_FLAG),
        category=clean_text(fields.get("category", ""), _MAX_FIELD),
    )


def _read_message_section(text: str) -> dict[str, str]:
    if len(text) > MAX_TXT_CHARS:
        raise VoicemailParseError(f"{len(text)} characters: not a message file (limit {MAX_TXT_CHARS})")
    if "\x00" in text:
        raise VoicemailParseError("NUL bytes: not a text file")
    lines = text.removeprefix("\ufeff").split("\n")
    if len(lines) > _MAX_LINES:
        raise VoicemailParseError(f"{len(lines)} lines: not a message file (limit {_MAX_LINES})")
    fields: dict[str, str] = {}
    in_message = False
    last_key = ""
    for raw_line in lines:
        line = raw_line.removesuffix("\r").strip()
        if not line or line.startswith(";"):
            continue
        if not in_message:
            header = _SECTION_RE.fullmatch(line)
            in_message = header is not None and header.group(1).strip().lower() == "message"
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep or not _KEY_RE.fullmatch(key):
            if last_key == "callerid":
                # the rest of a caller id split by a LF in the name: glue it back
                fields["callerid"] = f"{fields['callerid']} {line}"
            continue
        value = value.removeprefix(">").strip()
        if key in _LAST_WINS or key not in fields:
            fields[key] = value
            last_key = key
        else:
            last_key = ""  # a forged repeat: neither taken nor continued
    if not in_message:
        raise VoicemailParseError("no [message] section")
    return fields


def _integer(fields: dict[str, str], key: str, maximum: int) -> int:
    raw = fields.get(key)
    if raw is None:
        raise VoicemailParseError(f"{key}: missing (file incomplete?)")
    if not _INT_RE.fullmatch(raw) or int(raw) > maximum:
        raise VoicemailParseError(f"{key}: expected a whole number 0..{maximum}, got {_show(raw)}")
    return int(raw)


def _show(value: str) -> str:
    """A value for an error message: printable, bounded."""
    return repr(clean_text(value, 40))
