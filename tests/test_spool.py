"""Voicemail spool: the msgNNNN.txt parser (domain) and the read-only, symlink-proof spool reader.

The fixture spool (``fixtures/spool/voicemail``) is the real message recorded by Asterisk 22 in
the ``voicemail`` scenario: ``default/100/INBOX/msg0000.{wav,WAV,txt}`` (.wav PCM 16 bit 8 kHz,
.WAV GSM 6.10 in WAV = wav49). Tests that change the spool work on a copy in ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from clickphone_agi.adapters.spool import SpoolError, SpoolPathError, VoicemailMessage, VoicemailSpool
from clickphone_agi.domain.voicemail import VoicemailParseError, parse_message_txt

FIXTURE_ROOT = Path(__file__).parent / "fixtures" / "spool" / "voicemail"
INBOX = FIXTURE_ROOT / "default" / "100" / "INBOX"
REAL_TXT = (INBOX / "msg0000.txt").read_text()
_CONTROL = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # what clean_text turns into spaces


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A writable copy of the fixture spool."""
    dest = tmp_path / "voicemail"
    shutil.copytree(FIXTURE_ROOT, dest)
    return dest


def _txt(**overrides: str) -> str:
    """The real .txt with some values replaced (``None``-free: pass ``""`` to blank one)."""
    lines = []
    for line in REAL_TXT.splitlines():
        key, sep, _ = line.partition("=")
        lines.append(f"{key}={overrides[key]}" if sep and key in overrides else line)
    return "\n".join(lines) + "\n"


# -- parse_message_txt ---------------------------------------------------------------------------


def test_real_message_txt_parses_to_its_metadata() -> None:
    meta = parse_message_txt(REAL_TXT)
    assert meta.msg_id == "1795882923-00000000"
    assert (meta.callerid_name, meta.callerid_num) == ("Vasile Ionescu", "0744123456")
    assert meta.duration == 13
    # origtime=1795882923, and the file's own origdate says "Sat Nov 28 04:22:03 PM UTC 2026"
    assert meta.origtime == datetime(2026, 11, 28, 16, 22, 3, tzinfo=UTC)
    assert meta.origtime.tzinfo is UTC
    assert (meta.origmailbox, meta.context, meta.flag, meta.category) == ("100", "lab-inbound", "", "")


def test_crlf_comments_bom_unknown_keys_and_arrow_syntax_are_tolerated() -> None:
    text = "\ufeff; a comment\r\n[message]\r\n; another\r\nfuture_key=whatever\r\n" + _txt(
        flag="Urgent", category="sales"
    ).replace("\n", "\r\n").replace("duration=13", "duration => 13").replace("[message]\r\n", "", 1)
    meta = parse_message_txt(text)
    assert (meta.duration, meta.flag, meta.category) == (13, "Urgent", "sales")
    assert meta.callerid_num == "0744123456"


def test_inline_semicolon_is_data_not_a_comment() -> None:
    meta = parse_message_txt(_txt(callerid='"Smith; Partners" <0744123456>'))
    assert (meta.callerid_name, meta.callerid_num) == ("Smith; Partners", "0744123456")


def test_lf_in_caller_name_is_joined_back_and_cannot_forge_later_keys() -> None:
    """app_voicemail writes the name raw: a LF splits the line. Forged origtime/msg_id/duration
    lines come before the real ones and lose; the split name keeps its number."""
    split = parse_message_txt(_txt(callerid='"Bob\nSmith" <0744123456>'))
    assert (split.callerid_name, split.callerid_num) == ("Bob Smith", "0744123456")

    forged = _txt(callerid='"X\nduration=0\nmsg_id=forged-1\norigtime=1\ncontext=evil\n[message]\nflag=Urgent" <1>')
    meta = parse_message_txt(forged)
    assert (meta.msg_id, meta.duration, meta.flag) == ("1795882923-00000000", 13, "")
    assert meta.origtime == datetime(2026, 11, 28, 16, 22, 3, tzinfo=UTC)
    assert meta.context == "lab-inbound"  # written before callerid: the first occurrence wins


