"""Hostile caller-ID text, addresses and header values through real rendered messages: no header gets in."""

from __future__ import annotations

import email
import email.policy
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickphone_agi.notices.kinds import KINDS
from clickphone_agi.notices.render import (
    Attachment,
    InvalidHeader,
    NoticeError,
    Rendered,
    Renderer,
    build_message,
)

SENDER = "ClickPhone <no-reply@clickphone.example>"
RECIPIENT = "Ion Popescu <ion.popescu@example.ro>"
MESSAGE_ID = "<0123456789abcdef@clickphone.example>"
DATE = datetime(2026, 11, 28, 14, 21, tzinfo=UTC)
TOP_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "auto-submitted",
    "mime-version",
    "content-type",
    "x-clickphone-kind",
}
PART_HEADERS = {"content-type", "content-transfer-encoding", "content-disposition"}

HOSTILE_NAMES = [
    "Evil\r\nBcc: victim@example.com",
    "Evil\nBcc: victim@example.com",
    "Evil\rBcc: victim@example.com",
    "Ion\u2028Bcc: x@example.com",
    "Ion\u2029Bcc: x@example.com",
    "Ion\u0085Bcc: x@example.com",
    "=?UTF-8?Q?=0A?=Bcc: attacker@example.com",
    "=?UTF-8?B?CkJjYzogYXR0YWNrZXJAZXhhbXBsZS5jb20=?=",
    "==??UTF-8?Q?=0A?=Bcc: attacker@example.com",
    "attacker@evil, Boss",
    "Boss <boss@example.com>, attacker@evil.example",
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "\u202eaxelA\u202c Ion",
    "\x00\x1b[31mRED\x7f",
    "A" * 10_240,
    "Ion " + "\u200b" * 5000 + "Bcc: x@example.com",
]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def build(rendered: Rendered, kind: str, **overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "sender": SENDER,
        "recipient": RECIPIENT,
        "message_id": MESSAGE_ID,
        "date": DATE,
        "extra_headers": {"X-ClickPhone-Kind": kind},
    }
    arguments.update(overrides)
    return build_message(rendered, **arguments)


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def assert_clean_message(raw: bytes, expected_top: set[str] = TOP_HEADERS) -> EmailMessage:
    """Exactly the headers we set, each once; no CR/LF in any value; one recipient; nothing injected."""
    head = raw.partition(b"\r\n\r\n")[0]
    assert b"\n" not in head.replace(b"\r\n", b""), "bare LF in the header block"
    assert b"\r" not in head.replace(b"\r\n", b""), "bare CR in the header block"
    msg = parse(raw)
    assert not msg.defects
    names = [k.lower() for k in msg]
    assert sorted(names) == sorted(expected_top), names
    for name, value in msg.items():
        assert "\r" not in str(value), name
        assert "\n" not in str(value), name
        assert "=?" not in str(value), f"{name}: an encoded word survived decoding"
    to = msg["To"]
    assert len(to.addresses) == 1
    assert to.addresses[0].addr_spec == "ion.popescu@example.ro"
    assert msg["From"].addresses[0].addr_spec == "no-reply@clickphone.example"
    assert msg["Message-ID"] == MESSAGE_ID
    assert not has_control(str(msg["Subject"]))
    for part in msg.walk():
        if part is msg:
            continue
        assert {k.lower() for k in part} <= PART_HEADERS, list(part)
        assert not part.defects
    return msg


def html_of(msg: EmailMessage) -> str:
    body = msg.get_body(("html",))
    assert body is not None
    return str(body.get_content())


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def render(renderer: Renderer, kind: str, caller_name: str, caller_number: str = "0721000002") -> Rendered:
    data: Mapping[str, Any] = {**KINDS[kind].sample, "caller_name": caller_name, "caller_number": caller_number}
    return renderer.render(kind, "ro", data)


@pytest.mark.parametrize("kind", ["missed_call", "voicemail"])
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n[:30]))
def test_hostile_caller_names_inject_nothing(renderer: Renderer, kind: str, name: str) -> None:
    msg = assert_clean_message(build(render(renderer, kind, name), kind))
    subject = str(msg["Subject"])
    assert len(subject) <= 150
    html = html_of(msg)
    text = text_of(msg)
    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    assert "\u202e" not in html + text + subject
    for line in text.splitlines():
        assert not line.lower().startswith("bcc:")
    if "<script>" in name:
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<script>alert(1)</script>" in text, "text/plain shows the name as it is, unescaped"


@pytest.mark.parametrize("number", HOSTILE_NAMES[:10], ids=lambda n: repr(n[:30]))
def test_hostile_caller_numbers_inject_nothing(renderer: Renderer, number: str) -> None:
    assert_clean_message(build(render(renderer, "missed_call", "", number), "missed_call"))


