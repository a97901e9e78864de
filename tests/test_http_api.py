"""The HTTP intake API over real HTTP on loopback, against the in-process daemon and an SMTP sink."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clickphone_agi.adapters.accounts_file import load_accounts
from clickphone_agi.adapters.http_api import openapi_document
from clickphone_agi.app import Daemon, numbering
from clickphone_agi.config.loader import load_config
from clickphone_agi.services import privacy
from clickphone_agi.services.accounts import import_unit
from clickphone_agi.sim.smtp_sink import SmtpSink
from tests.api_harness import TOKEN, Api, _free_port
from tests.conftest import REPO, write_secret

ACCOUNTS = REPO / "etc" / "accounts.example.yaml"


async def _start(
    write_config: Callable[..., Path], short_tmp: Path, smtp_port: int, *, api_extra: str = "", **kwargs: Any
) -> tuple[Daemon, asyncio.Task[int], int]:
    port = _free_port()
    write_secret(short_tmp / "api-token", TOKEN + "\n")
    extra = f"api:\n  enabled: true\n  port: {port}\n  token_file: {short_tmp / 'api-token'}\n  max_body_bytes: 2048\n"
    extra += api_extra
    cfg = write_config(extra=extra, smtp_port=smtp_port, **kwargs)
    d = Daemon(load_config(cfg), config_path=cfg, install_signal_handlers=False)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    return d, task, port


@pytest.fixture
async def api(write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink) -> AsyncIterator[Api]:
    d, task, port = await _start(write_config, short_tmp, smtp_sink.port)
    parts = d._running()
    await parts.store.write(import_unit([(i.account, i.opening_balance) for i in load_accounts(ACCOUNTS)]))
    async with aiohttp.ClientSession() as session:
        yield Api(d, f"http://127.0.0.1:{port}", session, d.config.database.path)
    d.request_stop()
    assert await task == 0


def _later(hours: int = 1) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


EVENTS: dict[str, dict[str, Any]] = {
    "password_changed": {"source_ip": "198.51.100.7"},
    "password_recovery": {"reset_url": "https://cont.example.ro/reset?t=abc", "expires_at": _later()},
    "pin_created": {"number": "0310000001"},
    "topup": {"amount": "12.50", "reference": "TOP-1"},
    "payment_confirmed": {"amount": "45.90", "method": "card", "reference": "CP-2026-1"},
    "balance_info": {},
}


async def _settle(sink: SmtpSink, count: int) -> None:
    await sink.wait_for(count)
    await asyncio.sleep(0.3)  # anything extra would have arrived by now


async def test_every_event_mails_once_and_repeats_do_nothing(api: Api, smtp_sink: SmtpSink) -> None:
    for n, (kind, data) in enumerate(EVENTS.items()):
        status, body = await api.call(
            "POST", "/v1/accounts/acct1001/events", {"type": kind, "data": data}, key=f"k-{kind}"
        )
        assert status in (200, 202), body
        assert body["mails"] == 1
        await smtp_sink.wait_for(n + 1)
    for kind, data in EVENTS.items():
        again = await api.call("POST", "/v1/accounts/acct1001/events", {"type": kind, "data": data}, key=f"k-{kind}")
        assert again[0] in (200, 202)
    await _settle(smtp_sink, len(EVENTS))
    assert len(smtp_sink.messages) == len(EVENTS)
    kinds = sorted(
        next(line for line in m.data.decode().splitlines() if line.startswith("X-ClickPhone-Kind:")).split(": ")[1]
        for m in smtp_sink.messages
    )
    assert kinds == sorted(EVENTS)
    assert all(m.rcpt_tos == ("ion.popescu@example.ro",) for m in smtp_sink.messages)
    payment = next(m for m in smtp_sink.messages if b"payment_confirmed" in m.data)
    assert b"card" not in payment.data.split(b"\r\n\r\n", 1)[0]


async def test_topup_credits_exactly(api: Api) -> None:
    store = api.daemon._running().store
    before = await store.write(lambda tx: tx.balance("acct1001"))
    body = {"type": "topup", "data": {"amount": "12.50"}}
    status, reply = await api.call("POST", "/v1/accounts/acct1001/events", body, key="top-1")
    assert status == 200
    assert reply["balance"] == before + 1250
    assert await api.call("POST", "/v1/accounts/acct1001/events", body, key="top-1") == (status, reply)
    after = await store.write(lambda tx: tx.balance("acct1001"))
    assert after == before + 1250
    assert api.ledger_sum("acct1001") == after
    assert await store.write(lambda tx: tx.get_state("acct1001", "low_armed")) == "1"


async def test_a_notice_key_reused_after_its_request_row_is_purged_is_409(api: Api, smtp_sink: SmtpSink) -> None:
    """The outbox keeps ``api:<kind>:<key>`` longer than api_requests keeps the answer: the same key
    for another password change answered 202 with ``mails: 0``, and nobody was told."""
    body = {"type": "password_changed", "data": {"source_ip": "192.0.2.7"}}
    assert (await api.call("POST", "/v1/accounts/acct1001/events", body, key="pw-old"))[0] in (200, 202)
    await _settle(smtp_sink, 1)
    with contextlib.closing(sqlite3.connect(api.db)) as conn, conn:
        assert conn.execute("DELETE FROM api_requests WHERE key = 'pw-old'").rowcount == 1
    status, reply = await api.call("POST", "/v1/accounts/acct1001/events", body, key="pw-old")
    assert (status, reply["field"]) == (409, "Idempotency-Key"), reply
    status, reply = await api.call("POST", "/v1/accounts/acct1001/events", body, key="pw-new")
    assert (status in (200, 202), reply["mails"]) == (True, 1), reply


async def test_topup_key_reused_after_its_request_row_is_purged_is_409(api: Api, smtp_sink: SmtpSink) -> None:
    """Retention drops the api_requests row, not the ledger's ``api:<key>`` ref: the same key
    for another top-up must not answer 200 with nothing booked."""
    store = api.daemon._running().store
    body = {"type": "topup", "data": {"amount": "12.50"}}
    assert (await api.call("POST", "/v1/accounts/acct1001/events", body, key="top-old"))[0] == 200
    await _settle(smtp_sink, 1)
    with contextlib.closing(sqlite3.connect(api.db)) as conn, conn:
        assert conn.execute("DELETE FROM api_requests WHERE key = 'top-old'").rowcount == 1
    before = await store.write(lambda tx: tx.balance("acct1002"))
    status, reply = await api.call("POST", "/v1/accounts/acct1002/events", body, key="top-old")
    assert status == 409, reply
    assert (reply["field"], "already used" in reply["error"]) == ("Idempotency-Key", True)
    assert await store.write(lambda tx: tx.balance("acct1002")) == before
    assert api.rows("SELECT account FROM ledger WHERE ref = 'api:top-old'") == [("acct1001",)]
    assert api.rows("SELECT COUNT(*) FROM api_requests WHERE key = 'top-old'") == [(0,)]
    await _settle(smtp_sink, 1)  # no top-up mail for the refused one


async def test_auth_errors_and_limits(api: Api) -> None:
    body = {"type": "topup", "data": {"amount": "12.50"}}
    path = "/v1/accounts/acct1001/events"
    status, reply = await api.call("POST", path, body, key="a", token=None)
    assert (status, reply["field"]) == (401, None)
    assert (await api.call("POST", path, body, key="a", token="wrong"))[0] == 401
    status, reply = await api.call("POST", path, {"type": "topup", "data": {"amount": "12.505"}}, key="b")
    assert (status, reply["field"]) == (400, "data.amount")
    status, reply = await api.call("POST", path, {"type": "topup", "data": {"amount": 12.5}}, key="b")
    assert (status, reply["field"]) == (400, "data.amount")
    assert (await api.call("POST", path, body))[0] == 400  # no Idempotency-Key
    status, reply = await api.call("POST", path, {"type": "topup", "data": {"amount": "1" * 5000}}, key="c")
    assert status == 413
    assert set(reply) == {"error", "field"}
    assert (await api.call("POST", "/v1/accounts/nobody/events", body, key="d"))[0] == 404
    assert (await api.call("POST", path, body, key="e"))[0] == 200
    status, reply = await api.call("POST", path, {"type": "topup", "data": {"amount": "1.00"}}, key="e")
    assert (status, reply["field"]) == (409, "Idempotency-Key")


async def test_put_account_and_allowed_ip_change(api: Api, smtp_sink: SmtpSink) -> None:
    new = {"name": "Ana Pop", "email": "ana.pop@example.ro", "opening_balance": "10.00", "allowed_ips": ["192.0.2.1"]}
    status, reply = await api.call("PUT", "/v1/accounts/acct2001", new, key="p1")
    assert (status, reply["created"], reply["balance"]) == (201, True, 1000)
    status, reply = await api.call("PUT", "/v1/accounts/acct2001", {**new, "email": "x"}, key="p2")
    assert (status, reply["field"]) == (400, "email")
    status, reply = await api.call("PUT", "/v1/accounts/acct2001", {**new, "allowed_ips": ["1.2.3.4/8"]}, key="p2")
    assert (status, reply["field"]) == (400, "allowed_ips[0]")
    changed = {**new, "allowed_ips": ["192.0.2.2", "198.51.100.0/24"], "opening_balance": "99.00"}
    status, reply = await api.call("PUT", "/v1/accounts/acct2001", changed, key="p3")
    assert (status, reply["created"], reply["balance"], reply["mails"]) == (200, False, 1000, 1)
    assert (await api.call("PUT", "/v1/accounts/acct2001", changed, key="p3"))[0] == 200
    await _settle(smtp_sink, 1)
    assert len(smtp_sink.messages) == 1
    assert smtp_sink.messages[0].rcpt_tos == ("ana.pop@example.ro",)
    assert b"X-ClickPhone-Kind: allowed_ip_changed" in smtp_sink.messages[0].data


async def test_an_allow_list_change_that_also_moves_the_address_tells_the_old_address_too(
    api: Api, smtp_sink: SmtpSink
) -> None:
    """One PUT that changes both the e-mail and the allow-list (a hijacked portal session, say)
    used to alert only the new address: the attacker's."""
    new = {"name": "Ana Pop", "email": "ana.pop@example.ro", "allowed_ips": ["192.0.2.1"]}
    assert (await api.call("PUT", "/v1/accounts/acct2001", new, key="mv1"))[0] == 201
    moved = {**new, "email": "someone.else@example.net", "allowed_ips": []}
    status, reply = await api.call("PUT", "/v1/accounts/acct2001", moved, key="mv2")
    assert (status, reply["mails"]) == (200, 2), reply
    await _settle(smtp_sink, 2)
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.messages) == ["ana.pop@example.ro", "someone.else@example.net"]
    assert all(b"X-ClickPhone-Kind: allowed_ip_changed" in m.data for m in smtp_sink.messages)
    # the address alone changing is not an allow-list notice
    status, reply = await api.call("PUT", "/v1/accounts/acct2001", {**moved, "email": "a@example.ro"}, key="mv3")
    assert (status, reply["mails"]) == (200, 0), reply


