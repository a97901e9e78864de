"""AMI wire format: framing, header parsing and action encoding. Pure: no I/O, no asyncio.

Asterisk sends one banner line (``Asterisk Call Manager/x.y.z``) and then frames of
``Name: value`` lines, each line ended by CRLF and each frame by an empty line. Lines are split
on CRLF only: a Cdr ``CallerID`` can carry a raw LF or CR taken from a hostile caller name.
Bytes are buffered across reads and only complete frames are decoded, so a UTF-8 character
split between two TCP reads survives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "AmiMessage",
    "AmiProtocolError",
    "Banner",
    "FrameParser",
    "decode_text",
    "encode_action",
    "parse_frame",
]

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024

_CRLF = b"\r\n"
_END = b"\r\n\r\n"
_EVENT_LINE = b"Event: "
# "<product name>/<version>": "Asterisk Call Manager/11.0.0"; not "HTTP/1.1 400 Bad Request"
_BANNER = re.compile(rb"[^:/\r\n]+/([^\s/:]+)")


class AmiProtocolError(Exception):
    """The peer sent something that is not AMI (oversized frame, no banner).

    ``parsed``: what :meth:`FrameParser.feed` had completed from the same read before the bad
    frame (a Cdr just ahead of a flood): the caller delivers it, then drops the link.
    """

    def __init__(self, message: str, parsed: Sequence[AmiMessage | Banner] = ()) -> None:
        super().__init__(message)
        self.parsed: tuple[AmiMessage | Banner, ...] = tuple(parsed)


@dataclass(frozen=True)
class Banner:
    """The greeting line, e.g. ``Asterisk Call Manager/11.0.0`` → version ``11.0.0``."""

    version: str
    raw: bytes = b""


class AmiMessage:
    """One AMI frame: headers in the order received (names may repeat) and its exact bytes.

    The parser decodes only the ``Event`` name up front (from a leading ``Event: X`` line, or
    from the parsed headers when the frame does not start with one). ``headers`` is parsed from
    the frame's bytes the first time something asks and then cached, so a frame that nobody
    reads costs one slice and one short decode. ``AmiMessage(headers, raw)`` builds a message
    from headers already parsed.

    Immutable. Two messages are equal when their headers and raw bytes are (as with the frozen
    dataclass this class replaced).
    """

    __slots__ = ("_event", "_frame", "_headers", "_raw")

    def __init__(self, headers: Sequence[tuple[str, str]], raw: bytes = b"") -> None:
        parsed = tuple(headers)
        self._headers: tuple[tuple[str, str], ...] | None = parsed
        self._raw = raw
        self._frame: bytes | None = None
        self._event = _first(parsed, "event")

    @classmethod
    def _lazy(cls, raw: bytes, frame: bytes, event: str) -> AmiMessage:
        """A message whose headers are parsed from ``frame`` on first use; ``event`` is the value
        of the frame's first line, which is ``Event: <event>``."""
        message = cls.__new__(cls)
        message._headers = None
        message._raw = raw
        message._frame = frame
        message._event = event
        return message

    @classmethod
    def _parsed(cls, headers: tuple[tuple[str, str], ...], raw: bytes, frame: bytes) -> AmiMessage:
        message = cls.__new__(cls)
        message._headers = headers
        message._raw = raw
        message._frame = frame
        message._event = _first(headers, "event")
        return message

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """``(name, value)`` pairs in order; parsed on first access, then cached."""
        headers = self._headers
        if headers is None:
            frame = self._frame
            if frame is None:  # pragma: no cover - every constructor sets one of the two
                raise AssertionError("AmiMessage without headers or frame")
            headers = self._headers = _parse_headers(frame)
        return headers

    @property
    def raw(self) -> bytes:
        """The frame's bytes as received, terminator included (``b''`` if built from headers)."""
        return self._raw

    @property
    def frame(self) -> bytes | None:
        """The bytes ``headers`` are (or will be) parsed from: CRLF-separated ``Name: value``
        lines, empty lines ignored; ``None`` for a message built from headers. For a message
        from :class:`FrameParser` this is :attr:`raw` itself."""
        return self._frame

    @property
    def event(self) -> str | None:
        """Value of the first ``Event`` header (case-insensitive), else ``None``. Computed once,
        when the message is built."""
        return self._event

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), else ``default``."""
        value = _first(self.headers, name.lower())
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in order (e.g. repeated ``ChanVariable``)."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def response(self) -> str | None:
        return self.get("Response")

    @property
    def action_id(self) -> str | None:
        return self.get("ActionID")

    @property
    def is_event(self) -> bool:
        return self._event is not None

    @property
    def is_response(self) -> bool:
        """A reply to an action. ``OriginateResponse`` events also carry ``Response:`` and
        ``ActionID:``, and ``UserEvent`` echoes the sender's ``ActionID``: an ``Event`` header
        makes a frame an event, whatever else it holds."""
        return self._event is None and self.response is not None

    def as_dict(self) -> dict[str, str]:
        """Header names as received → value; the first of repeated names wins."""
        result: dict[str, str] = {}
        for key, value in self.headers:
            result.setdefault(key, value)
        return result

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AmiMessage):
            return NotImplemented
        return self._raw == other._raw and self.headers == other.headers

    def __hash__(self) -> int:
        return hash((self.headers, self._raw))

    def __repr__(self) -> str:
        return f"AmiMessage(headers={self.headers!r}, raw={self._raw!r})"


def _first(headers: Sequence[tuple[str, str]], lower_name: str) -> str | None:
    for key, value in headers:
        if key.lower() == lower_name:
            return value
    return None


def decode_text(data: bytes) -> str:
    """UTF-8, or latin-1 when that fails: every byte becomes a character, none is dropped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _parse_headers(frame: bytes) -> tuple[tuple[str, str], ...]:
    """CRLF-separated ``Name: value`` lines → headers; see :func:`parse_frame` for the rules.

    Each name and value is decoded on its own with :func:`decode_text`. When the whole frame is
    valid UTF-8 it is decoded in one go instead: CR, LF and ``:`` are ASCII, which never occurs
    inside a multi-byte UTF-8 sequence, so splitting the text gives exactly the per-part decodes.
    """
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_headers_per_value(frame)
    headers: list[tuple[str, str]] = []
    append = headers.append
    for line in text.split("\r\n"):
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            append(("", line))
        elif value[:1] == " ":
            append((name, value[1:]))
        else:
            append((name, value))
    return tuple(headers)