def test_ten_kilobyte_name_is_bounded(renderer: Renderer) -> None:
    msg = assert_clean_message(build(render(renderer, "voicemail", "B" * 10_240), "voicemail"))
    assert len(str(msg["Subject"])) == 150
    assert "B" * 1000 in text_of(msg)
    assert "B" * 1001 not in text_of(msg)


@pytest.mark.parametrize(
    "recipient",
    [
        "ion.popescu@example.ro\r\nBcc: victim@example.com",
        "ion.popescu@example.ro\nBcc: victim@example.com",
        "ion.popescu@example.ro, attacker@evil.example",
        "Ion <ion.popescu@example.ro>, attacker@evil.example",
        "=?UTF-8?Q?=0A?=Bcc: attacker@example.com <ion.popescu@example.ro>",
        "Ion\u2028Bcc: x@example.com <ion.popescu@example.ro>",
        "Ion\u202e <ion.popescu@example.ro>",
        "attacker@evil, Boss",
        "not an address",
        "",
        "ion.popescu@exâmple.ro",
    ],
)
def test_hostile_recipients_are_refused(renderer: Renderer, recipient: str) -> None:
    rendered = render(renderer, "missed_call", "Maria Ionescu")
    with pytest.raises(InvalidHeader):
        build(rendered, "missed_call", recipient=recipient)
    with pytest.raises(InvalidHeader):
        build(rendered, "missed_call", sender=recipient)


def test_display_name_with_a_quoted_comma_is_one_recipient(renderer: Renderer) -> None:
    quoted = '"Popescu, Ion" <ion.popescu@example.ro>'
    raw = build(render(renderer, "missed_call", "Maria"), "missed_call", recipient=quoted)
    msg = assert_clean_message(raw)
    assert msg["To"].addresses[0].display_name == "Popescu, Ion"


