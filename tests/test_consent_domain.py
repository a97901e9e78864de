"""Pure rules: unsubscribe tokens, the one-month rule, who an offer may reach; and the broadcast
kinds rendered in both languages with hostile data (headers intact, nothing injected)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, date, datetime

import pytest

from clickphone_agi.adapters.smtp import render_row, unsubscribe_headers
from clickphone_agi.config.schema import SmtpConfig
from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.consent import (
    Candidate,
    Skip,
    add_months,
    audience_matches,
    earliest_effective,
    marketing_skip,
)
from clickphone_agi.domain.outbox import OutboxRow, OutboxStatus
from clickphone_agi.domain.privacy import anonymised
from clickphone_agi.domain.unsubscribe import ForgedToken, MalformedToken, make_token, unsubscribe_url, verify_token
from clickphone_agi.notices.render import InvalidHeader, Renderer

KEY = b"k" * 32


def test_token_round_trip_binds_account_and_purpose() -> None:
    token = make_token(KEY, "acct1001")
    assert token == make_token(KEY, "acct1001")  # deterministic: every offer carries the same link
    found = verify_token(KEY, token)
    assert (found.account, found.purpose) == ("acct1001", "marketing")
    assert verify_token(KEY, make_token(KEY, "acct.1_0-2")).account == "acct.1_0-2"
    assert make_token(KEY, "acct1002") != token


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # a flipped signature character
        lambda t: make_token(KEY, "acct1002").split(".")[0] + "." + t.split(".")[1],  # another account's payload
        lambda t: make_token(b"x" * 32, "acct1001"),  # signed with another key
    ],
)
def test_tampered_tokens_are_forged(mangle: object) -> None:
    token = make_token(KEY, "acct1001")
    with pytest.raises(ForgedToken):
        verify_token(KEY, mangle(token))  # type: ignore[operator]


@pytest.mark.parametrize("bad", ["", "abc", "a.b", "x" * 300, "bWFya2V0aW5n.%%%", "bWFy\nrZXQ." + "A" * 43])
def test_malformed_tokens(bad: str) -> None:
    with pytest.raises(MalformedToken):
        verify_token(KEY, bad)


def test_unsubscribe_url_and_refusals() -> None:
    assert unsubscribe_url("https://x.example/api/", "t.k") == "https://x.example/api/v1/unsubscribe/t.k"
    with pytest.raises(ValueError, match="short"):
        make_token(b"short", "acct1001")
    with pytest.raises(ValueError, match="A-Z"):
        make_token(KEY, "acct 1001")


@pytest.mark.parametrize(
    ("today", "earliest"),
    [
        (date(2026, 1, 31), date(2026, 2, 28)),
        (date(2028, 1, 31), date(2028, 2, 29)),
        (date(2026, 12, 15), date(2027, 1, 15)),
        (date(2026, 3, 31), date(2026, 4, 30)),
    ],
)
def test_one_calendar_month_ahead(today: date, earliest: date) -> None:
    assert earliest_effective(today) == earliest
    assert add_months(today, 12).year == today.year + 1


def _candidate(consent: bool | None, suppressed: bool = False, bounced: bool = False) -> Candidate:
    account = Account(code="a1", name="Ion", email="ion@example.ro")
    return Candidate(account, consent, suppressed, bounced)


def test_a_broadcast_audience_leaves_out_erased_accounts() -> None:
    """An erased account has no address: counting it as a recipient inflated every broadcast's
    figures (the outbox then refused its row)."""
    account = Account(code="acct1001", name="Ion Popescu", email="ion.popescu@example.ro")
    assert audience_matches(account, None, None)
    assert audience_matches(account, frozenset({"acct1001"}), "prepaid")
    assert not audience_matches(anonymised(account), None, None)
    assert not audience_matches(anonymised(account), frozenset({"acct1001"}), None)


def test_marketing_needs_consent_and_suppression_wins() -> None:
    assert marketing_skip(_candidate(True)) is None
    assert marketing_skip(_candidate(None)) is Skip.NO_CONSENT
    assert marketing_skip(_candidate(False)) is Skip.WITHDRAWN
    assert marketing_skip(_candidate(True, suppressed=True)) is Skip.SUPPRESSED
    assert marketing_skip(_candidate(True, bounced=True)) is Skip.BOUNCED


HOSTILE = "Ofertă\r\nBcc: victim@evil.example =?UTF-8?Q?=0A?=Bcc: x@evil <script>alert(1)</script>"
PAYLOADS = {
    "tariff_change": {
        "tariff": HOSTILE,
        "effective": "2027-01-01",
        "changes": "Mobil: 0,06 lei/min.\n" + HOSTILE,
        "url": "https://www.clickphone.example/tarife",
    },
    "policy_changed": {
        "version": "3.2",
        "effective": "2027-01-01",
        "summary": HOSTILE,
        "url": "https://api.clickphone.example/v1/policies/3.2/text",
    },
    "offer": {
        "title": HOSTILE,
        "body": HOSTILE,
        "url": "https://www.clickphone.example/oferte",
        "valid_until": "2027-01-31",
        "unsubscribe_url": "https://api.clickphone.example/v1/unsubscribe/" + make_token(KEY, "acct1001"),
    },
}


@pytest.mark.parametrize("lang", ["ro", "en"])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_broadcast_kinds_render_with_intact_headers(kind: str, lang: str) -> None:
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    payload = {**PAYLOADS[kind], "name": "Ion\r\nPopescu", "language": lang}
    row = OutboxRow(1, f"bc:x:acct1001:{kind}", kind, "ion@example.ro", "acct1001", OutboxStatus.PENDING, 0, now,
                    now, now, None, None, None, payload)  # fmt: skip
    raw = render_row(row, SmtpConfig(), Renderer())
    head = raw.split(b"\r\n\r\n", 1)[0]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None
    assert b"\nBcc" not in head
    assert msg.get_all("To") == ["ion@example.ro"]
    assert msg["X-ClickPhone-Kind"] == kind
    html = msg.get_body(("html",)).get_content()
    assert "<script>" not in html
    text = msg.get_body(("plain",)).get_content()
    assert ("Sunteți" in text or "Buna" in text or "Bună" in text) if lang == "ro" else "Hello" in text
    if kind == "offer":
        assert msg.get_all("List-Unsubscribe") == [f"<{payload['unsubscribe_url']}>"]
        assert msg.get_all("List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
        assert payload["unsubscribe_url"] in text
    else:
        assert msg["List-Unsubscribe"] is None


def test_a_marketing_row_without_an_unsubscribe_link_is_refused() -> None:
    with pytest.raises(InvalidHeader):
        unsubscribe_headers("offer", {"unsubscribe_url": "http://plain.example/x"})
    with pytest.raises(InvalidHeader):
        unsubscribe_headers("offer", {})
    assert unsubscribe_headers("tariff_change", {}) == {}