async def test_metrics_and_health(api: Api) -> None:
    async with api.session.get(api.base + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"clickphone_ami_events", "clickphone_ingest_queue_depth", "clickphone_outbox_messages"} <= set(families)
    storage = {name: families[f"clickphone_storage_{name}"].samples[0].value for name in ("commits", "relaxed_commits")}
    assert storage["commits"] >= 1  # the daemon's own writes at start (went live, the retention run, ...)
    assert storage["relaxed_commits"] == 0  # no authorize yet: nothing committed without fsync
    assert families["clickphone_storage_wal_sync_failures"].samples[0].value == 0
    async with api.session.get(api.base + "/healthz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["database_writable"] is True
    assert body["ami"] is None


async def test_health_503_when_ami_down(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    d, task, port = await _start(write_config, short_tmp, smtp_sink.port, ami_enabled=True, ami_port=_free_port())
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["ami"]["connected"] is False
        assert body["database_writable"] is True
    finally:
        d.request_stop()
        assert await task == 0


async def _consent_ip(api: Api, forwarded: str) -> str:
    """PUT a consent change with ``X-Forwarded-For: forwarded``; the address recorded as its evidence."""
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Idempotency-Key": "xff-" + "".join(forwarded.split()),
        "X-Forwarded-For": forwarded,
    }
    path = api.base + "/v1/accounts/acct1001/consent"
    async with api.session.put(path, json={"marketing": True}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    status, consent = await api.call("GET", "/v1/accounts/acct1001/consent")
    assert status == 200
    return str(consent["history"][0]["ip"])


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(api: Api) -> None:
    """No trusted proxy configured: a client cannot choose the address recorded as evidence."""
    assert await _consent_ip(api, "203.0.113.66") == "127.0.0.1"


async def test_forwarded_for_behind_a_trusted_proxy_takes_the_rightmost_untrusted_hop(
    write_config: Callable[..., Path], short_tmp: Path, smtp_sink: SmtpSink
) -> None:
    """The peer (127.0.0.1) and 10.0.0.0/8 are our proxies: the client's own entry (left) is not
    believed, the hop our proxy saw connect is; an unreadable hop on the way gives the peer."""
    trusted = '  trusted_proxies: ["127.0.0.1", "10.0.0.0/8"]\n'
    d, task, port = await _start(write_config, short_tmp, smtp_sink.port, api_extra=trusted)
    try:
        await d._running().store.write(import_unit([(i.account, i.opening_balance) for i in load_accounts(ACCOUNTS)]))
        async with aiohttp.ClientSession() as session:
            api = Api(d, f"http://127.0.0.1:{port}", session, d.config.database.path)
            assert await _consent_ip(api, "203.0.113.66, 198.51.100.7, 10.1.2.3") == "198.51.100.7"
            assert await _consent_ip(api, "198.51.100.7, bogus, 10.1.2.3") == "127.0.0.1"
            assert await _consent_ip(api, "10.9.9.9,10.1.2.3") == "10.9.9.9"
    finally:
        d.request_stop()
        assert await task == 0


async def test_a_reset_link_longer_than_the_mail_keeps_is_refused_not_cut(api: Api, smtp_sink: SmtpSink) -> None:
    """The renderer cuts one-line values at 1,000 characters: a longer reset link used to be
    accepted (202) and mailed cut short, a link that does not work. It is refused, naming the field;
    one of exactly 1,000 characters goes out whole."""
    path = "/v1/accounts/acct1001/events"
    head = "https://cont.example.ro/reset?t="
    long = {"reset_url": head + "a" * (1001 - len(head)), "expires_at": _later()}
    status, reply = await api.call("POST", path, {"type": "password_recovery", "data": long}, key="r-long")
    assert (status, reply["field"]) == (400, "data.reset_url"), reply
    fits = head + "b" * (1000 - len(head))
    body = {"type": "password_recovery", "data": {"reset_url": fits, "expires_at": _later()}}
    assert (await api.call("POST", path, body, key="r-fits"))[0] == 202
    await _settle(smtp_sink, 1)
    assert len(smtp_sink.messages) == 1
    msg = email.message_from_bytes(smtp_sink.messages[0].data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    text = msg.get_body(("plain",))
    assert text is not None
    assert fits in text.get_content().splitlines()


MARIA = "maria.ionescu@example.ro"


def _plain(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


async def test_an_emptied_allow_list_is_announced_as_any_address(api: Api, smtp_sink: SmtpSink) -> None:
    """An empty allow-list lets every address call: the templates have a warning for it, but the
    service passed ``["*"]``, so the notice said "Allowed now: *" instead, in both languages."""
    people = [("acct1001", "Ion Popescu", "ion.popescu@example.ro", "ro"), ("acct1002", "Maria Ionescu", MARIA, "en")]
    for code, name, address, language in people:
        body = {"name": name, "email": address, "language": language, "allowed_ips": []}
        status, reply = await api.call("PUT", f"/v1/accounts/{code}", body, key=f"empty-{code}")
        assert (status, reply["mails"]) == (200, 1), reply
    await _settle(smtp_sink, 2)
    texts = {m.rcpt_tos[0]: _plain(m.data) for m in smtp_sink.messages}
    ro, en = texts["ion.popescu@example.ro"], texts[MARIA]
    assert "Adrese permise acum: oricare (lista este goală" in ro, ro
    assert "Allowed now: any (the list is empty" in en, en
    assert ": *" not in ro + en


async def test_the_allow_list_notice_shows_the_old_list_beside_the_new(api: Api, smtp_sink: SmtpSink) -> None:
    """The notice is "old → new": the service computed the old list but no template showed it, so
    a subscriber could not see what an intruder had removed."""
    body = {"name": "Ion Popescu", "email": "ion.popescu@example.ro", "allowed_ips": ["192.0.2.1"]}
    assert (await api.call("PUT", "/v1/accounts/acct1001", body, key="old-new"))[1]["mails"] == 1
    body = {"name": "Maria Ionescu", "email": MARIA, "language": "en", "allowed_ips": []}
    assert (await api.call("PUT", "/v1/accounts/acct1002", body, key="old-any"))[1]["mails"] == 1
    await _settle(smtp_sink, 2)
    texts = {m.rcpt_tos[0]: _plain(m.data) for m in smtp_sink.messages}
    ro, en = texts["ion.popescu@example.ro"], texts[MARIA]
    assert "Adrese permise înainte: 127.0.0.1/32, 198.51.100.0/24, 2001:db8:100::/48" in ro, ro
    assert "Adrese permise acum: 192.0.2.1/32" in ro
    assert "Allowed before: 192.0.2.10/32" in en, en
    assert "Allowed now: any" in en


async def test_balance_info_mails_the_balance_and_todays_spend(api: Api, smtp_sink: SmtpSink) -> None:
    """balance_info "mails the current balance and today's spend" (issue #6); the service computed
    the spend and answered it, but the mail left it out."""
    status, reply = await api.call("POST", "/v1/accounts/acct1001/events", {"type": "balance_info"}, key="bal")
    assert (status, reply["balance"], reply["spent_today"]) == (202, 2500, 0), reply
    status, reply = await api.call("POST", "/v1/accounts/acct1002/events", {"type": "balance_info"}, key="bal2")
    assert status == 202, reply
    await _settle(smtp_sink, 2)
    texts = {m.rcpt_tos[0]: _plain(m.data) for m in smtp_sink.messages}
    assert "Cheltuit astăzi: 0,00 lei" in texts["ion.popescu@example.ro"]
    assert "Spent today: 0.00 RON" in texts[MARIA]


async def test_payment_confirmed_mails_the_method_it_requires(api: Api, smtp_sink: SmtpSink) -> None:
    """payment_confirmed carries "amount, method, reference" (issue #6) and ``method`` is required,
    but it was checked and then dropped: the confirmation did not say how the subscriber paid."""
    path = "/v1/accounts/{}/events"
    data = {"amount": "45.90", "method": "ordin de plată", "reference": "CP-2026-1"}
    body = {"type": "payment_confirmed", "data": data}
    assert (await api.call("POST", path.format("acct1001"), body, key="pay-ro"))[0] == 202
    body = {"type": "payment_confirmed", "data": {**data, "method": "card"}}
    assert (await api.call("POST", path.format("acct1002"), body, key="pay-en"))[0] == 202
    await _settle(smtp_sink, 2)
    texts = {m.rcpt_tos[0]: _plain(m.data) for m in smtp_sink.messages}
    assert "Metoda de plată: ordin de plată" in texts["ion.popescu@example.ro"]
    assert "Payment method: card" in texts[MARIA]


async def test_an_unknown_data_field_is_refused_by_name(api: Api, smtp_sink: SmtpSink) -> None:
    """Unknown fields are refused everywhere else (account PUTs, broadcasts, the event itself), but
    not inside ``data``: a top-up with ``refrence`` was booked and mailed with the Idempotency-Key
    as its reference. Each type takes its own fields, and ``source_ip`` as before."""
    path = "/v1/accounts/acct1001/events"
    store = api.daemon._running().store
    before = await store.write(lambda tx: tx.balance("acct1001"))
    for n, (body, field) in enumerate(
        [
            ({"type": "topup", "data": {"amount": "10.00", "refrence": "TOP-7"}}, "data.refrence"),
            ({"type": "balance_info", "data": {"amount": "10.00"}}, "data.amount"),
            ({"type": "password_changed", "data": {"reset_url": "https://x.example/r"}}, "data.reset_url"),
        ]
    ):
        status, reply = await api.call("POST", path, body, key=f"unknown-{n}")
        assert (status, reply["field"]) == (400, field), reply
    assert await store.write(lambda tx: tx.balance("acct1001")) == before
    body = {"type": "pin_created", "data": {"number": "0310000001", "source_ip": "198.51.100.7"}}
    assert (await api.call("POST", path, body, key="known"))[0] == 202
    await _settle(smtp_sink, 1)
    assert len(smtp_sink.messages) == 1


async def test_an_unknown_mailbox_key_is_refused_as_the_import_file_refuses_it(api: Api, smtp_sink: SmtpSink) -> None:
    """``accounts import`` refuses an unknown key in a mailbox entry; the PUT ignored it, so a
    mistyped ``emial`` silently sent that box's voicemail to the account's address instead."""
    body = {
        "name": "Ana Pop",
        "email": "ana.pop@example.ro",
        "mailboxes": [{"box": "300@default"}, {"box": "301@default", "emial": "receptie@example.ro"}],
    }
    status, reply = await api.call("PUT", "/v1/accounts/acct2002", body, key="mbox-typo")
    assert (status, reply["field"]) == (400, "mailboxes[1].emial"), reply
    assert api.rows("SELECT code FROM accounts WHERE code = 'acct2002'") == []


async def test_a_time_the_mail_cannot_show_is_refused_naming_its_field(api: Api) -> None:
    """A valid ISO time at the edge of the calendar cannot be shown in Bucharest time: it was
    refused only when the mail failed to render, blaming ``data`` as a whole."""
    path = "/v1/accounts/acct1001/events"
    for n, (body, field) in enumerate(
        [
            ({"type": "password_changed", "data": {"at": "0001-01-01T00:00:00+14:00"}}, "data.at"),
            ({"type": "pin_created", "data": {"at": "9999-12-31T23:00:00Z"}}, "data.at"),
            (
                {
                    "type": "password_recovery",
                    "data": {"reset_url": "https://x.example/r", "expires_at": "9999-12-31T23:59:59-14:00"},
                },
                "data.expires_at",
            ),
        ]
    ):
        status, reply = await api.call("POST", path, body, key=f"edge-{n}")
        assert (status, reply["field"]) == (400, field), reply


async def test_an_event_for_an_erased_account_is_410_as_documented(api: Api) -> None:
    """An erased account takes no more events (410, README "Data rights"); openapi.yaml did not
    list 410, nor the 503 the service answers when an account keeps changing under a request."""
    await privacy.erase_account(api.daemon._running().store, "acct1002", numbering(api.daemon.config))
    body = {"type": "balance_info"}
    status, reply = await api.call("POST", "/v1/accounts/acct1002/events", body, key="erased")
    assert (status, reply["field"]) == (410, None), reply
    documented = openapi_document()["paths"]["/v1/accounts/{code}/events"]["post"]["responses"]
    assert {"410", "503"} <= set(documented)


async def test_the_longest_idempotency_key_works_for_every_event(api: Api, smtp_sink: SmtpSink) -> None:
    """Keys of 1-200 characters are allowed, but the mail's outbox key is ``api:<kind>:<key>`` and
    the outbox takes at most 200: a key of over ~180 characters answered 500 and booked nothing."""
    for n, (kind, data) in enumerate(EVENTS.items()):
        key = f"{n}-" + "k" * 198
        body = {"type": kind, "data": data}
        status, reply = await api.call("POST", "/v1/accounts/acct1001/events", body, key=key)
        assert (status in (200, 202), reply["mails"]) == (True, 1), reply
        assert await api.call("POST", "/v1/accounts/acct1001/events", body, key=key) == (status, reply)
    body = {"name": "Ion Popescu", "email": "ion.popescu@example.ro", "allowed_ips": ["192.0.2.1"]}
    status, reply = await api.call("PUT", "/v1/accounts/acct1001", body, key="p" * 200)
    assert (status, reply["mails"]) == (200, 1), reply
    await _settle(smtp_sink, len(EVENTS) + 1)
    assert len(smtp_sink.messages) == len(EVENTS) + 1
