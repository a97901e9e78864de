"""Uniqueid → Linkedid correlation: the one stateful stage before the pure translator.

A Cdr AMI event carries no Linkedid unless cdr_manager.conf maps it (``[mappings]
linkedid => LinkedID``), but every channel event does. :class:`LinkedIdCorrelator` remembers
``Uniqueid → Linkedid`` from every event it is shown, so the translator can group a call's CDRs.

Feed it every event in stream order and *before* translating that event. The mapping is in
place long before a channel's Cdr: ``Newchannel`` (the first event of every channel) already
carries both ids, and the channel's later events (DialBegin/DialEnd, Newstate, HangupRequest,
Hangup) refresh it. The Cdr does *not* reliably follow the channel's Hangup: in the Asterisk 22
recordings 15 of the 25 Cdr events arrive before their channel's Hangup event (the CDR engine
and the channel topic are separate stasis subscriptions).

So an entry lives in two stages. While its channel is up it is **live**: kept however long the
call lasts (a two-hour call's Cdr still finds its Linkedid), within ``max_entries`` live
channels, far more than one Asterisk carries at once (beyond it the least recently observed is
evicted; a channel whose Hangup was lost in an AMI gap ends there). Once the channel's Hangup
*or* its Cdr has been seen (:meth:`LinkedIdCorrelator.end`), the entry is **ended**: kept only
for the Cdr or Hangup still to come, among the last ``ended_entries`` ended channels (first
ended, first forgotten; the default covers tens of seconds at the highest rates, against the
milliseconds between a Hangup and its Cdr). Memory therefore follows the calls in progress,
not the calls handled since the start. An evicted or forgotten id gives the Cdr
``linked_id=None``: the Master.csv reconciliation or the ``LinkedID`` mapping is the fallback;
``evictions`` and ``forgotten`` count them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["DEFAULT_ENDED_ENTRIES", "DEFAULT_MAX_ENTRIES", "LinkedIdCorrelator"]

DEFAULT_MAX_ENTRIES = 50_000
DEFAULT_ENDED_ENTRIES = 16_384  # ~4 ids a call: the last ~4,000 calls, over a minute at 60 calls/s

# Asterisk's AST_MAX_UNIQUEID is 150: anything longer is not an id, and would cost memory
_MAX_ID_LEN = 150
_UNIQUEID = "uniqueid"
_LINKEDID = "linkedid"
_UNIQUEID_COLON = b"uniqueid:"
_LINKEDID_COLON = b"linkedid:"
_CRLF = b"\r\n"
# KELVIN SIGN: the only character outside ASCII whose lower() holds one of the ASCII letters of
# "uniqueid"/"linkedid" without a combining mark after it ("\u212a".lower() == "k"), so the one
# way a header name can end in "linkedid" for str.lower() but not for bytes.lower()
_KELVIN_UTF8 = "\u212a".encode()

# The exact spellings Asterisk 22 uses → (is a Uniqueid, lowercased prefix); any other name takes
# the generic rule in _classify, which gives the same answer for these.
_KNOWN_NAMES: dict[str, tuple[bool, str]] = {
    name: (name.lower().endswith(_UNIQUEID), name.lower()[: -len(_UNIQUEID)])
    for name in (
        "Uniqueid",
        "Linkedid",
        "UniqueID",
        "LinkedID",
        "DestUniqueid",
        "DestLinkedid",
        "LocalOneUniqueid",
        "LocalOneLinkedid",
        "LocalTwoUniqueid",
        "LocalTwoLinkedid",
        "TransfereeUniqueid",
        "TransfereeLinkedid",
        "TransferTargetUniqueid",
        "TransferTargetLinkedid",
        "OrigTransfererUniqueid",
        "OrigTransfererLinkedid",
        "SecondTransfererUniqueid",
        "SecondTransfererLinkedid",
        "BridgeUniqueid",
    )
}


class LinkedIdCorrelator:
    """Remembers which call (Linkedid) each channel (Uniqueid) belongs to, within a bound.

    Every header pair ``<Prefix>Uniqueid`` / ``<Prefix>Linkedid`` of an event is recorded (names
    case-insensitive): ``Uniqueid``/``Linkedid`` (Newchannel, Hangup, DialEnd, MessageWaiting,
    …), ``DestUniqueid``/``DestLinkedid`` (DialBegin/DialEnd), ``LocalOneUniqueid``/
    ``LocalTwoUniqueid`` (LocalBridge), ``UniqueID``/``LinkedID`` (a Cdr with the mapping), the
    transfer events' prefixed pairs. Empty values and Asterisk's ``none`` are ignored.

    :meth:`observe` reads parsed headers; :meth:`observe_frame` reads the same pairs straight
    from a frame's bytes, without decoding the other headers, and records exactly what
    :meth:`observe` would have recorded for that frame's headers.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, ended_entries: int = DEFAULT_ENDED_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if ended_entries < 1:
            raise ValueError("ended_entries must be at least 1")
        self._max = max_entries
        self._max_ended = ended_entries
        self._links: OrderedDict[str, str] = OrderedDict()  # live channels, least recently observed first
        self._ended: OrderedDict[str, str] = OrderedDict()  # ended channels, first ended first
        self.evictions = 0
        self.forgotten = 0

    @property
    def max_entries(self) -> int:
        return self._max

    @property
    def ended_entries(self) -> int:
        return self._max_ended

    @property
    def live(self) -> int:
        """Channels whose Hangup or Cdr has not been seen yet."""
        return len(self._links)

    @property
    def ended(self) -> int:
        """Channels whose Hangup or Cdr was seen, kept for the other one to come."""
        return len(self._ended)

    def __len__(self) -> int:
        return len(self._links) + len(self._ended)

    def observe(self, headers: Sequence[tuple[str, str]], *, ended: bool = False) -> None:
        """Record every Uniqueid → Linkedid pair that this event's headers carry; ``ended`` (a
        Hangup) then ends the channel named by its own ``Uniqueid``."""
        unique_ids: dict[str, str] = {}
        linked_ids: dict[str, str] = {}
        for name, value in headers:
            # a name ending in "uniqueid"/"linkedid" once lowered ends in "d" or "D"
            if name[-1:] not in ("d", "D"):
                continue
            kind = _KNOWN_NAMES.get(name) or _classify(name)
            if kind is None:
                continue
            is_unique, prefix = kind
            (unique_ids if is_unique else linked_ids).setdefault(prefix, value)
        self._record_pairs(unique_ids, linked_ids)
        if ended and (unique_id := unique_ids.get("")) is not None:
            self.end(unique_id)

    def observe_frame(self, frame: bytes, *, ended: bool = False) -> bool:
        """Like :meth:`observe` for the headers of ``frame`` (an AMI frame's bytes: lines split
        on CRLF only, ``Name: value``, empty lines ignored, each value UTF-8 or else latin-1).

        Only lines whose name ends in ``uniqueid``/``linkedid`` (ASCII, any case) are looked at:
        a line is a header of that name only when no ``:`` comes before the match on its CRLF
        line, so text after a colon (a raw LF inside a caller name included) never counts.

        Returns ``False``, having recorded nothing, for the rare frame it cannot read exactly
        like :meth:`observe` (a matching header name with non-ASCII characters, or a KELVIN
        SIGN anywhere): the caller then passes the parsed headers to :meth:`observe`.
        """
        low = frame.lower()
        found = low.find(_UNIQUEID_COLON)
        if found < 0:
            return True  # no "...uniqueid" header: nothing to pair
        if not frame.isascii() and _KELVIN_UTF8 in frame:  # isascii() is far cheaper than the search
            return False
        linked = low.find(_LINKEDID_COLON)
        if linked < 0:
            return True
        unique_ids = _scan(frame, low, _UNIQUEID_COLON, found)
        linked_ids = _scan(frame, low, _LINKEDID_COLON, linked)
        if unique_ids is None or linked_ids is None:
            return False
        for prefix, raw_unique in unique_ids.items():
            raw_linked = linked_ids.get(prefix)
            if raw_linked is not None:
                self.record(_decode(raw_unique), _decode(raw_linked))
        if ended and (raw_own := unique_ids.get(b"")) is not None:
            self.end(_decode(raw_own))
        return True

    def _record_pairs(self, unique_ids: dict[str, str], linked_ids: dict[str, str]) -> None:
        for prefix, unique_id in unique_ids.items():
            linked_id = linked_ids.get(prefix)
            if linked_id is not None:
                self.record(unique_id, linked_id)

    def record(self, unique_id: str, linked_id: str) -> None:
        """Remember one pair (the most recent wins); evicts the least recently seen if full.

        An ended channel stays ended: the events after its Hangup (its Cdr with the ``LinkedID``
        mapping, a peer's DialEnd) update it in place and do not bring it back to life."""
        if not _usable(unique_id) or not _usable(linked_id):
            return
        if unique_id in self._ended:
            self._ended[unique_id] = linked_id
            return
        links = self._links
        if unique_id in links:
            links.move_to_end(unique_id)
        links[unique_id] = linked_id
        while len(links) > self._max:
            links.popitem(last=False)
            self.evictions += 1

    def end(self, unique_id: str) -> None:
        """The channel's Hangup or Cdr was seen: keep its entry only for the other one to come."""
        linked_id = self._links.pop(unique_id, None)
        if linked_id is None:
            return  # never seen, evicted, or already ended
        ended = self._ended
        ended[unique_id] = linked_id
        if len(ended) > self._max_ended:
            ended.popitem(last=False)
            self.forgotten += 1

    def linked_id_for(self, unique_id: str) -> str | None:
        """The Linkedid last seen with ``unique_id``, else ``None`` (never seen, or evicted)."""
        linked_id = self._links.get(unique_id)
        return self._ended.get(unique_id) if linked_id is None else linked_id


