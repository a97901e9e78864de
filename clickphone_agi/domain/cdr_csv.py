"""One Asterisk ``cdr_csv`` Master.csv row → :class:`CallEnded`. Pure: stdlib only, no I/O.

Master.csv is the reconciliation source after an AMI gap: a row must give the SAME idempotency
key as its AMI ``Cdr`` twin, ``cdr_key(system_name, uniqueid, dstchannel)``, computed from the raw
field values exactly as the AMI translator computes it from the raw header values.

Layouts (``cdr/cdr_csv.c`` ``build_csv_record``; detected by column count):

* 18 columns, ``cdr.conf`` ``[csv]`` with ``loguniqueid=yes`` and ``loguserfield=yes`` (both
  REQUIRED: without the uniqueid no key can be built)::

      accountcode, src, dst, dcontext, clid, channel, dstchannel, lastapp, lastdata,
      start, answer, end, duration, billsec, disposition, amaflags, uniqueid, userfield

* 21 columns, additionally ``newcdrcolumns=yes``: the 18 above, then
  ``peeraccount, linkedid, sequence`` (``sequence`` is written as a bare integer).

cdr_csv quotes every string field (a ``"`` inside is doubled, nothing else is escaped, so a quoted
field can hold a raw CR or LF from a hostile caller name); ``duration``, ``billsec`` and
``sequence`` are bare integers; an unset time (``answer`` of an unanswered call) is a bare empty
field. Times are ``YYYY-MM-DD HH:MM:SS`` in Asterisk's local zone (``usegmtime=no``, the default)
or in UTC (``usegmtime=yes``, pass ``gmt=True``); either way they are returned as aware datetimes
in ``timezone``, like the AMI twin's. A local time in the repeated hour at the end of summer time
is ambiguous in the file; it is read with ``fold=0`` (the first occurrence). Never derive a
duration from the times: use ``duration``/``billsec``.

The small text helpers here (caller-ID parsing, control-character stripping, time parsing) are
private on purpose; they will be unified with the AMI translator's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from clickphone_agi.domain.events import CDR_YEARS, CallEnded, Disposition, EventSource
from clickphone_agi.domain.keys import cdr_key

__all__ = [
    "BASE_COLUMNS",
    "EXTENDED_COLUMNS",
    "CsvRowError",
    "call_ended_from_csv",
]

BASE_COLUMNS: tuple[str, ...] = (
    "accountcode",
    "src",
    "dst",
    "dcontext",
    "clid",
    "channel",
    "dstchannel",
    "lastapp",
    "lastdata",
    "start",
    "answer",
    "end",
    "duration",
    "billsec",
    "disposition",
    "amaflags",
    "uniqueid",
    "userfield",
)
"""Master.csv with ``loguniqueid=yes`` and ``loguserfield=yes``."""

EXTENDED_COLUMNS: tuple[str, ...] = (*BASE_COLUMNS, "peeraccount", "linkedid", "sequence")
"""The same plus ``newcdrcolumns=yes``."""

_IDX = {name: i for i, name in enumerate(EXTENDED_COLUMNS)}
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_MAX_NAME = 80  # Asterisk's whole clid is 80 bytes
_MAX_NUMBER = 40
_MAX_TEXT = 256
_NUMBER_ONLY = re.compile(r"[0-9+*#]+")


class CsvRowError(ValueError):
    """A Master.csv row that cannot be a CDR; ``column`` names the offending column, if one."""

    def __init__(self, message: str, *, column: str | None = None) -> None:
        super().__init__(f"column {column!r}: {message}" if column else message)
        self.column = column


def call_ended_from_csv(
    fields: Sequence[str],
    *,
    system_name: str,
    timezone: ZoneInfo,
    gmt: bool = False,
) -> CallEnded:
    """Translate one parsed Master.csv row (18 or 21 decoded fields) into a CSV-origin CallEnded.

    Raises :class:`CsvRowError` for a wrong column count, a missing uniqueid, an unparsable time
    or a non-integer duration/billsec/sequence.
    """
    count = len(fields)
    if count not in (len(BASE_COLUMNS), len(EXTENDED_COLUMNS)):
        missing = EXTENDED_COLUMNS[count] if count < len(EXTENDED_COLUMNS) else None
        raise CsvRowError(
            f"expected {len(BASE_COLUMNS)} columns (cdr.conf [csv] loguniqueid=yes, loguserfield=yes) or "
            f"{len(EXTENDED_COLUMNS)} (plus newcdrcolumns=yes), got {count}",
            column=missing,
        )
    extended = count == len(EXTENDED_COLUMNS)

    def raw(name: str) -> str:
        return fields[_IDX[name]]

    unique_id = raw("uniqueid")
    if not unique_id.strip():
        raise CsvRowError("empty: cdr.conf [csv] needs loguniqueid=yes", column="uniqueid")
    destination_channel = raw("dstchannel")
    start = _parse_time(raw("start"), "start", timezone, gmt=gmt)
    end = _parse_time(raw("end"), "end", timezone, gmt=gmt)
    if start is None:
        raise CsvRowError("empty", column="start")
    if end is None:
        raise CsvRowError("empty", column="end")
    name, number = _parse_caller_id(raw("clid"))

    linked_id: str | None = None
    sequence: int | None = None
    if extended:
        linked_id = _clean(raw("linkedid"), _MAX_TEXT) or None
        sequence = _parse_int(raw("sequence"), "sequence")

    return CallEnded(
        key=cdr_key(system_name, unique_id, destination_channel),
        system_name=system_name,
        account=_clean(raw("accountcode"), _MAX_TEXT),
        source=_clean(raw("src"), _MAX_TEXT),
        destination=_clean(raw("dst"), _MAX_TEXT),
        destination_context=_clean(raw("dcontext"), _MAX_TEXT),
        caller_id_name=name,
        caller_id_num=number,
        channel=_clean(raw("channel"), _MAX_TEXT),
        destination_channel=_clean(destination_channel, _MAX_TEXT),
        last_application=_clean(raw("lastapp"), _MAX_TEXT),
        last_data=_clean(raw("lastdata"), _MAX_TEXT),
        disposition=_parse_disposition(raw("disposition")),
        duration=_parse_int(raw("duration"), "duration"),
        billable_seconds=_parse_int(raw("billsec"), "billsec"),
        start=start,
        answer=_parse_time(raw("answer"), "answer", timezone, gmt=gmt),
        end=end,
        unique_id=_clean(unique_id, _MAX_TEXT),
        linked_id=linked_id,
        sequence=sequence,
        user_field=_clean(raw("userfield"), _MAX_TEXT),
        origin=EventSource.CSV,
    )


def _clean(text: str, limit: int) -> str:
    """Drop control and other non-printable characters, and a backslash glued to one.

    The AMI ``Cdr`` form of a hostile caller name carries ``\\`` before each raw CR/LF; dropping
    the pair makes both sources give the same display text.
    """
    out: list[str] = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif out and out[-1] == "\\":
            out.pop()
    return "".join(out).strip()[:limit]


def _clean_display(text: str, limit: int) -> str:
    """Caller-ID text bound for mail headers: also no ``=?`` (RFC 2047 encoded-word opener)."""
    cleaned = _clean(text, len(text))
    while "=?" in cleaned:
        cleaned = cleaned.replace("=?", "")
    return cleaned.strip()[:limit]


def _parse_caller_id(clid: str) -> tuple[str, str]:
    r"""``"Name" <number>`` / ``Name <number>`` / ``number`` / ``Name`` → (name, number).

    The number is in the LAST ``<…>`` and the outer quotes of the name are removed. The CDR's
    ``clid`` is the string its AMI ``Cdr`` event carries as ``CallerID`` (cdr_csv only doubles its
    ``"`` for the CSV quoting, which the reader has undone). With a number, Asterisk's
    ``ast_callerid_merge`` escapes ``"`` and ``\`` inside the quotes (``ast_escape_quoted``), so
    a backslash before a printable character is dropped, as
    :func:`~clickphone_agi.domain.ami_translate.parse_caller_id` does for AMI: ``"O"Brien"`` and
    ``"C:\pbx"`` give ``O"Brien`` and ``C:\pbx`` from both sources; so is one in a name cut
    before its closing quote (the 80-byte clid). A backslash before a control character stays for
    :func:`_clean` to drop with it. A name alone is written as it is, and taken as it is; so is a
    name whose inner quotes were not escaped (older versions).
    """
    text = clid.strip()
    name, number = text, ""
    open_at = text.rfind("<")
    split = open_at != -1 and text.endswith(">")
    if split:
        name, number = text[:open_at].strip(), text[open_at + 1 : -1].strip()
    elif _NUMBER_ONLY.fullmatch(text):
        name, number = "", text
    if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
        name = _unescape_quoted(name[1:-1]) if split else name[1:-1]
    elif not split and name.startswith('"'):  # cut inside the quotes: the rest is the (escaped) name
        name = _unescape_quoted(name[1:])
    return _clean_display(name, _MAX_NAME), _clean_display(number, _MAX_NUMBER)


_ESCAPED_PRINTABLE = re.compile(r"\\(.)", re.DOTALL)


def _unescape_quoted(name: str) -> str:
    r"""Undo ``ast_escape_quoted`` for printable characters (``\"`` → ``"``, ``\\`` → ``\``)."""
    if "\\" not in name:
        return name
    return _ESCAPED_PRINTABLE.sub(lambda m: m.group(1) if m.group(1).isprintable() else m.group(0), name)


def _parse_time(value: str, column: str, timezone: ZoneInfo, *, gmt: bool) -> datetime | None:
    text = value.strip()
    if not text:
        return None
    try:
        naive = datetime.strptime(text, _TIME_FORMAT)  # naive on purpose: the zone is attached below
    except ValueError:
        raise CsvRowError(f"expected a time YYYY-MM-DD HH:MM:SS, got {_preview(text)}", column=column) from None
    if naive.year not in CDR_YEARS:
        raise CsvRowError(f"year outside {CDR_YEARS.start}..{CDR_YEARS.stop - 1}, got {_preview(text)}", column=column)
    if gmt:
        return naive.replace(tzinfo=UTC).astimezone(timezone)
    return naive.replace(tzinfo=timezone, fold=0)


def _parse_int(value: str, column: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise CsvRowError(f"expected a non-negative whole number, got {_preview(text)}", column=column)
    return int(text)


def _parse_disposition(value: str) -> Disposition:
    try:
        return Disposition(value.strip().upper())
    except ValueError:
        return Disposition.UNKNOWN


def _preview(text: str) -> str:
    return repr(_clean(text, 40))
