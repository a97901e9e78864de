"""Synthetic Asterisk traffic built from the real transcripts, for the crash and soak tests.

A synthetic call is one recording from ``sim/scenarios`` replayed under a new identity: every
Uniqueid/Linkedid renumbered (the fax file names holding them too), every timestamp moved to the
call's start, the account code and the voicemail box replaced, the billing CDR given its own
duration, and ``LinkedID``/``Sequence`` appended to each ``Cdr`` as the ``cdr_manager.conf``
``[mappings]`` of the README make Asterisk do. Seven recordings thus give any number of distinct
calls whose frames are still Asterisk's own bytes.

A call also carries what Asterisk writes besides AMI, which is what the daemon recovers from
after a gap: its Master.csv records (``newcdrcolumns=yes``, so the linked id survives), the
voicemail spool files, and the received fax TIFF with the ``.result`` sidecar of
``dialplan/clickphone-fax.conf`` (a failed reception leaves only the sidecar: no page, no TIFF).
:class:`AsteriskFiles` writes those where the daemon looks; everything else here is pure.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import wave
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from clickphone_agi.adapters.ami.protocol import AmiMessage, parse_frame
from clickphone_agi.sim.ami_server import load_transcript, packaged_scenarios
from clickphone_agi.sim.master_csv import csv_record

__all__ = [
    "CALL_SCENARIOS",
    "AsteriskFiles",
    "CallFactory",
    "CallTemplate",
    "FaxFiles",
    "SynthCall",
    "VoicemailFiles",
    "load_templates",
    "silent_wav",
]

#: The recordings a synthetic call can be made of (``full_noise`` is ``answered_call`` with every
#: event class: VarSet, Newexten, RTCP… — the soak's noise).
CALL_SCENARIOS = (
    "answered_call", "long_call", "busy_call", "missed_call", "voicemail", "fax", "fax_failed", "full_noise",
)  # fmt: skip

RECORDED_ACCOUNT = b"acct1001"
RECORDED_BOX = b"100@default"
SPOOL_SAMPLES = Path(__file__).parent / "spool"
RECORDED_VOICEMAIL_TXT = SPOOL_SAMPLES / "voicemail" / "default" / "100" / "INBOX" / "msg0000.txt"
RECORDED_FAX_TIFF = SPOOL_SAMPLES / "fax" / "rx-1795882939.18.tif"

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_END = b"\r\n\r\n"
_VOICEMAIL_DELAY = 17  # seconds from the call's start to the message's origtime, as recorded


# what a call rewrites, found once per template: an id, a time, the account, the mailbox
_TOKEN = re.compile(
    rb"(?P<id>(?<![0-9.])[0-9]{9,10}\.[0-9]{1,9}(?![0-9]))"
    rb"|(?P<time>[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2})"
    rb"|(?P<account>" + re.escape(RECORDED_ACCOUNT) + rb")"
    rb"|(?P<box>" + re.escape(RECORDED_BOX) + rb")"
)
_Piece = bytes | tuple[str, bytes]  # literal bytes, or (token kind, recorded value)


@dataclass(frozen=True)
class CallTemplate:
    """One recording, ready to be renumbered: its event frames and what identifies the call.

    Each frame is kept cut into literal bytes and the tokens a call replaces, so that making a
    call is a join (thousands of calls a second), not a regular-expression pass per frame.
    """

    name: str
    frames: tuple[bytes, ...]
    start: datetime  # earliest time in the frames (naive: Asterisk's local zone)
    linked_ids: Mapping[bytes, bytes]  # Uniqueid → Linkedid, from the channel events
    pieces: tuple[tuple[_Piece, ...], ...]  # per frame
    ids: tuple[bytes, ...]  # every recorded id, in Asterisk's order
    times: tuple[bytes, ...]  # every distinct recorded time

    @classmethod
    def from_transcript(cls, path: Path) -> CallTemplate:
        transcript = load_transcript(path)
        frames = tuple(f.raw for f in transcript.replay_frames)
        linked: dict[bytes, bytes] = {}
        for frame in transcript.replay_frames:
            unique, link = frame.message.get("Uniqueid"), frame.message.get("Linkedid")
            if unique and link:
                linked.setdefault(unique.encode(), link.encode())
        pieces = tuple(_cut(f) for f in frames)
        tokens = [p for frame in pieces for p in frame if isinstance(p, tuple)]
        ids = tuple(sorted({v for k, v in tokens if k == "id"}, key=_id_order))
        times = tuple(sorted({v for k, v in tokens if k == "time"}))
        if not times:
            raise ValueError(f"{path.name}: no timestamps to move")
        start = datetime.strptime(times[0].decode(), _TIME_FORMAT)
        return cls(transcript.name, frames, start, linked, pieces, ids, times)


def _cut(frame: bytes) -> tuple[_Piece, ...]:
    out: list[_Piece] = []
    pos = 0
    for match in _TOKEN.finditer(frame):
        out.append(frame[pos : match.start()])
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group()))
        pos = match.end()
    out.append(frame[pos:])
    return tuple(out)


def load_templates() -> dict[str, CallTemplate]:
    """Every recording in :data:`CALL_SCENARIOS`, from the packaged scenarios."""
    paths = packaged_scenarios()
    return {name: CallTemplate.from_transcript(paths[name]) for name in CALL_SCENARIOS}


@dataclass(frozen=True)
class VoicemailFiles:
    context: str
    mailbox: str
    number: int  # msgNNNN
    msg_id: str
    txt: bytes
    audio: bytes


@dataclass(frozen=True)
class FaxFiles:
    name: str  # rx-<uniqueid>.tif, as the dialplan names it
    unique_id: str  # the receiving channel's: the fax notice's key
    status: str  # SUCCESS | FAILED
    tiff: bytes | None  # None: the reception failed before a page, only the sidecar exists
    sidecar: bytes


@dataclass(frozen=True)
class SynthCall:
    index: int
    scenario: str
    account: str
    start: datetime  # naive, Asterisk's local zone
    frames: tuple[bytes, ...]
    cdrs: tuple[AmiMessage, ...]
    linked_id: str  # the call's root channel (the caller's): the missed-call key's part
    voicemail: VoicemailFiles | None = None
    fax: FaxFiles | None = None

    @property
    def events(self) -> int:
        return len(self.frames)

    def segments(self) -> Iterator[tuple[bytes, bytes]]:
        """``(Master.csv records, AMI bytes)`` in stream order: each run of frames that ends with a
        ``Cdr`` comes with that CDR's record, to be appended just before the frames are sent, as
        Asterisk hands a CDR to cdr_csv and cdr_manager at the same moment."""
        pending: list[bytes] = []
        cdrs = iter(self.cdrs)
        for frame in self.frames:
            pending.append(frame)
            if frame.startswith(b"Event: Cdr\r\n"):
                yield csv_record(next(cdrs), new_columns=True), b"".join(pending)
                pending = []
        if pending:
            yield b"", b"".join(pending)


def silent_wav(seconds: float = 0.2, rate: int = 8000) -> bytes:
    """A small valid WAV (8 kHz, 16-bit mono silence): voicemail audio without megabytes of mail."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return out.getvalue()


