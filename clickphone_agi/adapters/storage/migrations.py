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
    Migration(
        3,
        "money: accounts, append-only ledger, daily spend, reservations, threshold state, rated calls",
        (
            # The account's settings as provisioned (JSON of domain.accounts.Account); DIDs and
            # mailboxes are indexed in their own tables for the notices' lookups.
            """CREATE TABLE accounts (
                   code       TEXT PRIMARY KEY,
                   data       TEXT NOT NULL,
                   created_at TEXT NOT NULL,
                   updated_at TEXT NOT NULL
               ) WITHOUT ROWID""",
            "CREATE TABLE account_dids (did TEXT PRIMARY KEY, account TEXT NOT NULL) WITHOUT ROWID",
            "CREATE TABLE account_mailboxes (box TEXT PRIMARY KEY, account TEXT NOT NULL) WITHOUT ROWID",
            # Every money movement, append only; ref is the idempotency key of its cause (a call's
            # CDR key, a top-up's request key), so a replay cannot move money twice.
            """CREATE TABLE ledger (
                   id         INTEGER PRIMARY KEY,
                   account    TEXT NOT NULL,
                   amount     INTEGER NOT NULL,
                   kind       TEXT NOT NULL CHECK (kind IN ('opening','call','topup','adjustment')),
                   ref        TEXT NOT NULL UNIQUE,
                   reason     TEXT,
                   created_at TEXT NOT NULL
               )""",
            "CREATE INDEX ledger_account ON ledger (account, id)",
            """CREATE TRIGGER ledger_append_only_update BEFORE UPDATE ON ledger
               BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""",
            """CREATE TRIGGER ledger_append_only_delete BEFORE DELETE ON ledger
               BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""",
            # The balance cache: always the ledger's sum (checked by `accounts check`).
            "CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL) WITHOUT ROWID",
            """CREATE TABLE daily_spend (
                   account TEXT NOT NULL,
                   day     TEXT NOT NULL,
                   spent   INTEGER NOT NULL,
                   PRIMARY KEY (account, day)
               ) WITHOUT ROWID""",
            # Budget held by calls in progress (FastAGI ALLOW), released by the call's CDR or expiry.
            """CREATE TABLE reservations (
                   call_id    TEXT PRIMARY KEY,
                   account    TEXT NOT NULL,
                   amount     INTEGER NOT NULL,
                   created_at TEXT NOT NULL,
                   expires_at TEXT NOT NULL
               ) WITHOUT ROWID""",
            "CREATE INDEX reservations_account ON reservations (account)",
            """CREATE TABLE notice_state (
                   account TEXT NOT NULL,
                   name    TEXT NOT NULL,
                   value   TEXT NOT NULL,
                   PRIMARY KEY (account, name)
               ) WITHOUT ROWID""",
            """CREATE TABLE rated_calls (
                   key            TEXT PRIMARY KEY,
                   account        TEXT NOT NULL,
                   destination    TEXT NOT NULL,
                   prefix         TEXT NOT NULL,
                   tariff         TEXT NOT NULL,
                   class          TEXT NOT NULL,
                   answered_at    TEXT NOT NULL,
                   day            TEXT NOT NULL,
                   billable       INTEGER NOT NULL,
                   billed_seconds INTEGER NOT NULL,
                   cost           INTEGER NOT NULL
               ) WITHOUT ROWID""",
            "CREATE INDEX rated_calls_answered ON rated_calls (answered_at)",
            # Notifications whose body is rendered by the sender (small notices decided inside a
            # money transaction): the template data travels with the row.
            "ALTER TABLE outbox ADD COLUMN payload TEXT",
        ),
    ),
    Migration(
        4,
        "mail: VERP envelope senders, bounces, suppressions, operator retries",
        (
            # The envelope sender (MAIL FROM) the row was last sent with: bounce+<id>-<mac>@domain.
            "ALTER TABLE outbox ADD COLUMN envelope_from TEXT",
            # When a DSN reported the message undeliverable (status 'bounced').
            "ALTER TABLE outbox ADD COLUMN bounced_at TEXT",
            # When an operator replayed a dead letter (`outbox retry`): its lifetime restarts there.
            "ALTER TABLE outbox ADD COLUMN retried_at TEXT",
            # Recipients (ASCII-lowercased) with hard bounces. The address is suppressed once
            # hard_bounces reaches smtp.hard_bounce_limit (suppressed_at set): nothing is sent to
            # it again, marketing or service. A suppressed row keeps the outbox CHECK constraint
            # (SQLite cannot alter it): status 'dead', last_error 'suppressed: <reason>'.
            """CREATE TABLE suppressions (
                   address       TEXT PRIMARY KEY,
                   reason        TEXT NOT NULL,
                   hard_bounces  INTEGER NOT NULL DEFAULT 0,
                   created_at    TEXT NOT NULL,
                   updated_at    TEXT NOT NULL,
                   suppressed_at TEXT
               ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        5,
        "intake API: idempotency keys with the first response",
        (
            # One row per Idempotency-Key of the HTTP intake API, written in the same transaction
            # as the operation's effects; a repeat with the same body hash gets the stored response.
            """CREATE TABLE api_requests (
                   key        TEXT PRIMARY KEY,
                   body_hash  TEXT NOT NULL,
                   status     INTEGER NOT NULL,
                   response   TEXT NOT NULL,
                   created_at TEXT NOT NULL
               ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        6,
        "consent records, marketing suppressions, the policy archive, broadcasts",
        (
            # Marketing consent as a history: every grant and withdrawal with when, how (api, cli,
            # unsubscribe, import, ami) and under which privacy-policy version. The newest row per
            # account is the current state; accounts.data's marketing_consent mirrors it.
            """CREATE TABLE consent_records (
                   id             INTEGER PRIMARY KEY,
                   account        TEXT NOT NULL,
                   purpose        TEXT NOT NULL DEFAULT 'marketing',
                   granted        INTEGER NOT NULL CHECK (granted IN (0, 1)),
                   recorded_at    TEXT NOT NULL,
                   source         TEXT NOT NULL,
                   policy_version TEXT,
                   evidence       TEXT
               )""",
            "CREATE INDEX consent_records_account ON consent_records (account, id)",
            # Addresses (ASCII-lowercased) that never get marketing, whatever their consent says.
            """CREATE TABLE marketing_suppressions (
                   address    TEXT PRIMARY KEY,
                   reason     TEXT NOT NULL,
                   created_at TEXT NOT NULL
               ) WITHOUT ROWID""",
            # Published privacy-policy versions: immutable, content-hashed (sha256 of text).
            """CREATE TABLE policies (
                   version      TEXT PRIMARY KEY,
                   sha256       TEXT NOT NULL,
                   text         BLOB NOT NULL,
                   summary      TEXT NOT NULL,
                   effective_on TEXT NOT NULL,
                   published_at TEXT NOT NULL
               ) WITHOUT ROWID""",
            """CREATE TRIGGER policies_immutable_update BEFORE UPDATE ON policies
               BEGIN SELECT RAISE(ABORT, 'policy versions are immutable'); END""",
            """CREATE TRIGGER policies_immutable_delete BEFORE DELETE ON policies
               BEGIN SELECT RAISE(ABORT, 'policy versions are immutable'); END""",
            # One row per broadcast (its id is the request's idempotency key).
            """CREATE TABLE broadcasts (
                   id         TEXT PRIMARY KEY,
                   kind       TEXT NOT NULL CHECK (kind IN ('tariff_change', 'offer')),
                   params     TEXT NOT NULL,
                   created_at TEXT NOT NULL,
                   recipients INTEGER NOT NULL DEFAULT 0,
                   skipped    INTEGER NOT NULL DEFAULT 0
               ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        7,
        "the notification audit trail: outbox rows by account",
        (
            # GET /v1/accounts/{code}/notifications pages through one account's rows, newest first;
            # without this index every page scans the whole outbox.
            "CREATE INDEX outbox_account ON outbox (account, id)",
        ),
    ),
    Migration(
        8,
        "bulk mail (broadcasts, policy notices) goes after everything else that is due",
        (
            # 1 for the bulk kinds (notices/kinds.py: tariff_change, policy_changed, offer): the
            # sender reads due rows in (bulk, next_attempt_at) order, so service and security mail
            # never waits behind a broadcast that the rate limit spreads over hours.
            "ALTER TABLE outbox ADD COLUMN bulk INTEGER NOT NULL DEFAULT 0",
            "UPDATE outbox SET bulk = 1 WHERE kind IN ('tariff_change', 'policy_changed', 'offer')",
            "CREATE INDEX outbox_due_bulk ON outbox (status, bulk, next_attempt_at)",
        ),
    ),
    Migration(
        9,
        "a published policy's own key moves out of the clients' Idempotency-Key space",
        (
            # POST /v1/policies recorded its completion as 'policy:<version>', a key a client may
            # send too. Its rows are those whose body_hash is the version's sha256 (a client's row
            # holds the hash of its request); they become 'policy <version>' (services/intake.py
            # internal_key). A client's own 'policy:<version>' row stays as it is.
            """UPDATE api_requests SET key = 'policy ' || substr(key, 8)
               WHERE substr(key, 1, 7) = 'policy:'
                 AND body_hash = (SELECT sha256 FROM policies WHERE version = substr(api_requests.key, 8))""",
        ),
    ),
    Migration(
        10,
        "erased numbers: a leg read again after an erasure is not recorded again",
        (
            # The key of the erased numbers' digests (domain.privacy.number_digest): random, one per
            # database, made here once (SQLite's randomblob draws from its CSPRNG, seeded by the OS).
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('erased_numbers_key', lower(hex(randomblob(32))))",
            # One row per spelling of an erased subscriber's numbers: its keyed digest and when it
            # was erased (a CDR leg without an account code that carries it, from a call started
            # before then, is not recorded). Pseudonymous; kept for that one purpose: not exported,
            # and purged by retention only once nothing from before the erasure is read again
            # (domain.retention.erased_numbers_cutoff; a comment, so later versions may say so).
            """CREATE TABLE erased_numbers (
                   digest    TEXT PRIMARY KEY,
                   erased_at TEXT NOT NULL
               ) WITHOUT ROWID""",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
