"""Bounces: VERP envelope senders and RFC 3464 delivery-status reports (pure, no I/O).

Through a relay, a refused recipient rarely shows on the SMTP session: the relay accepts the
message and mails a DSN back later, to the envelope sender. So every outbox row is sent with
its own envelope sender::

    bounce+<row-id>-<mac>@<bounce_domain>

``mac`` is the first 8 characters (lowercase base32, 40 bits) of HMAC-SHA256 over
``"<row-id>:<idempotency key>"``, keyed by a secret only this daemon knows. A DSN is attributed
to a row only if the mac verifies against that row's *current* idempotency key, so a forged
token, or a late DSN for a purged row whose id SQLite reused, is ignored. Base32 and digits
survive MTAs that fold the local part to lowercase; ``+`` is Postfix's ``recipient_delimiter``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from email.policy import compat32
from enum import StrEnum
from typing import Any

VERP_LOCAL = "bounce"
MAC_CHARS = 8
MAX_TOKENS = 10
MAX_RECIPIENTS = 10
MAX_TEXT = 500

_TOKEN = re.compile(rf"{VERP_LOCAL}\+(\d{{1,18}})-([a-z2-7]{{{MAC_CHARS}}})@", re.IGNORECASE)
_STATUS = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# headers of the DSN itself that may carry the address it was delivered to, most reliable first
TOKEN_HEADERS = ("Delivered-To", "X-Original-To", "To")


def _mac(key: bytes, row_id: int, idempotency_key: str) -> str:
    digest = hmac.new(key, f"{row_id}:{idempotency_key}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:MAC_CHARS]


def verp_address(row_id: int, idempotency_key: str, key: bytes, domain: str) -> str:
    """The envelope sender (MAIL FROM) for one outbox row."""
    return f"{VERP_LOCAL}+{row_id}-{_mac(key, row_id, idempotency_key)}@{domain}"


@dataclass(frozen=True)
class VerpToken:
    row_id: int
    mac: str

    def verify(self, key: bytes, idempotency_key: str) -> bool:
        return hmac.compare_digest(self.mac.lower(), _mac(key, self.row_id, idempotency_key))


def find_tokens(texts: Iterable[str]) -> tuple[VerpToken, ...]:
    """Every distinct VERP token in ``texts``, in order of appearance (at most MAX_TOKENS)."""
    found: list[VerpToken] = []
    for text in texts:
        for match in _TOKEN.finditer(text):
            token = VerpToken(int(match.group(1)), match.group(2).lower())
            if token not in found:
                found.append(token)
            if len(found) >= MAX_TOKENS:
                return tuple(found)
    return tuple(found)


def address_key(address: str) -> str:
    """How a recipient is looked up in the suppression list: ASCII case folded (as SQLite's lower())."""
    return "".join(c.lower() if c.isascii() else c for c in address.strip())


class Verdict(StrEnum):
    HARD = "hard"  # Action: failed, Status: 5.x.x — the address does not work
    SOFT = "soft"  # Action: failed with a 4.x.x status (the relay gave up): not delivered, address may be fine
    DELAYED = "delayed"  # still being retried by the relay: nothing to record
    OTHER = "other"  # delivered, relayed, expanded or unknown


_SEVERITY = {Verdict.HARD: 3, Verdict.SOFT: 2, Verdict.DELAYED: 1, Verdict.OTHER: 0}


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a delivery-status part (RFC 3464 §2.3)."""

    action: str
    status: str
    final_recipient: str | None = None
    original_recipient: str | None = None
    diagnostic_code: str | None = None
    remote_mta: str | None = None

    @property
    def verdict(self) -> Verdict:
        action = self.action.lower()
        if action == "failed":
            return Verdict.HARD if self.status.startswith("5.") else Verdict.SOFT
        if action == "delayed":
            return Verdict.DELAYED
        return Verdict.OTHER

    def summary(self) -> str:
        parts = [f"{self.action} {self.status}".strip()]
        if self.diagnostic_code:
            parts.append(self.diagnostic_code)
        return "; ".join(parts)[:MAX_TEXT]


@dataclass(frozen=True)
class DeliveryReport:
    """What a DSN says, reduced to what the outbox needs; JSON-safe for the control socket."""

    tokens: tuple[VerpToken, ...]
    recipients: tuple[RecipientStatus, ...]
    reporting_mta: str | None = None

    @property
    def primary(self) -> RecipientStatus | None:
        """The most severe recipient block (our messages have one recipient each)."""
        if not self.recipients:
            return None
        return max(self.recipients, key=lambda r: _SEVERITY[r.verdict])

    @property
    def verdict(self) -> Verdict:
        primary = self.primary
        return Verdict.OTHER if primary is None else primary.verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": [[t.row_id, t.mac] for t in self.tokens],
            "recipients": [
                {
                    "action": r.action,
                    "status": r.status,
                    "final_recipient": r.final_recipient,
                    "original_recipient": r.original_recipient,
                    "diagnostic_code": r.diagnostic_code,
                    "remote_mta": r.remote_mta,
                }
                for r in self.recipients
            ],
            "reporting_mta": self.reporting_mta,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeliveryReport:
        """The inverse of :meth:`to_json`; raises ValueError on anything malformed."""
        try:
            tokens = tuple(
                VerpToken(int(row_id), _clean(str(mac), MAC_CHARS)) for row_id, mac in list(data["tokens"])[:MAX_TOKENS]
            )
            recipients = tuple(
                RecipientStatus(
                    action=_clean(str(r["action"]), 40),
                    status=_clean(str(r["status"]), 40),
                    final_recipient=_opt(r.get("final_recipient")),
                    original_recipient=_opt(r.get("original_recipient")),
                    diagnostic_code=_opt(r.get("diagnostic_code")),
                    remote_mta=_opt(r.get("remote_mta")),
                )
                for r in list(data["recipients"])[:MAX_RECIPIENTS]
            )
            return cls(tokens, recipients, _opt(data.get("reporting_mta")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed delivery report: {exc}") from None


class NotADsn(ValueError):
    """The input is not a delivery-status report we can use; the message says why."""


def parse_dsn(raw: bytes, *, envelope_recipient: str | None = None) -> DeliveryReport:
    """Parse an RFC 3464 ``multipart/report; report-type=delivery-status`` message.

    ``envelope_recipient`` is the address the MTA delivered it to (Postfix ``${recipient}``),
    the most reliable place for the VERP token; the DSN's own ``Delivered-To``,
    ``X-Original-To`` and ``To`` headers and Postfix's ``X-Postfix-Sender`` field follow.
    Never raises anything but :class:`NotADsn`, whatever the input.
    """
    try:
        return _parse(raw, envelope_recipient)
    except NotADsn:
        raise
    except Exception as exc:  # hostile input must never crash the pipe: classify it as junk
        raise NotADsn(f"unparseable message ({type(exc).__name__})") from None


def _parse(raw: bytes, envelope_recipient: str | None) -> DeliveryReport:
    if not raw.strip():
        raise NotADsn("empty input")
    msg = message_from_bytes(raw, policy=compat32)
    if msg.get_content_type() != "multipart/report":
        raise NotADsn(f"not a multipart/report (Content-Type {msg.get_content_type()})")
    report_type = str(msg.get_param("report-type", "") or "").lower()
    if report_type != "delivery-status":
        raise NotADsn(f"report-type {report_type or 'missing'!r} is not delivery-status")
    status_part = next((p for p in msg.walk() if p.get_content_type() == "message/delivery-status"), None)
    if status_part is None:
        raise NotADsn("no message/delivery-status part")
    blocks = _blocks(status_part)
    if not blocks:
        raise NotADsn("empty delivery-status part")
    per_message, per_recipient = blocks[0], blocks[1:]
    recipients = tuple(
        RecipientStatus(
            action=_clean(_field(b, "Action") or "", 40).lower(),
            status=_status(_field(b, "Status")),
            final_recipient=_address_field(_field(b, "Final-Recipient")),
            original_recipient=_address_field(_field(b, "Original-Recipient")),
            diagnostic_code=_opt(_field(b, "Diagnostic-Code")),
            remote_mta=_opt(_field(b, "Remote-MTA")),
        )
        for b in per_recipient[:MAX_RECIPIENTS]
        if _field(b, "Action")
    )
    if not recipients:
        raise NotADsn("delivery-status part has no per-recipient Action")
    texts: list[str] = [envelope_recipient] if envelope_recipient else []
    for name in TOKEN_HEADERS:
        texts.extend(str(v) for v in msg.get_all(name, []))
    texts.extend(filter(None, [_field(per_message, "X-Postfix-Sender")]))
    return DeliveryReport(find_tokens(texts), recipients, _opt(_field(per_message, "Reporting-MTA")))


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a delivery-status part (the parser splits them into sub-messages)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    # some MTAs send it base64/quoted-printable encoded: decode and split on blank lines
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        return []
    chunks = re.split(rb"\r?\n[ \t]*\r?\n", body.strip())
    return [message_from_bytes(chunk + b"\n\n", policy=compat32) for chunk in chunks if chunk.strip()]


def _field(block: Message, name: str) -> str | None:
    value = block.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())


def _clean(text: str, limit: int = MAX_TEXT) -> str:
    return _CONTROL.sub(" ", text).strip()[:limit]


def _opt(value: object) -> str | None:
    if value is None:
        return None
    text = _clean(str(value))
    return text or None


def _status(value: str | None) -> str:
    match = _STATUS.match(value or "")
    return ".".join(match.groups()) if match else ""


def _address_field(value: str | None) -> str | None:
    """``rfc822; user@example.ro`` → ``user@example.ro``."""
    if not value:
        return None
    _, _, address = value.partition(";")
    return _opt((address or value).strip().strip("<>"))


# ---- failures seen on the SMTP session itself ---------------------------------------------------

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def is_bad_mailbox(code: int | None, message: str) -> bool:
    """A 5xx refusal of RCPT that names the address itself (5.1.x bad address, 5.2.1 disabled).

    Counted as a hard bounce like a DSN. A bare ``550`` without an enhanced status is not: it is
    as often "relaying denied" (our configuration) as "no such user" (the address).
    """
    if code is None or not 500 <= code <= 599:
        return False
    match = _ENHANCED.search(message)
    if match is None or match.group(1) != "5":
        return False
    subject, detail = match.group(2), match.group(3)
    return subject == "1" or (subject, detail) == ("2", "1")


def recipients_of(report: DeliveryReport) -> Sequence[str]:
    """Final recipients named by the report (for the log line)."""
    return [r.final_recipient for r in report.recipients if r.final_recipient]
