"""The SQL behind data rights (export, erase) and the retention job, as functions on a connection.

:class:`~clickphone_agi.adapters.storage.sqlite.SqliteTx` runs the writing ones inside a unit of
work (its savepoint, its writer cache); the reading ones run on a read-only connection, in one
read transaction so an export is one consistent snapshot. The rules (what an erased account looks
like, how a suppressed address is kept) are in :mod:`clickphone_agi.domain.privacy`.

What erasure does, table by table (README "Data rights and retention" says why):

* ``accounts``: the anonymised account (:func:`~clickphone_agi.domain.privacy.anonymised`);
  ``account_dids``/``account_mailboxes``/``reservations``: deleted.
* ``cdrs`` of the account (its account code, or no account code and one of its numbers):
  numbers and channel names blanked; ``rated_calls``: destination blanked. Their keys — Asterisk's
  channel names inside a CDR key can hold the dialled number — become ``erased:<digest>``, the
  digest salted with a random value that is thrown away, so the rows of one call stay linked to
  each other and to nothing else. The same keys' ``processed_events`` rows are deleted: an erased
  account's events are ignored from now on, so nothing needs them.
* voicemail keys: a box (``mailbox@context``) is often the subscriber's number, and the keys of
  its events name it (:func:`names_box`: ``vm:<system>:<box>:<msg_id>`` and its ``:kept``,
  ``mwi:``, ``vmfile:`` by spool path, ``vmpass:`` and its ``notice:vmpass:``). Their
  ``processed_events`` rows are deleted as the CDR keys' are: the box's events are refused from
  now on (the ingest refuses an event of an erased account, or of an erased box no account owns;
  the voicemail scan mails no message of the box left before its erasure, whoever owns it now).
* ``erased_numbers``: the keyed digest (:func:`~clickphone_agi.domain.privacy.number_digest`,
  under the random ``erased_numbers_key`` in ``meta``) of every spelling of the account's numbers,
  with the moment of the erasure, so that a leg without an account code read again later (a
  Master.csv catch-up or replay) is not recorded again with the number; and so of each of its
  voicemail boxes (``mailbox@context``), which is what refuses the box's events above. Pseudonymous (whoever
  holds the database can test a guessed number), kept for that one purpose like the address
  digests of the suppressions: never exported (no longer the account's data, and linked to no
  account), purged by retention only once the key floor has passed the erasure by a margin
  (:func:`~clickphone_agi.domain.retention.erased_numbers_cutoff`): a replay from before the
  erasure is ignored by then anyway.
* ``ledger``: amounts, kinds and dates stay (money totals must); refs become the same digests and
  the free-text ``reason`` of top-ups and manual adjustments is cleared. The ledger is append-only
  by trigger; this is the one place that lifts the triggers, inside the erasure's own transaction,
  for those two columns of that account's rows, and checks the account's sum is unchanged.
* ``outbox`` rows of the account or to its addresses: body and template data deleted, recipient
  replaced, the address cut out of the SMTP reply and last error; a pending one is not sent. A
  low-balance warning's key (``lowbal:<account>:<ledger ref>``) takes the ref's new name; a key
  naming one of its boxes (a voicemail or password-change notice) becomes ``erased:<digest>``.
* ``suppressions``/``marketing_suppressions``: the address becomes its ``sha256:`` digest (lookups
  check both forms). ``consent_records``: the evidence (the IP it was given from) is cleared; the
  history of grants and withdrawals stays as the proof of lawful processing. ``api_requests``: a
  consent request's stored answer echoes that evidence (``ip``, ``how``): both become null there.
* ``balances``, ``daily_spend``, ``notice_state``, the other ``api_requests``: kept (amounts,
  counters and stored API answers; none holds a name, address or number: ``notice_state`` names
  are ``low_armed`` and ``limit_fired:<day>``).
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from clickphone_agi.adapters.storage.codec import account_from_json, account_to_json
from clickphone_agi.domain.privacy import ERASED_EMAIL, address_forms, address_hash, anonymised, ascii_lower
from clickphone_agi.domain.retention import FINISHED_STATUSES

ERASED_KEY_PREFIX = "erased:"
EXPORT_FORMAT = "clickphone-agi privacy export 1"

NumberForms = Callable[[str], tuple[str, ...]]


class ErasureDeferred(Exception):
    """The writer's current batch still holds deferred rows of the account: erase in the next one."""


