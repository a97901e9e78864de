"""Uniqueid → Linkedid correlation: the one stateful stage before the pure translator.

A Cdr AMI event carries no Linkedid unless cdr_manager.conf maps it (``[mappings]
linkedid => LinkedID``), but every channel event does. :class:`LinkedIdCorrelator` remembers
``Uniqueid → Linkedid`` from every event it is shown, so the translator can group a call's CDRs.

Feed it every event in stream order and *before* translating that event. The mapping is in
place long before a channel's Cdr: ``Newchannel`` (the first event of every channel) already
carries both ids, and the channel's later events (DialBegin/DialEnd, Newstate, HangupRequest,
Hangup) refresh it. The Cdr does *not* reliably follow the channel's Hangup: in the Asterisk 22
recordings 15 of the 25 Cdr events arrive before their channel's Hangup event (the CDR engine
and the channel topic are separate stasis subscriptions), so an entry is never dropped on Hangup.

Memory is bounded: at most ``max_entries`` ids (least recently *observed* evicted first, an
:class:`~collections.OrderedDict` LRU; lookups do not refresh). With ~4 ids per call (Local
channels) the default keeps the last ~12,000 calls, far more than the seconds between a
channel's last event and its Cdr. After an eviction the Cdr gets ``linked_id=None`` and the
Master.csv reconciliation or the ``LinkedID`` mapping is the fallback; ``evictions`` counts them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["DEFAULT_MAX_ENTRIES", "LinkedIdCorrelator"]

DEFAULT_MAX_ENTRIES = 50_000

# Asterisk's AST_MAX_UNIQUEID is 150: anything longer is not an id, and would cost memory
_MAX_ID_LEN = 150
_UNIQUEID = "uniqueid"
_LINKEDID = "linkedid"


class LinkedIdCorrelator:
    """Remembers which call (Linkedid) each channel (Uniqueid) belongs to, within a bound.

    Every header pair ``<Prefix>Uniqueid`` / ``<Prefix>Linkedid`` of an event is recorded (names
    case-insensitive): ``Uniqueid``/``Linkedid`` (Newchannel, Hangup, DialEnd, MessageWaiting,
    …), ``DestUniqueid``/``DestLinkedid`` (DialBegin/DialEnd), ``LocalOneUniqueid``/
    ``LocalTwoUniqueid`` (LocalBridge), ``UniqueID``/``LinkedID`` (a Cdr with the mapping), the
    transfer events' prefixed pairs. Empty values and Asterisk's ``none`` are ignored.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._links: OrderedDict[str, str] = OrderedDict()
        self.evictions = 0

    @property
    def max_entries(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._links)

    def observe(self, headers: Sequence[tuple[str, str]]) -> None:
        """Record every Uniqueid → Linkedid pair that this event's headers carry."""
        unique_ids: dict[str, str] = {}
        linked_ids: dict[str, str] = {}
        for name, value in headers:
            lower = name.lower()
            if lower.endswith(_UNIQUEID):
                unique_ids.setdefault(lower[: -len(_UNIQUEID)], value)
            elif lower.endswith(_LINKEDID):
                linked_ids.setdefault(lower[: -len(_LINKEDID)], value)
        for prefix, unique_id in unique_ids.items():
            linked_id = linked_ids.get(prefix)
            if linked_id is not None:
                self.record(unique_id, linked_id)

    def record(self, unique_id: str, linked_id: str) -> None:
        """Remember one pair (the most recent wins); evicts the least recently seen if full."""
        if not _usable(unique_id) or not _usable(linked_id):
            return
        links = self._links
        if unique_id in links:
            links.move_to_end(unique_id)
        links[unique_id] = linked_id
        while len(links) > self._max:
            links.popitem(last=False)
            self.evictions += 1

    def linked_id_for(self, unique_id: str) -> str | None:
        """The Linkedid last seen with ``unique_id``, else ``None`` (never seen, or evicted)."""
        return self._links.get(unique_id)


def _usable(value: str) -> bool:
    return bool(value) and value != "none" and len(value) <= _MAX_ID_LEN
