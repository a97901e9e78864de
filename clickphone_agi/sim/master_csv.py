"""What Asterisk's cdr_csv writes to Master.csv for a Cdr event (for the demo and the tests).

cdr_csv quotes every string column (inner quotes doubled), writes Duration/BillableSeconds bare
and an unset time as an empty unquoted field; columns follow ``loguniqueid=yes``,
``loguserfield=yes`` (18 columns), and with ``new_columns`` also ``newcdrcolumns=yes``
(peeraccount, linkedid, sequence: 21 columns; the sequence bare).
"""

from __future__ import annotations

from clickphone_agi.adapters.ami.protocol import AmiMessage

CDR_HEADERS = (
    "AccountCode", "Source", "Destination", "DestinationContext", "CallerID", "Channel", "DestinationChannel",
    "LastApplication", "LastData", "StartTime", "AnswerTime", "EndTime", "Duration", "BillableSeconds",
    "Disposition", "AMAFlags", "UniqueID", "UserField",
)  # fmt: skip


NEW_CDR_HEADERS = (*CDR_HEADERS, "PeerAccount", "LinkedID", "Sequence")
_BARE = frozenset({"Duration", "BillableSeconds", "Sequence"})


def csv_record(cdr: AmiMessage, *, new_columns: bool = False) -> bytes:
    """The Master.csv record for one ``Event: Cdr`` message (``new_columns``: ``newcdrcolumns=yes``;
    linkedid and sequence come from the ``LinkedID``/``Sequence`` headers cdr_manager appends)."""
    parts = []
    for name in NEW_CDR_HEADERS if new_columns else CDR_HEADERS:
        value = cdr.get(name) or ""
        if name in _BARE or (name.endswith("Time") and not value):
            parts.append(value)
        else:
            parts.append('"' + value.replace('"', '""') + '"')
    return (",".join(parts) + "\n").encode("utf-8")
