"""Notification mail: Jinja2 templates to text, then text to a MIME message that cannot carry injected headers.

Rendering (``Renderer``): templates live in the ``clickphone_agi.templates`` package (the top-level
``templates/`` directory) as ``<lang>/<kind>.subject.j2``, ``<lang>/<kind>.txt.j2`` and
``<lang>/<kind>.html.j2``; the HTML ones extend ``base.html.j2``. An operator override directory with
the same layout is searched first, file by file. The environment is sandboxed, undefined names raise,
only ``.html``/``.html.j2`` templates are autoescaped and no filter marks text safe. Data values are
copied and cleaned first: control and invisible formatting characters (C0/C1, DEL, U+2028/2029, bidi
overrides, zero-width characters) become spaces, and every value is bounded in length.

Building (``build_message``): headers are set through the email package only, addresses through
``email.headerregistry.Address``; every header text we set is free of control characters and of
``=?`` (on Python < 3.11.10 an encoded word in a header could smuggle a real header: CVE-2024-6923),
and the generated header block is checked once more before the bytes leave this module.
Message-ID, List-Unsubscribe and List-Unsubscribe-Post must reach the receiver as plain ASCII on
one line (a folded, encoded URL breaks one-click unsubscribe): they are checked against their
exact shape and written verbatim; one too long for a header line is refused, never cut.
"""

from __future__ import annotations

import io
import re
import unicodedata
import wave
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.headerregistry import Address
from email.message import MIMEPart
from email.policy import SMTP
from email.utils import format_datetime
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from jinja2.loaders import split_template_path
from jinja2.sandbox import SandboxedEnvironment

from clickphone_agi.adapters.mail import parse_address
from clickphone_agi.domain.delivery import message_id as stable_message_id
from clickphone_agi.notices.kinds import DEFAULT_LANGUAGE, KINDS, LANGUAGES, KindSpec

__all__ = [
    "ALLOWED_EXTRA_HEADERS",
    "SUBJECT_MAX",
    "Attachment",
    "InvalidData",
    "InvalidHeader",
    "MissingData",
    "NoticeError",
    "Rendered",
    "Renderer",
    "TemplateFailure",
    "UnknownKind",
    "build_message",
    "clean_header_text",
    "format_duration",
    "format_localdate",
    "format_localtime",
    "preview",
    "safe_filename",
]

SUBJECT_MAX: Final = 150
TEXT_MAX: Final = 1_000  # one-line values (names, numbers, URLs)
MULTILINE_MAX: Final = 10_000  # values a kind declares multi-line (summaries, offer bodies)
FILENAME_MAX: Final = 100
RESERVED_KEYS: Final = frozenset({"lang", "subject"})
ALLOWED_EXTRA_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {name.lower(): name for name in ("List-Unsubscribe", "List-Unsubscribe-Post", "X-ClickPhone-Kind")}
)
EXTRA_HEADER_MAX: Final = 900  # characters of an allowed extra header's text; longer is refused, never cut
LINE_MAX: Final = 998  # RFC 5322 2.1.1: octets of a header line, name and ": " included

PREVIEW_SENDER: Final = "ClickPhone <no-reply@clickphone.example>"
PREVIEW_RECIPIENT: Final = "Ion Popescu <ion.popescu@example.ro>"
PREVIEW_DATE: Final = datetime(2026, 11, 28, 14, 21, 30, tzinfo=UTC)

