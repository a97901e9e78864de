"""The privacy-policy archive: publish a version once, keep it byte for byte, tell every subscriber.

A version is immutable (the table's triggers refuse UPDATE and DELETE) and identified by its
label; its sha256 proves later which words were in force. Publishing the same version with the
same text again is harmless and queues nothing more; with another text it is 409. The
``policy_changed`` notice goes to every account whatever its marketing consent (a service
notice: no offer in it), with the operator's summary and a link to the archived text on
``api.public_base_url``, queued in chunks like a broadcast (``policy:<version>:<account>``).
The version is the idempotency key: the completed publication is recorded under
``policy <version>`` in the same table as the API's keys (a space: no client key has one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import structlog

from clickphone_agi.clock import Clock
from clickphone_agi.domain.consent import Candidate, Skip, check_policy_version
from clickphone_agi.domain.money import Notice
from clickphone_agi.domain.policy import Policy, archive_url
from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.ports import Store, WriteTx
from clickphone_agi.services.broadcasts import date_field, fan_out, text_field
from clickphone_agi.services.intake import ApiError, Reply, internal_key

log = structlog.get_logger(__name__)

MAX_POLICY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class PolicySettings:
    public_base_url: str | None = None
    chunk: int = 500


def policy_json(policy: Policy, *, text: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": policy.version,
        "sha256": policy.sha256,
        "effective_on": policy.effective_on.isoformat(),
        "published_at": policy.published_at.isoformat(),
        "summary": policy.summary,
        "bytes": len(policy.text),
    }
    if text:
        out["text"] = policy.text.decode("utf-8")
    return out


def parse_policy(body: Any) -> tuple[str, bytes, date, str]:
    """A publish request → (version, text as UTF-8 bytes, effective date, summary); refusals name the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "expected a JSON object", None)
    for name in body:
        if name not in ("version", "text", "effective_on", "summary"):
            raise ApiError(400, f"unknown field {name!r}", str(name))
    version = body.get("version")
    if not isinstance(version, str):
        raise ApiError(400, "expected a version label such as 3.2", "version")
    try:
        check_policy_version(version)
    except ValueError as exc:
        raise ApiError(400, str(exc), "version") from None
    raw = body.get("text")
    if not isinstance(raw, str) or not raw.strip():
        raise ApiError(400, "expected the policy text (non-empty)", "text")
    text = raw.encode("utf-8", "surrogatepass")
    if len(text) > MAX_POLICY_BYTES or "\x00" in raw:
        raise ApiError(400, f"expected UTF-8 text without NUL, at most {MAX_POLICY_BYTES} bytes", "text")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "not valid UTF-8 text (lone surrogate)", "text") from None
    effective = date_field(body, "effective_on")
    summary = text_field(body, "summary", limit=10_000, multiline=True)
    return version, text, effective, summary


class PolicyService:
    def __init__(self, store: Store, clock: Clock, settings: Callable[[], PolicySettings]) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self.published = 0
        self.mails = 0

    async def publish(self, body: Any) -> Reply:
        """``{"version", "text", "effective_on", "summary"}`` → archived and announced (201), or the
        first answer again (200) for a repeat."""
        version, text, effective, summary = parse_policy(body)
        s = self._settings()
        if s.public_base_url is None:
            raise ApiError(
                400, "api.public_base_url is not configured: the notice must link to the archived text", None
            )
        candidate = Policy(version, text, summary, effective, self._clock.now())
        done_key = internal_key("policy", version)

        def archive(tx: WriteTx) -> tuple[Policy, Reply | None]:
            existing = tx.policy(version)
            if existing is None:
                tx.publish_policy(candidate)
                return candidate, None
            if existing.text != text:
                raise ApiError(
                    409, f"version {version} was published with another text (sha256 {existing.sha256})", "text"
                )
            for name, old, new in (
                ("summary", existing.summary, summary),
                ("effective_on", existing.effective_on, effective),
            ):
                if old != new:
                    raise ApiError(409, f"version {version} was published with another {name}", name)
            found = tx.api_request(done_key)
            return existing, None if found is None else Reply(200, json.loads(found[2]))

        policy, repeat = await self._store.write(archive)
        if repeat is not None:
            return repeat  # completed before: nothing is queued again
        url = archive_url(s.public_base_url, version)
        lifetime = KINDS["policy_changed"].lifetime

        def decide(c: Candidate) -> Notice | Skip | None:
            account = c.account
            payload = {
                "name": account.name,
                "version": version,
                "effective": policy.effective_on.isoformat(),
                "summary": policy.summary,
                "url": url,
                "language": account.language,
            }
            key = f"policy:{version}:{account.code}"
            return Notice(key, "policy_changed", account.email, account.code, payload, lifetime)

        result = await fan_out(self._store, s.chunk, decide)
        response = {**policy_json(policy), "url": url, "recipients": result.recipients, "queued": result.queued}

        def finish(tx: WriteTx) -> Reply:
            found = tx.api_request(done_key)
            if found is not None:
                return Reply(200, json.loads(found[2]))
            tx.record_api_request(done_key, policy.sha256, 201, json.dumps(response, sort_keys=True))
            return Reply(201, response)

        reply = await self._store.write(finish)
        self.published += 1
        self.mails += result.queued
        log.info("policy.published", version=version, sha256=policy.sha256, queued=result.queued)
        return reply

    async def list(self) -> Reply:
        return Reply(200, {"policies": await self._store.policies()})

    async def get(self, version: str) -> Policy:
        policy = await self._store.policy(version)
        if policy is None:
            raise ApiError(404, f"no policy version {version!r}", None)
        return policy
