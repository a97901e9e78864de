"""Notification templates: every kind in every language renders, is well-formed, self-contained and honest."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from markupsafe import escape

from clickphone_agi.domain.money import format_ron
from clickphone_agi.notices.kinds import KINDS, LANGUAGES, KindSpec
from clickphone_agi.notices.render import (
    SUBJECT_MAX,
    InvalidData,
    MissingData,
    Renderer,
    TemplateFailure,
    UnknownKind,
    format_duration,
    format_localdate,
    format_localtime,
    format_plural,
    preview,
)

TEMPLATES = Path(str(files("clickphone_agi.templates")))
ALL = [(kind, lang) for kind in KINDS for lang in LANGUAGES]
SECURITY_NOTICES = ("password_changed", "pin_created", "allowed_ip_changed", "ip_denied")
CEDILLA = "\u015f\u0163\u015e\u0162"  # ş ţ Ş Ţ: wrong for Romanian
COMMA_BELOW = "\u0219\u021b\u0218\u021a"  # ș ț Ș Ț
# Romanian words written without their diacritics (how text typed on a US keyboard gives itself away)
ASCII_ROMANIAN = re.compile(
    r"\b(si|ati|in|sunteti|puteti|doriti|dumneavoastra|fara|catre|numarul|Buna|va rugam|contactati|Data si ora)\b"
)
# not shown on purpose: codes the template translates into words
HIDDEN_VALUES = {("insufficient_funds", "reason")}
MARKETING_WORDS = re.compile(r"ofert|offer|promo|reducere|discount|abonare la", re.IGNORECASE)
VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


class TagStack(HTMLParser):
    """Every non-void element is closed, in order; records every tag with its attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.declarations: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.declarations.append(decl)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID_ELEMENTS:
            self.errors.append(f"self-closed non-void <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_ELEMENTS:
            self.errors.append(f"end tag for void element </{tag}>")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def parse_html(html: str) -> TagStack:
    parser = TagStack()
    parser.feed(html)
    parser.close()
    return parser


def shown_values(spec: KindSpec, lang: str, data: Mapping[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """(key, text) for every data value as a subscriber sees it: dates formatted, lists itemised."""
    for key, value in (data or spec.sample).items():
        if isinstance(value, bool) or (spec.name, key) in HIDDEN_VALUES:
            continue
        if isinstance(value, datetime) or key in ("at", "expires_at"):
            yield key, format_localtime(value, lang)
        elif isinstance(value, date) or key in ("day", "effective", "valid_until"):
            yield key, format_localdate(value, lang)
        elif key == "duration":
            yield key, format_duration(value)
        elif isinstance(value, tuple | list):
            yield from ((key, str(item)) for item in value)
        elif key in spec.multiline:
            yield key, str(value)
            yield from ((key, line) for line in str(value).splitlines())
        else:
            yield key, str(value)


# -- every kind, every language --------------------------------------------------------------------


def test_every_kind_has_its_three_templates_in_both_languages() -> None:
    for kind, lang in ALL:
        for part in ("subject", "txt", "html"):
            assert (TEMPLATES / lang / f"{kind}.{part}.j2").is_file(), f"{lang}/{kind}.{part}.j2"
    assert (TEMPLATES / "base.html.j2").is_file()
    shipped = {p.name.split(".")[0] for p in TEMPLATES.glob("*/*.j2") if not p.name.startswith("_")}
    assert shipped == set(KINDS), "a template for a kind the catalogue does not know"


@pytest.mark.parametrize(("kind", "lang"), ALL)
def test_each_kind_renders_from_its_sample(renderer: Renderer, kind: str, lang: str) -> None:
    rendered = renderer.render(kind, lang, KINDS[kind].sample)
    assert rendered.subject
    assert rendered.subject == rendered.subject.strip()
    assert "\n" not in rendered.subject
    assert len(rendered.subject) <= SUBJECT_MAX
    assert rendered.text.endswith("\n")
    assert "ClickPhone" in rendered.text
    assert "<p>" not in rendered.text, "text part is not HTML"


@pytest.mark.parametrize(("kind", "lang"), ALL)
def test_html_part_is_well_formed_and_accessible(renderer: Renderer, kind: str, lang: str) -> None:
    html = renderer.render(kind, lang, KINDS[kind].sample).html
    parser = parse_html(html)
    assert parser.errors == []
    assert parser.stack == [], f"unclosed: {parser.stack}"
    assert [d.lower() for d in parser.declarations] == ["doctype html"]
    assert parser.tags[0] == ("html", {"lang": lang})
    tags = [t for t, _ in parser.tags]
    assert tags.count("title") == 1
    assert tags.count("h1") == 1
    assert ("meta", {"charset": "utf-8"}) in parser.tags
    for tag, attrs in parser.tags:
        if tag == "th":
            assert attrs.get("scope") == "row", "table headers say what they head"


@pytest.mark.parametrize(("kind", "lang"), ALL)
def test_html_part_loads_nothing_from_outside(renderer: Renderer, kind: str, lang: str) -> None:
    spec = KINDS[kind]
    html = renderer.render(kind, lang, spec.sample).html
    lowered = html.lower()
    for needle in ("<img", "<link", "<script", "<style", "<iframe", "<object", "<embed", "<form", "url(", "@import"):
        assert needle not in lowered, needle
    assert "src=" not in lowered
    links = {str(v) for k, v in spec.sample.items() if k.endswith("url")}
    for tag, attrs in parse_html(html).tags:
        assert set(attrs) <= {"href", "style", "lang", "role", "aria-label", "scope", "charset", "name", "content"}
        if "href" in attrs:
            assert tag == "a"
            assert attrs["href"] in links, "only the data's own links, as anchors"


@pytest.mark.parametrize(("kind", "lang"), ALL)
def test_text_part_says_what_the_html_part_says(renderer: Renderer, kind: str, lang: str) -> None:
    spec = KINDS[kind]
    rendered = renderer.render(kind, lang, spec.sample)
    for key, value in shown_values(spec, lang):
        in_text = value in rendered.text
        in_html = str(escape(value)) in rendered.html
        assert in_text == in_html, f"{key}={value!r}: text {in_text}, html {in_html}"
        assert in_text, f"{key}={value!r} is not shown"


def test_text_is_not_escaped_and_html_is(renderer: Renderer) -> None:
    data = {**KINDS["missed_call"].sample, "caller_name": 'Ion & "Maria" <b>', "name": "A&B <i>"}
    rendered = renderer.render("missed_call", "ro", data)
    assert 'Ion & "Maria" <b>' in rendered.text
    assert "A&B <i>" in rendered.text
    assert 'Ion & "Maria" <b>' in rendered.subject
    assert "Ion &amp; &#34;Maria&#34; &lt;b&gt;" in rendered.html
    assert "A&amp;B &lt;i&gt;" in rendered.html
    assert "<b>" not in rendered.html
    assert "<i>" not in rendered.html


def test_preview_is_a_parseable_message_for_every_kind() -> None:
    renderer = Renderer()
    for kind, lang in ALL:
        msg = email.message_from_bytes(preview(kind, lang, renderer=renderer), policy=email.policy.default)
        assert msg["X-ClickPhone-Kind"] == kind
        assert str(msg["From"]) == "ClickPhone <no-reply@clickphone.example>"
        assert msg["Auto-Submitted"] == "auto-generated"
        body = msg.get_body(("plain",))
        assert body is not None
        assert str(body.get_content()).replace("\r\n", "\n") == renderer.render(kind, lang, KINDS[kind].sample).text
        assert msg.get_body(("html",)) is not None
        if kind in ("voicemail", "fax_received"):
            assert len(list(msg.iter_attachments())) == 1
    offer = email.message_from_bytes(preview("offer", "ro"), policy=email.policy.default)
    assert offer["List-Unsubscribe"].strip() == f"<{KINDS['offer'].sample['unsubscribe_url']}>"
    assert offer["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


# -- Romanian --------------------------------------------------------------------------------------


def romanian_template_sources() -> Iterator[tuple[str, str]]:
    for path in sorted((TEMPLATES / "ro").glob("*.j2")):
        yield path.name, path.read_text(encoding="utf-8")
    yield "base.html.j2", (TEMPLATES / "base.html.j2").read_text(encoding="utf-8")


def test_romanian_templates_use_comma_below_never_cedilla() -> None:
    sources = dict(romanian_template_sources())
    for name, text in sources.items():
        assert not set(text) & set(CEDILLA), f"{name}: cedilla ş/ţ instead of comma-below ș/ț"
    everything = "".join(sources.values())
    assert "ș" in everything
    assert "ț" in everything
    for spec in KINDS.values():  # invented Romanian sample text too
        assert not set(repr(dict(spec.sample))) & set(CEDILLA), spec.name


@pytest.mark.parametrize("kind", list(KINDS))
def test_romanian_text_has_its_diacritics(renderer: Renderer, kind: str) -> None:
    rendered = renderer.render(kind, "ro", KINDS[kind].sample)
    for part in (rendered.subject, rendered.text, rendered.html):
        assert not set(part) & set(CEDILLA)
    for part in (rendered.text, rendered.html):
        assert set(part) & set(COMMA_BELOW + "ăâîĂÂÎ")
        assert not ASCII_ROMANIAN.search(part), ASCII_ROMANIAN.search(part)
    assert "Bună ziua" in rendered.text


def test_money_values_appear_as_formatted_in_romanian(renderer: Renderer) -> None:
    data = {"name": "Ion Popescu", "balance": format_ron(1250, "ro"), "threshold": format_ron(500, "ro")}
    rendered = renderer.render("low_balance", "ro", data)
    assert data["balance"] == "12,50 lei"
    assert "12,50 lei" in rendered.subject
    assert "12,50 lei" in rendered.text
    assert "12,50 lei" in rendered.html
    assert "5,00 lei" in rendered.text
    english = renderer.render("low_balance", "en", {**data, "balance": format_ron(1250, "en")})
    assert "12.50 RON" in english.text


# -- service, security, marketing ------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k, s in KINDS.items() if s.category != "marketing"])
def test_service_mail_carries_no_marketing(renderer: Renderer, kind: str) -> None:
    for lang in LANGUAGES:
        for part in ("subject", "txt", "html"):
            source = (TEMPLATES / lang / f"{kind}.{part}.j2").read_text(encoding="utf-8")
            assert "unsubscribe_url" not in source
        offer = KINDS["offer"].sample
        rendered = renderer.render(kind, lang, {**offer, **KINDS[kind].sample})
        for part_text in (rendered.subject, rendered.text, rendered.html):
            for key in ("title", "body", "url", "unsubscribe_url"):
                assert str(offer[key]).splitlines()[0] not in part_text, f"offer {key} leaked into {kind}"
            assert not MARKETING_WORDS.search(part_text), MARKETING_WORDS.search(part_text)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_offer_carries_an_unsubscribe_line(renderer: Renderer, lang: str) -> None:
    spec = KINDS["offer"]
    assert spec.category == "marketing"
    url = spec.sample["unsubscribe_url"]
    rendered = renderer.render("offer", lang, spec.sample)
    unsubscribe = "dezabona" if lang == "ro" else "unsubscribe"
    assert any(unsubscribe in line.lower() and url in line for line in rendered.text.splitlines())
    anchors = [attrs for tag, attrs in parse_html(rendered.html).tags if tag == "a"]
    assert {"href": url} in [{"href": a["href"]} for a in anchors]
    assert ("Ofertă" if lang == "ro" else "offer") in rendered.subject, "a commercial message says so"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_tariff_change_states_the_effective_date_and_no_offer(renderer: Renderer, lang: str) -> None:
    spec = KINDS["tariff_change"]
    rendered = renderer.render("tariff_change", lang, spec.sample)
    day = format_localdate(spec.sample["effective"], lang)
    assert day == ("01.01.2027" if lang == "ro" else "1 Jan 2027")
    for part in (rendered.subject, rendered.text, rendered.html):
        assert day in part
        assert not MARKETING_WORDS.search(part)


@pytest.mark.parametrize(("kind", "lang"), [(k, lang) for k in SECURITY_NOTICES for lang in LANGUAGES])
def test_security_notices_say_what_to_do_if_it_was_not_you(renderer: Renderer, kind: str, lang: str) -> None:
    rendered = renderer.render(kind, lang, KINDS[kind].sample)
    phrase = "Dacă nu ați fost dumneavoastră" if lang == "ro" else "If this was not you"
    for part in (rendered.text, rendered.html):
        assert phrase in part
        after = part[part.index(phrase) :]
        assert re.search(r"parol|password", after), "and what to do about it"
    assert KINDS[kind].category == "security"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_policy_changed_has_version_date_summary_and_link(renderer: Renderer, lang: str) -> None:
    spec = KINDS["policy_changed"]
    rendered = renderer.render("policy_changed", lang, spec.sample)
    for part in (rendered.text, rendered.html):
        assert "3.2" in part
        assert format_localdate(date(2026, 12, 15), lang) in part
        assert "Am redus la 6 luni" in part
        assert spec.sample["url"] in part
    assert "3.2" in rendered.subject


def test_catalogue() -> None:
    assert set(KINDS) == {
        "missed_call",
        "voicemail",
        "fax_received",
        "fax_sent",
        "fax_failed",
        "daily_limit",
        "low_balance",
        "insufficient_funds",
        "ip_denied",
        "password_changed",
        "password_recovery",
        "pin_created",
        "allowed_ip_changed",
        "balance_info",
        "topup",
        "payment_confirmed",
        "tariff_change",
        "offer",
        "policy_changed",
        "mail_test",
    }
    assert {k for k, s in KINDS.items() if s.opt_out} == {"missed_call", "fax_sent", "offer"}
    assert {k for k, s in KINDS.items() if s.category == "marketing"} == {"offer"}
    assert KINDS["password_recovery"].lifetime == timedelta(hours=1)
    assert KINDS["insufficient_funds"].lifetime == timedelta(days=1)
    assert KINDS["missed_call"].lifetime == timedelta(days=2)
    assert KINDS["voicemail"].lifetime == timedelta(days=5)
    assert KINDS["fax_received"].lifetime == timedelta(days=5)
    for name, spec in KINDS.items():
        assert spec.name == name
        assert spec.required <= set(spec.sample)
        assert spec.multiline <= spec.required
        for key, value in spec.sample.items():
            if key.endswith("url"):
                assert str(value).startswith("https://"), key
                assert ".example/" in str(value), "invented links only"


# -- the money notices' payload contract (as the money service and charging build them) ---------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_money_service_payloads_keep_working(renderer: Renderer, lang: str) -> None:
    payloads: dict[str, dict[str, Any]] = {
        "daily_limit": {
            "percent": 100,
            "day": "2026-11-28",
            "limit": format_ron(5000, lang),
            "spent": format_ron(5012, lang),
            "name": "Ion Popescu",
            "language": lang,
        },
        "low_balance": {
            "balance": format_ron(420, lang),
            "threshold": format_ron(500, lang),
            "name": "Ion Popescu",
            "language": lang,
        },
        "insufficient_funds": {
            "name": "Ion Popescu",
            "reason": "daily_limit",
            "balance": format_ron(35, lang),
            "number": "0040740000005",
            "language": lang,
        },
        "ip_denied": {
            "name": "Ion Popescu",
            "source_ip": "203.0.113.45",
            "number": "0040740000005",
            "at": datetime(2026, 7, 1, 9, 0, 5, tzinfo=UTC).isoformat(timespec="seconds"),
            "language": lang,
        },
    }
    for kind, payload in payloads.items():
        rendered = renderer.render(kind, lang, payload)
        for key, value in shown_values(KINDS[kind], lang, payload):
            if key != "language":
                assert value in rendered.text, (kind, key)
    limit = renderer.render("daily_limit", lang, payloads["daily_limit"]).text
    assert ("oprite până mâine" if lang == "ro" else "stopped until tomorrow") in limit
    assert "La 100%" not in limit
    assert "At 100%" not in limit
    denied = renderer.render("ip_denied", lang, payloads["ip_denied"]).text
    assert ("01.07.2026, 12:00" if lang == "ro" else "1 Jul 2026, 12:00") in denied, "summer time is UTC+3"
    refused = renderer.render("insufficient_funds", lang, payloads["insufficient_funds"]).subject
    assert ("limita zilnică" if lang == "ro" else "daily limit") in refused


# -- renderer behaviour ----------------------------------------------------------------------------


def test_missing_data_key_raises_a_typed_error_naming_it(renderer: Renderer) -> None:
    data = dict(KINDS["missed_call"].sample)
    del data["caller_number"]
    with pytest.raises(MissingData) as caught:
        renderer.render("missed_call", "ro", data)
    assert caught.value.key == "caller_number"
    assert caught.value.kind == "missed_call"
    assert "caller_number" in str(caught.value)
    assert isinstance(caught.value, KeyError)


def test_strict_undefined_in_an_override_raises_the_typed_error(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "missed_call.txt.j2").write_text("{{ caller_number }} {{ caller_city }}\n", encoding="utf-8")
    with pytest.raises(MissingData) as caught:
        Renderer(tmp_path).render("missed_call", "ro", KINDS["missed_call"].sample)
    assert caught.value.key == "caller_city"


def test_unknown_kind_raises_a_keyerror_like_typed_error(renderer: Renderer) -> None:
    with pytest.raises(UnknownKind) as caught:
        renderer.render("lottery_win", "ro", {})
    assert isinstance(caught.value, KeyError)
    assert "lottery_win" in str(caught.value)
    with pytest.raises(UnknownKind):
        preview("lottery_win", "ro", renderer=renderer)


def test_unknown_language_falls_back_to_romanian(renderer: Renderer) -> None:
    sample = KINDS["low_balance"].sample
    assert renderer.render("low_balance", "hu", sample) == renderer.render("low_balance", "ro", sample)


def test_override_directory_wins_file_by_file(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "missed_call.subject.j2").write_text("Sună-l pe {{ caller_number }}\n", encoding="utf-8")
    (tmp_path / "base.html.j2").write_text(
        '<!DOCTYPE html>\n<html lang="{{ lang }}"><head><title>{{ subject }}</title></head>'
        "<body><p>Operator</p>{% block content %}{% endblock %}</body></html>\n",
        encoding="utf-8",
    )
    sample = KINDS["missed_call"].sample
    overridden = Renderer(tmp_path).render("missed_call", "ro", sample)
    packaged = Renderer().render("missed_call", "ro", sample)
    assert overridden.subject == "Sună-l pe 0721000002"
    assert overridden.text == packaged.text, "files not overridden come from the package"
    assert "<p>Operator</p>" in overridden.html
    assert "Apel nepreluat" in overridden.html
    english = Renderer(tmp_path).render("missed_call", "en", sample)
    assert english.subject == Renderer().render("missed_call", "en", sample).subject


def test_override_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        Renderer(tmp_path / "missing")


def test_no_filter_marks_data_safe(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "missed_call.html.j2").write_text("<p>{{ caller_name|safe }}</p>\n", encoding="utf-8")
    with pytest.raises(TemplateFailure):
        Renderer(tmp_path).render("missed_call", "ro", KINDS["missed_call"].sample)


@pytest.mark.parametrize("body", ["{{ name.__class__.__mro__ }}", "{{ 1 / 0 }}", "{% if %}"])
def test_broken_or_unsafe_override_templates_fail_typed(tmp_path: Path, body: str) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "missed_call.txt.j2").write_text(body + "\n", encoding="utf-8")
    with pytest.raises(TemplateFailure):
        Renderer(tmp_path).render("missed_call", "ro", KINDS["missed_call"].sample)


def test_data_values_that_could_carry_markup_are_refused(renderer: Renderer) -> None:
    class Sneaky:
        def __html__(self) -> str:
            return "<script>alert(1)</script>"

    with pytest.raises(InvalidData):
        renderer.render("missed_call", "ro", {**KINDS["missed_call"].sample, "caller_name": Sneaky()})
    with pytest.raises(InvalidData):
        renderer.render("missed_call", "ro", {**KINDS["missed_call"].sample, "lang": "en"})


def test_links_must_be_http_urls(renderer: Renderer) -> None:
    data = {**KINDS["password_recovery"].sample, "reset_url": "javascript:alert(1)"}
    with pytest.raises(InvalidData):
        renderer.render("password_recovery", "ro", data)


def test_subject_is_one_capped_line_without_control_characters(renderer: Renderer) -> None:
    data = {**KINDS["missed_call"].sample, "caller_name": "Ion\u202e\x07 Popescu " + "x" * 400}
    subject = renderer.render("missed_call", "ro", data).subject
    assert len(subject) == SUBJECT_MAX
    assert subject.endswith("…")
    assert subject.startswith("Apel nepreluat de la Ion Popescu xxx")


def test_time_formatting() -> None:
    autumn = datetime(2026, 11, 28, 14, 21, tzinfo=UTC)
    assert format_localtime(autumn, "ro") == "28.11.2026, 16:21"
    assert format_localtime(autumn, "en") == "28 Nov 2026, 16:21"
    assert format_localtime(autumn.isoformat(), "ro") == "28.11.2026, 16:21"
    assert format_localtime(datetime(2026, 7, 1, 21, 30, tzinfo=UTC), "ro") == "02.07.2026, 00:30"
    assert format_localtime(autumn, "ro", "UTC") == "28.11.2026, 14:21"
    assert format_localdate("2026-11-28", "en") == "28 Nov 2026"
    assert format_localdate(datetime(2026, 11, 28, 22, 30, tzinfo=UTC), "ro") == "29.11.2026"
    with pytest.raises(InvalidData):
        format_localtime(datetime(2026, 11, 28, 14, 21), "ro")  # naive: which 14:21?
    with pytest.raises(InvalidData):
        format_localtime("yesterday", "ro")


def test_renderer_time_zone_is_a_parameter() -> None:
    rendered = Renderer(timezone="UTC").render("mail_test", "ro", KINDS["mail_test"].sample)
    assert "28.11.2026, 14:21" in rendered.text
    with pytest.raises(ValueError, match="time zone"):
        Renderer(timezone="Europe/Atlantis")


def test_duration_and_plural() -> None:
    assert format_duration(65) == "1 min 5 s"
    assert format_duration(5) == "5 s"
    assert format_duration(0) == "0 s"
    assert format_duration(120) == "2 min"
    assert format_duration(3725) == "1 h 2 min 5 s"
    with pytest.raises(InvalidData):
        format_duration(-1)
    assert format_plural(1, "pagină", "pagini", "ro") == "1 pagină"
    assert format_plural(3, "pagină", "pagini", "ro") == "3 pagini"
    assert format_plural(20, "pagină", "pagini", "ro") == "20 de pagini"
    assert format_plural(101, "pagină", "pagini", "ro") == "101 pagini"
    assert format_plural(20, "page", "pages", "en") == "20 pages"