def _rows(conn: sqlite3.Connection | Any, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    cur = conn.execute(sql, tuple(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values)) or "NULL"


def _addresses(data: dict[str, Any]) -> list[str]:
    """The account's own addresses, ASCII-lowercased: its e-mail and its mailboxes' ones."""
    found = [data.get("email") or ""] + [(m or {}).get("email") or "" for m in data.get("mailboxes") or []]
    return sorted({ascii_lower(a) for a in found if a})


def _numbers(data: dict[str, Any], dids: Iterable[str], forms: NumberForms) -> list[str]:
    return sorted({form for did in {*dids, *(data.get("dids") or [])} for form in forms(did)})


def account_numbers(conn: Any, code: str, forms: NumberForms, data: dict[str, Any] | None = None) -> list[str]:
    """Every form of the account's numbers that a CDR leg without an account code may carry."""
    if data is None:
        head = conn.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
        data = json.loads(head[0]) if head else {}
    dids = [r[0] for r in conn.execute("SELECT did FROM account_dids WHERE account = ?", (code,))]
    return _numbers(data, dids, forms)


def account_boxes(conn: Any, code: str, data: dict[str, Any] | None = None) -> list[str]:
    """The account's voicemail boxes (``mailbox@context``): its settings' and the lookup table's."""
    if data is None:
        head = conn.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
        data = json.loads(head[0]) if head else {}
    stored = [r[0] for r in conn.execute("SELECT box FROM account_mailboxes WHERE account = ?", (code,))]
    return sorted({*stored, *((m or {}).get("box") or "" for m in data.get("mailboxes") or [])} - {""})


# the keys that name a voicemail box: (prefix, where the box is among the key's ':'-parts); a
# ``vmfile:`` key names it as the spool path's ``/<context>/<mailbox>/`` instead
_BOX_KEYS: tuple[tuple[str, int], ...] = (("vm:", 2), ("mwi:", 2), ("vmpass:", 2), ("notice:vmpass:", 3))


def names_box(key: str, boxes: Collection[str]) -> bool:
    """Whether ``key`` names one of ``boxes`` (``mailbox@context``): a voicemail notice
    (``vm:<system>:<box>:<msg_id>``, and its ``:kept``), MWI (``mwi:<system>:<box>:…``), recording
    (``vmfile:<system>:<spool path>/<context>/<mailbox>/…``) or password-change key
    (``vmpass:<system>:<box>…``, its notice ``notice:vmpass:…``)."""
    if key.startswith("vmfile:"):
        path = key.split(":", 2)[-1]
        return any(f"/{b.partition('@')[2]}/{b.partition('@')[0]}/" in path for b in boxes)
    for prefix, index in _BOX_KEYS:
        if key.startswith(prefix):
            parts = key.split(":")
            return len(parts) > index and parts[index] in boxes
    return False


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def box_keys(conn: Any, table: str, column: str, boxes: Collection[str]) -> list[str]:
    """The keys in ``table.column`` that name one of ``boxes`` (:func:`names_box`). GLOB keeps each
    search on the key's index (its constant prefix); the exact test is :func:`names_box`, as ``*``
    also spans ``:``."""
    found: set[str] = set()
    for box in boxes:
        mailbox, _, context = box.partition("@")
        patterns = [f"{prefix}*{_glob_escape(box)}*" for prefix, _ in _BOX_KEYS]
        patterns.append(f"vmfile:*/{_glob_escape(context)}/{_glob_escape(mailbox)}/*")
        for pattern in patterns:
            for (key,) in conn.execute(f"SELECT {column} FROM {table} WHERE {column} GLOB ?", (pattern,)):  # noqa: S608
                if names_box(str(key), boxes):
                    found.add(str(key))
    return sorted(found)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# ---- export (read-only connection) -----------------------------------------------------------------


def decode_message(raw: bytes) -> dict[str, Any]:
    """A stored MIME message as text a subscriber can read: headers, text parts, attachments listed."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        parts: list[dict[str, Any]] = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            filename = part.get_filename()
            content_type = part.get_content_type()
            if filename is None and part.get_content_maintype() == "text":
                parts.append({"content_type": content_type, "text": str(part.get_content())})
            else:
                payload = part.get_payload(decode=True)
                size = len(payload) if isinstance(payload, bytes) else 0
                parts.append({"content_type": content_type, "attachment": filename, "bytes": size})
        headers = {name: str(msg[name]) for name in ("From", "To", "Subject", "Date", "Message-ID") if msg[name]}
    except Exception as exc:  # a damaged body must not hide the rest of the export
        return {"error": f"unreadable message: {type(exc).__name__}", "bytes": len(raw)}
    return {"headers": headers, "parts": parts}


def export_account(conn: sqlite3.Connection, code: str, forms: NumberForms) -> dict[str, Any] | None:
    """Everything stored about account ``code``, or None if there is no such account.

    Runs in one read transaction: the export is one snapshot even while the daemon writes.
    """
    conn.execute("BEGIN")
    try:
        return _export(conn, code, forms)
    finally:
        conn.execute("COMMIT")


def _export(conn: sqlite3.Connection, code: str, forms: NumberForms) -> dict[str, Any] | None:
    head = conn.execute("SELECT data, created_at, updated_at FROM accounts WHERE code = ?", (code,)).fetchone()
    if head is None:
        return None
    data = json.loads(head[0])
    dids = [r[0] for r in conn.execute("SELECT did FROM account_dids WHERE account = ? ORDER BY did", (code,))]
    boxes = [r[0] for r in conn.execute("SELECT box FROM account_mailboxes WHERE account = ? ORDER BY box", (code,))]
    numbers = _numbers(data, dids, forms)
    addresses = _addresses(data)
    balance = conn.execute("SELECT balance FROM balances WHERE account = ?", (code,)).fetchone()
    nm, am = _marks(numbers), _marks(addresses)
    cdrs = _rows(
        conn,
        f"SELECT * FROM cdrs WHERE account = ? OR source IN ({nm}) OR destination IN ({nm})"  # noqa: S608 - marks only
        " ORDER BY end_at, key",
        (code, *numbers, *numbers),
    )
    outbox = _rows(
        conn,
        "SELECT id, idempotency_key, kind, recipient, account, status, attempts, created_at, expires_at,"  # noqa: S608
        " next_attempt_at, sent_at, bounced_at, last_error, smtp_reply, envelope_from, payload, message"
        f" FROM outbox WHERE account = ? OR lower(recipient) IN ({am}) ORDER BY id",
        (code, *addresses),
    )
    for row in outbox:
        message, payload = row.pop("message"), row.pop("payload")
        row["template_data"] = json.loads(payload) if payload else None
        row["message"] = decode_message(bytes(message)) if message else None
        row["body_held"] = bool(message or payload)
    lookups = [form for a in addresses for form in address_forms(a)]
    lm = _marks(lookups)
    keys = {r["key"] for r in cdrs} | {
        r[0] for r in conn.execute("SELECT ref FROM ledger WHERE account = ? AND kind = 'call'", (code,))
    }
    keys |= set(box_keys(conn, "processed_events", "key", account_boxes(conn, code, data)))  # its voicemail's
    km = _marks(sorted(keys))
    pattern = f"acct:%:{_like_escape(code)}:%"
    return {
        "format": EXPORT_FORMAT,
        "account": {"code": code, "settings": data, "created_at": head[1], "updated_at": head[2]},
        "dids": dids,
        "mailboxes": boxes,
        "numbers_searched": numbers,
        "addresses_searched": addresses,
        "balance": int(balance[0]) if balance else 0,
        "ledger": _rows(conn, "SELECT * FROM ledger WHERE account = ? ORDER BY id", (code,)),
        "daily_spend": _rows(conn, "SELECT day, spent FROM daily_spend WHERE account = ? ORDER BY day", (code,)),
        "reservations": _rows(conn, "SELECT * FROM reservations WHERE account = ? ORDER BY created_at", (code,)),
        "notice_state": _rows(conn, "SELECT name, value FROM notice_state WHERE account = ? ORDER BY name", (code,)),
        "rated_calls": _rows(conn, "SELECT * FROM rated_calls WHERE account = ? ORDER BY answered_at, key", (code,)),
        "cdrs": cdrs,
        "outbox": outbox,
        "consent_records": _rows(conn, "SELECT * FROM consent_records WHERE account = ? ORDER BY id", (code,)),
        "suppressions": _rows(
            conn,
            f"SELECT * FROM suppressions WHERE address IN ({lm}) ORDER BY address",  # noqa: S608 - marks only
            lookups,
        ),
        "marketing_suppressions": _rows(
            conn,
            f"SELECT * FROM marketing_suppressions WHERE address IN ({lm}) ORDER BY address",  # noqa: S608
            lookups,
        ),
        "api_requests": [
            {**r, "response": json.loads(r["response"])}
            for r in _rows(
                conn,
                "SELECT key, status, response, created_at FROM api_requests"
                " WHERE json_valid(response) AND json_extract(response, '$.account') = ? ORDER BY created_at, key",
                (code,),
            )
        ],
        "processed_events": _rows(
            conn,
            f"SELECT key, kind, processed_at FROM processed_events WHERE key IN ({km})"  # noqa: S608 - marks only
            " OR key LIKE ? ESCAPE '\\' ORDER BY processed_at, key",
            (*sorted(keys), pattern),
        ),
    }


# ---- erase (the writer, inside one unit of work) ---------------------------------------------------


def outbox_candidates(conn: sqlite3.Connection, code: str) -> tuple[list[int], int]:
    """Read-only, before the erasure's unit: the outbox rows of the account or to its addresses, and
    the highest row id seen. The outbox has no index on either column, so this scan runs on a reader;
    the unit itself only looks at rows added after it (by id, cheaply)."""
    conn.execute("BEGIN")
    try:
        head = conn.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
        addresses = _addresses(json.loads(head[0])) if head else []
        ids = [
            int(r[0])
            for r in conn.execute(
                f"SELECT id FROM outbox WHERE account = ? OR lower(recipient) IN ({_marks(addresses)})",  # noqa: S608
                (code, *addresses),
            )
        ]
        top = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])
    finally:
        conn.execute("COMMIT")
    return ids, top


def scrub(text: str | None, addresses: Iterable[str]) -> str | None:
    """``text`` with every ``addresses`` entry (any case) replaced by ``[erased]``."""
    if not text:
        return text
    for address in addresses:
        text = re.sub(re.escape(address), "[erased]", text, flags=re.IGNORECASE)
    return text


def _erased_key(salt: bytes, key: str) -> str:
    return ERASED_KEY_PREFIX + hashlib.sha256(salt + key.encode("utf-8")).hexdigest()[:40]


def erase_account(
    conn: Any,
    code: str,
    *,
    forms: NumberForms,
    outbox_ids: Sequence[int],
    outbox_seen_up_to: int,
    now_db: str,
    salt: bytes,
    number_digests: Sequence[str],
) -> dict[str, Any] | None:
    """Anonymise account ``code`` (see the module doc); None if there is no such account.

    ``conn`` is the unit's connection (its savepoint opens on the first statement);
    ``number_digests`` are the keyed digests of the account's numbers, kept as erased at
    ``now_db``. Returns what was changed, by table. Erasing an erased account again is harmless
    (it finds less to do).
    """
    head = conn.execute("SELECT data FROM accounts WHERE code = ?", (code,)).fetchone()
    if head is None:
        return None
    data = json.loads(head[0])
    numbers = account_numbers(conn, code, forms, data)
    boxes = account_boxes(conn, code, data)
    addresses = set(_addresses(data))
    done: dict[str, Any] = {"account": code}

    # calls: the account's CDRs, and CDR legs without an account code that carry one of its numbers
    nm = _marks(numbers)
    cdr_keys = [r[0] for r in conn.execute("SELECT key FROM cdrs WHERE account = ?", (code,))]
    cdr_keys += [
        r[0]
        for r in conn.execute(
            f"SELECT key FROM cdrs WHERE account = '' AND (source IN ({nm}) OR destination IN ({nm}))",  # noqa: S608
            (*numbers, *numbers),
        )
    ]
    ledger = conn.execute("SELECT id, ref FROM ledger WHERE account = ?", (code,)).fetchall()
    keys = {*cdr_keys, *(ref for _, ref in ledger)}
    renamed = {key: _erased_key(salt, key) for key in sorted(keys) if not key.startswith(ERASED_KEY_PREFIX)}
    conn.executemany(
        "UPDATE cdrs SET key = ?, source = '', destination = '', channel = '', destination_channel = '' WHERE key = ?",
        [(renamed.get(k, k), k) for k in cdr_keys],
    )
    done["cdrs"] = len(cdr_keys)
    cur = conn.executemany(
        "UPDATE rated_calls SET key = ?, destination = '' WHERE key = ? AND account = ?",
        [(new, old, code) for old, new in renamed.items()],
    )
    done["rated_calls"] = max(cur.rowcount, 0)
    cur = conn.executemany("DELETE FROM processed_events WHERE key = ?", [(old,) for old in renamed])
    done["processed_events"] = max(cur.rowcount, 0)
    # voicemail: the keys naming one of its boxes (a box is often the subscriber's number); the
    # box's events are refused from now on (ingest, notices), so nothing needs these rows either
    cur = conn.executemany(
        "DELETE FROM processed_events WHERE key = ?", [(k,) for k in box_keys(conn, "processed_events", "key", boxes)]
    )
    done["processed_events"] += max(cur.rowcount, 0)
    done["ledger"] = _anonymise_ledger(conn, code, [(i, renamed.get(ref, ref)) for i, ref in ledger])
    # the numbers stay erased: a leg read again later is refused (domain.privacy.erased_leg)
    conn.executemany(
        "INSERT INTO erased_numbers (digest, erased_at) VALUES (?, ?)"
        " ON CONFLICT (digest) DO UPDATE SET erased_at = max(erased_at, excluded.erased_at)",
        [(digest, now_db) for digest in number_digests],
    )
    done["erased_numbers"] = len(number_digests)

    # the outbox: rows found by the reader, and rows added since
    later = conn.execute(
        f"SELECT id FROM outbox WHERE id > ? AND (account = ? OR lower(recipient) IN ({_marks(sorted(addresses))}))",  # noqa: S608
        (outbox_seen_up_to, code, *sorted(addresses)),
    ).fetchall()
    ids = sorted({*outbox_ids, *(int(r[0]) for r in later)})
    rows = [
        conn.execute(
            "SELECT id, recipient, last_error, smtp_reply, status, idempotency_key FROM outbox WHERE id = ?", (i,)
        ).fetchone()
        for i in ids
    ]
    rows = [r for r in rows if r is not None]
    addresses |= {ascii_lower(r[1]) for r in rows if r[1] and r[1] != ERASED_EMAIL}
    # a low-balance warning is keyed by the ledger ref of its cause (a CDR key may hold the dialled
    # number): it follows the ref's new name; a voicemail or password-change notice is keyed by its
    # box: it takes a name of its own, like a CDR key
    lowbal = f"lowbal:{code}:"
    by_box = {k: _erased_key(salt, k) for k in (box_keys(conn, "outbox", "idempotency_key", boxes) if rows else ())}
    conn.executemany(
        """UPDATE outbox SET recipient = ?, message = NULL, payload = NULL, last_error = ?, smtp_reply = ?,
               status = CASE WHEN status = 'pending' THEN 'dead' ELSE status END, idempotency_key = ?
           WHERE id = ?""",
        [
            (
                ERASED_EMAIL,
                "erased: the account's personal data was erased" if status == "pending" else scrub(err, addresses),
                scrub(reply, addresses),
                _outbox_key(key, lowbal, renamed, by_box),
                row_id,
            )
            for row_id, _, err, reply, status, key in rows
        ],
    )
    done["outbox"] = len(rows)

    done["suppressions"] = _hash_suppressions(conn, "suppressions", addresses)
    done["marketing_suppressions"] = _hash_suppressions(conn, "marketing_suppressions", addresses)
    cur = conn.execute("UPDATE consent_records SET evidence = NULL WHERE account = ? AND evidence IS NOT NULL", (code,))
    done["consent_evidence"] = cur.rowcount
    # a consent request's stored answer (replayed for its Idempotency-Key) echoes the same evidence
    cur = conn.execute(
        "UPDATE api_requests SET response = json_replace(response, '$.ip', NULL, '$.how', NULL)"
        " WHERE json_valid(response) AND json_extract(response, '$.account') = ?"
        " AND (json_extract(response, '$.ip') IS NOT NULL OR json_extract(response, '$.how') IS NOT NULL)",
        (code,),
    )
    done["api_requests"] = cur.rowcount
    for table in ("account_dids", "account_mailboxes"):
        conn.execute(f"DELETE FROM {table} WHERE account = ?", (code,))  # noqa: S608 - constant names
    erased = anonymised(account_from_json(head[0]))
    conn.execute("UPDATE accounts SET data = ?, updated_at = ? WHERE code = ?", (account_to_json(erased), now_db, code))
    return done


def _outbox_key(key: str, lowbal: str, renamed: dict[str, str], by_box: dict[str, str]) -> str:
    """An erased account's outbox key: a low-balance warning's under its ref's new name, one
    naming a box under its own."""
    if key.startswith(lowbal):
        return lowbal + renamed.get(key[len(lowbal) :], key[len(lowbal) :])
    return by_box.get(key, key)


def _anonymise_ledger(conn: Any, code: str, rows: list[tuple[int, str]]) -> int:
    """New refs and no free-text reason for the account's rows; the append-only triggers are lifted
    for this statement only, in this transaction, and the account's sum must come out unchanged."""
    if not rows:
        return 0
    triggers = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'ledger' ORDER BY name"
    ).fetchall()
    before = conn.execute("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM ledger WHERE account = ?", (code,)).fetchone()
    for name, _ in triggers:
        conn.execute(f'DROP TRIGGER "{name}"')
    try:
        conn.executemany(
            "UPDATE ledger SET ref = ?, reason = CASE WHEN kind IN ('topup', 'adjustment') THEN NULL ELSE reason END"
            " WHERE id = ? AND account = ?",
            [(ref, row_id, code) for row_id, ref in rows],
        )
    finally:
        for _, sql in triggers:
            conn.execute(sql)
    after = conn.execute("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM ledger WHERE account = ?", (code,)).fetchone()
    if tuple(after) != tuple(before):
        raise RuntimeError(f"{code}: the ledger changed while anonymising it ({tuple(before)} -> {tuple(after)})")
    return len(rows)