def _parse_headers_per_value(frame: bytes) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    for line in frame.split(_CRLF):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            headers.append(("", decode_text(line)))
            continue
        if value.startswith(b" "):
            value = value[1:]
        headers.append((decode_text(name), decode_text(value)))
    return tuple(headers)


def _message(frame: bytes, raw: bytes) -> AmiMessage | None:
    """A frame that starts with ``Event: X`` stays lazy; any other is parsed now (responses)."""
    if frame.startswith(_EVENT_LINE):
        eol = frame.find(_CRLF, len(_EVENT_LINE))
        name = frame[len(_EVENT_LINE) :] if eol < 0 else frame[len(_EVENT_LINE) : eol]
        return AmiMessage._lazy(raw, frame, decode_text(name))
    headers = _parse_headers(frame)
    if not headers:
        return None
    return AmiMessage._parsed(headers, raw, frame)


def parse_frame(frame: bytes, raw: bytes | None = None) -> AmiMessage | None:
    """Parse one frame body (CRLF-separated lines, no terminator). ``None`` if it is empty.

    ``Name: value`` is split at the first colon and exactly one space after it is removed, so
    ``UserField: `` and ``UserField:`` both give ``''``. A line without a colon is kept with the
    name ``''`` rather than dropped. Blank lines (stray CRLFs) are skipped. Each name and value is
    decoded on its own: UTF-8, or latin-1 if that value is not UTF-8 (:func:`decode_text`).
    """
    return _message(frame, frame + _END if raw is None else raw)


