"""Fuzzing the intake API bodies: PUT /v1/accounts/{code} and POST /v1/accounts/{code}/events.

* in volume, through the transport-neutral service (:class:`Intake`) on a real SQLite store:
  any JSON value, and bodies that are almost right (every field, any type, hostile text, huge
  numbers, times at the ends of the calendar) → a 2xx reply or an :class:`ApiError` with a 4xx
  status and a field path (or null), never another exception;
* a smaller sample over real HTTP on loopback (aiohttp, the real adapter): any bytes, any JSON
  (nesting past the parser's recursion limit, integers past Python's 4300-digit limit, unicode),
  any account code in the path → 2xx, or 4xx JSON with ``error`` and ``field``; never a 500,
  never a traceback, nothing logged as ``api.failed``.
"""

from __future__ import annotations

import itertools
import json
import socket
import string
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from clickphone_agi.adapters.accounts_file import FIELDS, load_accounts
from clickphone_agi.adapters.http_api import HttpApi
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.notices.render import Renderer
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.services.intake import EVENT_TYPES, ApiError, Intake, IntakeSettings, Reply, body_hash
from tests.conftest import REPO
from tests.fuzz.budget import fuzz

TOKEN = "fuzz-api-token"
CODES = ("acct1001", "acct1002")
NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
_keys = itertools.count()


@dataclass
class Service:
    intake: Intake
    store: SqliteStore
    clock: FakeClock


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    clock = FakeClock(NOW)
    store = await SqliteStore.open(tmp_path / "api.db", clock)
    store.start()
    accounts = load_accounts(REPO / "etc" / "accounts.example.yaml")
    await store.write(import_unit([(a.account, a.opening_balance) for a in accounts]))
    intake = Intake(
        store,
        clock,
        Renderer(),
        lambda: IntakeSettings("ClickPhone <no-reply@clickphone.example>", "clickphone.example"),
    )
    try:
        yield Service(intake, store, clock)
    finally:
        await store.close()


# ---- bodies --------------------------------------------------------------------------------------------

_HOSTILE = st.sampled_from(
    [
        "", " ", "acct1001", "Ion Popescu", "ion.popescu@example.ro", "a@b", "ro", "en", "prepaid", "12.50", "12,50",
        "0", "-1", "1e3", "NaN", "99999999999999", "0.001", "198.51.100.7", "10.0.0.0/8", "2001:db8::/32",
        "::ffff:1.2.3.4", "40212345678", "+40 21 234 5678", "100@default", "premium", "missed_call", "true",
        "https://cont.example.ro/reset?t=abc", "http://x", "https://a b", "2026-11-28T15:21:00+02:00",
        "2026-11-28T15:21:00", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59+00:00", "Evil\r\nBcc: x@example.com", "=?UTF-8?Q?=0A?=", "\u202eabc", "\x00",
        "Ștefan Țăran", "a" * 300, "<script>alert(1)</script>",
    ]
)  # fmt: skip
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    _HOSTILE,
)
JSON = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
_VALUE = st.one_of(_HOSTILE, _SCALAR, st.lists(_HOSTILE | _SCALAR, max_size=3), JSON)


