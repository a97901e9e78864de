"""The storage interface services depend on; SQLite implements it today, PostgreSQL later.

A write is a *unit of work*: a plain synchronous function that receives a :class:`WriteTx` and
runs inside one transaction on the storage's own writer. It must only decide and call ``tx``
methods — no sockets, no file reads, no rendering (do those before). That keeps SQL and
transaction handling inside the adapter and makes each transaction one hop to the database.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from clickphone_agi.domain.accounts import Account
from clickphone_agi.domain.consent import Candidate, ConsentRecord
from clickphone_agi.domain.delivery import DueMail
from clickphone_agi.domain.events import CallEnded
from clickphone_agi.domain.money import Notice, RatedCall
from clickphone_agi.domain.outbox import OutboxMessage, OutboxRow
from clickphone_agi.domain.policy import Policy

T = TypeVar("T")


class StorageUnavailable(Exception):
    """The database took no write, for a reason outside the unit of work: the disk is full, an
    I/O error, a read-only or locked file. The same units may succeed later, and since each one
    commits with its idempotency key, retrying them is safe: hold them and try again."""


#: Seconds before the first retry of writes the database refused (:class:`StorageUnavailable`),
#: doubling up to the most: a freed disk is noticed within half a minute, and a full one costs a
#: log line a try.
STORAGE_RETRY_FIRST = 0.5
STORAGE_RETRY_MAX = 30.0


class StorageRetry:
    """The wait before the next try of writes the database refused: ``first``, doubling up to
    ``most`` with each try that fails too, and ``first`` again once a write commits."""

    def __init__(self, first: float = STORAGE_RETRY_FIRST, most: float = STORAGE_RETRY_MAX) -> None:
        self._first, self._most = first, most
        self.delay = first  # the next wait

    def take(self) -> float:
        """The wait to make now; the next one doubles."""
        delay, self.delay = self.delay, min(self.delay * 2, self._most)
        return delay

    def reset(self) -> None:
        self.delay = self._first


class WriteTx(Protocol):
    """Operations available inside one write transaction."""

    now: datetime

    def claim_event(self, key: str, kind: str) -> bool:
        """Record an event's idempotency key; False if it was already processed."""
        ...

    def record_call(self, call: CallEnded) -> None:
        """Store one CDR (call after :meth:`claim_event` succeeded for its key)."""
        ...

    def erased_leg(self, call: CallEnded) -> bool:
        """Whether ``call`` is a leg without an account code that carries a number erased after the
        call started: it is not recorded (neither the CDR nor its key). Costs no statement."""
        ...

    def box_erased_at(self, box: str) -> datetime | None:
        """When voicemail box ``box`` (``mailbox@context``) was erased with its account, or None: its
        messages and events from before then are neither mailed nor recorded. Costs no statement."""
        ...

    def set_meta(self, key: str, value: str) -> None:
        """Small durable state such as the Master.csv read position."""
        ...

    # money: reads and writes inside the same transaction as the decision they serve
    def get_account(self, code: str) -> Account | None: ...

    def account_for_did(self, did: str) -> Account | None: ...

    def account_for_mailbox(self, box: str) -> Account | None: ...

    def upsert_account(self, account: Account, opening_balance: int) -> bool:
        """Insert or update an account; the opening balance only for a new one. True if new."""
        ...

    def balance(self, code: str) -> int: ...

    def post_ledger(self, code: str, amount: int, kind: str, ref: str, reason: str | None) -> bool:
        """Append a money movement (False if ``ref`` was already booked) and move the balance."""
        ...

    def spent(self, code: str, day: str) -> int: ...

    def add_spend(self, code: str, day: str, amount: int) -> int: ...

    def reservations(self, code: str) -> tuple[int, int]:
        """(bani held, calls) by the account's unexpired reservations."""
        ...

    def held_since(self, code: str, moment: datetime) -> int:
        """Bani held by the account's unexpired reservations made at or after ``moment``."""
        ...

    def reserve(self, call_id: str, code: str, amount: int, expires_at: datetime) -> bool: ...

    def release(self, call_id: str) -> int | None: ...

    def purge_expired_reservations(self) -> int: ...

    def get_state(self, code: str, name: str) -> str | None: ...

    def set_state(self, code: str, name: str, value: str) -> None: ...

    def record_rated(self, rated: RatedCall) -> None: ...

    def api_request(self, key: str) -> tuple[str, int, str] | None:
        """The intake API's record of an Idempotency-Key: (body hash, status, response JSON)."""
        ...

    def record_api_request(self, key: str, body_hash: str, status: int, response: str) -> bool:
        """Record an intake API key with its first response (same transaction as the effects)."""
        ...

    def enqueue_notice(self, notice: Notice) -> bool:
        """An outbox row rendered by the sender from the notice's payload."""
        ...

    def enqueue(self, message: OutboxMessage) -> bool:
        """Add an outbox row; False (and nothing inserted) if its key already exists."""
        ...

    def set_message(self, row_id: int, mime: bytes) -> None:
        """Store the body the sender rendered for a notice row (rendered once)."""
        ...

    def mark_sent(self, row_id: int, smtp_reply: str, *, envelope_from: str | None = None) -> None:
        """The server answered 250: the row is sent (a pending row only)."""
        ...

    def mark_failed(
        self,
        row_id: int,
        error: str,
        next_attempt_at: datetime,
        *,
        dead: bool,
        smtp_reply: str | None = None,
        envelope_from: str | None = None,
        count_attempt: bool = True,
    ) -> None:
        """A failed attempt: deferred to ``next_attempt_at``, or dead (a pending row only)."""
        ...

    def mark_expired(self, row_id: int) -> None: ...

    def outbox_row(self, row_id: int) -> OutboxRow | None:
        """One outbox row as it is inside this transaction."""
        ...

    def mark_bounced(self, row_id: int, error: str) -> bool:
        """A DSN reported the message undeliverable; False if the row was already bounced."""
        ...

    def suppression(self, address: str) -> str | None:
        """The reason ``address`` is suppressed (no mail at all goes to it), or None."""
        ...

    def count_hard_bounce(self, address: str, reason: str, limit: int, row_id: int | None = None) -> bool:
        """One more hard bounce for ``address``; True if that (or an earlier one) suppressed it.
        With ``row_id`` (the outbox row that bounced), nothing is counted if that row no longer
        goes to ``address``: an erasure took the address while the mail was in flight."""
        ...

    def verp_key(self, candidate: bytes | None) -> bytes | None:
        """The stored VERP HMAC key; ``candidate`` is stored first if there is none yet."""
        ...

    def retry_outbox(self, row_ids: list[int] | None) -> dict[str, Any]:
        """Dead letters back to pending, due now (``None``: every dead letter); says which were skipped."""
        ...

    def purge_outbox(self, before: datetime, statuses: tuple[str, ...], *, keep_rows: bool) -> int:
        """Delete finished rows created before ``before`` (bodies only with ``keep_rows``); never pending."""
        ...

    # consent, suppressions, the policy archive, broadcasts
    def consent(self, code: str) -> bool | None:
        """The newest marketing consent record: True granted, False withdrawn, None never recorded."""
        ...

    def record_consent(
        self, code: str, granted: bool, source: str, policy_version: str | None, evidence: str | None
    ) -> ConsentRecord:
        """Append a grant or withdrawal (when = the transaction's time)."""
        ...

    def marketing_suppression(self, address: str) -> str | None:
        """Why ``address`` gets no marketing (it is on the suppression list), or None."""
        ...

    def add_marketing_suppression(self, address: str, reason: str) -> bool: ...

    def remove_marketing_suppression(self, address: str) -> bool: ...

    def policy(self, version: str) -> Policy | None: ...

    def publish_policy(self, policy: Policy) -> bool:
        """Archive a new version; False if the version exists (versions are immutable)."""
        ...

    def policy_in_force(self, day: str) -> str | None:
        """The latest version effective on or before local ``day`` (ISO date)."""
        ...

    def broadcast(self, broadcast_id: str) -> tuple[str, str] | None:
        """(kind, params JSON) of a broadcast started under this id."""
        ...

    def start_broadcast(self, broadcast_id: str, kind: str, params: str) -> bool: ...

    def finish_broadcast(self, broadcast_id: str, recipients: int, skipped: int) -> None: ...

    def candidates(self, after: str | None, limit: int) -> list[Candidate]:
        """The next ``limit`` accounts in code order after ``after``, with consent and suppressions."""

    # data rights and retention
    def marketing_suppressed(self, address: str) -> str | None:
        """Why ``address`` gets no marketing (its plain or erased form is on the list), or None."""
        ...

    def erase_account(
        self,
        code: str,
        *,
        forms: Callable[[str], tuple[str, ...]],
        outbox_ids: Collection[int],
        outbox_seen_up_to: int,
        salt: bytes,
    ) -> dict[str, Any] | None:
        """Anonymise an account, keeping its money totals; None if there is no such account."""
        ...

    def purge_window(self, step: str, cutoff: datetime, after: str | None, limit: int) -> tuple[int, str | None]:
        """Delete rows of ``step`` older than ``cutoff`` in the next ``limit`` keys; (deleted, next start)."""
        ...

    def purge_bodies_window(
        self, cutoff: datetime, after: int, limit: int, at_once: frozenset[str]
    ) -> tuple[int, int | None]:
        """Clear finished outbox bodies older than ``cutoff`` (``at_once`` kinds at any age) in one window."""
        ...

    def drop_body(self, row_id: int) -> None:
        """Forget a finished row's body now."""
        ...


