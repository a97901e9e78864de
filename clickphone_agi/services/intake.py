"""The intake API's service layer: account upserts and subscriber events with idempotency keys.

Transport-neutral (no aiohttp): the HTTP adapter — and later the CLI — hands over the decoded
JSON body, the ``Idempotency-Key`` and the caller's address, and gets a :class:`Reply` back.

Every operation follows the notices' pattern: read what the mail needs, render it off the loop,
then ONE unit of work that re-checks what was read, applies the effects, enqueues the mail and
records the key with its response — so an operation is never applied without its key recorded,
nor the other way round. If what was read changed meanwhile (a concurrent charge moved the
balance the mail announces), the operation is rendered again (a few times at most).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from clickphone_agi.adapters.accounts_file import _MAILBOX_FIELDS, _PARSERS, FIELDS, _Bad, _ManyBad, _unknown, _Value
from clickphone_agi.clock import Clock
from clickphone_agi.domain.accounts import Account, AccountConflict, parse_amount
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.domain.money import format_ron
from clickphone_agi.domain.outbox import MAX_KEY as OUTBOX_KEY_MAX
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.notices.render import TEXT_MAX, NoticeError, Renderer, build_message
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.accounts import consent_for_upsert

EVENT_TYPES = ("password_changed", "password_recovery", "pin_created", "topup", "payment_confirmed", "balance_info")
# the ``data`` fields each type takes (openapi.yaml, Event.data); ``source_ip`` is taken by every type
EVENT_FIELDS: dict[str, frozenset[str]] = {
    "password_changed": frozenset({"at"}),
    "password_recovery": frozenset({"reset_url", "expires_at"}),
    "pin_created": frozenset({"number", "at"}),
    "topup": frozenset({"amount", "reference"}),
    "payment_confirmed": frozenset({"amount", "method", "reference"}),
    "balance_info": frozenset(),
}
MAX_KEY = 200
_ATTEMPTS = 5
_BOOLEAN_FIELDS = frozenset({"marketing_consent", "enabled"})


class ApiError(Exception):
    """A request the service refuses: HTTP-like status, a message and the offending field path."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class IntakeSettings:
    sender: str
    message_id_domain: str
    timezone: str = "Europe/Bucharest"
    default_language: str = "ro"  # notifications.default_language: an account PUT without one


class _Changed(Exception):
    """What the rendered mail was based on changed before the transaction: render again."""