class CallFactory:
    """Makes :class:`SynthCall` s; identities (Uniqueids, CDR sequence, msgNNNN) never repeat."""

    def __init__(
        self,
        templates: Mapping[str, CallTemplate],
        *,
        zone: ZoneInfo,
        audio: bytes | None = None,
        tiff: bytes | None = None,
    ) -> None:
        self._templates = templates
        self._zone = zone
        self._audio = audio if audio is not None else silent_wav()
        self._tiff = tiff if tiff is not None else RECORDED_FAX_TIFF.read_bytes()
        self._txt = RECORDED_VOICEMAIL_TXT.read_bytes()
        self._ids = itertools.count(1)
        self._cdr_sequence = itertools.count(1)
        self._messages: dict[tuple[str, str], int] = {}

    def call(
        self,
        index: int,
        scenario: str,
        account: str,
        start: datetime,
        *,
        billsec: int | None = None,
        mailbox: str = "100",
    ) -> SynthCall:
        """The ``scenario`` recording as call ``index`` of ``account`` starting at ``start`` (naive,
        local); ``billsec`` sets the billing CDR's billable seconds (answered calls only)."""
        template = self._templates[scenario]
        epoch = int(start.replace(tzinfo=self._zone).timestamp())
        ids = {old: f"{epoch}.{next(self._ids)}".encode() for old in template.ids}
        shift = start - template.start
        new: dict[_Piece, bytes] = {("id", old): value for old, value in ids.items()}
        for old in template.times:
            moved = datetime.strptime(old.decode(), _TIME_FORMAT) + shift
            new["time", old] = moved.strftime(_TIME_FORMAT).encode()
        new["account", RECORDED_ACCOUNT] = account.encode()
        new["box", RECORDED_BOX] = f"{mailbox}@default".encode()

        frames: list[bytes] = []
        cdrs: list[AmiMessage] = []
        for pieces in template.pieces:
            frame = b"".join(p if isinstance(p, bytes) else new[p] for p in pieces)
            if frame.startswith(b"Event: Cdr\r\n"):
                frame = self._cdr(frame, template, ids, billsec)
                message = parse_frame(frame[: -len(_END)], frame)
                assert message is not None
                cdrs.append(message)
            frames.append(frame)
        root = ids[min(template.linked_ids.values(), key=_id_order)].decode()
        call = SynthCall(index, scenario, account, start, tuple(frames), tuple(cdrs), root)
        if scenario == "voicemail":
            return replace(call, voicemail=self._voicemail(mailbox, epoch + _VOICEMAIL_DELAY))
        if scenario in ("fax", "fax_failed"):
            return replace(call, fax=self._fax(frames))
        return call

    # -- internals ---------------------------------------------------------------------------

    def _cdr(self, frame: bytes, template: CallTemplate, ids: Mapping[bytes, bytes], billsec: int | None) -> bytes:
        """Append LinkedID/Sequence (cdr_manager mappings); give a billing CDR its duration."""
        message = parse_frame(frame[: -len(_END)], frame)
        assert message is not None
        unique = (message.get("UniqueID") or "").encode()
        originals = {v: k for k, v in ids.items()}
        linked = ids.get(template.linked_ids.get(originals.get(unique, b""), b""), unique)
        answered_dial = message.get("LastApplication") == "Dial" and message.get("Disposition") == "ANSWERED"
        if billsec is not None and answered_dial:
            duration = int(message.get("Duration") or 0) - int(message.get("BillableSeconds") or 0) + billsec
            frame = re.sub(rb"\r\nDuration: [0-9]+\r\n", f"\r\nDuration: {duration}\r\n".encode(), frame)
            frame = re.sub(rb"\r\nBillableSeconds: [0-9]+\r\n", f"\r\nBillableSeconds: {billsec}\r\n".encode(), frame)
        extra = b"LinkedID: " + linked + b"\r\nSequence: " + str(next(self._cdr_sequence)).encode() + b"\r\n"
        return frame[: -len(b"\r\n")] + extra + b"\r\n"

    def _voicemail(self, mailbox: str, origtime: int) -> VoicemailFiles:
        number = self._messages.get(("default", mailbox), 0)
        self._messages[("default", mailbox)] = number + 1
        msg_id = f"{origtime}-{number:08x}"
        stamp = datetime.fromtimestamp(origtime, self._zone).strftime("%a %b %d %I:%M:%S %p %Z %Y")
        txt = self._txt
        for key, value in (
            ("origmailbox", mailbox),
            ("origtime", str(origtime)),
            ("origdate", stamp),
            ("msg_id", msg_id),
        ):
            txt = re.sub(rf"(?m)^{key}=.*$".encode(), f"{key}={value}".encode(), txt)
        return VoicemailFiles("default", mailbox, number, msg_id, txt, self._audio)

    def _fax(self, frames: list[bytes]) -> FaxFiles:
        """The receiving side's outcome (the lab's ``LabFaxResult``, Direction receive) as the
        dialplan's sidecar, next to the TIFF ReceiveFAX wrote (none when no page arrived)."""
        result = next(
            m
            for f in frames
            if f.startswith(b"Event: UserEvent\r\n")
            and (m := parse_frame(f[: -len(_END)], f)) is not None
            and m.get("Direction") == "receive"
        )
        unique = result.get("Uniqueid") or ""
        status = result.get("FAXSTATUS") or "FAILED"
        lines = {
            "direction": "receive",
            "status": status,
            "error": result.get("FAXERROR") or "",
            "statusstr": result.get("FAXOPT_statusstr") or "",
            "pages": result.get("FAXPAGES") or "",
            "rate": result.get("FAXBITRATE") or "",
            "resolution": result.get("FAXRESOLUTION") or "",
            "local": result.get("LOCALSTATIONID") or "",
            "remote": result.get("REMOTESTATIONID") or "",
            "account": result.get("AccountCode") or "",
            "uniqueid": unique,
            "linkedid": result.get("Linkedid") or "",
        }
        sidecar = "".join(f"{k}={v}\n" for k, v in lines.items()) + "end=1\n"
        pages = int(result.get("FAXPAGES") or 0)
        tiff = self._tiff if pages > 0 else None
        return FaxFiles(f"rx-{unique}.tif", unique, status, tiff, sidecar.encode())


