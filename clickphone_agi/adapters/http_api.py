"""The HTTP intake API (aiohttp): bearer-token auth, idempotency keys, health and metrics.

* Every route but :data:`PUBLIC_ROUTES` needs ``Authorization: Bearer <api token>`` (compared
  in constant time) and, on POST/PUT, an ``Idempotency-Key`` header; the work itself is
  :mod:`clickphone_agi.services.intake`.
* Every error is JSON ``{"error": "...", "field": <path or null>}``; bodies over
  ``api.max_body_bytes`` are 413.
* ``GET /healthz`` (no auth): 200 or 503 with the AMI link, the oldest pending mail and whether
  the database takes a write. ``GET /metrics`` (no auth): Prometheus text from a dedicated
  registry whose collector reads the daemon's live status figures at scrape time.
"""

from __future__ import annotations

import base64
import hmac
import html
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib.resources import files
from typing import Any

import structlog
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from clickphone_agi.ports import StorageUnavailable, Store
from clickphone_agi.services.audit import notifications
from clickphone_agi.services.broadcasts import BroadcastService
from clickphone_agi.services.consent import ConsentService
from clickphone_agi.services.intake import ApiError, Intake, Reply, body_hash, check_key
from clickphone_agi.services.policies import PolicyService, policy_json

log = structlog.get_logger(__name__)

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
_JSON_CONTENT = "application/json"
# no bearer token: what the operator's web front publishes to subscribers (one-click unsubscribe,
# the archived policy texts), the API description itself, health and metrics. Matched against the
# route the router chose: the path text is decoded (x%2Ftext ends in /text) where the router's is not.
PUBLIC_ROUTES = frozenset(
    {"/v1/unsubscribe/{token}", "/v1/policies/{version}/text", "/v1/openapi.json", "/healthz", "/metrics"}
)