# values each field accepts (so that most bodies get past the first check and reach the rest)
_PLAUSIBLE: dict[str, list[Any]] = {
    "code": list(CODES),
    "name": ["Ion Popescu", "Ștefan Țăran"],
    "email": ["ion.popescu@example.ro", "maria@example.com"],
    "language": ["ro", "en", "RO"],
    "billing": ["prepaid", "postpaid"],
    "daily_limit": ["50", "12.50", 20, None],
    "low_balance_threshold": ["5", "0", 3],
    "allowed_ips": [[], ["198.51.100.7"], ["10.0.0.0/8", "2001:db8::/32"], "198.51.100.7; 192.0.2.1"],
    "dids": [[], ["40212345678"], ["+40 21 234 5679", "0212345670"]],
    "mailboxes": [[], ["100@default"], [{"box": "101@default", "email": "vm@example.ro"}]],
    "blocked_classes": [[], ["premium"], "premium satellite"],
    "max_concurrent_calls": [1, "10", 1000],
    "max_call_seconds": [60, "3600"],
    "marketing_consent": [True, False, "yes"],
    "enabled": [True, False],
    "opt_out": [[], ["missed_call"], ["fax_sent", "missed_call"]],
    "opening_balance": ["0", "100.00", 5],
    "source_ip": ["198.51.100.7", "::1"],
    "amount": ["12.50", "0.01", "1000"],
    "reference": ["TOP-1", "CP-2026-1"],
    "method": ["card", "transfer"],
    "reset_url": ["https://cont.example.ro/reset?t=abc"],
    "expires_at": ["2026-11-28T15:21:00+02:00", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00+00:00"],
    "at": ["2026-11-28T15:21:00+02:00", "2026-11-28T12:00:00Z"],
    "number": ["0310000001", "+40 31 000 0001"],
}


def _field_value(draw: st.DrawFn, name: str) -> Any:
    """Mostly a value the field accepts, else anything (hostile text, wrong types, huge numbers)."""
    if name in _PLAUSIBLE and draw(st.integers(0, 9)) < 7:
        return draw(st.sampled_from(_PLAUSIBLE[name]))
    return draw(_VALUE | _FUTURE.map(datetime.isoformat))


_FUTURE = st.datetimes(min_value=datetime(2026, 11, 29), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))


@st.composite
def account_bodies(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    body: dict[str, Any] = {"name": "Ion Popescu", "email": "ion.popescu@example.ro"}
    for name in draw(st.lists(st.sampled_from([*FIELDS, *FIELDS, "source_ip", "unknown"]), max_size=8, unique=True)):
        body[name] = _field_value(draw, name)
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(["name", "email"])), None)
    return body


_DATA_FIELDS = ["amount", "reference", "method", "reset_url", "expires_at", "at", "number", "source_ip", "other"]


@st.composite
def event_bodies(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(JSON)
    kind = draw(st.sampled_from(EVENT_TYPES)) if draw(st.integers(0, 9)) else draw(_SCALAR)
    data = {
        name: _field_value(draw, name)
        for name in draw(st.lists(st.sampled_from(_DATA_FIELDS), max_size=5, unique=True))
    }
    body: dict[str, Any] = {"type": kind, "data": data}
    if draw(st.integers(0, 9)) == 0:
        body["data"] = draw(_VALUE)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=6))] = draw(_SCALAR)
    return body


def assert_answer(outcome: Reply | ApiError) -> None:
    event(
        f"{outcome.status} {outcome.field if isinstance(outcome, ApiError) else 'ok'}"
    )  # --hypothesis-show-statistics
    if isinstance(outcome, ApiError):
        assert 400 <= outcome.status < 500, (outcome.status, outcome.message)
        assert outcome.field is None or isinstance(outcome.field, str)
        assert outcome.message
    else:
        assert 200 <= outcome.status < 300
        json.dumps(outcome.body)


async def call_service(service: Service, method: str, code: str, body: Any, key: str | None = None) -> Reply | ApiError:
    key = key or f"fuzz-{next(_keys)}"
    path = f"/v1/accounts/{code}" + ("/events" if method == "POST" else "")
    try:
        digest = body_hash(method, path, body)
        if method == "PUT":
            return await service.intake.put_account(key, digest, code, body, "198.51.100.7")
        return await service.intake.post_event(key, digest, code, body, "198.51.100.7")
    except ApiError as exc:
        return exc


@fuzz(250)
@given(
    body=account_bodies(), code=st.sampled_from([*CODES, *CODES, *CODES, "acct-new", "x" * 41, "", "acct/1", "ac ct"])
)
@example(body={"name": "Ion", "email": "ion.popescu@example.ro", "daily_limit": 10**400}, code="acct1001")
async def test_put_account_bodies_get_a_2xx_or_a_4xx_naming_the_field(service: Service, body: Any, code: str) -> None:
    assert_answer(await call_service(service, "PUT", code, body))