def _id_order(value: bytes) -> tuple[int, int]:
    whole, _, part = value.partition(b".")
    return int(whole), int(part)


class AsteriskFiles:
    """Writes what Asterisk writes besides AMI, where the daemon reads it (blocking, small writes).

    Master.csv records are appended with one ``write`` on an ``O_APPEND`` descriptor, so a reader
    never sees half a record except as a record without its final LF (which it leaves for later).
    Spool files are written under a temporary name and renamed, audio before the ``.txt`` and the
    TIFF before its sidecar, as the daemon relies on Asterisk to do.
    """

    def __init__(self, master_csv: Path, voicemail_root: Path, fax_root: Path) -> None:
        self.master_csv = master_csv
        self.voicemail_root = voicemail_root
        self.fax_root = fax_root
        master_csv.parent.mkdir(parents=True, exist_ok=True)
        fax_root.mkdir(parents=True, exist_ok=True)
        voicemail_root.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(master_csv, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def close(self) -> None:
        os.close(self._fd)

    def append_csv(self, records: bytes) -> None:
        if records:
            os.write(self._fd, records)

    def spool(self, call: SynthCall) -> None:
        """The call's voicemail message or fax files (before its AMI events, as Asterisk does)."""
        if call.voicemail is not None:
            vm = call.voicemail
            folder = self.voicemail_root / vm.context / vm.mailbox / "INBOX"
            folder.mkdir(parents=True, exist_ok=True)
            _atomic(folder / f"msg{vm.number:04d}.wav", vm.audio)
            _atomic(folder / f"msg{vm.number:04d}.txt", vm.txt)
        if call.fax is not None:
            fax = call.fax
            if fax.tiff is not None:
                _atomic(self.fax_root / fax.name, fax.tiff)
            _atomic(self.fax_root / f"{fax.name}.result", fax.sidecar)


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