def test_forged_section_header_cannot_hide_the_real_duration() -> None:
    meta = parse_message_txt(_txt(callerid='"X\n[other]\nY" <0744123456>'))
    assert meta.duration == 13


def test_bare_cr_and_encoded_words_in_caller_id_are_cleaned() -> None:
    """CVE-2024-6923: ``=?UTF-8?Q?=0A?=`` in a display name injected headers on Python 3.11.7."""
    meta = parse_message_txt(
        _txt(callerid='"Evil=?UTF-8?Q?=0A?=Bcc: x@example.com\r\x1b[31m\u202eName" <0744\x07123456>')
    )
    for text in (meta.callerid_name, meta.callerid_num):
        assert "=?" not in text
        assert not any(unicodedata.category(c) in _CONTROL for c in text)
    assert meta.callerid_name.startswith("Evil")
    assert "\r" not in meta.callerid_name


def test_unknown_or_empty_caller_id_gives_empty_fields() -> None:
    for value in ("Unknown", ""):
        meta = parse_message_txt(_txt(callerid=value))
        assert (meta.callerid_name, meta.callerid_num) == ("", "")
    number_only = parse_message_txt(_txt(callerid="<0744123456>"))
    assert (number_only.callerid_name, number_only.callerid_num) == ("", "0744123456")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "section"),
        ("origtime=1\nduration=1\nmsg_id=1-0\n", "section"),
        ("\x89PNG\r\n\x1a\n\x00\x00garbage", "NUL"),
        ("[message]\n" + "x=y\n" * 600, "lines"),
        ("[message]\nmsg_id=1-0\norigtime=1\nduration=" + "9" * 70_000, "characters"),
        (_txt().replace("duration=13\n", ""), "duration: missing"),
        (_txt(origtime="yesterday"), "origtime"),
        (_txt(origtime="99999999999999"), "origtime"),
        (_txt(duration="-5"), "duration"),
        (_txt(msg_id=""), "msg_id"),
        (_txt(msg_id="1795882923-0000:00"), "msg_id"),
        (_txt(msg_id="../../etc"), "msg_id"),
    ],
)
def test_garbage_or_incomplete_txt_raises_a_typed_error(text: str, reason: str) -> None:
    with pytest.raises(VoicemailParseError, match=reason):
        parse_message_txt(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.text(max_size=60))
def test_any_text_parses_or_raises_the_typed_error_and_output_is_clean(noise: str, name: str) -> None:
    for text in (noise, _txt(callerid=f'"{name}" <0744123456>') + noise):
        try:
            meta = parse_message_txt(text)
        except VoicemailParseError:
            continue
        for field in (meta.callerid_name, meta.callerid_num, meta.context, meta.flag, meta.category):
            assert "=?" not in field
            assert not any(unicodedata.category(c) in _CONTROL for c in field)
            assert len(field) <= 80


# -- VoicemailSpool: listing and reading ---------------------------------------------------------


def test_list_messages_finds_the_real_message_with_the_configured_format() -> None:
    for fmt, ext in (("wav", "wav"), ("WAV", "WAV"), ("wav49", "WAV")):
        [msg] = VoicemailSpool(FIXTURE_ROOT, audio_format=fmt).list_messages("default", "100")
        assert (msg.context, msg.mailbox, msg.folder, msg.number, msg.name) == ("default", "100", "INBOX", 0, "msg0000")
        assert msg.meta.msg_id == "1795882923-00000000"
        assert msg.audio == (INBOX / f"msg0000.{ext}").resolve()
        assert msg.txt == (INBOX / "msg0000.txt").resolve()
    [without] = VoicemailSpool(FIXTURE_ROOT, audio_format="gsm").list_messages("default", "100")
    assert without.audio is None


def test_read_audio_returns_the_real_bytes() -> None:
    for fmt in ("wav", "WAV"):
        spool = VoicemailSpool(FIXTURE_ROOT, audio_format=fmt)
        [msg] = spool.list_messages("default", "100")
        data = spool.read_audio(msg)
        path = INBOX / f"msg0000.{fmt}"
        assert data is not None
        assert len(data) == path.stat().st_size
        assert data == path.read_bytes()
        assert data[:4] == b"RIFF"