def _hash_suppressions(conn: Any, table: str, addresses: Iterable[str]) -> int:
    """Replace each plain address by its digest, merging with a digest row already there."""
    changed = 0
    for address in sorted(addresses):
        plain, hashed = address_forms(address)
        row = conn.execute(f"SELECT reason FROM {table} WHERE address = ?", (plain,)).fetchone()  # noqa: S608
        if row is None:
            continue
        reason = scrub(row[0], [plain])
        if conn.execute(f"SELECT 1 FROM {table} WHERE address = ?", (hashed,)).fetchone() is None:  # noqa: S608
            conn.execute(f"UPDATE {table} SET address = ?, reason = ? WHERE address = ?", (hashed, reason, plain))  # noqa: S608
        elif table == "suppressions":
            conn.execute(
                """UPDATE suppressions SET
                       hard_bounces = hard_bounces + (SELECT hard_bounces FROM suppressions WHERE address = ?1),
                       suppressed_at = COALESCE(suppressed_at,
                                                (SELECT suppressed_at FROM suppressions WHERE address = ?1))
                   WHERE address = ?2""",
                (plain, hashed),
            )
            conn.execute("DELETE FROM suppressions WHERE address = ?", (plain,))
        else:
            conn.execute(f"DELETE FROM {table} WHERE address = ?", (plain,))  # noqa: S608
        changed += 1
    return changed