class FrameParser:
    """Incremental AMI parser: feed it bytes as they arrive, get whole messages back.

    With ``expect_banner`` (the client side) the first CRLF-terminated line must be a banner of
    the form ``<name>/<version>``. A frame (or banner) longer than ``max_frame_bytes`` raises
    :class:`AmiProtocolError`; after an error the parser is unusable and the connection should
    be dropped. The complete frames of the same read ahead of the bad one are not lost: they are
    the error's :attr:`AmiProtocolError.parsed`. Messages come back lazy (see
    :class:`AmiMessage`): their headers are decoded when first asked for.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, expect_banner: bool = True) -> None:
        if max_frame_bytes < 4:
            raise ValueError("max_frame_bytes must be at least 4")
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._scan_from = 0
        self._need_banner = expect_banner

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[AmiMessage | Banner]:
        buf = self._buf
        buf += data
        out: list[AmiMessage | Banner] = []
        if self._need_banner:
            banner = self._take_banner()
            if banner is None:
                return out
            out.append(banner)
        end = buf.find(_END, self._scan_from)
        if end >= 0:
            # one copy of what is buffered, then every complete frame is a slice of it (bytes)
            chunk = bytes(buf)
            pos = 0
            limit = self._max
            append = out.append
            while end >= 0:
                stop = end + len(_END)
                if stop - pos > limit:
                    raise AmiProtocolError(f"AMI frame of {stop - pos} bytes exceeds {limit} bytes", out)
                raw = chunk[pos:stop]
                if chunk.startswith(_EVENT_LINE, pos):  # the usual frame: decode only its name
                    # "Event: " holds no CR, so the frame's first CRLF is at or before ``end``
                    eol = chunk.find(_CRLF, pos + len(_EVENT_LINE))
                    append(AmiMessage._lazy(raw, raw, decode_text(chunk[pos + len(_EVENT_LINE) : eol])))
                else:
                    message = _message(raw, raw)
                    if message is not None:
                        append(message)
                pos = stop
                end = chunk.find(_END, pos)
            del buf[:pos]
        if len(buf) > self._max:
            raise AmiProtocolError(f"AMI frame exceeds {self._max} bytes without an end (CRLF CRLF)", out)
        # the terminator may straddle this read and the next
        self._scan_from = max(0, len(buf) - 3)
        return out

    def _take_banner(self) -> Banner | None:
        # resume where the last read's search stopped: restarting from the first byte made a
        # peer that trickles a long line without CRLF cost quadratic time
        end = self._buf.find(_CRLF, self._scan_from)
        if end < 0:
            if len(self._buf) > self._max:
                raise AmiProtocolError("no AMI banner line within the size limit")
            self._scan_from = max(0, len(self._buf) - 1)  # a CR at the end may meet its LF next
            return None
        if end + len(_CRLF) > self._max:  # the same limit whether the line came whole or trickled
            raise AmiProtocolError("no AMI banner line within the size limit")
        line = bytes(self._buf[:end])
        match = _BANNER.fullmatch(line)
        if match is None:
            raise AmiProtocolError(f"not an AMI banner: {line[:80]!r}")
        raw = bytes(self._buf[: end + len(_CRLF)])
        del self._buf[: end + len(_CRLF)]
        self._need_banner = False
        self._scan_from = 0
        return Banner(version=decode_text(match.group(1)), raw=raw)


def _check_field(kind: str, text: str) -> None:
    # the value is not quoted in the message: it may be a secret
    if "\r" in text or "\n" in text:
        raise ValueError(f"AMI action {kind} must not contain CR or LF")


def encode_action(action: str, action_id: str, **fields: str) -> bytes:
    """``Action: X`` / ``ActionID: id`` / one line per field, then the empty line.

    CR or LF in any name or value is refused: it would end the line or the frame early and
    let the rest be read by Asterisk as further headers or a second action.
    """
    lines = [("Action", action), ("ActionID", action_id), *fields.items()]
    out = bytearray()
    for name, value in lines:
        _check_field("header name", name)
        if not name or ":" in name:
            raise ValueError(f"invalid AMI header name: {name!r}")
        _check_field(f"{name} value", value)
        out += f"{name}: {value}\r\n".encode()
    out += _CRLF
    return bytes(out)
