"""The shipped OpenAPI document is valid OpenAPI 3.1 and describes exactly the routes the app serves."""

from __future__ import annotations

import re
from typing import Any, cast

from openapi_spec_validator import validate
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clickphone_agi.adapters.agi import LatencyHistogram
from clickphone_agi.adapters.http_api import PUBLIC_ROUTES, HttpApi, openapi_document
from tests.api_harness import Api
from tests.test_marketing_api import OFFER

METHODS = {"get", "put", "post", "delete", "patch"}


def _served(api: HttpApi) -> set[tuple[str, str]]:
    out = set()
    for route in api.app.router.routes():
        if route.method == "HEAD":  # aiohttp adds one to every GET
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        out.add((route.method.lower(), str(path)))
    return out


def test_document_is_valid_openapi_31() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    validate(document)


async def test_every_route_is_documented_and_every_documented_route_is_served(api: Api) -> None:
    documented = {
        (method, path) for path, item in openapi_document()["paths"].items() for method in item if method in METHODS
    }
    # the running daemon's app, as built from the configuration
    async with api.session.get(api.base + "/v1/openapi.json") as resp:  # public: no token
        assert resp.status == 200
        served_doc = await resp.json()
    assert served_doc == openapi_document()
    app_routes = _served(_bare_api())
    assert app_routes == documented, (sorted(app_routes - documented), sorted(documented - app_routes))
    for _method, path in documented:
        assert re.fullmatch(r"(/[a-z0-9.\-]+|/\{[a-z]+\})+", path), path
    public = {
        path
        for path, item in openapi_document()["paths"].items()
        for method, operation in item.items()
        if method in METHODS and operation.get("security") == []
    }
    assert public == PUBLIC_ROUTES  # what the auth middleware lets through is what the document says


def _bare_api() -> HttpApi:
    """The application as the daemon builds it: every route is registered by the constructor."""

    async def status() -> dict[str, Any]:
        return {}

    return HttpApi(cast(Any, None), "t", host="127.0.0.1", port=0, max_body_bytes=1024, status=status)


def test_histogram_denials_and_limit_trips_in_the_exposition() -> None:
    api = _bare_api()
    latency = LatencyHistogram()
    for seconds in (0.002, 0.004, 0.2, 30.0):
        latency.observe(seconds)
    api._collector.status = {"money": {"allowed": 3, "denied": {"daily_limit": 2, "no_credit": 1}, "charged": 5}}
    api._collector.figures = {"agi_latency": latency.snapshot(), "unsubscribes": 4}
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(api.registry).decode())}
    hist = families["clickphone_agi_session_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert (buckets["0.0025"], buckets["0.005"], buckets["0.25"], buckets["10.0"], buckets["+Inf"]) == (1, 2, 3, 3, 4)
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count == 4
    trips = {s.labels["limit"]: s.value for s in families["clickphone_limit_trips"].samples}
    assert trips == {"daily_limit": 2, "credit": 1}
    decisions = {s.labels["decision"]: s.value for s in families["clickphone_money_decisions"].samples}
    assert decisions["denied"] == 3
    assert {s.labels["reason"] for s in families["clickphone_agi_denied"].samples} == {"daily_limit", "no_credit"}
    assert families["clickphone_unsubscribes"].samples[0].value == 4


async def test_metrics_parse_and_carry_what_the_issue_lists(api: Api) -> None:
    assert (await api.call("POST", "/v1/broadcasts", OFFER, key="m-offer"))[0] == 202
    async with api.session.post(api.base + "/v1/unsubscribe/not-a-token") as resp:
        assert resp.status == 400
    async with api.session.get(api.base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "clickphone_ami_events",
        "clickphone_ingest_queue_depth",
        "clickphone_outbox_messages",
        "clickphone_broadcasts",
        "clickphone_broadcast_mails",
        "clickphone_unsubscribes",
        "clickphone_unsubscribes_refused",
        "clickphone_consent_changes",
        "clickphone_policies_published",
    ):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("clickphone_broadcasts_total", (("kind", "offer"),))] == 1
    assert samples[("clickphone_broadcast_mails_total", (("kind", "offer"),))] == 1
    assert samples[("clickphone_unsubscribes_refused_total", ())] == 1