RETRY_AFTER_STORAGE = 30  # seconds a client is asked to wait when the database refuses writes
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


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, an IPv4-mapped IPv6 one (a dual-stack listener's peer) as IPv4; None if not one."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


class StatusCollector(Collector):
    """Metric families built from the last status snapshot (refreshed right before each scrape)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}

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
        held = s.get("held_for_storage") or {}
        yield GaugeMetricFamily(
            "clickphone_ingest_held_events",
            "events held because the database refuses writes (a full disk); retried until it takes them",
            value=held.get("held", 0),
        )
        yield CounterMetricFamily(
            "clickphone_storage_outages", "times the database refused the ingest's writes", value=held.get("outages", 0)
        )
        money = s.get("money")
        if money is not None:
            charges = CounterMetricFamily("clickphone_money_decisions", "money decisions", labels=["decision"])
            for name in ("allowed", "denied", "charged", "unrated"):
                value = money.get(name, 0)  # denied is a count by reason
                charges.add_metric([name], float(sum(value.values()) if isinstance(value, dict) else value))
            yield charges
            denied = money.get("denied")
            if isinstance(denied, dict):
                reasons = CounterMetricFamily(
                    "clickphone_agi_denied", "FastAGI authorisations denied, by reason", labels=["reason"]
                )
                trips = CounterMetricFamily(
                    "clickphone_limit_trips", "calls refused by a money limit", labels=["limit"]
                )
                for reason, count in sorted(denied.items()):
                    reasons.add_metric([str(reason)], float(count))
                trips.add_metric(["daily_limit"], float(denied.get("daily_limit", 0)))
                trips.add_metric(["credit"], float(denied.get("no_credit", 0)))
                yield reasons
                yield trips
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
        storage = s.get("storage") or {}
        for name, doc in (
            ("commits", "SQLite write transactions committed since start"),
            ("relaxed_commits", "of them, reservation batches committed without fsync (synced within 10 ms)"),
            ("wal_sync_failures", "failed fsyncs of the WAL after relaxed commits (a disk problem: act on it)"),
        ):
            yield CounterMetricFamily(f"clickphone_storage_{name}", doc, value=float(storage.get(name, 0)))
        yield from _figure_families(self.figures)
        yield from _retention_metrics(s.get("retention"))


def _figure_families(f: dict[str, Any]) -> Iterator[Metric]:
    """The API services' own counters and the FastAGI latency histogram (see ``ApiServices.figures``)."""
    latency = f.get("agi_latency")
    if latency is not None:
        histogram = HistogramMetricFamily(
            "clickphone_agi_session_seconds", "FastAGI session duration (request read to connection closed)"
        )
        histogram.add_metric([], [(b, float(c)) for b, c in latency["buckets"]], sum_value=latency["sum"])
        yield histogram
    for name, doc, label in (
        ("broadcasts", "broadcasts completed since start, by kind", "kind"),
        ("broadcast_mails", "mails queued by broadcasts and policy notices since start, by kind", "kind"),
        ("consent_changes", "consent records appended since start", "change"),
    ):
        family = CounterMetricFamily(f"clickphone_{name}", doc, labels=[label])
        for value, count in sorted((f.get(name) or {}).items()):
            family.add_metric([str(value)], float(count))
        yield family
    for name, doc in (
        ("unsubscribes", "one-click unsubscribes accepted since start"),
        ("unsubscribes_refused", "unsubscribe requests with a malformed or forged token since start"),
        ("policies_published", "privacy-policy versions published since start"),
    ):
        yield CounterMetricFamily(f"clickphone_{name}", doc, value=float(f.get(name, 0)))


def _retention_metrics(retention: dict[str, Any] | None) -> Iterator[Metric]:
    if retention is None:
        return
    purged = CounterMetricFamily("clickphone_retention_purged", "rows purged by retention since start", labels=["what"])
    for what, count in sorted((retention.get("purged_since_start") or {}).items()):
        purged.add_metric([str(what)], float(count))
    yield purged
    yield CounterMetricFamily("clickphone_retention_runs", "retention runs since start", value=retention["runs"])
    yield CounterMetricFamily(
        "clickphone_retention_failures", "retention runs that failed", value=retention["failures"]
    )
    last = retention.get("last_run") or {}
    if last.get("ok"):
        yield GaugeMetricFamily(
            "clickphone_retention_last_success_timestamp_seconds",
            "when the last successful retention run started (Unix time)",
            value=datetime.fromisoformat(last["at"]).timestamp(),
        )


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
        services: ApiServices | None = None,
        max_policy_bytes: int | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self._intake = intake
        self._token = token.encode() if token else None
        self._host = host
        self._port = port
        self._status = status
        self._services = services or ApiServices()
        self._max_body = max_body_bytes
        self._max_policy = max(max_policy_bytes or max_body_bytes, max_body_bytes)
        self._proxies = tuple(ipaddress.ip_network(proxy, strict=True) for proxy in trusted_proxies)
        self._collector = StatusCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        self.app = web.Application(client_max_size=self._max_policy, middlewares=[self._errors, self._auth])
        self.app.router.add_put("/v1/accounts/{code}", self._put_account)
        self.app.router.add_post("/v1/accounts/{code}/events", self._post_event)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self._add_routes()
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
        except StorageUnavailable as exc:  # a full disk: nothing was written; the same request may be retried
            log.error("api.storage_unavailable", method=request.method, path=request.path, error=str(exc))
            response = _error(503, "the database is not taking writes now (disk full?); retry later", None)
            response.headers["Retry-After"] = str(RETRY_AFTER_STORAGE)
            return response
        except Exception:
            log.exception("api.failed", method=request.method, path=request.path)
            return _error(500, "internal error", None)

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource  # None: no route (404, 405)
        if resource is None or resource.canonical not in PUBLIC_ROUTES:
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
        limit = self._max_policy if request.path == "/v1/policies" else self._max_body
        if (request.content_length or 0) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length or 0)
        raw = await request.read()
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
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

    def _caller_ip(self, request: web.Request) -> str:
        """The TCP peer, or behind a trusted proxy the rightmost X-Forwarded-For hop that is not one
        of ours: the entries left of it are whatever the client wrote (it is consent evidence).
        An unreadable hop on the way gives the peer; a chain of our own proxies, its far end."""
        peer = _address(request.remote or "")
        if peer is None or not self._trusted(peer):
            return "" if peer is None else str(peer)
        caller = peer
        for hop in reversed(",".join(request.headers.getall("X-Forwarded-For", [])).split(",")):
            address = _address(hop)
            if address is None:
                return str(peer)
            caller = address
            if not self._trusted(address):
                break
        return str(caller)

    def _trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._proxies)

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
        # computed with the status, by services.health: /healthz and `clickphone-agi status` agree
        body = (await self._status())["health"]
        return web.json_response(body, status=200 if body["ok"] else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        self._collector.status = await self._status()
        self._collector.figures = self._services.figures()
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    # ---- consent, unsubscribe, broadcasts, policies, audit trail, OpenAPI ----------------------

    def _add_routes(self) -> None:
        r = self.app.router
        r.add_put("/v1/accounts/{code}/consent", self._put_consent)
        r.add_get("/v1/accounts/{code}/consent", self._get_consent)
        r.add_get("/v1/accounts/{code}/notifications", self._get_notifications)
        r.add_post("/v1/marketing-suppressions", self._post_suppression)
        r.add_delete("/v1/marketing-suppressions/{address}", self._delete_suppression)
        r.add_post("/v1/unsubscribe/{token}", self._post_unsubscribe)
        r.add_get("/v1/unsubscribe/{token}", self._get_unsubscribe)
        r.add_post("/v1/broadcasts", self._post_broadcast)
        r.add_post("/v1/policies", self._post_policy)
        r.add_get("/v1/policies", self._get_policies)
        r.add_get("/v1/policies/{version}", self._get_policy)
        r.add_get("/v1/policies/{version}/text", self._get_policy_text)
        r.add_get("/v1/openapi.json", self._get_openapi)

    def _need(self, service: Any) -> Any:
        if service is None:
            raise ApiError(503, "this part of the API is not running", None)
        return service

    async def _put_consent(self, request: web.Request) -> web.Response:
        key, digest, body = await self._prepare(request)
        consent: ConsentService = self._need(self._services.consent)
        code = request.match_info["code"]
        return self._reply(await consent.put_consent(key, digest, code, body, self._caller_ip(request)))

    async def _get_consent(self, request: web.Request) -> web.Response:
        consent: ConsentService = self._need(self._services.consent)
        return self._reply(await consent.history(request.match_info["code"]))

    async def _get_notifications(self, request: web.Request) -> web.Response:
        q = request.query
        code = request.match_info["code"]
        store = self._need(self._services.store)
        return self._reply(await notifications(store, code, q.get("limit"), q.get("before")))

    async def _post_suppression(self, request: web.Request) -> web.Response:
        consent: ConsentService = self._need(self._services.consent)
        return self._reply(await consent.suppress(await self._body(request)))

    async def _delete_suppression(self, request: web.Request) -> web.Response:
        consent: ConsentService = self._need(self._services.consent)
        return self._reply(await consent.unsuppress(request.match_info["address"]))

    async def _post_unsubscribe(self, request: web.Request) -> web.Response:
        """RFC 8058 one-click: any body (``List-Unsubscribe=One-Click`` form-encoded) is accepted."""
        consent: ConsentService = self._need(self._services.consent)
        if (request.content_length or 0) > self._max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self._max_body, actual_size=request.content_length or 0)
        await request.read()
        reply = await consent.unsubscribe(request.match_info["token"], self._caller_ip(request))
        if "text/html" in request.headers.get("Accept", ""):
            return _page(_DONE_PAGE)
        return self._reply(reply)

    async def _get_unsubscribe(self, request: web.Request) -> web.Response:
        """A confirmation page with a POST button: a GET never unsubscribes (scanners prefetch links)."""
        consent: ConsentService = self._need(self._services.consent)
        try:
            consent.check_token(request.match_info["token"])
        except ApiError as exc:
            return _page(_BAD_PAGE, status=exc.status)
        return _page(_CONFIRM_PAGE)

    async def _post_broadcast(self, request: web.Request) -> web.Response:
        key, digest, body = await self._prepare(request)
        broadcasts: BroadcastService = self._need(self._services.broadcasts)
        return self._reply(await broadcasts.post(key, digest, body))

    async def _post_policy(self, request: web.Request) -> web.Response:
        policies: PolicyService = self._need(self._services.policies)
        return self._reply(await policies.publish(await self._body(request)))

    async def _get_policies(self, _request: web.Request) -> web.Response:
        policies: PolicyService = self._need(self._services.policies)
        return self._reply(await policies.list())

    async def _get_policy(self, request: web.Request) -> web.Response:
        policies: PolicyService = self._need(self._services.policies)
        policy = await policies.get(request.match_info["version"])
        return web.json_response(policy_json(policy, text=True), headers={"ETag": f'"{policy.sha256}"'})

    async def _get_policy_text(self, request: web.Request) -> web.Response:
        """The archived text byte for byte, its sha256 as the ETag and in ``Repr-Digest`` (RFC 9530)."""
        policies: PolicyService = self._need(self._services.policies)
        policy = await policies.get(request.match_info["version"])
        digest = base64.b64encode(bytes.fromhex(policy.sha256)).decode("ascii")
        headers = {
            "ETag": f'"{policy.sha256}"',
            "Repr-Digest": f"sha-256=:{digest}:",
            "Cache-Control": "public, max-age=86400, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        if request.headers.get("If-None-Match") == headers["ETag"]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=policy.text, content_type="text/plain", charset="utf-8", headers=headers)

    async def _get_openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi_document())


