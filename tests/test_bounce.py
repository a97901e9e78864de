"""Bounces: VERP tokens that cannot be forged, RFC 3464 parsing of realistic Postfix DSNs (and of
junk, which must never crash), and recording a bounce: the row marked bounced, hard bounces
counted per address, the address suppressed at the limit."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickphone_agi.adapters.control import CommandError
from clickphone_agi.adapters.smtp import bounce_command, bounce_unit
from clickphone_agi.adapters.storage.sqlite import SqliteStore
from clickphone_agi.clock import FakeClock
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.bounce import (
    DeliveryReport,
    NotADsn,
    RecipientStatus,
    Verdict,
    VerpToken,
    address_key,
    find_tokens,
    is_bad_mailbox,
    parse_dsn,
    verp_address,
)
from clickphone_agi.domain.outbox import OutboxMessage, OutboxStatus
from clickphone_agi.ports import WriteTx

FIXTURES = Path(__file__).parent / "fixtures" / "dsn"
KEY = b"0123456789abcdef0123456789abcdef"
DOMAIN = "bounces.clickphone.example"
NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def dsn(name: str, verp: str = "") -> bytes:
    return (FIXTURES / name).read_bytes().replace(b"@@VERP@@", verp.encode())


# ---- VERP ---------------------------------------------------------------------------------------


def test_verp_address_round_trip_and_what_it_reveals() -> None:
    address = verp_address(42, "vm:100@default:7", KEY, DOMAIN)
    local, _, domain = address.partition("@")
    assert domain == DOMAIN
    assert local.startswith("bounce+42-")
    assert len(local) == len("bounce+42-") + 8
    (token,) = find_tokens([f"<{address}>"])
    assert token == VerpToken(42, local[-8:])
    assert token.verify(KEY, "vm:100@default:7")
    assert not token.verify(b"another key of thirty-two bytes!", "vm:100@default:7")
    # the mac binds the idempotency key: a purged row's id reused by another row does not match
    assert not token.verify(KEY, "lowbal:acct1001:1")
    # MTAs may fold the local part to upper/lower case: still verifies
    (folded,) = find_tokens([address.upper()])
    assert folded.verify(KEY, "vm:100@default:7")


def test_find_tokens_dedupes_and_bounds() -> None:
    a = verp_address(1, "k", KEY, DOMAIN)
    assert len(find_tokens([a, a.upper(), f"rfc822; {a}"])) == 1
    many = [verp_address(i, "k", KEY, DOMAIN) for i in range(1, 30)]
    assert len(find_tokens(many)) == 10
    assert find_tokens(["bounce+12-short@x.example", "no-reply@clickphone.example"]) == ()


def test_address_key_folds_ascii_case_like_sqlite_lower() -> None:
    assert address_key(" Ion.Popescu@Example.RO ") == "ion.popescu@example.ro"
    assert address_key("Ștefan@exemplu.ro") == "Ștefan@exemplu.ro"  # SQLite's lower() leaves non-ASCII alone


# ---- parsing ------------------------------------------------------------------------------------


def test_postfix_5_1_1_user_unknown_is_a_hard_bounce() -> None:
    verp = verp_address(42, "lowbal:acct1001:1", KEY, DOMAIN)
    report = parse_dsn(dsn("postfix_5.1.1_user_unknown.eml", verp))
    assert report.tokens == find_tokens([verp])
    assert report.verdict is Verdict.HARD
    primary = report.primary
    assert primary is not None
    assert (primary.action, primary.status) == ("failed", "5.1.1")
    assert primary.final_recipient == "ion.popescu@example.ro"
    assert primary.remote_mta == "dns; mx1.example.ro"
    assert primary.diagnostic_code is not None
    assert "User unknown in virtual mailbox table" in primary.diagnostic_code  # folded lines joined
    assert report.reporting_mta == "dns; mail.clickphone.example"


def test_postfix_4_4_1_delayed_is_not_a_bounce() -> None:
    verp = verp_address(7, "k", KEY, DOMAIN)
    report = parse_dsn(dsn("postfix_4.4.1_delayed.eml", verp))
    assert report.verdict is Verdict.DELAYED
    assert report.primary is not None
    assert report.primary.status == "4.4.1"


def test_token_from_the_envelope_recipient_comes_first() -> None:
    header_verp = verp_address(7, "k", KEY, DOMAIN)
    envelope = verp_address(8, "k", KEY, DOMAIN)
    report = parse_dsn(dsn("postfix_5.1.1_user_unknown.eml", header_verp), envelope_recipient=envelope)
    assert [t.row_id for t in report.tokens] == [8, 7]


def test_a_non_dsn_is_refused_with_a_reason() -> None:
    verp = verp_address(7, "k", KEY, DOMAIN)
    with pytest.raises(NotADsn, match="not a multipart/report"):
        parse_dsn(dsn("not_a_dsn_out_of_office.eml", verp))
    with pytest.raises(NotADsn, match="empty"):
        parse_dsn(b"")
    feedback = b"Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n--b--\n"
    with pytest.raises(NotADsn, match="feedback-report"):
        parse_dsn(feedback)


def test_recipient_verdicts() -> None:
    assert RecipientStatus("failed", "5.2.2").verdict is Verdict.HARD
    assert RecipientStatus("failed", "4.4.7").verdict is Verdict.SOFT  # the relay gave up after retrying
    assert RecipientStatus("delayed", "4.4.1").verdict is Verdict.DELAYED
    assert RecipientStatus("delivered", "2.0.0").verdict is Verdict.OTHER
    report = DeliveryReport((), (RecipientStatus("delayed", "4.4.1"), RecipientStatus("failed", "5.1.1")))
    assert report.verdict is Verdict.HARD  # the most severe block decides


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_parse_dsn_never_raises_anything_but_not_a_dsn(raw: bytes) -> None:
    with contextlib.suppress(NotADsn):
        parse_dsn(raw)


@given(st.text(max_size=400))
@settings(max_examples=200, deadline=None)
def test_parse_dsn_survives_junk_inside_a_report_envelope(text: str) -> None:
    raw = (
        "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\n"
        f"Content-Type: message/delivery-status\n\n{text}\n--b--\n"
    ).encode("utf-8", "surrogateescape")
    try:
        report = parse_dsn(raw)
    except NotADsn:
        return
    assert report.recipients  # whatever it returns is usable


def test_report_json_round_trip_and_validation() -> None:
    verp = verp_address(42, "k", KEY, DOMAIN)
    report = parse_dsn(dsn("postfix_5.1.1_user_unknown.eml", verp))
    assert DeliveryReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="malformed"):
        DeliveryReport.from_json({"tokens": [["x", "y"]], "recipients": []})
    with pytest.raises(ValueError, match="malformed"):
        DeliveryReport.from_json({"tokens": []})


@pytest.mark.parametrize(
    ("code", "message", "hard"),
    [
        (550, "5.1.1 <a@b.ro>: Recipient address rejected: User unknown", True),
        (550, "5.1.10 Recipient address has null MX", True),
        (550, "5.2.1 Mailbox disabled", True),
        (554, "5.7.1 Relay access denied", False),  # our configuration, not the address
        (550, "Requested action not taken: mailbox unavailable", False),  # no enhanced status
        (450, "4.1.1 try later", False),
        (None, "", False),
    ],
)
def test_is_bad_mailbox(code: int | None, message: str, hard: bool) -> None:
    assert is_bad_mailbox(code, message) is hard


# ---- recording ----------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> SqliteStore:
    s = await SqliteStore.open(tmp_path / "t.db", FakeClock(NOW))
    s.start()
    yield s  # type: ignore[misc]
    await s.close()


async def _sent_row(store: SqliteStore, key: str, to: str = "ion.popescu@example.ro") -> int:
    message = OutboxMessage.build(
        key=key, kind="voicemail", recipient=to, account="acct1001", mime=b"x", now=NOW, lifetime=timedelta(days=1)
    )

    def unit(tx: WriteTx) -> int:
        tx.enqueue(message)
        row_id = int(tx._conn.execute("SELECT id FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()[0])  # type: ignore[attr-defined]
        tx.mark_sent(row_id, "250 ok")
        return row_id

    return await store.write(unit)


def _report(row_id: int, key: str, name: str = "postfix_5.1.1_user_unknown.eml", k: bytes = KEY) -> DeliveryReport:
    return parse_dsn(dsn(name, verp_address(row_id, key, k, DOMAIN)))


async def test_hard_bounce_marks_the_row_and_suppresses_at_the_limit(store: SqliteStore) -> None:
    ids = [await _sent_row(store, f"vm:{i}") for i in range(3)]
    results = [await store.write(bounce_unit(_report(i, f"vm:{n}"), KEY, 3)) for n, i in enumerate(ids)]
    assert [r["outcome"] for r in results] == ["bounced"] * 3
    assert [r["suppressed"] for r in results] == [False, False, True]
    rows = {r.id: r for r in await store.outbox_rows()}
    assert all(rows[i].status is OutboxStatus.BOUNCED for i in ids)
    assert (rows[ids[0]].last_error or "").startswith("bounced: failed 5.1.1; smtp; 550 5.1.1")
    reason = await store.write(lambda tx: tx.suppression("ION.POPESCU@example.ro"))
    assert reason is not None
    assert "5.1.1" in reason


async def test_the_same_dsn_twice_counts_once(store: SqliteStore) -> None:
    row_id = await _sent_row(store, "vm:1")
    report = _report(row_id, "vm:1")
    first = await store.write(bounce_unit(report, KEY, 2))
    again = await store.write(bounce_unit(report, KEY, 2))
    assert (first["outcome"], again["outcome"]) == ("bounced", "duplicate")
    assert await store.write(lambda tx: tx.suppression("ion.popescu@example.ro")) is None  # 1 of 2, not 2


async def test_delayed_dsn_changes_nothing(store: SqliteStore) -> None:
    row_id = await _sent_row(store, "vm:1")
    result = await store.write(bounce_unit(_report(row_id, "vm:1", "postfix_4.4.1_delayed.eml"), KEY, 1))
    assert (result["outcome"], result["verdict"]) == ("noted", "delayed")
    assert (await store.outbox_rows())[0].status is OutboxStatus.SENT


async def test_forged_foreign_or_reused_tokens_are_ignored(store: SqliteStore) -> None:
    row_id = await _sent_row(store, "vm:1")
    forged = parse_dsn(dsn("forged_token.eml"))
    assert forged.tokens == (VerpToken(1, "aaaaaaaa"),)
    assert row_id == 1
    assert (await store.write(bounce_unit(forged, KEY, 1)))["outcome"] == "ignored"
    other_key = _report(row_id, "vm:1", k=b"a key from another installation!")
    assert (await store.write(bounce_unit(other_key, KEY, 1)))["outcome"] == "ignored"
    reused = _report(row_id, "a purged row that had this id")
    assert (await store.write(bounce_unit(reused, KEY, 1)))["outcome"] == "ignored"
    assert (await store.outbox_rows())[0].status is OutboxStatus.SENT
    assert await store.write(lambda tx: tx.suppression("ion.popescu@example.ro")) is None


async def test_without_any_key_nothing_can_verify(store: SqliteStore) -> None:
    row_id = await _sent_row(store, "vm:1")
    result = await store.write(bounce_unit(_report(row_id, "vm:1"), None, 1))
    assert result["outcome"] == "ignored"
    assert "no VERP key" in result["reason"]


async def test_bounce_command_with_the_database_key_and_with_a_key_file(store: SqliteStore, tmp_path: Path) -> None:
    db_key = await store.write(lambda tx: tx.verp_key(b"k" * 32))
    assert db_key == b"k" * 32
    assert await store.write(lambda tx: tx.verp_key(b"z" * 32)) == db_key  # created once, then kept
    row_id = await _sent_row(store, "vm:1")
    cfg = SmtpConfig(hard_bounce_limit=1)
    result = await bounce_command(store, cfg, {"report": _report(row_id, "vm:1", k=db_key).to_json()})
    assert (result["outcome"], result["suppressed"]) == ("bounced", True)

    key_file = tmp_path / "verp-key"
    key_file.write_bytes(b"a file key of at least sixteen bytes\n")
    second = await _sent_row(store, "vm:2", to="maria@example.net")
    cfg = SmtpConfig(hard_bounce_limit=1, verp_key_file=key_file)
    report = _report(second, "vm:2", k=b"a file key of at least sixteen bytes")
    key_file.chmod(0o644)  # other local users could forge DSNs with it: refused, as at start-up
    with pytest.raises(CommandError, match="readable by every local user"):
        await bounce_command(store, cfg, {"report": report.to_json()})
    key_file.chmod(0o600)
    assert (await bounce_command(store, cfg, {"report": report.to_json()}))["outcome"] == "bounced"