def _classify(name: str) -> tuple[bool, str] | None:
    """``(is a Uniqueid, lowercased prefix)`` for a ``<Prefix>Uniqueid``/``<Prefix>Linkedid``
    header name (case-insensitive), else ``None``."""
    lower = name.lower()
    if lower.endswith(_UNIQUEID):
        return True, lower[: -len(_UNIQUEID)]
    if lower.endswith(_LINKEDID):
        return False, lower[: -len(_LINKEDID)]
    return None


def _scan(frame: bytes, low: bytes, suffix: bytes, found: int) -> dict[bytes, bytes] | None:
    """Lowercased prefix → raw value of the first header per prefix whose name ends in
    ``suffix`` (which includes the colon); ``None`` if a matching name is not ASCII."""
    values: dict[bytes, bytes] = {}
    step = len(suffix)
    while found >= 0:
        start = low.rfind(_CRLF, 0, found)
        start = 0 if start < 0 else start + len(_CRLF)
        # a ':' before the match on this line: the match is inside a value, not a name
        if low.find(b":", start, found) < 0:
            prefix = low[start:found]
            if not prefix.isascii():
                return None
            if prefix not in values:
                value_start = found + step
                value_end = low.find(_CRLF, value_start)
                value = frame[value_start:] if value_end < 0 else frame[value_start:value_end]
                values[prefix] = value[1:] if value[:1] == b" " else value
        found = low.find(suffix, found + step)
    return values


def _decode(data: bytes) -> str:
    # the parser's rule (adapters.ami.protocol.decode_text): UTF-8, else latin-1
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _usable(value: str) -> bool:
    return bool(value) and value != "none" and len(value) <= _MAX_ID_LEN