class Store(Protocol):
    """What the daemon's services need from storage."""

    async def write(self, work: Callable[[WriteTx], T], *, urgent: bool = False, durable: bool = True) -> T:
        """Run ``work`` in one write transaction (BEGIN IMMEDIATE … COMMIT) and return its result;
        ``urgent``: ahead of writes already queued (a sent mail's mark: the shorter the wait, the
        fewer mails a crash can make go twice). ``durable=False``: committed when this returns,
        so it survives a crash or restart of the daemon, but made safe against power loss a few
        milliseconds later, off the caller's path (an ``authorize`` reservation: a power cut also
        ends the calls it holds budget for); mail it enqueues is made durable before it returns."""
        ...

    async def write_many(
        self,
        works: Sequence[Callable[[WriteTx], T]],
        *,
        prefetch_claims: Sequence[str] = (),
        records: Sequence[tuple[CallEnded, RatedCall | None]] = (),
    ) -> list[T | Exception]:
        """Run each of ``works`` as its own unit of work (one failing leaves the others), in order;
        each one's result or exception. Hints, which an adapter may ignore: ``prefetch_claims``,
        keys the units will claim; ``records``, the CDRs (and their ratings) the units will pass
        to :meth:`WriteTx.record_call` and :meth:`WriteTx.record_rated`, so that their rows can
        be encoded before the transaction, on the caller's thread.

        A unit that could not commit for a reason of the database's, not its own (the disk is
        full), fails with :class:`StorageUnavailable`: try it again later."""
        ...

    async def went_live_at(self) -> datetime:
        """When this database first went live: nothing older is ever charged or mailed."""
        ...

    async def due_outbox(self, now: datetime, limit: int) -> list[tuple[OutboxRow, bytes]]:
        """Pending rows whose next attempt is due, with their MIME bytes, oldest first."""
        ...

    async def outbox_counts(self) -> dict[str, int]: ...

    async def due_mail(
        self, now: datetime, limit: int, exclude: Collection[int] = (), bulk_limit: int | None = None
    ) -> list[DueMail]:
        """Pending rows due at ``now`` (but not ``exclude``), oldest first, with body, suppression and retry time.

        Bulk kinds come after every other row; ``bulk_limit`` caps how many of them are returned."""
        ...

    async def send_stop(self, row_id: int) -> str | None:
        """Why outbox row ``row_id`` must not be sent now (as ``DueMail.suppressed``), or None: the
        sender asks again right before sending, after any wait since the row was read."""
        ...

    async def next_due_after(self, moment: datetime) -> datetime | None:
        """The earliest ``next_attempt_at`` of a pending row later than ``moment``."""
        ...

    async def mail_metrics(self, now: datetime) -> dict[str, Any]:
        """Outbox figures for the status command (pending, oldest pending age, … by kind)."""
        ...

    async def event_count(self, kind: str | None = None) -> int: ...

    async def get_meta(self, key: str) -> str | None: ...

    async def has_event(self, key: str) -> bool: ...

    async def outbox_status(self, key: str) -> str | None:
        """The status of the outbox row queued under ``key`` (``None``: no such row)."""

    async def consent_history(self, code: str, limit: int = 500) -> list[ConsentRecord]: ...

    async def marketing_suppression(self, address: str) -> str | None: ...

    async def policies(self) -> list[dict[str, Any]]: ...

    async def policy(self, version: str) -> Policy | None: ...

    async def notifications(self, code: str, limit: int, before: int | None) -> list[OutboxRow]:
        """One account's outbox rows (no bodies), newest first, ids below ``before``."""

    async def export_account(self, code: str, forms: Callable[[str], tuple[str, ...]]) -> dict[str, Any] | None:
        """Everything stored about an account, as one snapshot; None if there is no such account."""
        ...

    async def erasure_candidates(self, code: str) -> tuple[list[int], int]:
        """Outbox row ids of the account or its addresses, and the highest row id seen."""
        ...

    async def checkpoint(self, attempts: int = 5) -> tuple[int, int, int]:
        """Move the write-ahead log into the database file and empty it: (busy, frames, checkpointed)."""
        ...

    async def charges_between(self, start: datetime, end: datetime) -> tuple[int, int]:
        """(calls charged, bani) for calls answered in [start, end)."""
        ...