# ---- retention (the writer, one window per unit of work) ------------------------------------------

# what each step deletes: (table, primary key, the time column compared with the cutoff)
PURGE_STEPS: dict[str, tuple[str, str, str]] = {
    "processed_events": ("processed_events", "key", "processed_at"),
    "cdrs": ("cdrs", "key", "end_at"),
    "rated_calls": ("rated_calls", "key", "answered_at"),
    "api_requests": ("api_requests", "key", "created_at"),
    "erased_numbers": ("erased_numbers", "digest", "erased_at"),
}


def purge_window(conn: Any, step: str, cutoff_db: str, after: str | None, limit: int) -> tuple[int, str | None]:
    """Delete the rows older than ``cutoff_db`` among the next ``limit`` primary keys after ``after``.

    Walking the primary key in windows bounds every unit's work (these tables have no index on
    time), so the writer is never held for long. Returns (deleted, where the next window starts;
    None when this was the last).
    """
    table, pk, column = PURGE_STEPS[step]
    start = "" if after is None else after
    upper = conn.execute(
        f"SELECT {pk} FROM {table} WHERE {pk} > ? ORDER BY {pk} LIMIT 1 OFFSET ?",  # noqa: S608 - constant names
        (start, limit - 1),
    ).fetchone()
    if upper is None:
        cur = conn.execute(f"DELETE FROM {table} WHERE {pk} > ? AND {column} < ?", (start, cutoff_db))  # noqa: S608
        return max(cur.rowcount, 0), None
    cur = conn.execute(
        f"DELETE FROM {table} WHERE {pk} > ? AND {pk} <= ? AND {column} < ?",  # noqa: S608 - constant names
        (start, upper[0], cutoff_db),
    )
    return max(cur.rowcount, 0), str(upper[0])


