"""Broadcasts, consent, one-click unsubscribe, the policy archive and the audit trail, over real HTTP
on loopback against the in-process daemon, a real SQLite file and an aiosmtpd sink."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import hashlib
import json
import sqlite3
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from yarl import URL

from clickphone_agi.domain.consent import add_months
from clickphone_agi.services.intake import body_hash
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.api_harness import PUBLIC, Api, settle, start_daemon

ION, MARIA = "ion.popescu@example.ro", "maria.ionescu@example.ro"


def parsed(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def kind_of(raw: bytes) -> str:
    return str(parsed(raw)["X-ClickPhone-Kind"])


OFFER = {
    "kind": "offer",
    "title": "Pachetul Europa",
    "body": "Sunați în 40 de țări cu 0,04 lei/min.\nActivare gratuită.",
    "url": "https://www.clickphone.example/oferte/europa",
    "valid_until": (date.today() + timedelta(days=30)).isoformat(),
}


def tariff(effective: date) -> dict[str, Any]:
    return {
        "kind": "tariff_change",
        "tariff": "ClickPhone Standard",
        "effective": effective.isoformat(),
        "changes": "Mobile: 0,05 → 0,06 lei/min.",
        "url": "https://www.clickphone.example/tarife",
    }


def far() -> date:
    return add_months(datetime.now(ZoneInfo("Europe/Bucharest")).date(), 2)


async def test_offer_only_with_consent_and_one_click_unsubscribe_works(api: Api, smtp_sink: SmtpSink) -> None:
    """acct1002 was imported with consent (recorded as a grant), acct1001 without: only Maria is mailed;
    her mail's RFC 8058 link, POSTed on the running API, withdraws consent; the next offer skips her."""
    status, reply = await api.call("POST", "/v1/broadcasts", OFFER, key="offer-1")
    assert status == 202, reply
    assert (reply["recipients"], reply["queued"], reply["skipped"]) == (1, 1, {"no_consent": 1})
    await settle(smtp_sink, 1)
    mail = smtp_sink.messages[0]
    assert mail.rcpt_tos == (MARIA,)
    msg = parsed(mail.data)
    assert msg.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    (header,) = msg.get_all("List-Unsubscribe")
    assert header.startswith(f"<{PUBLIC}/v1/unsubscribe/")
    assert header.endswith(">")
    url = header[1:-1]
    assert url in msg.get_body(("plain",)).get_content()  # the same link in the text
    path = urlsplit(url).path.removeprefix(urlsplit(PUBLIC).path)
    # a GET (a scanner's prefetch) shows a page and changes nothing
    async with api.session.get(api.base + path) as resp:
        assert resp.status == 200
        assert 'method="post"' in await resp.text()
    assert (await api.call("GET", "/v1/accounts/acct1002/consent"))[1]["consent"] is True
    # the one-click POST, as a mail client sends it: no bearer token, form-encoded body
    form = {"List-Unsubscribe": "One-Click"}
    async with api.session.post(api.base + path, data=form) as resp:
        assert resp.status == 200
        assert await resp.json() == {"unsubscribed": True}
    async with api.session.post(api.base + path, data=form) as resp:  # idempotent
        assert resp.status == 200
    status, consent = await api.call("GET", "/v1/accounts/acct1002/consent")
    assert (consent["consent"], consent["marketing"]) == (False, False)
    assert [(h["marketing"], h["source"]) for h in consent["history"]] == [(False, "unsubscribe"), (True, "import")]
    status, reply = await api.call("POST", "/v1/broadcasts", {**OFFER, "title": "A doua ofertă"}, key="offer-2")
    assert (status, reply["queued"], reply["skipped"]) == (202, 0, {"consent_withdrawn": 1, "no_consent": 1})
    await settle(smtp_sink, 1)


