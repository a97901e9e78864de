"""AMI wire format: framing, header parsing and action encoding. Pure: no I/O, no asyncio.

Asterisk sends one banner line (``Asterisk Call Manager/x.y.z``) and then frames of
``Name: value`` lines, each line ended by CRLF and each frame by an empty line. Lines are split
on CRLF only: a Cdr ``CallerID`` can carry a raw LF or CR taken from a hostile caller name.
Bytes are buffered across reads and only complete frames are decoded, so a UTF-8 character
split between two TCP reads survives.
"""

from __future__ import annotations

import re
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
# "<product name>/<version>": "Asterisk Call Manager/11.0.0"; not "HTTP/1.1 400 Bad Request"
_BANNER = re.compile(rb"[^:/\r\n]+/([^\s/:]+)")


class AmiProtocolError(Exception):
    """The peer sent something that is not AMI (oversized frame, no banner)."""


@dataclass(frozen=True)
class Banner:
    """The greeting line, e.g. ``Asterisk Call Manager/11.0.0`` → version ``11.0.0``."""

    version: str
    raw: bytes = b""


@dataclass(frozen=True)
class AmiMessage:
    """One AMI frame: headers in the order received (names may repeat) and its exact bytes."""

    headers: tuple[tuple[str, str], ...]
    raw: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), else ``default``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in order (e.g. repeated ``ChanVariable``)."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def event(self) -> str | None:
        return self.get("Event")

    @property
    def response(self) -> str | None:
        return self.get("Response")

    @property
    def action_id(self) -> str | None:
        return self.get("ActionID")

    @property
    def is_event(self) -> bool:
        return self.event is not None

    @property
    def is_response(self) -> bool:
        """A reply to an action. ``OriginateResponse`` events also carry ``Response:`` and
        ``ActionID:``, and ``UserEvent`` echoes the sender's ``ActionID``: an ``Event`` header
        makes a frame an event, whatever else it holds."""
        return self.event is None and self.response is not None

    def as_dict(self) -> dict[str, str]:
        """Header names as received → value; the first of repeated names wins."""
        result: dict[str, str] = {}
        for key, value in self.headers:
            result.setdefault(key, value)
        return result


def decode_text(data: bytes) -> str:
    """UTF-8, or latin-1 when that fails: every byte becomes a character, none is dropped."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def parse_frame(frame: bytes, raw: bytes | None = None) -> AmiMessage | None:
    """Parse one frame body (CRLF-separated lines, no terminator). ``None`` if it is empty.

    ``Name: value`` is split at the first colon and exactly one space after it is removed, so
    ``UserField: `` and ``UserField:`` both give ``''``. A line without a colon is kept with the
    name ``''`` rather than dropped. Blank lines (stray CRLFs) are skipped.
    """
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
    if not headers:
        return None
    return AmiMessage(headers=tuple(headers), raw=frame + _END if raw is None else raw)


class FrameParser:
    """Incremental AMI parser: feed it bytes as they arrive, get whole messages back.

    With ``expect_banner`` (the client side) the first CRLF-terminated line must be a banner of
    the form ``<name>/<version>``. A frame (or banner) longer than ``max_frame_bytes`` raises
    :class:`AmiProtocolError`; after an error the parser is unusable and the connection should
    be dropped.
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
        self._buf += data
        out: list[AmiMessage | Banner] = []
        if self._need_banner:
            banner = self._take_banner()
            if banner is None:
                return out
            out.append(banner)
        while True:
            end = self._buf.find(_END, self._scan_from)
            if end < 0:
                if len(self._buf) > self._max:
                    raise AmiProtocolError(f"AMI frame exceeds {self._max} bytes without an end (CRLF CRLF)")
                # the terminator may straddle this read and the next
                self._scan_from = max(0, len(self._buf) - 3)
                return out
            stop = end + len(_END)
            if stop > self._max:
                raise AmiProtocolError(f"AMI frame of {stop} bytes exceeds {self._max} bytes")
            raw = bytes(self._buf[:stop])
            del self._buf[:stop]
            self._scan_from = 0
            message = parse_frame(raw[:end], raw)
            if message is not None:
                out.append(message)

    def _take_banner(self) -> Banner | None:
        end = self._buf.find(_CRLF)
        if end < 0:
            if len(self._buf) > self._max:
                raise AmiProtocolError("no AMI banner line within the size limit")
            return None
        line = bytes(self._buf[:end])
        match = _BANNER.fullmatch(line)
        if match is None:
            raise AmiProtocolError(f"not an AMI banner: {line[:80]!r}")
        raw = bytes(self._buf[: end + len(_CRLF)])
        del self._buf[: end + len(_CRLF)]
        self._need_banner = False
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