BODY_WINDOW_BYTES = 4 << 20
"""At most this many bytes of bodies are cleared in one window (a single bigger row goes alone):
with secure_delete every freed byte is overwritten and goes through the WAL, ~60 MB/s measured,
so a window of 2000 voicemail or fax mails could hold the writer for seconds."""


def purge_outbox_bodies_window(
    conn: Any, cutoff_db: str, after: int, limit: int, at_once: frozenset[str], *, now_db: str = ""
) -> tuple[int, int | None]:
    """Clear body and template data of finished rows created before ``cutoff_db`` — and of finished
    rows of the ``at_once`` kinds whatever their age (a dead one is kept for ``outbox retry`` until
    it expires at ``now_db``: a reset link past its expiry has nothing left to retry) — among the
    next ``limit`` row ids after ``after``, stopping early at :data:`BODY_WINDOW_BYTES` of bodies.
    The rows themselves stay (audit trail)."""
    statuses = _marks(FINISHED_STATUSES)
    kinds = sorted(at_once)
    due = (
        f"status IN ({statuses}) AND (message IS NOT NULL OR payload IS NOT NULL)"
        f" AND (created_at < ? OR (kind IN ({_marks(kinds)}) AND (status != 'dead' OR expires_at <= ?)))"
    )
    params = (*FINISHED_STATUSES, cutoff_db, *kinds, now_db)
    rows = conn.execute(
        f"SELECT id, CASE WHEN {due} THEN COALESCE(length(message), 0) + COALESCE(length(payload), 0) ELSE 0 END"  # noqa: S608
        " FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
        (*params, after, limit),
    ).fetchall()
    top, size, full = None, 0, len(rows) == limit
    for row_id, row_bytes in rows:
        if top is not None and size + row_bytes > BODY_WINDOW_BYTES:
            full = True
            break
        top, size = int(row_id), size + int(row_bytes)
    if top is None:
        return 0, None
    cur = conn.execute(
        f"UPDATE outbox SET message = NULL, payload = NULL WHERE id > ? AND id <= ? AND {due}",  # noqa: S608 - marks only
        (after, top, *params),
    )
    return max(cur.rowcount, 0), (top if full else None)


def address_hash_sql(address: str | None) -> str | None:
    """:func:`~clickphone_agi.domain.privacy.address_hash` as an SQL function (``address_hash(x)``)."""
    return None if address is None else address_hash(address)