@fuzz(300)
@given(body=event_bodies(), code=st.sampled_from([*CODES, *CODES, "nobody"]))
@example(body={"type": "password_changed", "data": {"at": "0001-01-01T00:00:00+23:59"}}, code="acct1001")
@example(body={"type": "pin_created", "data": {"at": "9999-12-31T23:59:59-23:59"}}, code="acct1001")
@example(
    body={
        "type": "password_recovery",
        "data": {"reset_url": "https://a.ro/r", "expires_at": "9999-12-31T23:59:59-23:59"},
    },
    code="acct1001",
)
async def test_event_bodies_get_a_2xx_or_a_4xx_naming_the_field(service: Service, body: Any, code: str) -> None:
    assert_answer(await call_service(service, "POST", code, body))


async def test_a_repeated_key_replays_and_a_changed_body_is_409(service: Service) -> None:
    body = {"type": "topup", "data": {"amount": "1.00"}}
    first = await call_service(service, "POST", "acct1001", body, key="same")
    assert isinstance(first, Reply)
    assert await call_service(service, "POST", "acct1001", body, key="same") == first
    changed = await call_service(service, "POST", "acct1001", {**body, "data": {"amount": "2.00"}}, key="same")
    assert isinstance(changed, ApiError)
    assert (changed.status, changed.field) == (409, "Idempotency-Key")


# ---- over real HTTP ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Http:
    base: str
    session: aiohttp.ClientSession


@pytest.fixture
async def http(service: Service) -> AsyncIterator[Http]:
    port = _free_port()

    async def status() -> dict[str, Any]:
        return {}

    api = HttpApi(service.intake, TOKEN, host="127.0.0.1", port=port, max_body_bytes=65536, status=status)
    await api.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Http(f"http://127.0.0.1:{port}", session)
    finally:
        await api.close()


def _deep(n: int) -> bytes:
    return b'{"type": "topup", "data": ' + b"[" * n + b"]" * n + b"}"


_RAW = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    account_bodies().map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    event_bodies().map(lambda v: json.dumps(v).encode()),
    st.integers(1, 30_000).map(_deep),  # past the JSON parser's recursion limit
    st.integers(4000, 20_000).map(lambda n: b'{"type": "topup", "data": {"amount": ' + b"9" * n + b"}}"),
    st.sampled_from(
        [b"", b"null", b"[]", b"1e999999", b"-Infinity", b'"\\ud800"', b"\xef\xbb\xbf{}", b'{"a":1,"a":2}']
    ),
)
_PATH_CODE = st.sampled_from([*CODES, "nobody", "%00", "%ff", "..", "a%2Fb", "ș", "x" * 300]) | st.text(
    alphabet=string.ascii_letters + string.digits + "-._~%", max_size=20
)


@fuzz(120)
@given(
    raw=_RAW,
    code=_PATH_CODE,
    events=st.booleans(),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]),
    key=st.sampled_from(["k", "", " ", "x" * 300, "ü"]) | st.builds(lambda: f"fuzz-{next(_keys)}"),
)
@example(raw=_deep(5000), code="acct1001", events=True, content_type="application/json", key="deep")
@example(
    raw=b'{"name": "Ion", "email": "a@b.ro", "daily_limit": ' + b"1" * 5000 + b"}",
    code="acct1001",
    events=False,
    content_type="application/json",
    key="huge-int",
)
@example(raw=b'{"name": "\\ud800"}', code="acct1001", events=False, content_type="application/json", key="surrogate")
async def test_http_answers_2xx_or_4xx_json_never_500_or_a_traceback(
    http: Http, raw: bytes, code: str, events: bool, content_type: str, key: str
) -> None:
    path = f"/v1/accounts/{urllib.parse.quote(code, safe='%')}" + ("/events" if events else "")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    if key:
        headers["Idempotency-Key"] = key.encode("utf-8").decode("latin-1")
    with capture_logs() as logs:
        async with http.session.request(
            "POST" if events else "PUT", http.base + path, data=raw, headers=headers
        ) as resp:
            text = await resp.text()
            status, kind = resp.status, resp.content_type
    assert not [e for e in logs if e["event"] == "api.failed"], logs
    assert "Traceback" not in text
    assert status < 500, (status, text[:300])
    if status >= 400:
        assert kind == "application/json", (status, text[:200])
        body = json.loads(text)
        assert set(body) == {"error", "field"}
        assert body["field"] is None or isinstance(body["field"], str)
    elif status < 300:
        assert kind == "application/json"