async def test_suppression_wins_over_consent(api: Api, smtp_sink: SmtpSink) -> None:
    status, reply = await api.call(
        "PUT", "/v1/accounts/acct1001/consent", {"marketing": True, "how": "portal checkbox"}, key="c1"
    )
    assert (status, reply["marketing"], reply["source"], reply["how"]) == (200, True, "api", "portal checkbox")
    status, reply = await api.call("POST", "/v1/marketing-suppressions", {"address": "Ion.Popescu@example.ro"})
    assert (status, reply["added"]) == (201, True)
    status, reply = await api.call("POST", "/v1/broadcasts", OFFER, key="offer-s")
    assert (reply["recipients"], reply["skipped"]) == (1, {"suppressed": 1})
    await settle(smtp_sink, 1)
    assert smtp_sink.messages[0].rcpt_tos == (MARIA,)
    status, consent = await api.call("GET", "/v1/accounts/acct1001/consent")
    assert (consent["consent"], consent["suppressed"], consent["marketing"]) == (True, True, False)
    assert (await api.call("DELETE", "/v1/marketing-suppressions/ion.popescu%40example.ro"))[1]["removed"] is True


async def test_unsubscribe_after_queueing_stops_the_mail(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """A queued offer whose recipient withdraws before the send is not sent (checked at the attempt)."""
    d, task, _port = await start_daemon(write_config, short_tmp, smtp_sink.port)
    try:
        store = d._running().store
        store.on_outbox = None  # the sender is not woken by the commit (its next poll is 60 s away)
        services = d._intake_services()
        reply = await services.broadcasts.post("held", body_hash("POST", "/v1/broadcasts", OFFER), OFFER)
        assert reply.body["queued"] == 1
        await services.consent.put_consent("w", "h", "acct1002", {"marketing": False}, "127.0.0.1")
        d._running().sender.wake()
        for _ in range(100):
            rows = await store.write(lambda tx: tx.outbox_row(1))
            if rows is not None and rows.status != "pending":
                break
            await asyncio.sleep(0.05)
        assert rows is not None
        assert (rows.status, rows.last_error) == ("dead", "suppressed: no marketing consent")
        assert smtp_sink.messages == []
    finally:
        d.request_stop()
        assert await task == 0


async def test_forged_and_malformed_tokens_are_refused(api: Api) -> None:
    status, _reply = await api.call("POST", "/v1/broadcasts", OFFER, key="offer-t")
    assert status == 202
    (row,) = api.rows("SELECT payload FROM outbox WHERE kind = 'offer'")
    token = json.loads(row[0])["unsubscribe_url"].rsplit("/", 1)[1]
    payload, mac = token.split(".")
    other = "bWFya2V0aW5nOmFjY3QxMDAx"  # marketing:acct1001, with Maria's signature
    for forged in (f"{payload}.{'A' * 43}", f"{other}.{mac}", f"{payload}.{mac[:-1]}B"):
        async with api.session.post(f"{api.base}/v1/unsubscribe/{forged}") as resp:
            assert resp.status == 404, forged
            assert (await resp.json())["error"] == "unknown unsubscribe link"
        async with api.session.get(f"{api.base}/v1/unsubscribe/{forged}") as resp:
            assert resp.status == 404
    async with api.session.post(f"{api.base}/v1/unsubscribe/not-a-token") as resp:
        assert (resp.status, (await resp.json())["field"]) == (400, "token")
    assert (await api.call("GET", "/v1/accounts/acct1002/consent"))[1]["consent"] is True


async def test_offer_refused_without_unsubscribe_secret(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    d, task, port = await start_daemon(write_config, short_tmp, smtp_sink.port, secret=False)
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(d, f"http://127.0.0.1:{port}", session, d.config.database.path)
            status, reply = await api.call("POST", "/v1/broadcasts", OFFER, key="o")
            assert (status, reply["field"]) == (400, "kind")
            assert "unsubscribe" in reply["error"]
            assert api.rows("SELECT COUNT(*) FROM outbox") == [(0,)]
    finally:
        d.request_stop()
        assert await task == 0


async def test_tariff_change_reaches_accounts_without_consent(api: Api, smtp_sink: SmtpSink) -> None:
    today = datetime.now(ZoneInfo("Europe/Bucharest")).date()
    too_soon = add_months(today, 1) - timedelta(days=1)
    status, reply = await api.call("POST", "/v1/broadcasts", tariff(too_soon), key="t0")
    assert (status, reply["field"]) == (400, "effective")
    status, reply = await api.call("POST", "/v1/broadcasts", {**tariff(far()), "title": "Promo"}, key="t0")
    assert (status, reply["field"]) == (400, "title")  # no offer fields on a service notice
    status, reply = await api.call("POST", "/v1/broadcasts", tariff(add_months(today, 1)), key="t1")
    assert (status, reply["recipients"], reply["skipped"]) == (202, 2, {})
    await settle(smtp_sink, 2)
    assert sorted(m.rcpt_tos for m in smtp_sink.messages) == [(ION,), (MARIA,)]  # Ion never consented
    for m in smtp_sink.messages:
        msg = parsed(m.data)
        assert msg["List-Unsubscribe"] is None
        assert kind_of(m.data) == "tariff_change"


async def test_broadcast_repeat_queues_nothing_and_other_body_is_409(api: Api, smtp_sink: SmtpSink) -> None:
    body = tariff(far())
    first = await api.call("POST", "/v1/broadcasts", body, key="bc-same")
    assert first[0] == 202
    assert await api.call("POST", "/v1/broadcasts", body, key="bc-same") == first
    status, reply = await api.call("POST", "/v1/broadcasts", {**body, "tariff": "Alt"}, key="bc-same")
    assert (status, reply["field"]) == (409, "Idempotency-Key")
    await settle(smtp_sink, 2)
    assert api.rows("SELECT recipients, skipped FROM broadcasts WHERE id = 'bc-same'") == [(2, 0)]


async def test_account_filter_and_audit_trail(api: Api, smtp_sink: SmtpSink) -> None:
    body = {**tariff(far()), "accounts": ["acct1002"]}
    assert (await api.call("POST", "/v1/broadcasts", body, key="only-maria"))[1]["recipients"] == 1
    await settle(smtp_sink, 1)
    for _ in range(50):
        status, trail = await api.call("GET", "/v1/accounts/acct1002/notifications")
        if trail["notifications"] and trail["notifications"][0]["status"] == "sent":
            break
        await asyncio.sleep(0.05)
    (entry,) = trail["notifications"]
    assert (entry["kind"], entry["status"], entry["attempts"]) == ("tariff_change", "sent", 1)
    assert entry["smtp_reply"].startswith("250")
    assert entry["sent_at"] is not None
    assert "message" not in entry
    assert "payload" not in entry
    assert trail["next_before"] is None
    assert (await api.call("GET", "/v1/accounts/acct1001/notifications"))[1]["notifications"] == []
    assert (await api.call("GET", "/v1/accounts/nobody/notifications"))[0] == 404
    status, reply = await api.call("GET", "/v1/accounts/acct1002/notifications?limit=0")
    assert (status, reply["field"]) == (400, "limit")


async def test_consent_idempotency_and_history(api: Api) -> None:
    path = "/v1/accounts/acct1001/consent"
    first = await api.call("PUT", path, {"marketing": True, "how": "call centre"}, key="k1")
    assert first[0] == 200
    assert await api.call("PUT", path, {"marketing": True, "how": "call centre"}, key="k1") == first
    status, reply = await api.call("PUT", path, {"marketing": False}, key="k1")
    assert (status, reply["field"]) == (409, "Idempotency-Key")
    status, reply = await api.call("PUT", path, {"marketing": "yes"}, key="k2")
    assert (status, reply["field"]) == (400, "marketing")
    status, reply = await api.call("PUT", path, {"marketing": True, "policy_version": "9.9"}, key="k3")
    assert (status, reply["field"]) == (400, "policy_version")
    assert (await api.call("PUT", path, {"marketing": False}, key="k4"))[0] == 200
    status, consent = await api.call("GET", path)
    assert [h["marketing"] for h in consent["history"]] == [False, True]
    assert consent["history"][1]["ip"] == "127.0.0.1"
    stored = api.rows("SELECT data FROM accounts WHERE code = 'acct1001'")[0][0]
    assert '"marketing_consent": false' in stored  # mirrored on the account
    # a PUT of the account with the import flag does not override the history
    account = {"name": "Ion Popescu", "email": ION, "marketing_consent": True}
    status, reply = await api.call("PUT", "/v1/accounts/acct1001", account, key="acct-put")
    assert (status, reply["marketing_consent"]) == (200, False)


POLICY_V1 = "Politica de confidențialitate v1.\r\nPăstrăm datele 12 luni.\n\tSfârșit.\n"
POLICY_V2 = "Politica de confidențialitate v2.\nPăstrăm datele 6 luni.\n"


def policy(version: str, text: str, effective: str = "2027-01-01") -> dict[str, Any]:
    return {"version": version, "text": text, "effective_on": effective, "summary": "Păstrăm mai puțin.\nAtât."}


async def test_policy_archive_and_one_notice_per_account(api: Api, smtp_sink: SmtpSink) -> None:
    status, v1 = await api.call("POST", "/v1/policies", policy("1", POLICY_V1, "2026-01-01"))
    assert (status, v1["recipients"], v1["queued"]) == (201, 2, 2)
    assert v1["sha256"] == hashlib.sha256(POLICY_V1.encode()).hexdigest()
    status, v2 = await api.call("POST", "/v1/policies", policy("2", POLICY_V2))
    assert (status, v2["queued"]) == (201, 2)
    await settle(smtp_sink, 4)
    # a repeat publish queues nothing and answers the first result; another text is 409
    status, again = await api.call("POST", "/v1/policies", policy("2", POLICY_V2))
    assert (status, again) == (200, v2)
    status, reply = await api.call("POST", "/v1/policies", policy("2", POLICY_V2 + "!"))
    assert (status, reply["field"]) == (409, "text")
    await settle(smtp_sink, 4)
    per_account = sorted((m.rcpt_tos[0], kind_of(m.data)) for m in smtp_sink.messages)
    assert per_account == [(ION, "policy_changed")] * 2 + [(MARIA, "policy_changed")] * 2
    # the archive: listed with hashes, both texts byte for byte (v1 with its \r\n and tab)
    status, listed = await api.call("GET", "/v1/policies")
    assert [(p["version"], p["sha256"]) for p in listed["policies"]] == [("2", v2["sha256"]), ("1", v1["sha256"])]
    for version, original, meta in (("1", POLICY_V1, v1), ("2", POLICY_V2, v2)):
        async with api.session.get(f"{api.base}/v1/policies/{version}/text") as resp:  # public: no token
            assert resp.status == 200
            assert await resp.read() == original.encode()
            assert resp.headers["ETag"] == f'"{meta["sha256"]}"'
        status, shown = await api.call("GET", f"/v1/policies/{version}")
        assert (shown["text"], shown["sha256"]) == (original, meta["sha256"])
    assert (await api.call("GET", "/v1/policies/1", token=None))[0] == 401
    assert (await api.call("GET", "/v1/policies/3"))[0] == 404
    # the mail links to the public archived text
    linked = [
        m
        for m in smtp_sink.messages
        if f"{PUBLIC}/v1/policies/2/text" in parsed(m.data).get_body(("plain",)).get_content()
    ]
    assert len(linked) == 2
    with (
        contextlib.closing(sqlite3.connect(api.db)) as conn,
        pytest.raises(sqlite3.IntegrityError, match="immutable"),
        conn,
    ):
        conn.execute("UPDATE policies SET text = 'x' WHERE version = '1'")


async def test_public_routes_are_decided_by_the_route_matched_not_the_path_text(api: Api) -> None:
    """``x%2Ftext`` decodes to a path ending in /text, but the router matches it as GET
    /v1/policies/{version} (logged-in only): 401. The public routes still need no token."""
    assert (await api.call("POST", "/v1/policies", policy("1", POLICY_V1)))[0] == 201
    async with api.session.get(URL(f"{api.base}/v1/policies/x%2Ftext", encoded=True)) as resp:
        assert resp.status == 401
    async with api.session.get(f"{api.base}/v1/nothing-here") as resp:
        assert resp.status == 401  # no route: not public either
    for path in ("/v1/policies/1/text", "/v1/openapi.json", "/healthz", "/metrics"):
        async with api.session.get(api.base + path) as resp:
            assert resp.status == 200, path
    async with api.session.head(f"{api.base}/v1/policies/1/text") as resp:
        assert resp.status == 200
    for method in ("GET", "POST"):  # the unsubscribe service answers (a bad token), not the auth check
        async with api.session.request(method, f"{api.base}/v1/unsubscribe/not-a-token") as resp:
            assert resp.status == 400, method


async def test_a_client_key_named_like_a_policy_is_not_taken_for_its_publication(api: Api, smtp_sink: SmtpSink) -> None:
    """The archive records a publication under a key no client can send (a space): an
    Idempotency-Key ``policy:4`` used earlier neither answers nor blocks publishing version 4."""
    path = "/v1/accounts/acct1001/consent"
    first = await api.call("PUT", path, {"marketing": False}, key="policy:4")
    assert first[0] == 200
    status, v4 = await api.call("POST", "/v1/policies", policy("4", POLICY_V2))
    assert status == 201, v4
    assert (v4["version"], v4["recipients"], v4["queued"]) == ("4", 2, 2)
    assert await api.call("POST", "/v1/policies", policy("4", POLICY_V2)) == (200, v4)
    assert await api.call("PUT", path, {"marketing": False}, key="policy:4") == first  # still the client's
    status, reply = await api.call("PUT", path, {"marketing": False}, key="policy 4")
    assert (status, reply["field"]) == (400, "Idempotency-Key")
    await settle(smtp_sink, 2)


async def test_broadcast_interrupted_then_retried_completes_without_doubles(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """A crash mid-broadcast (here: the writer refusing the second chunk), then the same request
    again: every account has exactly one row, and the request is then recorded as done."""
    d, task, _port = await start_daemon(write_config, short_tmp, smtp_sink.port, chunk=1)
    try:
        parts = d._running()
        parts.store.on_outbox = None  # nothing is sent meanwhile: the rows stay visible
        services = d._intake_services()
        store = parts.store
        real_write = store.write
        chunks = {"n": 0}

        async def failing_write(work: Any) -> Any:
            if work.__qualname__.startswith("fan_out."):
                chunks["n"] += 1
                if chunks["n"] == 2:  # the second chunk's transaction never commits
                    raise OSError("disk gone")
            return await real_write(work)

        body = tariff(far())
        digest = body_hash("POST", "/v1/broadcasts", body)
        store.write = failing_write  # type: ignore[method-assign]
        with pytest.raises(OSError, match="disk gone"):
            await services.broadcasts.post("crashy", digest, body)
        store.write = real_write  # type: ignore[method-assign]
        with contextlib.closing(sqlite3.connect(d.config.database.path)) as conn, conn:
            assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (1,)
        reply = await services.broadcasts.post("crashy", digest, body)
        assert (reply.status, reply.body["recipients"], reply.body["queued"]) == (202, 2, 1)
        again = await services.broadcasts.post("crashy", digest, body)
        assert again == reply
        with contextlib.closing(sqlite3.connect(d.config.database.path)) as conn, conn:
            rows = conn.execute("SELECT account, COUNT(*) FROM outbox GROUP BY account").fetchall()
        assert sorted(rows) == [("acct1001", 1), ("acct1002", 1)]
    finally:
        d.request_stop()
        assert await task == 0


async def test_a_broadcast_link_longer_than_the_mail_keeps_is_refused_not_cut(api: Api) -> None:
    """The renderer cuts one-line values at 1,000 characters, so a longer tariff or offer link would
    reach every subscriber cut short: it is refused, naming the field."""
    url = "https://www.clickphone.example/tarife?x=" + "a" * 1000
    status, reply = await api.call("POST", "/v1/broadcasts", {**tariff(far()), "url": url}, key="bc-long")
    assert (status, reply["field"]) == (400, "url"), reply