def body_hash(method: str, path: str, body: Any) -> str:
    """sha256 of the request line and the canonical JSON of the body (key order, spacing ignored)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def internal_key(kind: str, name: str) -> str:
    """A key the daemon records for itself beside the clients' keys (``policy 3.2``): its space is
    a character :func:`check_key` refuses, so no Idempotency-Key a client sends can take it first."""
    return f"{kind} {name}"


def check_key(key: str | None) -> str:
    if key is None or not key.strip():
        raise ApiError(400, "the Idempotency-Key header is required", "Idempotency-Key")
    key = key.strip()
    if len(key) > MAX_KEY or any(ord(c) < 33 or ord(c) > 126 for c in key):
        raise ApiError(400, f"Idempotency-Key: 1-{MAX_KEY} printable ASCII characters", "Idempotency-Key")
    return key


# ---- account fields: the import file's parsers, fed from JSON --------------------------------


def _to_value(raw: Any, where: str, *, top: str) -> _Value:
    if raw is None:
        return _Value(where, 0)
    if isinstance(raw, bool):
        if top not in _BOOLEAN_FIELDS:
            raise ApiError(400, "expected text, not true/false", where)
        return _Value(where, 0, flag=raw)
    if isinstance(raw, int):
        return _Value(where, 0, text=str(raw))
    if isinstance(raw, float):
        raise ApiError(400, 'give amounts and numbers as text such as "12.50" (binary floats are inexact)', where)
    if isinstance(raw, str):
        return _Value(where, 0, text=raw)
    if isinstance(raw, list):
        items = [_to_value(item, f"{where}[{i}]", top=top) for i, item in enumerate(raw)]
        return _Value(where, 0, items=items, kind="list")
    if isinstance(raw, dict):
        for k in raw:
            if top == "mailboxes" and k not in _MAILBOX_FIELDS:  # as the import file refuses it
                raise ApiError(400, _unknown(str(k), _MAILBOX_FIELDS), f"{where}.{k}")
        fields = {str(k): _to_value(v, f"{where}.{k}", top=top) for k, v in raw.items()}
        return _Value(where, 0, fields=fields, kind="mapping")
    raise ApiError(400, "unsupported value", where)


def parse_account(code: str, body: Any, default_language: str = "ro") -> tuple[Account, int, str | None]:
    """The PUT body → (account, opening balance in bani, ``source_ip`` if given); same fields as
    ``accounts import`` (``code`` optional, and then the path's; ``language`` else the default)."""
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object", None)
    body = dict(body)
    source_ip = body.pop("source_ip", None)
    if source_ip is not None:
        source_ip = _ip(source_ip, "source_ip")
    for name in body:
        if name not in FIELDS:
            raise ApiError(400, f"unknown field {name!r}", str(name))
    if body.get("code", code) != code:
        raise ApiError(400, "does not match the account code in the path", "code")
    body["code"] = code
    parsed: dict[str, Any] = {}
    for name in FIELDS:
        value = _to_value(body.get(name), name, top=name)
        try:
            parsed[name] = _PARSERS[name](value)
        except _ManyBad as many:
            raise ApiError(400, many.bads[0].message, many.bads[0].value.where) from None
        except _Bad as bad:
            raise ApiError(400, bad.message, bad.value.where) from None
    opening = int(parsed.pop("opening_balance"))
    kwargs = {name: val for name, val in parsed.items() if val is not None}
    kwargs.setdefault("language", default_language)
    dids = kwargs.pop("dids", [])
    boxes = kwargs.pop("mailboxes", [])
    try:
        account = Account(**kwargs, dids=tuple(d for d, _ in dids), mailboxes=tuple(b for b, _ in boxes))
    except (ValueError, TypeError) as exc:
        field, _, _ = str(exc).partition(":")
        raise ApiError(400, str(exc), field if field in FIELDS else None) from None
    return account, opening, source_ip


def _ip(raw: Any, where: str) -> str:
    if not isinstance(raw, str):
        raise ApiError(400, "expected an IP address as text", where)
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ApiError(400, "expected an IP address such as 198.51.100.7", where) from None


def _text(data: dict[str, Any], name: str, *, required: bool, limit: int = 200) -> str | None:
    raw = data.get(name)
    if raw is None:
        if required:
            raise ApiError(400, "missing (required)", f"data.{name}")
        return None
    if not isinstance(raw, str) or not raw.strip() or len(raw) > limit or any(ord(c) < 32 for c in raw):
        raise ApiError(400, f"expected one line of text (at most {limit} characters)", f"data.{name}")
    return raw.strip()


_EARLIEST = datetime.min.replace(tzinfo=UTC) + timedelta(days=1)
_LATEST = datetime.max.replace(tzinfo=UTC) - timedelta(days=1)


def _moment(data: dict[str, Any], name: str, *, required: bool) -> datetime | None:
    raw = _text(data, name, required=required, limit=64)
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, "expected an ISO 8601 time such as 2026-11-28T15:21:00+02:00", f"data.{name}") from None
    if moment.tzinfo is None:
        raise ApiError(400, "the time needs a UTC offset (Z or +02:00)", f"data.{name}")
    try:  # the mail shows it in local time: a day's margin keeps every zone inside the calendar
        representable = _EARLIEST <= moment.astimezone(UTC) <= _LATEST
    except OverflowError:
        representable = False
    if not representable:
        raise ApiError(400, "out of range: the time cannot be shown in local time", f"data.{name}")
    return moment


def _amount(data: dict[str, Any]) -> int:
    raw = data.get("amount")
    if raw is None:
        raise ApiError(400, "missing (required)", "data.amount")
    if not isinstance(raw, str):
        raise ApiError(400, 'expected the amount as text such as "12.50"', "data.amount")
    try:
        bani = parse_amount(raw)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, str(exc), "data.amount") from None
    if bani <= 0:
        raise ApiError(400, "must be more than 0", "data.amount")
    return bani


