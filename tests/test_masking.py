"""Masking of phone numbers, email addresses and secrets (pure functions)."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickphone_agi.domain.masking import (
    is_secret_key,
    mask_email,
    mask_phone,
    mask_text,
    mask_value,
    redact_mapping,
)

# --- mask_phone ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("0721000001", "0721***001"),  # national mobile
        ("+40721000001", "+40721***001"),  # E.164
        ("0040212345678", "00402*****678"),  # international prefix, Bucharest fixed line
        ("0212345678", "0212***678"),  # national fixed line
        ("721000001", "721***001"),  # without trunk prefix: 9 digits keep 3 in front
        ("123456", "***456"),  # 6 digits: only the tail is kept
        ("1234567", "1***567"),
        ("004021234567890", "00402*******890"),  # never more than 5 leading digits
    ],
)
def test_mask_phone_keeps_prefix_and_last_three_digits(number: str, masked: str) -> None:
    assert mask_phone(number) == masked
    assert len(mask_phone(number)) == len(number)  # one * per hidden digit


@pytest.mark.parametrize("extension", ["1", "100", "1001", "12345", "112", "+12345"])
def test_mask_phone_leaves_extensions_and_short_codes_unchanged(extension: str) -> None:
    assert mask_phone(extension) == extension


@given(st.from_regex(r"\+?[0-9]{6,20}", fullmatch=True))
def test_mask_phone_hides_at_least_three_digits_and_shows_at_most_eight(number: str) -> None:
    masked = mask_phone(number)
    assert masked.count("*") >= 3
    assert sum(c.isdigit() for c in masked) <= 8
    assert masked.endswith(number[-3:])


def test_mask_phone_masks_numbers_inside_non_number_input_like_mask_text() -> None:
    assert mask_phone("tel:0721000001") == "tel:0721***001"
    assert mask_phone("") == ""


# --- mask_email ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("ion.popescu@example.ro", "io\u2026@example.ro"),
        ("maria@clickphone.ro", "ma\u2026@clickphone.ro"),
        ("abc@example.ro", "ab\u2026@example.ro"),
        ("ab@example.ro", "a\u2026@example.ro"),  # local part <= 2: keep 1
        ("a@example.ro", "a\u2026@example.ro"),
    ],
)
def test_mask_email_shortens_local_part_and_keeps_domain(email: str, masked: str) -> None:
    assert mask_email(email) == masked


@pytest.mark.parametrize("not_email", ["", "no-at-sign", "@example.ro"])
def test_mask_email_leaves_non_addresses_unchanged(not_email: str) -> None:
    assert mask_email(not_email) == not_email


# --- mask_text ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("call from 0721000001 to 1001", "call from 0721***001 to 1001"),
        ("caller=+40721000001 callee=0040212345678", "caller=+40721***001 callee=00402*****678"),
        ("mail to ion.popescu@example.ro failed", "mail to io\u2026@example.ro failed"),
        (
            "<ion.popescu@example.ro>, maria@clickphone.ro",
            "<io\u2026@example.ro>, ma\u2026@clickphone.ro",
        ),
        # a phone number as the local part of an address is covered by the email rule
        ("0721000001@sms.example.ro", "07\u2026@sms.example.ro"),
        # channel name: the number before '@' is masked, the sequence number after '-' is not
        (
            "Local/0040212345678@lab-outbound-00000000;1",
            "Local/00402*****678@lab-outbound-00000000;1",
        ),
        ("PJSIP/trunk-0000001a", "PJSIP/trunk-0000001a"),
        ("PJSIP/100-00000012", "PJSIP/100-00000012"),
        ("SIP/0721000001-0000002f", "SIP/0721***001-0000002f"),
        # sip URI with an IP host is not an email address; the user part is masked
        ("sip:0721000001@10.0.0.1:5060", "sip:0721***001@10.0.0.1:5060"),
        # end of sentence is not a decimal point
        ("number is 0721000001.", "number is 0721***001."),
        # national numbers start with 0, so this is not a uniqueid
        ("0721000001.5", "0721***001.5"),
    ],
)
def test_mask_text_masks_numbers_and_addresses_in_free_text(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "uniqueid=1795882891.0 linkedid=1795882891.12",
        "1715000000.123456",  # float epoch timestamp
        "pbx1-1795882891.42",  # uniqueid with a system name
        "2024-05-01T12:34:56.123456Z",  # ISO timestamps
        "2024-05-01T12:34:56+03:00",
        "extension 100 dialled 1001, mailbox 12345@default",
        "idempotency key 3f2a1234567890bc, sha 9e107d9d372bb6826bd81d3542a419d6",
        "call 0721 000 001 spaced",  # documented: numbers with spaces are not detected
        "amount 12.50 RON, 3 calls, 300 seconds",
        "",
    ],
)
def test_mask_text_leaves_non_personal_text_unchanged(text: str) -> None:
    assert mask_text(text) == text


def test_mask_text_is_linear_on_long_hostile_input() -> None:
    hostile = "a" * 50_000 + "@" + "b." * 20_000 + "1"
    start = time.perf_counter()
    assert mask_text(hostile) == hostile
    assert mask_text("x" * 100_000) == "x" * 100_000
    assert time.perf_counter() - start < 1.0


_PHONES = st.one_of(
    st.from_regex(r"0[237][0-9]{8}", fullmatch=True),  # national
    st.from_regex(r"\+40[237][0-9]{8}", fullmatch=True),  # E.164
    st.from_regex(r"00[1-9][0-9]{8,12}", fullmatch=True),  # international prefix
)
_FILLER = st.text(st.characters(codec="utf-8"), max_size=30)
_SEPARATORS = st.sampled_from([" ", ", ", "\n", "\t", "=", ":", "(", ")", "/", "<", ">", ";"])


@given(
    st.lists(st.tuples(_FILLER, _SEPARATORS, _PHONES, _SEPARATORS), min_size=1, max_size=5),
    _FILLER,
)
def test_mask_text_never_lets_a_full_phone_number_through(parts: list[tuple[str, str, str, str]], tail: str) -> None:
    text = "".join(f"{filler}{left}{phone}{right}" for filler, left, phone, right in parts) + tail
    masked = mask_text(text)
    for _, _, phone, _ in parts:
        assert phone not in masked
        assert phone.lstrip("+") not in masked
    # and no 9+ digit run of the input's phone numbers survives at all
    input_runs = {run for _, _, phone, _ in parts for run in re.findall(r"[0-9]{9,}", phone)}
    output_runs = set(re.findall(r"[0-9]{9,}", masked))
    assert not any(inp in out or out in inp for inp in input_runs for out in output_runs)


# --- mask_value ---------------------------------------------------------------


def test_mask_value_recurses_into_dicts_lists_and_tuples() -> None:
    value = {
        "caller": "0721000001",
        "recipients": ["ion.popescu@example.ro", ("+40721000001", 3)],
        "nested": {"deeper": {"callee": "0040212345678"}},
        "extension": "100",
        "seconds": 60,
        "rate": 0.05,
        "ok": True,
        "missing": None,
    }
    assert mask_value(value) == {
        "caller": "0721***001",
        "recipients": ["io\u2026@example.ro", ("+40721***001", 3)],
        "nested": {"deeper": {"callee": "00402*****678"}},
        "extension": "100",
        "seconds": 60,
        "rate": 0.05,
        "ok": True,
        "missing": None,
    }


def test_mask_value_leaves_other_types_and_the_input_unchanged() -> None:
    original = {"caller": "0721000001"}
    mask_value(original)
    assert original == {"caller": "0721000001"}
    assert mask_value(721000001) == 721000001
    assert mask_value(b"0721000001") == b"0721000001"


# --- redact_mapping -----------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "secret",
        "Secret",
        "ami_secret",
        "password",
        "DB_PASSWORD",
        "smtp_passwd",
        "token",
        "access_token",
        "Authorization",
        "pin",
        "PIN",
        "voicemail_pin",
        "vmPin",
        "pin_code",
        "pincode",
    ],
)
def test_secret_keys_are_recognised(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["caller", "ping_interval", "mapping", "shipping", "spinner", "opinion", "event"])
def test_ordinary_keys_are_not_secret(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_mapping_replaces_secrets_at_any_depth() -> None:
    data: dict[str, object] = {
        "username": "clickphone",
        "Secret": "labsecret",
        "smtp": {"host": "localhost", "password": {"nested": "x"}},
        "headers": [{"Authorization": "Bearer abc"}, ("tuple", {"api_token": "t"})],
        "voicemail_pin": 1234,
        "ping_interval": 20,
    }
    assert redact_mapping(data) == {
        "username": "clickphone",
        "Secret": "***",
        "smtp": {"host": "localhost", "password": "***"},
        "headers": [{"Authorization": "***"}, ("tuple", {"api_token": "***"})],
        "voicemail_pin": "***",
        "ping_interval": 20,
    }
    assert data["Secret"] == "labsecret"  # input not modified