def test_read_audio_over_the_cap_is_none_and_reported() -> None:
    size = (INBOX / "msg0000.wav").stat().st_size  # 217004 bytes: 13.56 s of 16-bit 8 kHz PCM
    at_cap = VoicemailSpool(FIXTURE_ROOT, max_attachment_bytes=size)
    [msg] = at_cap.list_messages("default", "100")
    assert at_cap.read_audio(msg) is not None
    over = VoicemailSpool(FIXTURE_ROOT, max_attachment_bytes=size - 1)
    with capture_logs() as logs:
        assert over.read_audio(msg) is None
    assert [entry["event"] for entry in logs] == ["voicemail_audio_too_large"]


def test_read_audio_rebuilds_the_path_and_ignores_msg_audio(root: Path) -> None:
    spool = VoicemailSpool(root)
    [msg] = spool.list_messages("default", "100")
    lying = VoicemailMessage(
        context=msg.context,
        mailbox=msg.mailbox,
        folder=msg.folder,
        number=msg.number,
        meta=msg.meta,
        audio=Path("/etc/passwd"),
        txt=msg.txt,
    )
    assert spool.read_audio(lying) == (INBOX / "msg0000.wav").read_bytes()
    (root / "default" / "100" / "INBOX" / "msg0000.wav").unlink()
    assert spool.read_audio(msg) is None  # vanished since listing


def test_audio_without_txt_is_not_a_message_yet(root: Path) -> None:
    inbox = root / "default" / "100" / "INBOX"
    shutil.copy(inbox / "msg0000.wav", inbox / "msg0001.wav")  # Asterisk writes the .txt last
    (inbox / "msg0002.txt").write_text(_txt().replace("duration=13\n", ""))  # .txt still being written
    spool = VoicemailSpool(root)
    with capture_logs() as logs:
        assert [m.number for m in spool.list_messages("default", "100")] == [0]
    assert [(e["event"], "msg0002.txt" in e["path"]) for e in logs] == [("voicemail_message_skipped", True)]
    assert spool.count("default", "100") == 2  # what app_voicemail counts: .txt files


def test_urgent_folder_is_listed_after_inbox(root: Path) -> None:
    urgent = root / "default" / "100" / "Urgent"
    urgent.mkdir()
    shutil.copy(INBOX / "msg0000.wav", urgent / "msg0000.wav")
    (urgent / "msg0000.txt").write_text(_txt(flag="Urgent", msg_id="1795882999-00000001"))
    (root / "default" / "100" / "Old").mkdir()  # other folders are not mailed
    shutil.copy(INBOX / "msg0000.txt", root / "default" / "100" / "Old" / "msg0000.txt")
    spool = VoicemailSpool(root)
    messages = spool.list_messages("default", "100")
    assert [(m.folder, m.number, m.meta.flag) for m in messages] == [("INBOX", 0, ""), ("Urgent", 0, "Urgent")]
    assert messages[1].audio == (urgent / "msg0000.wav").resolve()
    assert spool.read_audio(messages[1]) == (INBOX / "msg0000.wav").read_bytes()
    assert spool.count("default", "100") == 1  # INBOX only


def test_boxes_count_and_missing_boxes(root: Path) -> None:
    (root / "default" / "101" / "INBOX").mkdir(parents=True)
    (root / "other-ctx" / "200").mkdir(parents=True)
    (root / "default" / "greet.wav").write_bytes(b"")  # a file is not a box
    (root / "default" / "bad.name").mkdir()
    spool = VoicemailSpool(root)
    assert spool.boxes() == [("default", "100"), ("default", "101"), ("other-ctx", "200")]
    assert spool.count("default", "100") == 1
    assert spool.count("default", "101") == 0
    assert spool.count("nowhere", "1") == 0
    assert spool.list_messages("default", "101") == []
    assert spool.list_messages("nowhere", "1") == []
    assert VoicemailSpool(root / "absent").boxes() == []


