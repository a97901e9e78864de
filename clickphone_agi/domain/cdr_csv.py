"""One Asterisk ``cdr_csv`` Master.csv row → :class:`CallEnded`. Pure: no I/O.

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

The caller ID (``clid``) is the text the AMI ``Cdr`` event carries as ``CallerID``, and is read by
the AMI translator's :func:`~clickphone_agi.domain.ami_translate.parse_caller_id`, so a call
recovered from here and one heard on the AMI show the same caller (a hostile name with a raw CR,
LF or TAB gives a space either way). The other helpers (control-character stripping, times) are
private here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from clickphone_agi.domain.ami_translate import parse_caller_id
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
_MAX_TEXT = 256


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
    # the same text the AMI Cdr event carries as CallerID: the same parser, so a call recovered
    # from here and one heard on the AMI show its caller alike (a raw CR/LF in a name included)
    name, number = parse_caller_id(raw("clid"))

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
    """Drop control and other non-printable characters, and a backslash glued to one (an
    identifier, a number or a path: the caller's name goes through the AMI parser instead)."""
    out: list[str] = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif out and out[-1] == "\\":
            out.pop()
    return "".join(out).strip()[:limit]


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