# Unicode categories that never belong in a value shown to a subscriber: Cc (C0, DEL, C1), Cf (bidi
# overrides and isolates, zero-width characters, soft hyphen), Cs (lone surrogates), Zl/Zp (U+2028/2029).
_DROP: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_MAX_DEPTH: Final = 4
_MAX_ITEMS: Final = 200
_MONTHS_EN: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MESSAGE_ID_RE: Final = re.compile(r"<[A-Za-z0-9!#$%&'*+/^_`{|}~.-]{1,200}@[A-Za-z0-9.-]{1,200}>")
_CONTENT_TYPE_RE: Final = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}/[a-z0-9][a-z0-9.+-]{0,126}")
_UNDEFINED_RE: Final = re.compile(r"'([^']{1,200})' is undefined|has no attribute '([^']{1,200})'")
# RFC 2369 URIs in angle brackets (visible ASCII without <>" and without "=?"), comma-separated
_LIST_URIS_RE: Final = re.compile(r"<[a-z][a-z0-9+.-]*:[!#-;=?-~]+>(?:, ?<[a-z][a-z0-9+.-]*:[!#-;=?-~]+>)*")
# Headers written verbatim on one line: email.policy.SMTP treats List-Unsubscribe as unstructured
# text and folds a token longer than 78 characters (every unsubscribe URL) into RFC 2047 encoded
# words, which receivers do not decode in a URI field, so RFC 8058 one-click breaks. The Message-ID
# goes the same way so no Python version can do that to it. Values are validated, never cleaned.
_VERBATIM: Final[Mapping[str, Callable[[str], bool]]] = MappingProxyType(
    {
        "Message-ID": lambda v: _MESSAGE_ID_RE.fullmatch(v) is not None,
        "List-Unsubscribe": lambda v: _LIST_URIS_RE.fullmatch(v) is not None and "=?" not in v,
        "List-Unsubscribe-Post": lambda v: v == "List-Unsubscribe=One-Click",  # RFC 8058 3.1
    }
)
# generating with refold_source="none" leaves the verbatim (set_raw) values alone; every other
# header is a header object, folded by the policy as before
_POLICY: Final = SMTP.clone(refold_source="none")
# headers the message itself carries; ``build_message`` refuses output with any other (or a repeat)
_OWN_HEADERS: Final = frozenset(
    {"from", "to", "subject", "date", "message-id", "auto-submitted", "mime-version", "content-type"}
)


# -- errors ----------------------------------------------------------------------------------------


class NoticeError(Exception):
    """Base of every error this module raises on purpose."""


class UnknownKind(NoticeError, KeyError):
    """No such notification kind in ``KINDS``."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    def __str__(self) -> str:
        return f"unknown notification kind {self.kind[:60]!r}"


class MissingData(NoticeError, KeyError):
    """The template data lacks a key the kind (or an override template) needs."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(key)
        self.kind = kind
        self.key = key

    def __str__(self) -> str:
        return f"{self.kind}: template data lacks {self.key!r}"


class InvalidData(NoticeError, ValueError):
    """A data value of a type templates do not take, a reserved key, or a malformed date-time."""


class InvalidHeader(NoticeError, ValueError):
    """An address, Message-ID, header name/value, date or attachment that cannot go into a message safely."""


class TemplateFailure(NoticeError):
    """A template could not be found, compiled or run (a broken override, a sandbox violation)."""


# -- value objects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """One notice in one language: a one-line subject, the text/plain and the text/html body."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Attachment:
    """A file to attach; ``filename`` is sanitised by ``build_message``, ``content_type`` is ``type/subtype``."""

    filename: str
    content_type: str
    data: bytes


# -- cleaning and formatting -----------------------------------------------------------------------


def _blank_invisible(s: str, keep: str = "") -> str:
    return "".join(c if c in keep or unicodedata.category(c) not in _DROP else " " for c in s)


def _one_line(s: str, max_len: int = TEXT_MAX) -> str:
    s = _blank_invisible(s[: max_len * 4])
    return " ".join(s.split())[:max_len].rstrip()


def _lines(s: str, max_len: int = MULTILINE_MAX) -> str:
    s = s[: max_len * 4].replace("\r\n", "\n").replace("\r", "\n")
    s = _blank_invisible(s, keep="\n")
    return "\n".join(" ".join(line.split()) for line in s.split("\n")).strip("\n")[:max_len]


def clean_header_text(s: str, max_len: int = SUBJECT_MAX) -> str:
    """One line for a header: control/invisible characters become spaces, every ``=?`` goes (repeatedly,
    so ``==??`` cannot rebuild one), whitespace collapses, at most ``max_len`` characters (``…`` marks a cut)."""
    s = _blank_invisible(s[: max_len * 8])
    while "=?" in s:
        s = s.replace("=?", "")
    s = " ".join(s.split())
    if len(s) > max_len:
        s = s[: max_len - 1].rstrip() + "…"
    return s