def test_message_at_accepts_vm_messagefile_under_the_root_only(root: Path) -> None:
    spool = VoicemailSpool(root)
    msg = spool.message_at(f"{root}/default/100/INBOX/msg0000")
    assert msg is not None
    assert msg.meta.msg_id == "1795882923-00000000"
    assert spool.message_at(root / "default" / "100" / "INBOX" / "msg0007") is None
    for hint in (
        "/etc/passwd",
        f"{root}/../voicemail/default/100/INBOX/msg0000",
        f"{root}/default/100/INBOX/../INBOX/msg0000",
        f"{root}/default/100/Old/msg0000",
        f"{root}/default/100/INBOX/msg0000.wav",
        "default/100/INBOX/msg0000",
    ):
        with pytest.raises(SpoolPathError):
            spool.message_at(hint)


def test_the_spool_is_never_modified(root: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int, str]]:
        return {
            str(p.relative_to(root)): (
                p.stat().st_mode,
                p.stat().st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    spool = VoicemailSpool(root)
    for box in spool.boxes():
        for msg in spool.list_messages(*box):
            spool.read_audio(msg)
        spool.count(*box)
    assert snapshot() == before


# -- VoicemailSpool: hostile paths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "mailbox"),
    [("default", ".."), ("default", "../100"), ("..", "100"), ("default", ""), ("default", "100/INBOX"), ("a b", "1")],
)
def test_invalid_context_or_mailbox_is_refused(context: str, mailbox: str) -> None:
    spool = VoicemailSpool(FIXTURE_ROOT)
    with pytest.raises(SpoolPathError):
        spool.list_messages(context, mailbox)
    with pytest.raises(SpoolPathError):
        spool.count(context, mailbox)


def test_read_audio_refuses_forged_message_fields(root: Path) -> None:
    spool = VoicemailSpool(root)
    [msg] = spool.list_messages("default", "100")
    for forged in (
        {"mailbox": "../../../etc"},
        {"context": ".."},
        {"folder": "../INBOX"},
        {"number": -1},
        {"number": 10_000},
    ):
        fields = {**msg.__dict__, **forged}
        with pytest.raises(SpoolPathError):
            spool.read_audio(VoicemailMessage(**fields))


def test_message_file_symlinked_to_etc_passwd_is_refused_and_reported(root: Path) -> None:
    inbox = root / "default" / "100" / "INBOX"
    (inbox / "msg0001.txt").symlink_to("/etc/passwd")
    (inbox / "msg0002.txt").symlink_to(inbox / "msg0000.txt")  # even pointing inside the spool
    spool = VoicemailSpool(root)
    with capture_logs() as logs:
        assert [m.number for m in spool.list_messages("default", "100")] == [0]
    skipped = [e for e in logs if e["event"] == "voicemail_message_skipped"]
    assert len(skipped) == 2
    assert all("symlink" in e["reason"] or "leaves the spool root" in e["reason"] for e in skipped)


def test_audio_symlinked_to_etc_passwd_is_never_read(root: Path) -> None:
    inbox = root / "default" / "100" / "INBOX"
    (inbox / "msg0000.wav").unlink()
    (inbox / "msg0000.wav").symlink_to("/etc/passwd")
    spool = VoicemailSpool(root)
    with capture_logs() as logs:
        [msg] = spool.list_messages("default", "100")
    assert msg.audio is None
    assert [e["event"] for e in logs] == ["voicemail_file_refused"]
    with pytest.raises(SpoolPathError, match="symlink"):
        spool.read_audio(msg)


def test_inbox_symlinked_outside_or_inside_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(INBOX, outside)  # a perfectly valid message, but not in the spool
    box = root / "default" / "100"
    shutil.rmtree(box / "INBOX")
    (box / "INBOX").symlink_to(outside)
    (root / "default" / "101").mkdir()
    (root / "default" / "101" / "INBOX").symlink_to(root / "default" / "100" / "Urgent")
    (box / "Urgent").mkdir()
    shutil.copy(outside / "msg0000.txt", box / "Urgent" / "msg0000.txt")
    spool = VoicemailSpool(root)
    with capture_logs() as logs:
        assert [m.folder for m in spool.list_messages("default", "100")] == ["Urgent"]
        assert spool.list_messages("default", "101") == []
        assert spool.count("default", "100") == 0
    refused = [e for e in logs if e["event"] == "voicemail_dir_refused"]
    assert len(refused) == 3
    assert "leaves the spool root" in refused[0]["reason"]
    assert "symlink" in refused[1]["reason"]
    fake = VoicemailMessage("default", "100", "INBOX", 0, parse_message_txt(REAL_TXT), None, box / "INBOX" / "x")
    with pytest.raises(SpoolPathError):
        spool.read_audio(fake)


def test_symlinked_context_or_mailbox_dirs_are_not_boxes(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere" / "300").mkdir(parents=True)
    (root / "linked-ctx").symlink_to(tmp_path / "elsewhere")
    (root / "default" / "102").symlink_to(root / "default" / "100")
    spool = VoicemailSpool(root)
    with capture_logs() as logs:
        assert spool.boxes() == [("default", "100")]
    assert sorted(e["path"].rsplit("/", 1)[1] for e in logs if e["event"] == "voicemail_dir_refused") == [
        "102",
        "linked-ctx",
    ]
    with capture_logs():
        assert spool.list_messages("linked-ctx", "300") == []
        assert spool.list_messages("default", "102") == []


def test_a_fifo_as_audio_is_refused_without_blocking(root: Path) -> None:
    inbox = root / "default" / "100" / "INBOX"
    (inbox / "msg0000.wav").unlink()
    os.mkfifo(inbox / "msg0000.wav")
    spool = VoicemailSpool(root)
    with capture_logs() as logs:
        [msg] = spool.list_messages("default", "100")
    assert msg.audio is None
    assert "not a regular file" in logs[0]["reason"]
    with capture_logs(), pytest.raises(SpoolPathError, match="not a regular file"):
        spool.read_audio(msg)


def test_bad_audio_format_is_a_config_error() -> None:
    for fmt in ("", "../wav", "wav/..", "w a v"):
        with pytest.raises(ValueError, match="audio_format"):
            VoicemailSpool(FIXTURE_ROOT, audio_format=fmt)


def _renumber_after_deleting_msg0000(inbox: Path) -> None:
    """What app_voicemail's close_mailbox does once msg0000 was deleted: every later message moves
    down one number, its audio files first (``ast_filerename``), its ``.txt`` last (``rename_file``)."""
    for name in sorted(inbox.glob("msg0001.*"), key=lambda p: p.suffix == ".txt"):
        name.rename(inbox / name.name.replace("msg0001", "msg0000"))


def test_a_message_renumbered_after_listing_is_never_read_with_another_ones_audio(root: Path) -> None:
    """Regression: the audio was read by number long after the ``.txt`` was listed (a whole box is
    listed first, then each message is rendered and committed in turn). When the subscriber deleted
    a message meanwhile, Asterisk moved the next one down to its number, and the notice for the
    deleted message went out with the next caller's recording; the next one, not found at its old
    number any more, went out saying its recording could not be attached."""
    inbox = root / "default" / "100" / "INBOX"
    for suffix in ("wav", "WAV"):
        (inbox / f"msg0001.{suffix}").write_bytes(b"RIFF the second caller's recording")
    (inbox / "msg0001.txt").write_text(_txt(msg_id="1795883000-00000001", callerid='"Second" <0744000002>'))
    spool = VoicemailSpool(root)
    first, second = spool.list_messages("default", "100")
    _renumber_after_deleting_msg0000(inbox)

    def audio(msg: VoicemailMessage) -> bytes | str | None:
        try:
            return spool.read_audio(msg)
        except SpoolError as e:
            return type(e).__name__

    assert audio(first) == "SpoolMessageMoved"  # gone: its number now holds the second message
    assert audio(second) == "SpoolMessageMoved"  # moved: found at its new number by the next scan
    [again] = spool.list_messages("default", "100")
    assert again.meta.msg_id == second.meta.msg_id
    assert spool.read_audio(again) == b"RIFF the second caller's recording"