# ---- the service ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A rendered operation: the unit's effects (given the tx) and the mails to enqueue with them."""

    effects: Callable[[WriteTx], dict[str, Any]]
    messages: tuple[OutboxMessage, ...]
    status: int = 200


class Intake:
    """Account upserts and subscriber events with idempotency (see the module doc)."""

    def __init__(self, store: Store, clock: Clock, renderer: Renderer, settings: Callable[[], IntakeSettings]) -> None:
        self._store = store
        self._clock = clock
        self._renderer = renderer
        self._settings = settings
        self.requests: dict[str, int] = {}
        self.replays = 0

    async def ping(self) -> None:
        """A trivial unit of work: the database takes writes."""
        await self._store.write(lambda tx: tx.now)

    async def replay(self, key: str, digest: str) -> Reply | None:
        """The stored first response of ``key`` (409 if its body differed), or None if new."""
        found = await self._store.write(lambda tx: tx.api_request(key))
        return None if found is None else self._replayed(found, digest)

    def _replayed(self, found: tuple[str, int, str], digest: str) -> Reply:
        stored_hash, status, response = found
        if stored_hash != digest:
            raise ApiError(409, "this Idempotency-Key was used with a different request", "Idempotency-Key")
        self.replays += 1
        return Reply(status, json.loads(response))

    async def put_account(self, key: str, digest: str, code: str, body: Any, caller_ip: str) -> Reply:
        account, opening, source_ip = parse_account(code, body, self._settings().default_language)

        async def plan() -> _Plan:
            old = await self._store.write(lambda tx: tx.get_account(code))
            messages: tuple[OutboxMessage, ...] = ()
            if old is not None and set(old.allowed_ips) != set(account.allowed_ips):
                data = {
                    "name": account.name,
                    # empty means any address: the templates say so in words
                    "allowed_ips": [str(n) for n in account.allowed_ips],
                    "old_allowed_ips": [str(n) for n in old.allowed_ips],
                    "source_ip": source_ip or caller_ip,
                    "at": self._clock.now(),
                }
                messages = (await self._render("allowed_ip_changed", key, account, data),)
                if old.email.lower() != account.email.lower():
                    # the same request moved the address: a hijacked portal session would alert only
                    # the attacker's, so the address the subscriber had until now is told too
                    previous = replace(account, email=old.email)
                    messages += (await self._render("allowed_ip_changed", f"{key}:previous", previous, data),)

            def effects(tx: WriteTx) -> dict[str, Any]:
                if tx.get_account(code) != old:
                    raise _Changed
                stored = consent_for_upsert(tx, account, "api", "PUT /v1/accounts")
                try:
                    created = tx.upsert_account(stored, opening)
                except AccountConflict as exc:
                    raise ApiError(409, str(exc), exc.field) from None
                # marketing_consent follows the consent history (PUT .../consent changes it)
                return {
                    "account": code,
                    "created": created,
                    "balance": tx.balance(code),
                    "marketing_consent": stored.marketing_consent,
                }

            return _Plan(effects, messages)

        reply = await self._run(key, digest, plan)
        if reply.body.get("created") is True and reply.status == 200:
            return Reply(201, reply.body)
        return reply

    async def post_event(self, key: str, digest: str, code: str, body: Any, caller_ip: str) -> Reply:
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object", None)
        kind = body.get("type")
        if kind not in EVENT_TYPES:
            raise ApiError(400, f"expected one of {', '.join(EVENT_TYPES)}", "type")
        data = body.get("data", {})
        if not isinstance(data, dict):
            raise ApiError(400, "expected a JSON object", "data")
        for name in body:
            if name not in ("type", "data"):
                raise ApiError(400, f"unknown field {name!r}", str(name))
        for name in data:
            if name != "source_ip" and name not in EVENT_FIELDS[kind]:
                raise ApiError(400, f"unknown field {name!r} for a {kind} event", f"data.{name}")
        source_ip = _ip(data["source_ip"], "data.source_ip") if data.get("source_ip") is not None else caller_ip
        builder = getattr(self, f"_event_{kind}")

        async def plan() -> _Plan:
            result: _Plan = await builder(key, code, data, source_ip)
            return result

        return await self._run(key, digest, plan)

    # ---- the events ------------------------------------------------------------------------------

    async def _account(self, code: str) -> tuple[Account, int, int]:
        day = self._clock.now().astimezone(ZoneInfo(self._settings().timezone)).date().isoformat()

        def read(tx: WriteTx) -> tuple[Account | None, int, int]:
            return tx.get_account(code), tx.balance(code), tx.spent(code, day)

        account, balance, spent = await self._store.write(read)
        if account is None:
            raise ApiError(404, f"no account {code!r}", None)
        if account.erased:
            raise ApiError(410, f"account {code!r} was erased (privacy erase): it takes no more events", None)
        return account, balance, spent

    def _simple(self, code: str, kind: str, account: Account, message: OutboxMessage) -> _Plan:
        def effects(tx: WriteTx) -> dict[str, Any]:
            if tx.get_account(code) != account:
                raise _Changed
            return {"account": code, "event": kind}

        return _Plan(effects, (message,), 202)

    async def _event_password_changed(self, key: str, code: str, data: dict[str, Any], ip: str) -> _Plan:
        account, _, _ = await self._account(code)
        at = _moment(data, "at", required=False) or self._clock.now()
        msg = await self._render("password_changed", key, account, {"name": account.name, "source_ip": ip, "at": at})
        return self._simple(code, "password_changed", account, msg)

    async def _event_password_recovery(self, key: str, code: str, data: dict[str, Any], ip: str) -> _Plan:
        account, _, _ = await self._account(code)
        # no longer than the renderer keeps a one-line value: a cut link would not work
        url = _text(data, "reset_url", required=True, limit=TEXT_MAX)
        if url is None or not url.startswith("https://") or any(c in url for c in " \"'<>\\"):
            raise ApiError(400, "expected an https:// URL", "data.reset_url")
        expires = _moment(data, "expires_at", required=True)
        assert expires is not None
        if expires <= self._clock.now():
            raise ApiError(400, "already past", "data.expires_at")
        payload = {"name": account.name, "reset_url": url, "expires_at": expires, "source_ip": ip}
        msg = await self._render("password_recovery", key, account, payload, expires_at=expires)
        return self._simple(code, "password_recovery", account, msg)

    async def _event_pin_created(self, key: str, code: str, data: dict[str, Any], ip: str) -> _Plan:
        account, _, _ = await self._account(code)
        number = _text(data, "number", required=False, limit=32) or (f"+{account.dids[0]}" if account.dids else "")
        at = _moment(data, "at", required=False) or self._clock.now()
        msg = await self._render("pin_created", key, account, {"name": account.name, "number": number, "at": at})
        return self._simple(code, "pin_created", account, msg)

    async def _event_topup(self, key: str, code: str, data: dict[str, Any], ip: str) -> _Plan:
        amount = _amount(data)
        reference = _text(data, "reference", required=False) or key
        account, balance, _ = await self._account(code)
        expected = balance + amount
        lang = account.language
        payload = {
            "name": account.name,
            "amount": format_ron(amount, lang),
            "balance": format_ron(expected, lang),
            "reference": reference,
            "at": self._clock.now(),
        }
        msg = await self._render("topup", key, account, payload)

        def effects(tx: WriteTx) -> dict[str, Any]:
            if tx.get_account(code) != account or tx.balance(code) != balance:
                raise _Changed
            if not tx.post_ledger(code, amount, "topup", f"api:{key}", f"top-up {reference}"):
                # the key's request row was purged (retention) but its ledger ref stays: a reuse
                raise ApiError(
                    409, "this Idempotency-Key was already used for a booked top-up; use a new key", "Idempotency-Key"
                )
            new = tx.balance(code)
            if new >= account.low_balance_threshold:
                tx.set_state(code, "low_armed", "1")
            return {"account": code, "event": "topup", "amount": amount, "balance": new}

        return _Plan(effects, (msg,), 200)

    async def _event_payment_confirmed(self, key: str, code: str, data: dict[str, Any], ip: str) -> _Plan:
        amount = _amount(data)
        method = _text(data, "method", required=True, limit=40)
        reference = _text(data, "reference", required=True)
        account, _, _ = await self._account(code)
        payload = {
            "name": account.name,
            "amount": format_ron(amount, account.language),
            "invoice": reference,
            "method": method,
            "at": self._clock.now(),
        }
        msg = await self._render("payment_confirmed", key, account, payload)
        return self._simple(code, "payment_confirmed", account, msg)

    async def _event_balance_info(self, key: str, code: str, data: dict[str, Any], ip: str) -> _Plan:
        account, balance, spent = await self._account(code)
        lang = account.language
        payload = {
            "name": account.name,
            "balance": format_ron(balance, lang),
            "spent_today": format_ron(spent, lang),
            "at": self._clock.now(),
        }
        msg = await self._render("balance_info", key, account, payload)
        day = self._clock.now().astimezone(ZoneInfo(self._settings().timezone)).date().isoformat()

        def effects(tx: WriteTx) -> dict[str, Any]:
            if tx.get_account(code) != account or tx.balance(code) != balance or tx.spent(code, day) != spent:
                raise _Changed
            return {"account": code, "event": "balance_info", "balance": balance, "spent_today": spent}

        return _Plan(effects, (msg,), 202)

    # ---- common ------------------------------------------------------------------------------------

    async def _render(
        self, kind: str, key: str, account: Account, data: dict[str, Any], *, expires_at: datetime | None = None
    ) -> OutboxMessage:
        """Render off the loop, as the Notifier does; the outbox key is ``api:<kind>:<key>`` (with
        the key's sha256 in its place when that would be longer than the outbox takes)."""
        s = self._settings()
        now = self._clock.now()
        notice_key = f"api:{kind}:{key}"
        if len(notice_key) > OUTBOX_KEY_MAX:  # a long Idempotency-Key: its digest is as unique and fits
            notice_key = f"api:{kind}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"

        def render() -> bytes:
            rendered = self._renderer.render(kind, account.language, data)
            return build_message(
                rendered, sender=s.sender, recipient=account.email,
                message_id=message_id(notice_key, s.message_id_domain), date=now,
                extra_headers={"X-ClickPhone-Kind": kind},
            )  # fmt: skip

        try:
            mime = await asyncio.to_thread(render)
        except NoticeError as exc:
            raise ApiError(400, f"cannot build the {kind} mail: {exc}", "data") from None
        lifetime = (expires_at - now) if expires_at is not None else KINDS[kind].lifetime
        return OutboxMessage.build(
            key=notice_key, kind=kind, recipient=account.email, account=account.code, mime=mime, now=now,
            lifetime=max(lifetime, timedelta(seconds=1)),
        )  # fmt: skip

    async def _run(self, key: str, digest: str, plan: Callable[[], Any]) -> Reply:
        """Replay a known key, else plan (read + render) and commit effects, mails and key in one unit."""
        for _ in range(_ATTEMPTS):
            known = await self.replay(key, digest)
            if known is not None:
                return known
            planned: _Plan = await plan()

            def unit(tx: WriteTx, planned: _Plan = planned) -> Reply:
                found = tx.api_request(key)
                if found is not None:
                    return self._replayed(found, digest)
                body = planned.effects(tx)
                queued = [tx.enqueue(m) for m in planned.messages]
                if not all(queued):
                    # the key's stored answer was purged (retention) but its mail's key stays in the
                    # outbox: a reuse would answer 202 and mail nothing (a password change unannounced)
                    raise ApiError(
                        409,
                        "this Idempotency-Key was used before (its answer is no longer kept); use a new key",
                        "Idempotency-Key",
                    )
                body["mails"] = len(queued)
                tx.record_api_request(key, digest, planned.status, json.dumps(body, sort_keys=True))
                return Reply(planned.status, body)

            try:
                reply = await self._store.write(unit)
            except _Changed:
                continue
            self.requests[str(reply.status)] = self.requests.get(str(reply.status), 0) + 1
            return reply
        raise ApiError(503, "the account kept changing; try again", None)
