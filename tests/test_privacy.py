"""Data rights: export returns every personal datum held about an account; erase leaves none in the
database file or its -wal (secure_delete, checkpoint) while the money totals stay; suppressions keep
working; an erased account takes new events without a crash, and nothing of it comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clickphone_agi.adapters.storage import reports
from clickphone_agi.adapters.storage.privacy import ErasureDeferred
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.dialplan_vars import Reason
from clickphone_agi.domain import privacy as domain_privacy
from clickphone_agi.domain.accounts import Account, Mailbox
from clickphone_agi.domain.charging import BillingRule, Numbering
from clickphone_agi.domain.delivery import message_id
from clickphone_agi.domain.events import VoicemailWaiting
from clickphone_agi.domain.missed import missed_key
from clickphone_agi.domain.money import Notice
from clickphone_agi.domain.outbox import OutboxMessage
from clickphone_agi.domain.privacy import address_hash, erased_leg, number_digest, number_forms
from clickphone_agi.domain.unsubscribe import make_token
from clickphone_agi.notices.render import Renderer, build_message
from clickphone_agi.ports import WriteTx
from clickphone_agi.services import privacy
from clickphone_agi.services.accounts import adjust_unit, import_unit
from clickphone_agi.services.consent import ConsentService, ConsentSettings
from clickphone_agi.services.ingest import EventProcessor
from clickphone_agi.services.intake import ApiError, Reply
from clickphone_agi.services.money import MoneyService, MoneySettings
from clickphone_agi.services.notices import NoticeSettings, Notifier
from tests.test_money import SINCE, TABLE, TZ, _calls

NOW = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)
NUMBERING = Numbering()
ION = Account(
    code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro", language="en",
    allowed_ips=(ipaddress.ip_network("198.51.100.77/32"),), dids=("40721000001",),
    mailboxes=(Mailbox("100@default", "voicemail.ion@example.ro"),), daily_limit=100_000,
)  # fmt: skip
MARIA = Account(code="acct2002", name="Maria Dobre", email="maria.dobre@example.org", dids=("40215550000",))

# every personal datum seeded for Ion: none may survive the erasure, all must be in the export
NEEDLES = {
    "name": "Ion Popescu",
    "email": "ion.popescu@example.ro",
    "mailbox email": "voicemail.ion@example.ro",
    "DID": "40721000001",
    "DID as dialled": "0721000001",
    "allowed IP": "198.51.100.77",
    "called number": "0040212345678",
    "called number, E.164": "40212345678",
    "called number (long call)": "0040216500000",
    "caller number": "0744123456",
    "caller name": "Vasile Ionescu",
    "consent evidence": "203.0.113.9",
    "adjustment reason": "goodwill after the outage",
}


def _money(store: SqliteStore) -> MoneyService:
    settings = MoneySettings(tariffs=TABLE, zone=TZ, rule=BillingRule("Dial", ("lab-outbound",), None))
    return MoneyService(store, FakeClock(NOW), settings)


def _mail(kind: str, key: str, to: str, data: dict[str, object]) -> OutboxMessage:
    rendered = Renderer(None).render(kind, "en", data)
    mime = build_message(
        rendered, sender="ClickPhone <no-reply@clickphone.example>", recipient=to,
        message_id=message_id(key, "clickphone.example"), date=NOW,
    )  # fmt: skip
    return OutboxMessage.build(
        key=key, kind=kind, recipient=to, account="acct1001", mime=mime, now=NOW, lifetime=timedelta(days=1)
    )


async def _seed(store: SqliteStore) -> None:
    """Ion's calls (charged), mails (one bounced), suppressions, consent, an API answer, a reservation;
    and Maria's call, which an erasure of Ion must not touch."""
    await store.write(import_unit([(ION, 5000), (MARIA, 3000)]))
    processor = EventProcessor(store, SINCE, _money(store))
    for name in ("answered_call", "long_call", "missed_call", "voicemail"):
        for call in _calls(name):
            await processor.handle(call)
    (maria_call,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    await processor.handle(
        dataclasses.replace(
            maria_call, key="cdr:pbx1:maria.1:Local/0215550999@lab-pstn-1;1", account="acct2002",
            unique_id="maria.1", linked_id="maria.0", source="0215550000", destination="0040215550999",
            channel="Local/0040215550999@lab-outbound-1;2", destination_channel="Local/0215550999@lab-pstn-1;1",
        )
    )  # fmt: skip
    await store.write(adjust_unit("acct1001", 250, "goodwill after the outage", "adjust:seed"))
    missed = {
        "name": "Ion Popescu", "caller_name": "Vasile Ionescu", "caller_number": "0744123456",
        "number": "+40721000001", "at": NOW, "rang": 4,
    }  # fmt: skip
    sent = _mail("missed_call", "missed:pbx1:seed", "ion.popescu@example.ro", missed)
    bounced = _mail("missed_call", "missed:pbx1:seed2", "voicemail.ion@example.ro", missed)
    notice = Notice(
        key="limit:seed", kind="low_balance", recipient="ion.popescu@example.ro", account="acct1001",
        payload={"name": "Ion Popescu", "balance": "1,00 lei", "threshold": "5,00 lei", "language": "en"},
    )  # fmt: skip

    def mails(tx: object) -> None:
        assert tx.enqueue(sent)
        assert tx.enqueue(bounced)
        assert tx.enqueue_notice(notice)
        ids = [r[0] for r in tx._conn.execute("SELECT id FROM outbox ORDER BY id")]  # type: ignore[attr-defined]
        tx.mark_sent(ids[0], "250 2.0.0 Ok: queued as 4F3A")  # type: ignore[attr-defined]
        reply = "550 5.1.1 <Voicemail.Ion@example.ro>: Recipient address rejected"
        tx.mark_failed(ids[1], reply, NOW, dead=True, smtp_reply=reply)  # type: ignore[attr-defined]
        tx.count_hard_bounce("voicemail.ion@example.ro", reply, 1)  # type: ignore[attr-defined]
        tx.record_api_request("put-1", "h", 200, json.dumps({"account": "acct1001", "created": True}))  # type: ignore[attr-defined]
        tx.reserve("1795882999.1", "acct1001", 120, NOW + timedelta(minutes=5))  # type: ignore[attr-defined]

    await store.write(mails)
    # the consent tables' writers come with the consent API; their rows are what erasure must handle
    conn = sqlite3.connect(store.path)
    with conn:
        conn.execute(
            "INSERT INTO consent_records (account, granted, recorded_at, source, policy_version, evidence)"
            " VALUES ('acct1001', 1, '2026-11-01T10:00:00.000000Z', 'api', 'v1', '{\"ip\": \"203.0.113.9\"}')"
        )
        conn.execute(
            "INSERT INTO marketing_suppressions (address, reason, created_at)"
            " VALUES ('ion.popescu@example.ro', 'unsubscribe', '2026-11-02T10:00:00.000000Z')"
        )
    conn.close()


def _raw(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def _money_totals(path: Path) -> dict[str, object]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            "balances": conn.execute("SELECT account, balance FROM balances ORDER BY account").fetchall(),
            "ledger": conn.execute("SELECT account, SUM(amount), COUNT(*) FROM ledger GROUP BY account").fetchall(),
            "spend": conn.execute("SELECT account, day, spent FROM daily_spend ORDER BY 1, 2").fetchall(),
            "rated": conn.execute("SELECT account, SUM(cost), COUNT(*) FROM rated_calls GROUP BY account").fetchall(),
        }
    finally:
        conn.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    yield s
    await s.close()


async def test_export_holds_every_personal_datum(store: SqliteStore) -> None:
    await _seed(store)
    exported = await privacy.export_account(store, FakeClock(NOW), "acct1001", NUMBERING)
    text = json.dumps(exported, ensure_ascii=False)
    missing = [what for what, needle in NEEDLES.items() if needle not in text]
    assert missing == []
    assert exported["account"]["settings"]["allowed_ips"] == ["198.51.100.77/32"]
    assert exported["dids"] == ["40721000001"]
    assert exported["mailboxes"] == ["100@default"]
    assert sum(r["amount"] for r in exported["ledger"]) == exported["balance"]
    # the inbound calls to the DID and the outbound ones from it; none of Maria's
    assert {r["account"] for r in exported["cdrs"]} == {"acct1001"}
    assert len(exported["cdrs"]) == 14
    assert {r["idempotency_key"] for r in exported["outbox"]} >= {"missed:pbx1:seed", "missed:pbx1:seed2", "limit:seed"}
    (sent,) = [r for r in exported["outbox"] if r["idempotency_key"] == "missed:pbx1:seed"]
    assert any("Vasile Ionescu" in part.get("text", "") for part in sent["message"]["parts"])
    assert [s["address"] for s in exported["suppressions"]] == ["voicemail.ion@example.ro"]
    assert [s["address"] for s in exported["marketing_suppressions"]] == ["ion.popescu@example.ro"]
    assert [r["key"] for r in exported["api_requests"]] == ["put-1"]
    assert exported["reservations"][0]["call_id"] == "1795882999.1"
    with pytest.raises(privacy.UnknownAccount):
        await privacy.export_account(store, FakeClock(NOW), "nobody", NUMBERING)


async def test_erase_leaves_no_personal_datum_in_the_file_or_wal_and_keeps_money(store: SqliteStore) -> None:
    await _seed(store)
    before = _money_totals(store.path)
    raw = _raw(store.path)
    assert [what for what, needle in NEEDLES.items() if needle.encode() not in raw] == []  # the test can see them

    done = await privacy.erase_account(store, "acct1001", NUMBERING)

    assert done["wal_checkpoint"]["complete"] is True
    assert done["cdrs"] == 14
    assert done["ledger"] == 4
    assert done["outbox"] == 3
    assert done["reservations"] == 1
    raw = _raw(store.path)
    assert [what for what, needle in NEEDLES.items() if needle.encode() in raw] == []
    assert _money_totals(store.path) == before
    assert reports.check_balances(store.path) == []
    # Maria's call is hers: untouched, key and all
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT destination FROM cdrs WHERE account = 'acct2002'").fetchall() == [("0040215550999",)]
    conn.close()
    assert await store.has_event("cdr:pbx1:maria.1:Local/0215550999@lab-pstn-1;1")


async def test_erased_account_state_suppressions_and_new_events(store: SqliteStore) -> None:
    await _seed(store)
    await privacy.erase_account(store, "acct1001", NUMBERING)
    totals = _money_totals(store.path)

    account = await store.write(lambda tx: tx.get_account("acct1001"))
    assert account is not None
    assert account.erased
    assert not account.enabled
    assert (account.name, account.email, account.dids, account.mailboxes, account.allowed_ips) == (
        "erased", "erased@erased.invalid", (), (), (),
    )  # fmt: skip
    # the suppression lists keep working, through the hashed form
    assert await store.write(lambda tx: tx.suppression("Voicemail.Ion@example.ro")) is not None
    assert await store.write(lambda tx: tx.marketing_suppressed("ion.popescu@example.ro")) == "unsubscribe"
    assert await store.write(lambda tx: tx.marketing_suppressed("someone.else@example.ro")) is None
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT address FROM suppressions").fetchall() == [(address_hash("voicemail.ion@example.ro"),)]
    conn.close()
    # calls are denied as disabled; a replay of its calls records and charges nothing; no mail is queued
    decision = await _money(store).authorize("acct1001", "0040212345678", "198.51.100.77", "after.1")
    assert (decision.allow, decision.reason) == (False, Reason.DISABLED)
    processor = EventProcessor(store, SINCE, _money(store))
    for call in _calls("answered_call") + _calls("long_call"):
        assert await processor.handle(call) is False
    late = _mail("missed_call", "missed:pbx1:late", "someone@example.ro", {
        "name": "x", "caller_name": "", "caller_number": "", "number": "", "at": NOW, "rang": 1,
    })  # fmt: skip
    assert await store.write(lambda tx: tx.enqueue(late)) is False
    assert _money_totals(store.path) == totals
    assert [n for n in NEEDLES.values() if n.encode() in _raw(store.path)] == []
    # its code is retired, and erasing again is harmless
    with pytest.raises(ValueError, match="erased"):
        await store.write(import_unit([(dataclasses.replace(ION, code="acct1001"), 0)]))
    again = await privacy.erase_account(store, "acct1001", NUMBERING)
    assert again["cdrs"] == 14
    assert again["outbox"] == 3
    exported = await privacy.export_account(store, FakeClock(NOW), "acct1001", NUMBERING)
    assert exported["account"]["settings"]["erased"] is True
    assert [n for n in NEEDLES.values() if n in json.dumps(exported)] == []


async def test_erasure_waits_for_a_batch_holding_the_accounts_rows(store: SqliteStore) -> None:
    """A CDR's rows are written at COMMIT: an erasure in the same batch would miss them, so it refuses
    and the service tries again in the next batch."""
    await store.write(import_unit([(ION, 5000)]))
    (call,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    forms = privacy.forms_for(NUMBERING)

    def both(tx: object) -> None:
        tx.record_call(call)  # type: ignore[attr-defined]
        tx.erase_account("acct1001", forms=forms, outbox_ids=(), outbox_seen_up_to=0, salt=b"s")  # type: ignore[attr-defined]

    with pytest.raises(ErasureDeferred):
        await store.write(both)
    assert await store.write(lambda tx: tx.get_account("acct1001")) == ION  # the failed unit left nothing
    await store.write(lambda tx: tx.record_call(call))
    done = await privacy.erase_account(store, "acct1001", NUMBERING)
    assert done["cdrs"] == 1
    assert b"0040212345678" not in _raw(store.path)


async def test_erasure_also_waits_for_a_deferred_leg_without_account_that_carries_its_number(
    store: SqliteStore,
) -> None:
    """A leg with no account code (inbound, say) that carries Ion's DID is blanked by the erasure's
    SQL too; still deferred in the batch, it would be written after the erasure with the number."""
    await store.write(import_unit([(ION, 5000)]))
    (call,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    leg = dataclasses.replace(call, key="leg-1", account="", source="0721000001")  # Ion's DID as dialled
    other = dataclasses.replace(call, key="leg-2", account="", source="0744999999")  # somebody else's
    gate = threading.Event()
    blocker = asyncio.ensure_future(store.write(lambda tx: gate.wait(10)))
    await asyncio.sleep(0.05)  # the next writes queue for one batch: the legs, then the erasure
    legs = asyncio.ensure_future(store.write_many([lambda tx: tx.record_call(leg), lambda tx: tx.record_call(other)]))
    erase = asyncio.ensure_future(privacy.erase_account(store, "acct1001", NUMBERING))
    await asyncio.sleep(0.05)
    gate.set()
    async with asyncio.timeout(10):
        await asyncio.gather(blocker, legs, erase)
    assert erase.result()["cdrs"] == 1  # the leg with Ion's number, found once it was written
    assert b"0721000001" not in _raw(store.path)
    assert b"0744999999" in _raw(store.path)  # a stranger's leg is not Ion's to erase


async def test_erase_of_an_unknown_account(store: SqliteStore) -> None:
    with pytest.raises(privacy.UnknownAccount):
        await privacy.erase_account(store, "nobody", NUMBERING)


def test_number_forms_cover_how_a_did_is_dialled() -> None:
    assert number_forms("40721000001", "40", "0", "00") == (
        "40721000001", "+40721000001", "0040721000001", "0721000001",
    )  # fmt: skip
    assert address_hash("Ion@Example.RO") == address_hash("ion@example.ro")
    assert address_hash("ion@example.ro").startswith("sha256:")
    assert "ion" not in address_hash("ion@example.ro")


async def test_a_body_rendered_during_the_erasure_is_not_written_back(store: SqliteStore) -> None:
    """The sender renders payload rows outside any transaction; an erasure in between must win."""
    await store.write(import_unit([(ION, 5000)]))
    notice = Notice(
        key="limit:race", kind="low_balance", recipient="ion.popescu@example.ro", account="acct1001",
        payload={"name": "Ion Popescu", "balance": "1,00 lei", "threshold": "5,00 lei", "language": "en"},
    )  # fmt: skip
    assert await store.write(lambda tx: tx.enqueue_notice(notice))
    (due,) = await store.due_mail(NOW, 10)
    await privacy.erase_account(store, "acct1001", NUMBERING)
    await store.write(lambda tx: tx.set_message(due.row.id, b"Subject: low balance\r\n\r\nDear Ion Popescu\r\n"))
    assert b"Ion Popescu" not in _raw(store.path)
    (row,) = await store.outbox_rows()
    assert (row.status, row.recipient) == ("dead", "erased@erased.invalid")


async def test_a_mail_in_flight_that_bounces_after_the_erasure_stores_no_address(store: SqliteStore) -> None:
    """The sender holds the row (with the address) while the erasure runs; the relay's 550 then
    came back and the bounce count stored the plain address again, in a fresh suppression row."""
    await store.write(import_unit([(ION, 5000)]))
    missed = {"name": "Ion", "caller_name": "", "caller_number": "0744123456", "number": "+40721000001", "at": NOW}
    mail = _mail("missed_call", "missed:pbx1:fly", "ion.popescu@example.ro", {**missed, "rang": 4})
    assert await store.write(lambda tx: tx.enqueue(mail))
    (due,) = await store.due_mail(NOW, 10)
    await privacy.erase_account(store, "acct1001", NUMBERING)
    reply = "550 5.1.1 <ion.popescu@example.ro>: Recipient address rejected"

    def bounced(tx: WriteTx) -> bool:  # what the sender's failure unit does with the row it holds
        tx.mark_failed(due.row.id, reply, NOW, dead=True, smtp_reply=reply)
        return tx.count_hard_bounce(due.row.recipient, reply, 1, due.row.id)

    assert await store.write(bounced) is False
    assert b"ion.popescu@example.ro" not in _raw(store.path)


async def test_a_bounce_after_the_erasure_keeps_the_address_hashed(store: SqliteStore) -> None:
    await _seed(store)
    await privacy.erase_account(store, "acct1001", NUMBERING)
    reply = "550 5.1.1 <voicemail.ion@example.ro>: mailbox gone"
    assert await store.write(lambda tx: tx.count_hard_bounce("voicemail.ion@example.ro", reply, 3)) is True
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT address, reason, hard_bounces FROM suppressions").fetchall()
    conn.close()
    assert rows == [(address_hash("voicemail.ion@example.ro"), "550 5.1.1 <[erased]>: mailbox gone", 2)]


def _consent(store: SqliteStore) -> ConsentService:
    return ConsentService(store, lambda: ConsentSettings(unsubscribe_secret=b"s" * 32))


async def test_erase_clears_the_consent_evidence_kept_in_the_stored_api_answer(store: SqliteStore) -> None:
    """A consent PUT's answer (kept under its Idempotency-Key for replays) echoes the caller's IP and
    words; the erasure clears them there as it does in the consent record itself."""
    await store.write(import_unit([(ION, 5000)]))
    body = {"marketing": True, "how": "told Ion Popescu on the phone"}
    reply = await _consent(store).put_consent("consent-1", "h", "acct1001", body, "203.0.113.58")
    assert (reply.body["ip"], reply.body["how"]) == ("203.0.113.58", "told Ion Popescu on the phone")
    assert b"203.0.113.58" in _raw(store.path)

    await privacy.erase_account(store, "acct1001", NUMBERING)

    raw = _raw(store.path)
    assert b"203.0.113.58" not in raw
    assert b"Ion Popescu" not in raw
    # a replay of the key still answers, without the evidence
    again = await _consent(store).put_consent("consent-1", "h", "acct1001", body, "203.0.113.58")
    assert (again.status, again.body["marketing"], again.body["ip"], again.body["how"]) == (
        200,
        True,
        None,
        None,
    )


async def test_an_erased_account_takes_no_new_consent_record(store: SqliteStore) -> None:
    """After an erasure neither the one-click link of an old offer nor a consent PUT stores anything
    about the account again (a record would keep the clicking or calling IP); the link still answers
    as for any valid token, the PUT is 410 like the intake events."""
    await store.write(import_unit([(dataclasses.replace(ION, marketing_consent=True), 5000)]))
    await privacy.erase_account(store, "acct1001", NUMBERING)
    before = await store.consent_history("acct1001")
    token = make_token(b"s" * 32, "acct1001")

    reply = await _consent(store).unsubscribe(token, "203.0.113.77")

    assert reply == Reply(200, {"unsubscribed": True})
    for marketing in (False, True):
        with pytest.raises(ApiError) as refused:
            await _consent(store).put_consent(
                f"c-{marketing}", "h", "acct1001", {"marketing": marketing}, "203.0.113.78"
            )
        assert refused.value.status == 410
    assert await store.consent_history("acct1001") == before
    raw = _raw(store.path)
    assert b"203.0.113.77" not in raw
    assert b"203.0.113.78" not in raw


async def test_a_leg_without_account_read_again_after_the_erasure_stays_erased(store: SqliteStore) -> None:
    """Master.csv read again (a catch-up after an AMI gap, a replay after a restart) brings back a leg
    with no account code that carries the erased subscriber's number, from before the erasure: it
    must not be recorded again with the number. A later call to the number (reassigned) is."""
    await store.write(import_unit([(ION, 5000)]))
    (call,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    leg = dataclasses.replace(call, key="cdr:pbx1:in.1:PJSIP/100-00000001", account="", destination="0721000001")
    processor = EventProcessor(store, SINCE, _money(store))
    assert await processor.handle(leg) is True
    await privacy.erase_account(store, "acct1001", NUMBERING)
    assert b"0721000001" not in _raw(store.path)

    assert await processor.handle(leg) is False  # the same leg, read again
    late = dataclasses.replace(leg, key="cdr:pbx1:in.2:PJSIP/100-00000002")  # first seen only now
    assert await processor.handle(late) is False
    assert b"0721000001" not in _raw(store.path)


async def test_a_broadcast_sees_an_objection_kept_hashed_after_the_erasure(store: SqliteStore) -> None:
    """Ion objected, was erased, and came back under a new code with consent: the objection (now a
    digest) still holds when a broadcast picks its audience, not only at the send."""
    await _seed(store)  # Ion's address is on the marketing suppression list, the other one bounced
    await privacy.erase_account(store, "acct1001", NUMBERING)
    back = dataclasses.replace(ION, code="acct3003", marketing_consent=True)
    await store.write(import_unit([(back, 0)]))

    candidates = await store.write(lambda tx: tx.candidates(None, 10))

    (candidate,) = [c for c in candidates if c.account.code == "acct3003"]
    assert (candidate.consent, candidate.marketing_suppressed) == (True, True)
    bounced = dataclasses.replace(back, code="acct3004", email="Voicemail.Ion@example.ro", dids=(), mailboxes=())
    await store.write(import_unit([(bounced, 0)]))
    candidates = await store.write(lambda tx: tx.candidates(None, 10))
    (candidate,) = [c for c in candidates if c.account.code == "acct3004"]
    assert candidate.bounce_suppressed is True


async def test_erase_renames_the_low_balance_notice_key_that_holds_a_call_key(store: SqliteStore) -> None:
    """A low-balance warning is keyed by the ledger ref of the call that crossed the threshold, and a
    CDR key can hold the dialled number (``...:Local/0040212345678@...``): the erasure renames that
    ledger ref, so it must rename the outbox key built from it too."""
    await store.write(import_unit([(dataclasses.replace(ION, low_balance_threshold=4999), 5000)]))
    processor = EventProcessor(store, SINCE, _money(store))
    for call in _calls("answered_call"):
        await processor.handle(call)
    (row,) = await store.outbox_rows()
    assert row.kind == "low_balance"
    assert "0040212345678" in row.idempotency_key

    await privacy.erase_account(store, "acct1001", NUMBERING)

    (row,) = await store.outbox_rows()
    assert row.idempotency_key.startswith("lowbal:acct1001:erased:")
    assert b"0040212345678" not in _raw(store.path)
    assert b"0212345678" not in _raw(store.path)


async def test_a_later_call_to_an_erased_number_is_recorded_and_an_old_leg_stays_out_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The number may be reassigned: a call that started after the erasure is recorded as usual, and
    without hashing its numbers. After a restart (a writer cache loaded from the table) a leg from
    before the erasure is still refused."""
    path = tmp_path / "t.db"
    store = await SqliteStore.open(path, FakeClock(NOW))
    store.start()
    (call,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    leg = dataclasses.replace(call, key="cdr:pbx1:in.1:PJSIP/100-00000001", account="", destination="0721000001")
    try:
        await store.write(import_unit([(ION, 5000)]))
        await privacy.erase_account(store, "acct1001", NUMBERING)
    finally:
        await store.close()
    store = await SqliteStore.open(path, FakeClock(NOW))
    store.start()
    hashed: list[tuple[str, ...]] = []

    def counting(
        account: str, numbers: tuple[str, ...], started: datetime, erased: dict[str, datetime], key: bytes
    ) -> bool:
        hashed.append(numbers)
        return erased_leg(account, numbers, started, erased, key)

    monkeypatch.setattr("clickphone_agi.adapters.storage.sqlite.erased_leg", counting)
    try:
        processor = EventProcessor(store, SINCE, _money(store))
        assert await processor.handle(leg) is False
        assert hashed == [("0721000001", "0721000001")]
        shift = NOW - call.start + timedelta(minutes=1)
        later = dataclasses.replace(
            leg, key="cdr:pbx1:in.3:PJSIP/100-00000003", start=call.start + shift,
            answer=(call.answer or call.start) + shift, end=call.end + shift,
        )  # fmt: skip
        assert await processor.handle(later) is True
        assert len(hashed) == 1  # started after the last erasure: not even looked up
        assert [(c["key"], c["destination"]) for c in await store.calls()] == [(later.key, "0721000001")]
    finally:
        await store.close()


async def test_a_failed_erasure_leaves_no_erased_number_in_the_writers_cache(store: SqliteStore) -> None:
    """The erased numbers are cached by the writer; a unit that erases and then fails rolls back, and
    its numbers must not stay in the cache and keep refusing legs that nothing erased."""
    await store.write(import_unit([(ION, 5000)]))
    (call,) = [c for c in _calls("answered_call") if c.last_application == "Dial"]
    leg = dataclasses.replace(call, key="cdr:pbx1:in.1:PJSIP/100-00000001", account="", destination="0721000001")
    forms = privacy.forms_for(NUMBERING)

    def erase_then_fail(tx: WriteTx) -> None:
        tx.erase_account("acct1001", forms=forms, outbox_ids=(), outbox_seen_up_to=0, salt=b"s")
        assert tx.erased_leg(leg)  # the unit itself sees the numbers erased
        raise RuntimeError("a bug after the erasure's SQL")

    with pytest.raises(RuntimeError, match="a bug"):
        await store.write(erase_then_fail)
    assert await EventProcessor(store, SINCE, _money(store)).handle(leg) is True
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT COUNT(*) FROM erased_numbers").fetchone() == (0,)
    conn.close()


async def test_erased_numbers_are_kept_as_keyed_digests_and_not_exported(store: SqliteStore) -> None:
    """Every spelling of the erased DID, and the erased voicemail box, is kept as the digest under the
    database's own key, never as the number; an export (of the erased account or of one that now has
    the number) omits them."""
    await store.write(import_unit([(ION, 5000)]))
    await privacy.erase_account(store, "acct1001", NUMBERING)
    conn = sqlite3.connect(store.path)
    key = bytes.fromhex(conn.execute("SELECT value FROM meta WHERE key = 'erased_numbers_key'").fetchone()[0])
    rows = dict(conn.execute("SELECT digest, erased_at FROM erased_numbers").fetchall())
    conn.close()
    spellings = number_forms("40721000001", "40", "0", "00")
    assert sorted(rows) == sorted(number_digest(key, n) for n in (*spellings, "100@default"))
    assert set(rows.values()) == {"2026-11-28T18:00:00.000000Z"}
    await store.write(import_unit([(dataclasses.replace(MARIA, dids=("40721000001",)), 0)]))  # reassigned
    for code in ("acct1001", "acct2002"):
        text = json.dumps(await privacy.export_account(store, FakeClock(NOW), code, NUMBERING))
        assert [d for d in rows if d in text] == []


def test_a_number_digest_is_keyed_and_per_spelling() -> None:
    key = bytes(range(32))
    digest = number_digest(key, "0721000001")
    assert digest == hmac.new(key, b"0721000001", hashlib.sha256).hexdigest()
    assert number_digest(key, " 0721000001\t") == digest  # blanks around a CSV field do not matter
    assert number_digest(bytes(32), "0721000001") != digest  # another database's key: unrelated
    assert number_digest(key, "+40721000001") != digest  # each spelling is kept on its own


_KEY = bytes(range(32))
_ERASED_AT = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)
_BEFORE = datetime(2026, 11, 28, 19, 59, tzinfo=ZoneInfo("Europe/Bucharest"))  # 17:59 UTC
_AFTER = _ERASED_AT + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("account", "numbers", "started", "refused"),
    [
        ("", ("0744123456", "0721000001"), _BEFORE, True),  # the erased number as destination
        ("", ("0721000001", ""), _BEFORE, True),  # ... as source
        ("", ("0744123456", "0721000001"), _ERASED_AT, False),  # a call started at the erasure is later
        ("", ("0744123456", "0721000001"), _AFTER, False),  # the number reassigned: recorded
        ("acct2002", ("0744123456", "0721000001"), _BEFORE, False),  # another account's call is its record
        ("", ("0744123456", "+40721000001"), _BEFORE, False),  # a spelling that was not erased
    ],
)
def test_erased_leg_rule(account: str, numbers: tuple[str, ...], started: datetime, refused: bool) -> None:
    erased = {number_digest(_KEY, "0721000001"): _ERASED_AT}
    assert erased_leg(account, numbers, started, erased, _KEY) is refused


def test_with_nothing_erased_no_number_is_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(key: bytes, number: str) -> str:
        raise AssertionError(f"hashed {number}")

    monkeypatch.setattr(domain_privacy, "number_digest", fail)
    assert erased_leg("", ("0744123456", "0721000001"), _BEFORE, {}, _KEY) is False
    with pytest.raises(AssertionError, match="hashed"):  # the patch is in effect
        erased_leg("", ("0744123456", "0721000001"), _BEFORE, {"x": _ERASED_AT}, _KEY)


BOX = "0721000001@default"  # a box named after the subscriber's number, as many are
SPOOL_BOX = Path(__file__).parent / "fixtures" / "spool" / "voicemail" / "default" / "100" / "INBOX"


def _box_message(inbox: Path, number: int, origtime: int) -> None:
    """The fixture's message, as msg<number> of ``inbox``, left at ``origtime`` (epoch seconds)."""
    inbox.mkdir(parents=True, exist_ok=True)
    text = (SPOOL_BOX / "msg0000.txt").read_text()
    text = text.replace("origtime=1795882923", f"origtime={origtime}")
    text = text.replace("msg_id=1795882923-00000000", f"msg_id={origtime}-{number:08x}")
    (inbox / f"msg{number:04d}.txt").write_text(text)
    shutil.copy(SPOOL_BOX / "msg0000.wav", inbox / f"msg{number:04d}.wav")


async def test_erase_drops_the_keys_that_name_the_accounts_voicemail_box(store: SqliteStore, tmp_path: Path) -> None:
    """Voicemail keys name the box (``vm:<system>:<box>:<msg_id>``, MWI, recording, password change),
    and a box is often the subscriber's number: erasure drops those claims and renames the notices'
    outbox keys; a voicemail event of the box read again is neither recorded nor mailed, not even
    once the box is given to someone else (its old messages stay unmailed, its new ones go)."""
    ion = dataclasses.replace(ION, mailboxes=(Mailbox(BOX, "voicemail.ion@example.ro"),))
    await store.write(import_unit([(ion, 5000), (MARIA, 3000)]))
    vm_key = f"vm:pbx1:{BOX}:1795882923-00000000"
    named = {
        vm_key: "voicemail",
        f"{vm_key}:kept": "voicemail_kept",
        f"mwi:pbx1:{BOX}:1795882923.7:1": "mwi",
        "vmfile:pbx1:/var/spool/asterisk/voicemail/default/0721000001/INBOX/msg0000": "voicemail",
        f"vmpass:pbx1:{BOX}:1795882999": "vm_password",
        f"notice:vmpass:pbx1:{BOX}:1795882999": "password_changed",
    }
    others = ["vm:pbx1:0721000009@default:1795882923-00000000", "mwi:pbx1:100@default:1795882923.7:1"]
    data = {
        "name": "Ion Popescu", "mailbox": "0721000001", "caller_name": "Vasile Ionescu",
        "caller_number": "0744123456", "at": NOW, "duration": 13, "attached": False,
    }  # fmt: skip
    notices = [_mail("voicemail", vm_key, "voicemail.ion@example.ro", data)]
    notices.append(_mail("password_changed", f"notice:vmpass:pbx1:{BOX}:1795882999", "ion.popescu@example.ro",
                         {"name": "Ion Popescu", "source_ip": "", "at": NOW}))  # fmt: skip

    def seed(tx: WriteTx) -> None:
        for key, kind in [*named.items(), *((k, "voicemail") for k in others)]:
            assert tx.claim_event(key, kind)
        for notice in notices:
            assert tx.enqueue(notice)

    await store.write(seed)
    assert b"0721000001" in _raw(store.path)

    await privacy.erase_account(store, "acct1001", NUMBERING)

    assert b"0721000001" not in _raw(store.path)
    for key in named:
        assert not await store.has_event(key), key
    for key in others:
        assert await store.has_event(key), key
    conn = sqlite3.connect(store.path)
    keys = [r[0] for r in conn.execute("SELECT idempotency_key FROM outbox ORDER BY id")]
    conn.close()
    assert [k[: len("erased:")] for k in keys] == ["erased:", "erased:"]

    # an MWI of the box seen again: not recorded, but its call is still settled (no number in that key)
    processor = EventProcessor(store, SINCE, _money(store))
    mwi = VoicemailWaiting(
        key=f"mwi:pbx1:{BOX}:1795882923.8:1", mailbox="0721000001", context="default", new=1, old=0, waiting=True,
        account="", caller_id_num="0744123456", caller_id_name="", unique_id="1795882923.8",
        linked_id="1795882923.6", system_name="pbx1",
    )  # fmt: skip
    assert await processor.handle(mwi) is False
    assert not await store.has_event(mwi.key)
    assert await store.has_event(missed_key("pbx1", "1795882923.6"))
    theirs = dataclasses.replace(mwi, mailbox="0721000009", key="mwi:x", account="acct1001")
    assert await processor.handle(theirs) is False
    assert not await store.has_event("mwi:x")  # an erased account's event, whatever the box
    assert b"0721000001" not in _raw(store.path)

    # the spool still holds the old message; the box goes to Maria, and a new message arrives
    inbox = tmp_path / "vm" / "default" / "0721000001" / "INBOX"
    _box_message(inbox, 0, 1795882923)  # left for Ion, before the erasure
    _box_message(inbox, 1, int((NOW + timedelta(hours=1)).timestamp()))  # left for Maria
    settings = NoticeSettings(
        system_name="pbx1", sender="ClickPhone <no-reply@clickphone.example>", message_id_domain="clickphone.example",
        voicemail_root=tmp_path / "vm", fax_root=tmp_path / "fax",
    )  # fmt: skip
    notifier = Notifier(store, FakeClock(NOW), Renderer(), settings, datetime(2026, 1, 1, tzinfo=UTC))
    await notifier.voicemail_box("default", "0721000001")
    assert await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10) == []  # no owner: nothing mailed
    assert not await store.has_event(vm_key)
    await store.write(import_unit([(dataclasses.replace(MARIA, mailboxes=(Mailbox(BOX),)), 0)]))
    await notifier.voicemail_box("default", "0721000001")
    ((row, _mime),) = await store.due_outbox(datetime(2100, 1, 1, tzinfo=UTC), 10)
    assert (row.recipient, row.idempotency_key) == ("maria.dobre@example.org", f"vm:pbx1:{BOX}:{1795892400}-00000001")
    assert not await store.has_event(vm_key)  # Ion's message was not mailed to Maria