def _clean_value(value: Any, multiline: bool, depth: int = 0) -> Any:
    """A copy of ``value`` templates can show: plain ``str``/``int``/``float``/``bool``/``None``, dates,
    and tuples/dicts of those. Anything else (including objects with ``__html__``) is refused."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):  # also str subclasses such as markupsafe.Markup: the result is a plain str
        return _lines(value) if multiline else _one_line(value)
    if isinstance(value, datetime | date):
        return value
    if depth >= _MAX_DEPTH:
        raise InvalidData("template data nested too deeply")
    if isinstance(value, list | tuple):
        if len(value) > _MAX_ITEMS:
            raise InvalidData(f"template data list longer than {_MAX_ITEMS} items")
        return tuple(_clean_value(v, multiline, depth + 1) for v in value)
    if isinstance(value, Mapping):
        if len(value) > _MAX_ITEMS:
            raise InvalidData(f"template data mapping larger than {_MAX_ITEMS} items")
        return {_one_line(str(k), 100): _clean_value(v, multiline, depth + 1) for k, v in value.items()}
    raise InvalidData(f"template data of type {type(value).__name__} is not accepted")


def _zone(zone: ZoneInfo | str) -> ZoneInfo:
    if isinstance(zone, ZoneInfo):
        return zone
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {zone!r}") from exc


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidData(f"not an ISO 8601 date-time: {value[:40]!r}") from exc
    if not isinstance(value, datetime):
        raise InvalidData(f"expected a date-time, got {type(value).__name__}")
    if value.utcoffset() is None:
        raise InvalidData("a date-time without a time zone is ambiguous")
    return value


def format_localtime(value: Any, language: str, zone: ZoneInfo | str = "Europe/Bucharest") -> str:
    """An aware ``datetime`` (or its ISO string) in ``zone``.

    ``28.11.2026, 16:21`` (ro) / ``28 Nov 2026, 16:21`` (en); a naive date-time raises ``InvalidData``.
    """
    local = _as_datetime(value).astimezone(_zone(zone))
    if language == "en":
        return f"{local.day} {_MONTHS_EN[local.month - 1]} {local.year}, {local:%H:%M}"
    return f"{local:%d.%m.%Y, %H:%M}"


def format_localdate(value: Any, language: str, zone: ZoneInfo | str = "Europe/Bucharest") -> str:
    """A day: a ``date``, an ISO date (``2026-12-01``) or a date-time (its local day in ``zone``)."""
    if isinstance(value, str) and len(value) == 10:
        try:
            value = date.fromisoformat(value)
        except ValueError as exc:
            raise InvalidData(f"not an ISO 8601 date: {value!r}") from exc
    day = value if isinstance(value, date) and not isinstance(value, datetime) else None
    if day is None:
        day = _as_datetime(value).astimezone(_zone(zone)).date()
    if language == "en":
        return f"{day.day} {_MONTHS_EN[day.month - 1]} {day.year}"
    return f"{day:%d.%m.%Y}"


def _as_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidData(f"expected a number, got {type(value).__name__}")
    try:
        n = int(value)
    except ValueError as exc:
        raise InvalidData(f"expected a number, got {str(value)[:40]!r}") from exc
    if n < 0:
        raise InvalidData(f"expected a non-negative number, got {n}")
    return n


def format_duration(seconds: Any) -> str:
    """Whole seconds as ``1 h 2 min 5 s`` (the same in ro and en); ``65`` → ``1 min 5 s``, ``0`` → ``0 s``."""
    minutes, secs = divmod(_as_count(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes:
        parts.append(f"{minutes} min")
    if secs or not parts:
        parts.append(f"{secs} s")
    return " ".join(parts)


def format_plural(count: Any, one: str, many: str, language: str) -> str:
    """``3 pagini``, ``1 pagină``, ``20 de pagini`` (Romanian puts "de" after 20-99 in the last two digits)."""
    n = _as_count(count)
    if n == 1:
        return f"{n} {one}"
    if language == "ro" and n and (n % 100 == 0 or n % 100 >= 20):
        return f"{n} de {many}"
    return f"{n} {many}"


def _checked_url(value: Any) -> str:
    """A link target: an http(s) URL without spaces or quotes. Refuses ``javascript:`` and friends."""
    text = str(value)
    if not re.fullmatch(r"https?://[^\s\"'<>\\]{1,2000}", text):
        raise InvalidData(f"not an http(s) URL: {text[:60]!r}")
    return text


# -- template loading ------------------------------------------------------------------------------


class _ResourceLoader(jinja2.BaseLoader):
    """Loads templates from an ``importlib.resources`` Traversable (a directory, or a zip when installed so)."""

    def __init__(self, root: Traversable) -> None:
        self._root = root

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        node = self._root
        for part in split_template_path(template):  # refuses ".." and friends
            node = node.joinpath(part)
        if not node.is_file():
            raise jinja2.TemplateNotFound(template)
        return node.read_text(encoding="utf-8"), str(node) if isinstance(node, Path) else None, lambda: True


def _autoescape(template_name: str | None) -> bool:
    """HTML templates escape; text and subject templates must not (they would show ``&amp;``)."""
    return template_name is not None and template_name.endswith((".html", ".html.j2"))


class Renderer:
    """Renders a notice kind in a language from the packaged templates (or the operator's overrides)."""

    def __init__(self, override_dir: Path | None = None, *, timezone: str = "Europe/Bucharest") -> None:
        self._zone = _zone(timezone)
        loaders: list[jinja2.BaseLoader] = []
        if override_dir is not None:
            if not override_dir.is_dir():
                raise ValueError(f"template override directory {str(override_dir)!r} is not a directory")
            loaders.append(jinja2.FileSystemLoader(override_dir))
        loaders.append(_ResourceLoader(files("clickphone_agi.templates")))
        env = SandboxedEnvironment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=_autoescape,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        del env.filters["safe"]  # data never becomes markup
        zone = self._zone

        @jinja2.pass_context
        def localtime(ctx: jinja2.runtime.Context, value: Any) -> str:
            return format_localtime(value, str(ctx["lang"]), zone)

        @jinja2.pass_context
        def localdate(ctx: jinja2.runtime.Context, value: Any) -> str:
            return format_localdate(value, str(ctx["lang"]), zone)

        @jinja2.pass_context
        def plural(ctx: jinja2.runtime.Context, value: Any, one: str, many: str) -> str:
            return format_plural(value, one, many, str(ctx["lang"]))

        env.filters.update(
            localtime=localtime, localdate=localdate, plural=plural, duration=format_duration, url=_checked_url
        )
        self._env = env

    def render(self, kind: str, language: str, data: Mapping[str, Any]) -> Rendered:
        """Subject, text and HTML of ``kind`` in ``language`` (``ro``/``en``; anything else is ``ro``)."""
        spec = _spec(kind)
        lang = language if language in LANGUAGES else DEFAULT_LANGUAGE
        missing = sorted(spec.required - data.keys())
        if missing:
            raise MissingData(kind, missing[0])
        reserved = sorted(RESERVED_KEYS & data.keys())
        if reserved:
            raise InvalidData(f"{kind}: template data may not use the reserved key {reserved[0]!r}")
        context: dict[str, Any] = {
            str(k): _clean_value(v, multiline=k in spec.multiline) for k, v in data.items() if isinstance(k, str)
        }
        context["lang"] = lang
        subject = clean_header_text(self._render(spec, f"{lang}/{kind}.subject.j2", context))
        context["subject"] = subject
        text = self._render(spec, f"{lang}/{kind}.txt.j2", context)
        html = self._render(spec, f"{lang}/{kind}.html.j2", context)
        return Rendered(subject=subject, text=text, html=html)

    def _render(self, spec: KindSpec, name: str, context: Mapping[str, Any]) -> str:
        try:
            return self._env.get_template(name).render(context)
        except jinja2.UndefinedError as exc:
            found = _UNDEFINED_RE.search(str(exc))
            key = (found.group(1) or found.group(2)) if found else str(exc)
            raise MissingData(spec.name, key) from exc
        except jinja2.TemplateError as exc:  # not found, syntax, sandbox SecurityError
            raise TemplateFailure(f"{name}: {type(exc).__name__}: {exc}") from exc
        except NoticeError:
            raise  # InvalidData from a filter (a malformed date-time, a javascript: link)
        except Exception as exc:  # an override doing {{ 1 / 0 }}: still the template's fault, typed
            raise TemplateFailure(f"{name}: {type(exc).__name__}: {exc}") from exc


def _spec(kind: str) -> KindSpec:
    try:
        return KINDS[kind]
    except KeyError:
        raise UnknownKind(kind) from None


# -- MIME ------------------------------------------------------------------------------------------


def _address(text: str, role: str) -> Address:
    if any(unicodedata.category(c) in _DROP for c in text):
        raise InvalidHeader(f"{role}: address contains control or invisible characters")
    try:
        address = parse_address(text)
    except ValueError as exc:
        raise InvalidHeader(f"{role}: {exc}") from exc
    if not address.addr_spec.isascii():
        raise InvalidHeader(f"{role}: only ASCII e-mail addresses are supported")
    return address


def safe_filename(name: str) -> str:
    """The last path component, letters/digits/``._- `` only (others become ``_``), no leading dot,
    at most ``FILENAME_MAX`` characters with the extension kept; ``attachment`` when nothing is left."""
    base = unicodedata.normalize("NFC", _blank_invisible(re.split(r"[/\\]", name)[-1]))
    base = "".join(c if c.isalnum() or c in "._- " else "_" for c in base[: FILENAME_MAX * 4])
    base = " ".join(base.split()).strip(". ")
    if len(base) > FILENAME_MAX:
        stem, dot, ext = base.rpartition(".")
        if dot and stem and len(ext) <= 10:
            base = stem[: FILENAME_MAX - len(ext) - 1].rstrip(". ") + "." + ext
        else:
            base = base[:FILENAME_MAX].rstrip(". ")
    return base or "attachment"


def _content_type(value: str) -> tuple[str, str]:
    ctype = value.strip().lower()
    if not _CONTENT_TYPE_RE.fullmatch(ctype):
        raise InvalidHeader(f"attachment content type {value[:60]!r} is not type/subtype")
    maintype, _, subtype = ctype.partition("/")
    if maintype in ("multipart", "message"):
        raise InvalidHeader(f"attachment content type {ctype!r} is not allowed")
    return maintype, subtype


def _extra_headers(extra: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in extra.items():
        canonical = ALLOWED_EXTRA_HEADERS.get(str(name).lower())
        if canonical is None:
            raise InvalidHeader(f"header {str(name)[:60]!r} is not allowed (allowed: {sorted(ALLOWED_EXTRA_HEADERS)})")
        if canonical in out:
            raise InvalidHeader(f"header {canonical!r} given twice")
        text = str(value)
        if canonical in _VERBATIM:
            out[canonical] = _verbatim(canonical, text)
            continue
        if len(" ".join(text.split())) > EXTRA_HEADER_MAX:  # cutting would change its meaning
            raise InvalidHeader(f"header {canonical!r} is longer than {EXTRA_HEADER_MAX} characters")
        cleaned = clean_header_text(text, EXTRA_HEADER_MAX)
        if not cleaned:
            raise InvalidHeader(f"header {canonical!r} is empty")
        out[canonical] = cleaned
    return out


def _verbatim(name: str, value: str) -> str:
    """A header that goes out exactly as given, on one line: refused unless it has its own strict shape."""
    if not _VERBATIM[name](value):
        raise InvalidHeader(f"{name} {value[:80]!r} is not a valid {name} value")
    if len(name) + 2 + len(value) > LINE_MAX:  # never cut: a cut URL or id is a wrong one
        raise InvalidHeader(f"{name} is {len(value)} characters: longer than one header line ({LINE_MAX})")
    return value


def _verify_header_block(raw: bytes, expected: frozenset[str]) -> None:
    """The generated header block: CRLF lines only, each expected header exactly once, nothing else."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep or re.search(rb"\r(?!\n)|(?<!\r)\n|\x00", head):
        raise InvalidHeader("generated header block has bare CR/LF")
    seen: list[str] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            continue  # folded continuation
        name, colon, _ = line.partition(b":")
        if not colon:
            raise InvalidHeader("generated header block has a line that is not a header")
        seen.append(name.decode("ascii", "replace").strip().lower())
    if sorted(seen) != sorted(expected):
        raise InvalidHeader(f"generated headers {sorted(seen)} differ from the expected {sorted(expected)}")


def build_message(
    rendered: Rendered,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    date: datetime,
    attachments: Sequence[Attachment] = (),
    extra_headers: Mapping[str, str] = MappingProxyType({}),
    envelope_note: str | None = None,
) -> bytes:
    """The message as bytes (CRLF, quoted-printable UTF-8 parts) ready for SMTP.

    multipart/alternative (text/plain, then text/html), inside multipart/mixed when there are
    attachments. ``extra_headers`` may only name ``ALLOWED_EXTRA_HEADERS``. ``envelope_note`` is the
    MIME preamble, the text only non-MIME readers show (printable ASCII). Raises ``InvalidHeader``.
    """
    if date.utcoffset() is None:
        raise InvalidHeader("Date: a date-time without a time zone")
    if not _MESSAGE_ID_RE.fullmatch(message_id):
        raise InvalidHeader(f"Message-ID {message_id[:80]!r} is not <local@domain>")
    extra = {"Message-ID": message_id, **_extra_headers(extra_headers)}
    parts = [(safe_filename(a.filename), *_content_type(a.content_type), a.data) for a in attachments]
    if envelope_note is not None and not re.fullmatch(r"[ -~\n]{0,2000}", envelope_note):
        raise InvalidHeader("envelope_note: printable ASCII lines only, at most 2000 characters")

    # MIMEPart, not EmailMessage: the latter stamps MIME-Version on every body part it creates
    msg = MIMEPart(policy=_POLICY)
    msg["From"] = _address(sender, "From")
    msg["To"] = _address(recipient, "To")
    msg["Subject"] = clean_header_text(rendered.subject)
    msg["Date"] = format_datetime(date)
    msg["Auto-Submitted"] = "auto-generated"
    for name, value in extra.items():
        if name in _VERBATIM:
            msg.set_raw(name, value)
        else:
            msg[name] = value
    msg["MIME-Version"] = "1.0"
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    if parts:
        msg.make_mixed()
        for filename, maintype, subtype, data in parts:
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    if envelope_note:
        msg.preamble = envelope_note
    raw = msg.as_bytes()
    _verify_header_block(raw, _OWN_HEADERS | {name.lower() for name in extra})
    head = raw.partition(b"\r\n\r\n")[0] + b"\r\n"
    for name, value in extra.items():
        if name in _VERBATIM and f"\r\n{name}: {value}\r\n".encode("ascii") not in b"\r\n" + head:
            raise InvalidHeader(f"{name} was not written verbatim on one line")
    return raw


# -- preview ---------------------------------------------------------------------------------------


def _silence_wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)  # 0.1 s
    return out.getvalue()


def _blank_pdf() -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << >> >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _sample_attachments(kind: str) -> tuple[Attachment, ...]:
    if kind == "voicemail":
        return (Attachment("msg0000.wav", "audio/wav", _silence_wav()),)
    if kind == "fax_received":
        return (Attachment("fax-0310000009.pdf", "application/pdf", _blank_pdf()),)
    return ()


def preview(kind: str, language: str, *, renderer: Renderer | None = None) -> bytes:
    """A sample ``.eml`` of ``kind`` from its invented ``sample`` data.

    Sender, recipient, date and Message-ID are fixed; voicemail and fax_received carry a placeholder
    attachment (0.1 s of silence, a blank page) so the multipart/mixed shape shows too.
    """
    spec = _spec(kind)
    lang = language if language in LANGUAGES else DEFAULT_LANGUAGE
    rendered = (renderer or Renderer()).render(kind, lang, spec.sample)
    headers = {"X-ClickPhone-Kind": kind}
    if "unsubscribe_url" in spec.sample:
        headers["List-Unsubscribe"] = f"<{_checked_url(spec.sample['unsubscribe_url'])}>"
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return build_message(
        rendered,
        sender=PREVIEW_SENDER,
        recipient=PREVIEW_RECIPIENT,
        message_id=stable_message_id(f"preview:{kind}:{lang}", "clickphone.example"),
        date=PREVIEW_DATE,
        attachments=_sample_attachments(kind),
        extra_headers=headers,
    )
