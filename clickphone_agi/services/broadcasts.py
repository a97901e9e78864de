"""Broadcasts: a tariff change (service notice, every selected account) or an offer (marketing).

Transport-neutral, like :mod:`clickphone_agi.services.intake`. The broadcast id is the request's
Idempotency-Key. Mails are queued by :func:`fan_out` in chunks of ``api.broadcast_chunk``
accounts, one unit of work each, so a 100k-account broadcast never holds the single writer for
long; each outbox row's key is ``bc:<id>:<account>``, so a broadcast interrupted by a crash and
sent again completes without doubles. Rows carry the template data only: the sender renders each
at its first attempt (off the event loop) and its rate limit paces them. An offer goes only to an
account whose newest consent record is a grant and whose address is on no suppression list, with
its own signed RFC 8058 one-click link; the sender checks consent and suppression again before
every attempt, so an unsubscribe after queueing still stops it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from clickphone_agi.clock import Clock
from clickphone_agi.domain.accounts import check_code
from clickphone_agi.domain.consent import Candidate, Skip, audience_matches, earliest_effective, marketing_skip
from clickphone_agi.domain.money import Notice
from clickphone_agi.domain.unsubscribe import make_token, unsubscribe_url
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.notices.render import TEXT_MAX, NoticeError, Renderer
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.idempotency import replayed
from clickphone_agi.services.intake import ApiError, Reply

log = structlog.get_logger(__name__)

BROADCAST_KINDS = ("tariff_change", "offer")
_URL = re.compile(r"https://[^\s\"'<>\\]{1,2000}")
_SAMPLE_NAME = "Ion Popescu"


@dataclass(frozen=True)
class BroadcastSettings:
    timezone: str = "Europe/Bucharest"
    public_base_url: str | None = None
    unsubscribe_secret: bytes | None = None
    chunk: int = 500


@dataclass
class FanOut:
    """What one pass over the accounts did: rows that belong to it (new or queued by an earlier,
    interrupted pass), rows queued now, and the accounts skipped, by reason."""

    recipients: int = 0
    queued: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, other: FanOut) -> None:
        self.recipients += other.recipients
        self.queued += other.queued
        self.skipped.update(other.skipped)


Decide = Callable[[Candidate], Notice | Skip | None]  # None: not in the audience at all


async def fan_out(store: Store, chunk: int, decide: Decide) -> FanOut:
    """Every account in code order, ``chunk`` per unit of work; each unit reads its accounts with
    their consent and suppressions and queues their notices in the same transaction."""
    total = FanOut()
    after: str | None = None
    while True:

        def unit(tx: WriteTx, after: str | None = after) -> tuple[str | None, int, FanOut]:
            rows = tx.candidates(after, chunk)
            part = FanOut()
            for candidate in rows:
                decision = decide(candidate)
                if decision is None:
                    continue
                if isinstance(decision, Skip):
                    part.skipped[str(decision)] += 1
                    continue
                part.recipients += 1
                part.queued += int(tx.enqueue_notice(decision))
            return (rows[-1].account.code if rows else None), len(rows), part

        last, seen, part = await store.write(unit)
        total.add(part)
        if seen < chunk:
            return total
        after = last


# ---- request validation ----------------------------------------------------------------------------


def text_field(body: dict[str, Any], name: str, *, limit: int, multiline: bool = False) -> str:
    raw = body.get(name)
    if raw is None:
        raise ApiError(400, "missing (required)", name)
    allowed = "\n\r\t" if multiline else ""
    bad_char = isinstance(raw, str) and any(ord(c) < 32 and c not in allowed for c in raw)
    if not isinstance(raw, str) or not raw.strip() or len(raw) > limit or bad_char:
        what = "text" if multiline else "one line of text"
        raise ApiError(400, f"expected {what} (at most {limit} characters)", name)
    return raw.strip()


def date_field(body: dict[str, Any], name: str) -> date:
    raw = body.get(name)
    if not isinstance(raw, str):
        raise ApiError(400, "expected an ISO date such as 2027-01-01", name)
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, "expected an ISO date such as 2027-01-01", name) from None


def url_field(body: dict[str, Any], name: str) -> str:
    raw = body.get(name)
    if not isinstance(raw, str) or not _URL.fullmatch(raw):
        raise ApiError(400, "expected an https:// URL", name)
    if len(raw) > TEXT_MAX:  # the renderer would cut it, and every mail would carry a broken link
        raise ApiError(400, f"expected an https:// URL of at most {TEXT_MAX} characters", name)
    return raw


@dataclass(frozen=True)
class Broadcast:
    """A validated request: the kind, the template data shared by every mail, and the audience."""

    kind: str
    data: dict[str, Any]
    accounts: frozenset[str] | None
    billing: str | None
    expires: datetime | None = None  # an offer is not sent after its validity ends


_FIELDS = {
    "tariff_change": ("tariff", "effective", "changes", "url"),
    "offer": ("title", "body", "url", "valid_until"),
}


def parse_broadcast(body: Any, today: date, zone: ZoneInfo) -> Broadcast:
    """Check a request body; every refusal names its field."""
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object", None)
    kind = body.get("kind")
    if kind not in BROADCAST_KINDS:
        raise ApiError(400, f"expected one of {', '.join(BROADCAST_KINDS)}", "kind")
    for name in body:
        if name not in ("kind", "accounts", "billing", *_FIELDS[kind]):
            raise ApiError(400, f"unknown field {name!r} for a {kind} broadcast", str(name))
    accounts = _audience(body.get("accounts"))
    billing = body.get("billing")
    if billing is not None and billing not in ("prepaid", "postpaid"):
        raise ApiError(400, "expected prepaid or postpaid", "billing")
    url = url_field(body, "url")
    if kind == "tariff_change":
        effective = date_field(body, "effective")
        earliest = earliest_effective(today)
        if effective < earliest:
            raise ApiError(
                400,
                f"a contract change must be announced at least one month ahead: effective on {earliest} or later",
                "effective",
            )
        data = {
            "tariff": text_field(body, "tariff", limit=100),
            "effective": effective.isoformat(),
            "changes": text_field(body, "changes", limit=10_000, multiline=True),
            "url": url,
        }
        return Broadcast(kind, data, accounts, billing)
    until = date_field(body, "valid_until")
    if until < today:
        raise ApiError(400, "already past", "valid_until")
    data = {
        "title": text_field(body, "title", limit=150),
        "body": text_field(body, "body", limit=10_000, multiline=True),
        "url": url,
        "valid_until": until.isoformat(),
    }
    end = datetime.combine(until + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    return Broadcast(kind, data, accounts, billing, end)


def _audience(raw: Any) -> frozenset[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "expected a non-empty list of account codes (omit it for every account)", "accounts")
    for i, code in enumerate(raw):
        try:
            if not isinstance(code, str):
                raise ValueError("expected an account code")
            check_code(code)
        except ValueError as exc:
            raise ApiError(400, str(exc), f"accounts[{i}]") from None
    return frozenset(raw)


# ---- the service -----------------------------------------------------------------------------------


class BroadcastService:
    def __init__(
        self, store: Store, clock: Clock, renderer: Renderer, settings: Callable[[], BroadcastSettings]
    ) -> None:
        self._store = store
        self._clock = clock
        self._renderer = renderer
        self._settings = settings
        self.broadcasts: Counter[str] = Counter()
        self.mails: Counter[str] = Counter()

    async def post(self, key: str, digest: str, body: Any) -> Reply:
        s = self._settings()
        zone = ZoneInfo(s.timezone)
        now = self._clock.now()
        spec = parse_broadcast(body, now.astimezone(zone).date(), zone)
        secret = s.unsubscribe_secret
        base = s.public_base_url
        if spec.kind == "offer" and (base is None or secret is None):
            raise ApiError(
                400,
                "offers need a one-click unsubscribe link: configure api.public_base_url and"
                " api.unsubscribe_secret_file (or the unsubscribe-secret credential) first",
                "kind",
            )
        await self._check_renders(spec)
        params = json.dumps(body, sort_keys=True, ensure_ascii=False)

        def start(tx: WriteTx) -> Reply | None:
            found = tx.api_request(key)
            if found is not None:
                return replayed(found, digest)  # finished before: nothing more to queue
            existing = tx.broadcast(key)
            if existing is not None and existing != (spec.kind, params):
                raise ApiError(409, "this broadcast id was used with a different request", "Idempotency-Key")
            tx.start_broadcast(key, spec.kind, params)
            return None

        done = await self._store.write(start)
        if done is not None:
            return done
        lifetime = KINDS[spec.kind].lifetime

        def decide(candidate: Candidate) -> Notice | Skip | None:
            account = candidate.account
            if not audience_matches(account, spec.accounts, spec.billing):
                return None
            payload = {**spec.data, "name": account.name, "language": account.language}
            life = lifetime
            if spec.kind == "offer":
                assert base is not None
                assert secret is not None
                skip = marketing_skip(candidate)
                if skip is not None:
                    return skip
                payload["unsubscribe_url"] = unsubscribe_url(base, make_token(secret, account.code))
                if spec.expires is not None:
                    life = min(lifetime, spec.expires - now)
            return Notice(f"bc:{key}:{account.code}", spec.kind, account.email, account.code, payload, life)

        result = await fan_out(self._store, s.chunk, decide)
        response = {
            "broadcast": key,
            "kind": spec.kind,
            "recipients": result.recipients,
            "queued": result.queued,
            "skipped": dict(sorted(result.skipped.items())),
        }

        def finish(tx: WriteTx) -> Reply:
            found = tx.api_request(key)
            if found is not None:
                return replayed(found, digest)
            tx.finish_broadcast(key, result.recipients, sum(result.skipped.values()))
            tx.record_api_request(key, digest, 202, json.dumps(response, sort_keys=True))
            return Reply(202, response)

        reply = await self._store.write(finish)
        self.broadcasts[spec.kind] += 1
        self.mails[spec.kind] += result.queued
        log.info("broadcast.queued", id=key, kind=spec.kind, **{k: v for k, v in response.items() if k != "kind"})
        return reply

    async def _check_renders(self, spec: Broadcast) -> None:
        """Render the mail once per language now: a template problem is a 400, not 100k dead letters."""
        sample = {**spec.data, "name": _SAMPLE_NAME}
        if spec.kind == "offer":
            sample["unsubscribe_url"] = "https://example.invalid/v1/unsubscribe/x"

        def render() -> None:
            for lang in ("ro", "en"):
                self._renderer.render(spec.kind, lang, sample)

        try:
            await asyncio.to_thread(render)
        except NoticeError as exc:
            raise ApiError(400, f"cannot build the {spec.kind} mail: {exc}", None) from None