@pytest.mark.parametrize(
    "headers",
    [
        {"Bcc": "victim@example.com"},
        {"Cc": "victim@example.com"},
        {"To": "victim@example.com"},
        {"Reply-To": "attacker@example.com"},
        {"Content-Type": "text/html"},
        {"X-ClickPhone-Kind\r\nBcc": "victim@example.com"},
        {"List-Unsubscribe": "<https://a.example/u>", "list-unsubscribe": "<https://b.example/u>"},
        {"List-Unsubscribe": "\r\n"},
        {"List-Unsubscribe": "<https://cont.clickphone.example/u>\r\nBcc: victim@example.com"},
        {"List-Unsubscribe": "<https://cont.clickphone.example/u>\u2028Bcc: victim@example.com"},
        {"List-Unsubscribe": "=?UTF-8?Q?=0A?=Bcc: attacker@example.com"},
        {"List-Unsubscribe": "<https://cont.clickphone.example/u?a=?UTF-8?Q?=0A?=>"},
        {"List-Unsubscribe": "https://cont.clickphone.example/u"},
        {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click\r\nBcc: victim@example.com"},
    ],
)
def test_extra_headers_outside_the_allow_list_or_their_shape_raise(renderer: Renderer, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidHeader):
        build(render(renderer, "missed_call", "Maria"), "missed_call", extra_headers=headers)


@pytest.mark.parametrize(
    "value",
    [
        "<https://cont.clickphone.example/u>\r\nBcc: victim@example.com",
        "<https://cont.clickphone.example/u>\u2028Bcc: victim@example.com",
        "=?UTF-8?Q?=0A?=Bcc: attacker@example.com",
    ],
)
def test_allowed_extra_header_values_lose_line_breaks_and_encoded_words(renderer: Renderer, value: str) -> None:
    raw = build(render(renderer, "missed_call", "Maria"), "missed_call", extra_headers={"X-ClickPhone-Kind": value})
    msg = assert_clean_message(raw)
    assert "Bcc:" in str(msg["X-ClickPhone-Kind"]), "the text stays, as text inside the one header"


def test_a_long_unsubscribe_url_goes_out_verbatim_on_one_line(renderer: Renderer) -> None:
    """email.policy.SMTP folded a List-Unsubscribe over 78 characters into =?utf-8?q?=3Chttps...?= words,
    which no receiver parses as a URI: RFC 8058 one-click broke for every offer."""
    url = "https://cont.clickphone.example/v1/unsubscribe/" + "bWFya2V0aW5nOmFjY3QxMDAx." + "A" * 43
    message_id = "<" + "0" * 32 + "@notifications.mail.clickphone-with-a-long-domain.example>"
    raw = build(
        render(renderer, "missed_call", "Maria"),
        "missed_call",
        message_id=message_id,
        extra_headers={"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    )
    lines = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert f"List-Unsubscribe: <{url}>".encode() in lines
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines
    assert f"Message-ID: {message_id}".encode() in lines
    assert not [line for line in lines if line.startswith((b" ", b"\t")) and b"=?" in line]


@pytest.mark.parametrize("length", [980, 5000])
def test_an_unsubscribe_url_too_long_for_a_header_line_is_refused_not_cut(renderer: Renderer, length: int) -> None:
    url = "https://cont.clickphone.example/v1/unsubscribe/" + "A" * length
    with pytest.raises(InvalidHeader, match="longer than one header line"):
        build(render(renderer, "missed_call", "Maria"), "missed_call", extra_headers={"List-Unsubscribe": f"<{url}>"})


def test_an_extra_header_too_long_is_refused_not_cut(renderer: Renderer) -> None:
    with pytest.raises(InvalidHeader, match="longer than 900"):
        build(render(renderer, "missed_call", "Maria"), "missed_call", extra_headers={"X-ClickPhone-Kind": "k" * 901})


@pytest.mark.parametrize(
    "message_id", ["<a@b>\r\nBcc: x@example.com", "no-angle@example.com", "<=?UTF-8?Q?=0A?=@x>", "<a b@c>", ""]
)
def test_malformed_message_ids_raise(renderer: Renderer, message_id: str) -> None:
    with pytest.raises(InvalidHeader):
        build(render(renderer, "missed_call", "Maria"), "missed_call", message_id=message_id)


def test_naive_date_raises(renderer: Renderer) -> None:
    with pytest.raises(InvalidHeader):
        build(render(renderer, "missed_call", "Maria"), "missed_call", date=datetime(2026, 11, 28, 14, 21))


def test_a_hand_made_subject_is_cleaned_too() -> None:
    rendered = Rendered(subject="Hi\r\nBcc: victim@example.com =?UTF-8?Q?=0A?=", text="t\n", html="<p>t</p>\n")
    msg = assert_clean_message(build(rendered, "mail_test"))
    assert str(msg["Subject"]) == "Hi Bcc: victim@example.com UTF-8?Q?=0A?="


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("evil\r\nBcc: x@example.com.pdf", "evil Bcc_ x_example.com.pdf"),
        ("=?UTF-8?Q?=0A?=Bcc: x.pdf", "__UTF-8_Q__0A__Bcc_ x.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\ion\\fax.pdf", "fax.pdf"),
        (".hidden", "hidden"),
        ("Factură ianuarie.pdf", "Factură ianuarie.pdf"),
        ("", "attachment"),
    ],
)
def test_attachment_names_are_sanitised(renderer: Renderer, filename: str, expected: str) -> None:
    attachment = Attachment(filename, "application/pdf", b"%PDF-1.4\n")
    raw = build(render(renderer, "voicemail", "Maria"), "voicemail", attachments=[attachment])
    msg = assert_clean_message(raw)
    assert msg.get_content_type() == "multipart/mixed"
    (part,) = list(msg.iter_attachments())
    assert part.get_filename() == expected
    assert part.get_content() == b"%PDF-1.4\n"
    alternative = next(msg.iter_parts())
    assert isinstance(alternative, EmailMessage)
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]


@pytest.mark.parametrize("content_type", ["text/plain\r\nBcc: x@example.com", "pdf", "multipart/mixed", "a/b c"])
def test_attachment_content_types_are_checked(renderer: Renderer, content_type: str) -> None:
    with pytest.raises(InvalidHeader):
        build(
            render(renderer, "voicemail", "Maria"),
            "voicemail",
            attachments=[Attachment("msg0000.wav", content_type, b"RIFF")],
        )


def test_message_shape_without_attachments(renderer: Renderer) -> None:
    msg = assert_clean_message(build(render(renderer, "missed_call", "Maria"), "missed_call"))
    assert msg.get_content_type() == "multipart/alternative"
    parts: Sequence[Any] = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["MIME-Version"] == "1.0"


@settings(max_examples=150, deadline=None)
@given(name=st.text(max_size=400), number=st.text(max_size=80), kind=st.sampled_from(["missed_call", "voicemail"]))
def test_arbitrary_caller_text_never_adds_a_header(renderer: Renderer, name: str, number: str, kind: str) -> None:
    try:
        raw = build(render(renderer, kind, name, number), kind)
    except NoticeError:
        return  # a typed validation error is an acceptable answer; anything else fails the test
    msg = assert_clean_message(raw)
    assert "<script" not in html_of(msg).lower()
