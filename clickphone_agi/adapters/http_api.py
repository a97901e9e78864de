"""The HTTP intake API (aiohttp): bearer-token auth, idempotency keys, health and metrics.

* ``/v1/*`` needs ``Authorization: Bearer <api token>`` (compared in constant time) and, on
  POST/PUT, an ``Idempotency-Key`` header; the work itself is :mod:`clickphone_agi.services.intake`.
* Every error is JSON ``{"error": "...", "field": <path or null>}``; bodies over
  ``api.max_body_bytes`` are 413.
* ``GET /healthz`` (no auth): 200 or 503 with the AMI link, the oldest pending mail and whether
  the database takes a write. ``GET /metrics`` (no auth): Prometheus text from a dedicated
  registry whose collector reads the daemon's live status figures at scrape time.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from clickphone_agi.services.intake import ApiError, Intake, Reply, body_hash, check_key

log = structlog.get_logger(__name__)

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
_JSON_CONTENT = "application/json"


MAX_JSON_DEPTH = 32  # the bodies are three levels deep; body_hash and the parsers walk them recursively


def _json_problem(value: Any) -> str | None:
    """What json.loads accepts but the service cannot use, walked iteratively (no recursion):
    nesting deeper than :data:`MAX_JSON_DEPTH` (body_hash and the field parsers recurse), and
    text with a lone surrogate such as ``"\\ud800"``, which is not Unicode: it cannot be
    encoded to hash, store or mail."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level > MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
        elif isinstance(item, str) and not _is_unicode(item):
            return "a string holds a lone surrogate (\\ud800-\\udfff): not Unicode text"
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


class StatusCollector(Collector):
    """Metric families built from the last status snapshot (refreshed right before each scrape)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.status
        events = CounterMetricFamily("clickphone_ami_events", "AMI events received, by type", labels=["type"])
        for kind, count in sorted((s.get("events") or {}).items()):
            events.add_metric([str(kind)], float(count))
        yield events
        ami = s.get("ami")
        if ami is not None:
            yield CounterMetricFamily(
                "clickphone_ami_reconnects", "AMI connections after the first", value=max(0, int(ami["connects"]) - 1)
            )
            yield GaugeMetricFamily("clickphone_ami_connected", "1 if the AMI link is up", value=int(ami["connected"]))
        queue = s.get("queue") or {}
        yield GaugeMetricFamily("clickphone_ingest_queue_depth", "events waiting", value=queue.get("depth", 0))
        yield CounterMetricFamily(
            "clickphone_ingest_dropped", "events dropped by a full queue", value=queue.get("dropped", 0)
        )
        money = s.get("money")
        if money is not None:
            charges = CounterMetricFamily("clickphone_money_decisions", "money decisions", labels=["decision"])
            for name in ("allowed", "denied", "charged", "unrated"):
                charges.add_metric([name], float(money.get(name, 0)))
            yield charges
        mail = s.get("mail") or {}
        rows = GaugeMetricFamily(
            "clickphone_outbox_messages", "outbox rows by kind and outcome", labels=["kind", "outcome"]
        )
        for kind, figures in sorted((mail.get("by_kind") or {}).items()):
            for outcome, count in sorted(figures.items()):
                rows.add_metric([str(kind), str(outcome)], float(count))
        yield rows
        oldest = mail.get("oldest_pending_age_seconds")
        yield GaugeMetricFamily(
            "clickphone_outbox_oldest_pending_age_seconds", "age of the oldest pending mail", value=oldest or 0
        )
        notices = CounterMetricFamily("clickphone_notices_queued", "notices queued since start", labels=["kind"])
        for kind, count in sorted(((s.get("notices") or {}).get("queued") or {}).items()):
            notices.add_metric([str(kind)], float(count))
        yield notices


class HttpApi:
    """The aiohttp application and its runner on ``host:port``."""

    def __init__(
        self,
        intake: Intake,
        token: str | None,
        *,
        host: str,
        port: int,
        max_body_bytes: int,
        status: StatusSource,
    ) -> None:
        self._intake = intake
        self._token = token.encode() if token else None
        self._host = host
        self._port = port
        self._status = status
        self._collector = StatusCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors, self._auth])
        self.app.router.add_put("/v1/accounts/{code}", self._put_account)
        self.app.router.add_post("/v1/accounts/{code}/events", self._post_event)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        log.info("api.listening", host=self._host, port=self._port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.message, exc.field)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "request body too large", None)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason, None)
        except Exception:
            log.exception("api.failed", method=request.method, path=request.path)
            return _error(500, "internal error", None)

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            ok = (
                self._token is not None
                and scheme.lower() == "bearer"
                and hmac.compare_digest(given.strip().encode(), self._token)
            )
            if not ok:
                return web.json_response(
                    {"error": "missing or wrong bearer token", "field": None},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    # ---- helpers -------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if request.content_type != _JSON_CONTENT:
            raise ApiError(415, f"expected Content-Type {_JSON_CONTENT}", None)
        try:
            body = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise ApiError(400, "not valid JSON: nested too deeply", None) from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise ApiError(400, f"not valid JSON: {exc}", None) from None
        problem = _json_problem(body)
        if problem is not None:
            raise ApiError(400, f"not valid JSON: {problem}", None)
        return body

    @staticmethod
    def _caller_ip(request: web.Request) -> str:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        for candidate in (forwarded, request.remote or ""):
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                continue
        return ""

    @staticmethod
    def _reply(reply: Reply) -> web.Response:
        return web.json_response(reply.body, status=reply.status)

    async def _prepare(self, request: web.Request) -> tuple[str, str, Any]:
        key = check_key(request.headers.get("Idempotency-Key"))
        body = await self._body(request)
        return key, body_hash(request.method, request.path, body), body

    # ---- routes --------------------------------------------------------------------------------

    async def _put_account(self, request: web.Request) -> web.Response:
        key, digest, body = await self._prepare(request)
        code = request.match_info["code"]
        return self._reply(await self._intake.put_account(key, digest, code, body, self._caller_ip(request)))

    async def _post_event(self, request: web.Request) -> web.Response:
        key, digest, body = await self._prepare(request)
        code = request.match_info["code"]
        return self._reply(await self._intake.post_event(key, digest, code, body, self._caller_ip(request)))

    async def _healthz(self, _request: web.Request) -> web.Response:
        status = await self._status()
        ami = status.get("ami")
        try:
            await self._intake.ping()
            writable = True
        except Exception as exc:
            log.warning("api.health_db_failed", error=repr(exc))
            writable = False
        mail = status.get("mail") or {}
        ami_ok = ami is None or bool(ami.get("connected"))
        body = {
            "ok": ami_ok and writable,
            "ami": None if ami is None else {"connected": bool(ami.get("connected")), "state": ami.get("state")},
            "outbox_oldest_pending_age_seconds": mail.get("oldest_pending_age_seconds"),
            "database_writable": writable,
        }
        return web.json_response(body, status=200 if body["ok"] else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        self._collector.status = await self._status()
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")
