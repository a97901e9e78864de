"""What Asterisk's cdr_csv writes to Master.csv for a Cdr event (for the demo and the tests).

cdr_csv quotes every string column (inner quotes doubled), writes Duration/BillableSeconds bare
and an unset time as an empty unquoted field; columns follow ``loguniqueid=yes``,
``loguserfield=yes`` (18 columns).
"""

from __future__ import annotations

from clickphone_agi.adapters.ami.protocol import AmiMessage

CDR_HEADERS = (
    "AccountCode", "Source", "Destination", "DestinationContext", "CallerID", "Channel", "DestinationChannel",
    "LastApplication", "LastData", "StartTime", "AnswerTime", "EndTime", "Duration", "BillableSeconds",
    "Disposition", "AMAFlags", "UniqueID", "UserField",
)  # fmt: skip


def csv_record(cdr: AmiMessage) -> bytes:
    """The Master.csv record for one ``Event: Cdr`` message."""
    parts = []
    for name in CDR_HEADERS:
        value = cdr.get(name) or ""
        if name in ("Duration", "BillableSeconds") or (name.endswith("Time") and not value):
            parts.append(value)
        else:
            parts.append('"' + value.replace('"', '""') + '"')
    return (",".join(parts) + "\n").encode("utf-8")