@dataclass
class ApiServices:
    """The services behind the API's later endpoints, and the live figures /metrics adds."""

    store: Store | None = None
    consent: ConsentService | None = None
    broadcasts: BroadcastService | None = None
    policies: PolicyService | None = None
    figures: Callable[[], dict[str, Any]] = field(default=lambda: {})


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description shipped in the package (``clickphone_agi/openapi.yaml``)."""
    text = files("clickphone_agi").joinpath("openapi.yaml").read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    return document


_PAGE_STYLE = "body{font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em;line-height:1.5}"
_CONFIRM_PAGE = (
    "<h1>Dezabonare / Unsubscribe</h1>"
    "<p>Nu mai doriți oferte comerciale ClickPhone pe e-mail? / No more ClickPhone offers by e-mail?</p>"
    '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
    '<button type="submit">Dezabonare / Unsubscribe</button></form>'
    "<p>Mesajele despre serviciu (mesagerie vocală, fax, sold, securitate) continuă. /"
    " Service messages (voicemail, fax, balance, security) continue.</p>"
)
_DONE_PAGE = (
    "<h1>Dezabonat / Unsubscribed</h1>"
    "<p>Nu veți mai primi oferte comerciale ClickPhone pe e-mail. / You will receive no more ClickPhone offers"
    " by e-mail.</p>"
)
_BAD_PAGE = (
    "<h1>Link invalid / Invalid link</h1><p>Acest link de dezabonare nu este valid. / This link is not valid.</p>"
)


def _page(body: str, status: int = 200) -> web.Response:
    text = (
        '<!doctype html><html lang="ro"><head><meta charset="utf-8"><meta name="robots" content="noindex">'
        f"<title>ClickPhone</title><style>{html.escape(_PAGE_STYLE, quote=False)}</style></head>"
        f"<body>{body}</body></html>"
    )
    headers = {
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)
