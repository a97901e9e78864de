"""Numbered schema migrations. Append only: never edit a migration that has shipped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial: meta with the go-live baseline, processed events, outbox",
        (
            """CREATE TABLE meta (
                   key   TEXT PRIMARY KEY,
                   value TEXT NOT NULL
               ) WITHOUT ROWID""",
            # The go-live baseline: nothing older than this is ever charged or mailed, so the
            # first start does not flood subscribers with old voicemails or re-charge old calls.
            "INSERT INTO meta (key, value) VALUES ('went_live_at', :now)",
            """CREATE TABLE processed_events (
                   key          TEXT PRIMARY KEY,
                   kind         TEXT NOT NULL,
                   processed_at TEXT NOT NULL
               ) WITHOUT ROWID""",
            """CREATE TABLE outbox (
                   id              INTEGER PRIMARY KEY,
                   idempotency_key TEXT NOT NULL UNIQUE,
                   kind            TEXT NOT NULL,
                   recipient       TEXT NOT NULL,
                   account         TEXT,
                   message         BLOB,
                   status          TEXT NOT NULL DEFAULT 'pending'
                                   CHECK (status IN ('pending','sent','dead','expired','bounced')),
                   attempts        INTEGER NOT NULL DEFAULT 0,
                   created_at      TEXT NOT NULL,
                   expires_at      TEXT NOT NULL,
                   next_attempt_at TEXT NOT NULL,
                   last_error      TEXT,
                   smtp_reply      TEXT,
                   sent_at         TEXT
               )""",
            "CREATE INDEX outbox_due ON outbox (status, next_attempt_at)",
        ),
    ),
    Migration(
        2,
        "call records from AMI Cdr events and Master.csv reconciliation",
        (
            # One row per CDR (a Local-channel call has 3-4); the key is the idempotency key
            # shared by the AMI event and its Master.csv twin. Personal data: purged after
            # privacy.cdr_retention_days.
            """CREATE TABLE cdrs (
                   key                 TEXT PRIMARY KEY,
                   system_name         TEXT NOT NULL,
                   account             TEXT NOT NULL,
                   unique_id           TEXT NOT NULL,
                   linked_id           TEXT,
                   sequence            INTEGER,
                   source              TEXT NOT NULL,
                   destination         TEXT NOT NULL,
                   destination_context TEXT NOT NULL,
                   channel             TEXT NOT NULL,
                   destination_channel TEXT NOT NULL,
                   last_application    TEXT NOT NULL,
                   disposition         TEXT NOT NULL,
                   duration            INTEGER NOT NULL,
                   billable_seconds    INTEGER NOT NULL,
                   start_at            TEXT NOT NULL,
                   answer_at           TEXT,
                   end_at              TEXT NOT NULL,
                   origin              TEXT NOT NULL,
                   recorded_at         TEXT NOT NULL
               ) WITHOUT ROWID""",
            "CREATE INDEX cdrs_account_end ON cdrs (account, end_at)",
            "CREATE INDEX cdrs_linked ON cdrs (linked_id)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
