"""Command line: ``main(argv) -> int`` maps every known failure to a distinct exit code.

Exit codes (sysexits.h): 0 ok, 1 unexpected error or a component died, 2 usage,
65 data error (database from a newer release, corrupt backup), 69 daemon unreachable,
75 writer busy (another process holds the database), 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from clickphone_agi import __version__

EX_OK = 0
EX_ERROR = 1
EX_USAGE = 2
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

OUTBOX_STATUSES = ("pending", "sent", "dead", "expired", "bounced")
PURGEABLE_STATUSES = ("sent", "dead", "expired", "bounced")
MAX_DSN_BYTES = 10 * 1024 * 1024
PRIVACY_SCHEMA = 6  # consent_records and marketing_suppressions


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", type=Path, help="main YAML file (default /etc/clickphone-agi/clickphone-agi.yaml)"
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set logging.level=debug (highest layer)",
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = argparse.ArgumentParser(prog="clickphone-agi", description="ClickPhone's Asterisk companion daemon.")
    parser.add_argument("--version", action="version", version=f"clickphone-agi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon (what systemd starts)")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    st = sub.add_parser("status", parents=[common], help="health and key figures of the running daemon")
    st.add_argument("--json", action="store_true", help="the whole status reply as JSON")
    mt = sub.add_parser("mail-test", parents=[common], help="queue a test e-mail to ADDRESS")
    mt.add_argument("address")
    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("migrate", parents=[common], help="create or upgrade the schema")
    dbsub.add_parser("info", parents=[common], help="schema version, size, counts")
    b = dbsub.add_parser("backup", parents=[common], help="online, consistent copy to FILE")
    b.add_argument("file", type=Path)
    r = dbsub.add_parser("restore", parents=[common], help="replace the database with FILE (daemon stopped)")
    r.add_argument("file", type=Path)
    dbsub.add_parser(
        "vacuum", parents=[common], help="give back the space purged rows left (daemon stopped; ~2x the data free)"
    )
    _add_money_parsers(sub, common)
    _add_intake_parsers(sub, common)
    _add_privacy_parsers(sub, common)
    demo = sub.add_parser("demo", help="run the built-in demo on loopback")
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="where e-mails, database and report go")
    demo.add_argument("--debug", action="store_true")
    return parser


def _mail_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """``outbox list|show|retry|purge`` and ``bounce`` (part of :func:`_parser`)."""
    box = sub.add_parser("outbox", help="inspect and replay the mail outbox")
    boxsub = box.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    blist = boxsub.add_parser("list", parents=[common], help="newest rows first")
    blist.add_argument("--status", choices=OUTBOX_STATUSES)
    blist.add_argument("--kind", help="e.g. voicemail, low_balance, mail_test")
    blist.add_argument("--limit", type=int, default=50)
    bshow = boxsub.add_parser("show", parents=[common], help="one row: headers, last error, SMTP reply, attempts")
    bshow.add_argument("id", type=int)
    bshow.add_argument("--body", action="store_true", help="include the whole MIME message")
    bretry = boxsub.add_parser("retry", parents=[common], help="dead letters back to pending, due now")
    bretry.add_argument("ids", type=int, nargs="*", metavar="ID")
    bretry.add_argument("--all-dead", action="store_true", help="every dead letter (suppressed/expired skipped)")
    bpurge = boxsub.add_parser("purge", parents=[common], help="delete finished rows past retention, never pending")
    bpurge.add_argument("--older-than", type=float, metavar="DAYS", help="default: privacy.outbox_body_retention_days")
    bpurge.add_argument(
        "--status", action="append", choices=PURGEABLE_STATUSES, help="repeatable (default: all finished ones)"
    )
    bpurge.add_argument("--bodies-only", action="store_true", help="clear the bodies, keep the rows as an audit trail")
    bounce = sub.add_parser(
        "bounce", parents=[common], help="record a delivery-status report (DSN) read on stdin (MTA pipe transport)"
    )
    bounce.add_argument("--recipient", help="the envelope recipient the MTA delivered it to (Postfix ${recipient})")


def _add_money_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """accounts, export, tariffs and preview: the verbs of the Money and Email features."""
    acc = sub.add_parser("accounts", help="provision and inspect accounts")
    accsub = acc.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    imp = accsub.add_parser("import", parents=[common], help="upsert accounts from a YAML or CSV file")
    imp.add_argument("file", type=Path)
    shw = accsub.add_parser("show", parents=[common], help="one account: settings, balance, today, ledger")
    shw.add_argument("code")
    accsub.add_parser("list", parents=[common], help="every account with its balance")
    accsub.add_parser("check", parents=[common], help="verify every cached balance equals its ledger sum")
    adj = accsub.add_parser("adjust", parents=[common], help="manual ledger adjustment (e.g. 12.50 or -3,00)")
    adj.add_argument("code")
    adj.add_argument("amount", type=_adjust_amount_arg, help="lei, e.g. 12.50 or 12,50; a negative one after --")
    adj.add_argument("--reason", required=True, type=_reason_arg, help="why (kept in the ledger row)")
    adj.add_argument(
        "--key", type=_key_arg, help="idempotency key: a repeat with the same key books nothing (default: a new one)"
    )
    exp = sub.add_parser("export", help="export data for the billing system")
    expsub = exp.add_subparsers(dest="export_command", required=True, metavar="WHAT")
    calls = expsub.add_parser("calls", parents=[common], help="rated calls as CSV (amounts in bani)")
    calls.add_argument(
        "--from",
        dest="start",
        required=True,
        help="local date (midnight in billing.timezone) or ISO datetime, inclusive",
    )
    calls.add_argument(
        "--to", dest="end", required=True, help="the same, exclusive: a month is --from 2026-11-01 --to 2026-12-01"
    )
    calls.add_argument("--out", type=Path, help="file to write (default: stdout)")
    tar = sub.add_parser("tariffs", help="check the tariff file, rate a number")
    tarsub = tar.add_subparsers(dest="tariffs_command", required=True, metavar="ACTION")
    tchk = tarsub.add_parser("check", parents=[common], help="validate; report overlapping or shadowed prefixes")
    tchk.add_argument("file", type=Path, nargs="?", help="default: billing.tariffs_file")
    trate = tarsub.add_parser("rate", parents=[common], help="normalised number, prefix, billed seconds, cost")
    trate.add_argument("number")
    trate.add_argument("seconds", type=_seconds_arg, help="billable seconds, 0 or more")
    trate.add_argument("--at", help="ISO datetime of the answer (default: now)")
    _mail_parsers(sub, common)
    prev = sub.add_parser("preview", parents=[common], help="render a sample notification (.eml or .html)")
    prev.add_argument("kind", help="e.g. voicemail, missed_call, daily_limit; 'list' shows them all")
    prev.add_argument("--lang", choices=["ro", "en"], default="ro")
    prev.add_argument("--out", type=Path, help="FILE.eml (whole message) or FILE.html (HTML part); default: stdout")


def _adjust_amount_arg(text: str) -> int:
    """``accounts adjust`` AMOUNT: exact bani, not 0 (a usage error otherwise)."""
    from clickphone_agi.domain.accounts import parse_amount

    try:
        bani = parse_amount(text, allow_negative=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if bani == 0:
        raise argparse.ArgumentTypeError("must not be 0")
    return bani


def _seconds_arg(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"expected whole seconds, 0 or more, got {text!r}")
    return int(text)


def _key_arg(text: str) -> str:
    if not text.strip() or len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError("expected 1-200 printable characters")
    return text


def _reason_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("required: say why the balance moves")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help/--version
        return int(exc.code or 0)
    debug = bool(getattr(args, "debug", False))
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _cmd_run,
        "check-config": _cmd_check_config,
        "status": _cmd_status,
        "mail-test": _cmd_mail_test,
        "db": _cmd_db,
        "demo": _cmd_demo,
        "accounts": _cmd_accounts,
        "export": _cmd_export,
        "tariffs": _cmd_tariffs,
        "preview": _cmd_preview,
        "outbox": _cmd_outbox,
        "bounce": _cmd_bounce,
        "event": _cmd_event,
        "policy": _cmd_policy,
        "consent": _cmd_consent,
        "broadcast": _cmd_broadcast,
        "privacy": _cmd_privacy,
    }
    if args.command not in ("run", "demo"):
        # CLI verbs print their result on stdout; their own logs go to stderr, masked
        from clickphone_agi.adapters.logging import configure_logging

        configure_logging(level="debug" if debug else "warning", fmt="console", stream=sys.stderr)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _report(exc, debug)


def _report(exc: BaseException, debug: bool) -> int:
    """One clear line per problem on stderr and the exit code of the first matching type."""
    from clickphone_agi.adapters.accounts_file import AccountsFileError
    from clickphone_agi.adapters.control import CommandError, ControlUnavailable
    from clickphone_agi.adapters.storage.sqlite import SchemaTooNew, StorageError, WriterBusy
    from clickphone_agi.adapters.tariff_file import TariffFileError
    from clickphone_agi.config.loader import ConfigError
    from clickphone_agi.ports import StorageUnavailable
    from clickphone_agi.services.accounts import UnknownAccount

    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    # (type, exit code, prefix); order matters: subclasses before their bases
    table: list[tuple[type[BaseException], int, str]] = [
        (TariffFileError, EX_CONFIG, ""),
        (AccountsFileError, EX_DATAERR, ""),
        (ConfigError, EX_CONFIG, "config error: "),
        (SchemaTooNew, EX_DATAERR, ""),
        (WriterBusy, EX_TEMPFAIL, ""),
        (StorageUnavailable, EX_TEMPFAIL, "the database takes no writes now (disk full?): "),
        (StorageError, EX_DATAERR, ""),
        (CommandError, EX_ERROR, ""),
        (UnknownAccount, EX_DATAERR, ""),
    ]
    if isinstance(exc, ControlUnavailable):
        print(f"clickphone-agi: the daemon is not running (no control socket at {exc})", file=sys.stderr)
        return EX_UNAVAILABLE
    for kind, code, prefix in table:
        if isinstance(exc, kind):
            for problem in getattr(exc, "problems", None) or [str(exc)]:
                print(f"clickphone-agi: {prefix}{problem}", file=sys.stderr)
            return code
    print(f"clickphone-agi: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    if not debug:
        print("clickphone-agi: run again with --debug for the traceback", file=sys.stderr)
    return EX_ERROR


def _load(args: argparse.Namespace, *, require_secrets: bool = True) -> Any:
    from clickphone_agi.config.loader import load_config

    return load_config(args.config, overrides=tuple(args.overrides), require_secrets=require_secrets)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _cmd_run(args: argparse.Namespace) -> int:
    from clickphone_agi.app import Daemon, configure_from

    loaded = _load(args)
    configure_from(loaded.config)
    daemon = Daemon(loaded, config_path=args.config, overrides=tuple(args.overrides), freeze_heap=True)
    return run_loop(daemon.run(), loaded.config.daemon.event_loop)


def run_loop(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    """Run the daemon on uvloop (libuv) when configured and installed, else on asyncio's loop."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # a platform without it (the dependency is skipped on Windows)
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _cmd_check_config(args: argparse.Namespace) -> int:
    loaded = _load(args, require_secrets=False)
    if loaded.config.billing.tariffs_file is not None:
        from clickphone_agi.app import tariff_table

        tariff_table(loaded.config.billing)  # as the daemon reads it, in the configured numbering plan
    print(f"clickphone-agi: configuration OK ({', '.join(loaded.files)})")
    for note in loaded.notes:
        print(f"clickphone-agi: note: {note}")
    return EX_OK


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 when not (AMI down, database not writable), 69 when no daemon runs."""
    from clickphone_agi.adapters import control
    from clickphone_agi.status_view import format_status

    loaded = _load(args, require_secrets=False)
    status = control.call(loaded.config.daemon.control_socket, "status")
    if args.json:
        _print(status)
    else:
        print(format_status(status))
    return EX_OK if (status.get("health") or {}).get("ok") else EX_ERROR


def _as_writer(
    args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any], local: Callable[[Any], Any], loaded: Any = None
) -> Any:
    """Run a writing verb through the daemon if it runs, else as the writer under the lock
    (``loaded``: the configuration, when the verb has read it already)."""
    from clickphone_agi.adapters import control
    from clickphone_agi.adapters.storage.sqlite import WriterLock

    loaded = loaded or _load(args, require_secrets=False)
    try:
        return control.call(loaded.config.daemon.control_socket, cmd, cmd_args)
    except control.ControlUnavailable:
        pass
    with WriterLock(loaded.config.database.path):
        return asyncio.run(local(loaded))


def _cmd_mail_test(args: argparse.Namespace) -> int:
    from clickphone_agi.adapters.storage.sqlite import SqliteStore
    from clickphone_agi.app import enqueue_test_mail
    from clickphone_agi.clock import SystemClock

    async def local(loaded: Any) -> dict[str, Any]:
        clock = SystemClock()
        store = await SqliteStore.open(
            loaded.config.database.path, clock, busy_timeout=loaded.config.database.busy_timeout
        )
        store.start()
        try:
            key = await enqueue_test_mail(store, clock, loaded.config.smtp, args.address)
        finally:
            await store.close()
        return {"queued": key, "by": "cli (daemon not running: the mail stays pending until it starts)"}

    _print(_as_writer(args, "mail-test", {"to": args.address}, local))
    return EX_OK


def _cmd_db(args: argparse.Namespace) -> int:
    from clickphone_agi.adapters.storage import sqlite as db
    from clickphone_agi.clock import SystemClock

    if args.db_command == "migrate":

        async def local(loaded: Any) -> dict[str, Any]:
            path = loaded.config.database.path
            conn = db.connect_sync(path, loaded.config.database.busy_timeout)
            try:
                applied = db.migrate(conn, SystemClock().now(), path)
                return {"path": str(path), "applied": applied, "schema_version": db.schema_version(conn), "by": "cli"}
            finally:
                conn.close()

        _print(_as_writer(args, "db.migrate", {}, local))
        return EX_OK
    loaded = _load(args, require_secrets=False)
    dbc = loaded.config.database
    if args.db_command == "info":
        _print(db.info(dbc.path, dbc.busy_timeout))
    elif args.db_command == "backup":
        _print(db.backup(dbc.path, args.file, dbc.busy_timeout))
    elif args.db_command == "restore":
        with db.WriterLock(dbc.path):
            _print(db.restore(args.file, dbc.path, dbc.busy_timeout))
    elif args.db_command == "vacuum":
        with db.WriterLock(dbc.path):
            _print(db.vacuum(dbc.path, dbc.busy_timeout))
    return EX_OK


async def _local_unit(loaded: Any, unit: Any) -> Any:
    """Run one unit of work as the writer (the caller holds the writer lock)."""
    from clickphone_agi.adapters.storage.sqlite import SqliteStore
    from clickphone_agi.clock import SystemClock

    store = await SqliteStore.open(
        loaded.config.database.path, SystemClock(), busy_timeout=loaded.config.database.busy_timeout
    )
    store.start()
    try:
        return await store.write(unit)
    finally:
        await store.close()


def _cmd_accounts(args: argparse.Namespace) -> int:
    from clickphone_agi.adapters.storage import reports
    from clickphone_agi.adapters.storage.codec import account_to_json
    from clickphone_agi.domain.thresholds import local_day
    from clickphone_agi.services.accounts import ImportRefused, adjust_unit, import_unit

    action = args.accounts_command
    if action == "import":
        from clickphone_agi.adapters.accounts_file import AccountsFileError, load_accounts

        loaded = _load(args, require_secrets=False)
        items = load_accounts(args.file, loaded.config.notifications.default_language)
        pairs = [(i.account, i.opening_balance) for i in items]
        # where each row was written, for a clash with a stored account (every row is valid here,
        # so the n-th item is the file's accounts[n])
        yaml_file = args.file.suffix.lower() in {".yaml", ".yml"}
        wheres = [f"{args.file}:{i.line}: " + (f"accounts[{n}]." if yaml_file else "") for n, i in enumerate(items)]
        items_payload: dict[str, Any] = {
            "items": [
                {"account": account_to_json(a), "opening": o, "where": w}
                for (a, o), w in zip(pairs, wheres, strict=True)
            ]
        }

        async def local(loaded: Any) -> Any:
            try:
                return await _local_unit(loaded, import_unit(pairs, wheres))
            except ImportRefused as exc:
                return {"refused": [str(exc)]}

        result = _as_writer(args, "accounts.import", items_payload, local, loaded)
        if isinstance(result, dict) and result.get("refused"):
            raise AccountsFileError([str(problem) for problem in result["refused"]])
        _print(result)
        return EX_OK
    if action == "adjust":
        import uuid

        amount = args.amount  # bani, parsed by _adjust_amount_arg
        # the same --key gives the same ledger ref: a repeat (after a timeout, say) books nothing
        ref = f"adjust:{args.key or uuid.uuid4().hex}"
        payload: dict[str, Any] = {"code": args.code, "amount": amount, "reason": args.reason, "ref": ref}
        unit = adjust_unit(args.code, amount, args.reason, ref)
        _print(_as_writer(args, "accounts.adjust", payload, lambda loaded: _local_unit(loaded, unit)))
        return EX_OK
    loaded = _load(args, require_secrets=False)
    path = loaded.config.database.path
    if action == "list":
        _print(reports.list_accounts(path))
    elif action == "check":
        wrong = reports.check_balances(path)
        _print({"mismatches": wrong})
        return EX_OK if not wrong else EX_DATAERR
    else:
        from datetime import UTC, datetime
        from zoneinfo import ZoneInfo

        now = datetime.now(UTC)
        day = local_day(now, ZoneInfo(loaded.config.billing.timezone)).isoformat()
        shown = reports.show_account(path, args.code, now, day)
        if shown is None:
            print(f"clickphone-agi: no account {args.code!r}", file=sys.stderr)
            return EX_DATAERR
        _print(shown)
    return EX_OK


def _parse_when(text: str, zone: Any) -> Any:
    from datetime import UTC, date, datetime, time

    try:
        day = date.fromisoformat(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo:
            return moment
        local = moment.replace(tzinfo=zone)
        if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != moment:
            # skipped by the clocks going forward (03:30 on the last Sunday of March): as the tariff file
            raise ValueError(f"{text} does not exist in {zone} (the clocks skip it)") from None
        return local
    return datetime.combine(day, time(0), tzinfo=zone)


def _cmd_export(args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo

    from clickphone_agi.adapters.storage import reports

    loaded = _load(args, require_secrets=False)
    zone = ZoneInfo(loaded.config.billing.timezone)
    bounds = []
    for flag, value in (("--from", args.start), ("--to", args.end)):
        try:
            bounds.append(_parse_when(value, zone))
        except ValueError:
            print(
                f"clickphone-agi: {flag}: expected a date (2026-11-01) or an ISO date and time, got {value!r}",
                file=sys.stderr,
            )
            return EX_USAGE
    start, end = bounds
    if end <= start:
        # swapped bounds would give an empty export, which reads as a period without calls
        print(
            f"clickphone-agi: --to must be after --from (calls answered in [from, to)), got {args.start} .. {args.end}",
            file=sys.stderr,
        )
        return EX_USAGE
    text = reports.export_calls(loaded.config.database.path, start, end)
    if args.out:
        import os

        # every number each subscriber called (traffic data): owner only, also for an old file
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
        print(f"clickphone-agi: {text.count(chr(10)) - 1} calls written to {args.out}")
    else:
        sys.stdout.write(text)
    return EX_OK


def _cmd_tariffs(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from clickphone_agi.app import tariff_table
    from clickphone_agi.config.loader import ConfigError
    from clickphone_agi.domain.money import format_ron
    from clickphone_agi.domain.numbers import InvalidNumber, is_emergency, normalise
    from clickphone_agi.domain.rating import billed_seconds, cost
    from clickphone_agi.domain.tariffs import check

    loaded = _load(args, require_secrets=False)
    billing = loaded.config.billing
    zone = ZoneInfo(billing.timezone)
    path = getattr(args, "file", None) or billing.tariffs_file
    if path is None:
        raise ConfigError([f"{loaded.main_file}: billing.tariffs_file: not set (and no FILE given)"])
    table = tariff_table(billing, path)
    if args.tariffs_command == "check":
        problems = check(table)
        for problem in problems:
            print(f"clickphone-agi: {path}: {problem}")
        print(f"clickphone-agi: {len(table.entries)} tariff entries, {len(problems)} problems")
        return EX_OK if not problems else EX_DATAERR
    plan = {
        "country_code": billing.country_code,
        "national_prefix": billing.national_prefix,
        "international_prefix": billing.international_prefix,
    }
    try:
        at = _parse_when(args.at, zone) if args.at else datetime.now(UTC)
    except ValueError as exc:
        print(f"clickphone-agi: --at: expected an ISO date and time such as 2026-11-28T14:00, {exc}", file=sys.stderr)
        return EX_USAGE
    if is_emergency(args.number, billing.emergency_numbers, **plan):  # as authorize and charging do
        decision = "emergency number: always allowed, never charged (not rated)"
        _print({"number": args.number, "emergency": True, "decision": decision, "cost_bani": 0})
        return EX_OK
    result: dict[str, Any] = {"number": args.number, "normalised": None, "at": at.isoformat()}
    try:
        number = normalise(args.number, **plan)
    except InvalidNumber as exc:
        result.update(tariff=None, decision=f"denied: {exc}")
        _print(result)
        return EX_DATAERR
    result["normalised"] = number
    entry = table.match(number, at)
    if entry is None:
        result["tariff"] = None
        result["decision"] = "no tariff: calls to this number are denied"
        _print(result)
        return EX_DATAERR
    billed = billed_seconds(entry, args.seconds)
    amount = cost(entry, args.seconds)
    result.update(
        prefix=entry.prefix,
        tariff=entry.name,
        destination_class=entry.destination_class,
        rate_per_minute=str(entry.rate_per_minute),
        seconds=args.seconds,
        billed_seconds=billed,
        cost_bani=amount,
        cost=format_ron(amount, "ro"),
    )
    _print(result)
    return EX_OK


async def _with_store(loaded: Any, use: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Open the store as the writer (the caller holds the writer lock), run ``use(store, clock)``."""
    from clickphone_agi.adapters.storage.sqlite import SqliteStore
    from clickphone_agi.clock import SystemClock

    clock = SystemClock()
    store = await SqliteStore.open(loaded.config.database.path, clock, busy_timeout=loaded.config.database.busy_timeout)
    store.start()
    try:
        return await use(store, clock)
    finally:
        await store.close()


def _cmd_outbox(args: argparse.Namespace) -> int:
    from clickphone_agi.adapters.smtp import purge_command, retry_command
    from clickphone_agi.adapters.storage import sqlite as db

    action = args.outbox_command
    if action == "retry":
        if bool(args.ids) == bool(args.all_dead):
            print("clickphone-agi: outbox retry: give row IDs or --all-dead (not both)", file=sys.stderr)
            return EX_USAGE
        retry: dict[str, Any] = {"all_dead": True} if args.all_dead else {"ids": args.ids}
        local = partial(_with_store, use=lambda store, _clock: retry_command(store, retry))
        _print(_as_writer(args, "outbox.retry", retry, local))
        return EX_OK
    loaded = _load(args, require_secrets=False)
    dbc = loaded.config.database
    if action == "purge":
        days = loaded.config.privacy.outbox_body_retention_days if args.older_than is None else args.older_than
        purge: dict[str, Any] = {
            "older_than_days": days,
            "statuses": sorted(set(args.status or PURGEABLE_STATUSES)),
            "keep_rows": args.bodies_only,
        }
        local = partial(_with_store, use=lambda store, clock: purge_command(store, clock, purge))
        _print(_as_writer(args, "outbox.purge", purge, local))
        return EX_OK
    if action == "list":
        listed = db.outbox_list(
            dbc.path, status=args.status, kind=args.kind, limit=args.limit, busy_timeout=dbc.busy_timeout
        )
        _print(listed)
        return EX_OK
    shown = db.outbox_show(dbc.path, args.id, body=args.body, busy_timeout=dbc.busy_timeout)
    if shown is None:
        print(f"clickphone-agi: no outbox row {args.id}", file=sys.stderr)
        return EX_DATAERR
    _print(shown)
    return EX_OK


def _cmd_bounce(args: argparse.Namespace) -> int:
    """An MTA pipe transport's command: exit 0 unless the database is busy or unreachable (75: retry).

    Junk (not a DSN, no VERP token, forged token) is logged and acknowledged with 0 so the MTA
    does not retry it forever. The DSN is parsed here; only the facts go to the writer.
    """
    import sqlite3

    import structlog

    from clickphone_agi.adapters import control
    from clickphone_agi.adapters.smtp import bounce_command
    from clickphone_agi.adapters.storage.sqlite import SchemaTooNew, StorageError, WriterBusy
    from clickphone_agi.config.loader import ConfigError
    from clickphone_agi.domain.bounce import NotADsn, parse_dsn

    log = structlog.get_logger("clickphone_agi.bounce")
    stdin = sys.stdin.buffer
    raw = stdin.read(MAX_DSN_BYTES + 1)
    truncated = len(raw) > MAX_DSN_BYTES
    if truncated:
        raw = raw[:MAX_DSN_BYTES]
        while stdin.read(1 << 20):  # the MTA expects its pipe read to the end
            pass
    try:
        report = parse_dsn(raw, envelope_recipient=args.recipient)
        if not report.tokens:
            raise NotADsn("no VERP token in the envelope recipient or the DSN's headers")
    except NotADsn as exc:
        outcome = {"outcome": "ignored", "reason": str(exc), "bytes": len(raw), "truncated": truncated}
        log.warning("bounce.ignored", **outcome)
        # into the daemon's journal too when it runs: an MTA discards a pipe command's output on exit 0
        with contextlib.suppress(control.ControlUnavailable, control.CommandError, ConfigError, OSError):
            socket_path = _load(args, require_secrets=False).config.daemon.control_socket
            control.call(socket_path, "bounce", {"ignored": outcome}, timeout=5)
        _print(outcome)
        return EX_OK
    payload = {"report": report.to_json()}

    def local(loaded: Any) -> Awaitable[Any]:
        return _with_store(loaded, lambda store, _clock: bounce_command(store, loaded.config.smtp, payload))

    try:
        result = _as_writer(args, "bounce", payload, local)
    except SchemaTooNew:
        raise
    except (WriterBusy, StorageError, sqlite3.Error, control.CommandError, OSError) as exc:
        log.error("bounce.deferred", error=str(exc), exit_code=EX_TEMPFAIL)
        print(f"clickphone-agi: bounce not recorded, the MTA should retry: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    _print(result)
    return EX_OK


def _cmd_preview(args: argparse.Namespace) -> int:
    from clickphone_agi.notices.kinds import KINDS
    from clickphone_agi.notices.render import Renderer, preview

    if args.kind == "list":
        for name, spec in sorted(KINDS.items()):
            print(f"{name:20} {spec.category:10} opt-out: {'yes' if spec.opt_out else 'no'}")
        return EX_OK
    if args.kind not in KINDS:
        print(f"clickphone-agi: unknown kind {args.kind!r}; 'clickphone-agi preview list' shows them", file=sys.stderr)
        return EX_USAGE
    loaded = _load(args, require_secrets=False)
    raw = preview(args.kind, args.lang, renderer=Renderer(loaded.config.notifications.templates_dir))
    out: Path | None = args.out
    if out is not None and out.suffix == ".html":
        import email
        import email.policy

        msg = email.message_from_bytes(raw, policy=email.policy.default)
        part = msg.get_body(("html",))
        out.write_text(part.get_content() if part is not None else "", encoding="utf-8")
    elif out is not None:
        out.write_bytes(raw)
    else:
        sys.stdout.write(raw.decode("utf-8", "replace"))
    if out is not None:
        print(f"clickphone-agi: {args.kind} ({args.lang}) written to {out}")
    return EX_OK


def _add_privacy_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """``privacy export|erase``: the data-rights verbs (part of :func:`_parser`)."""
    pr = sub.add_parser("privacy", help="data rights: export or erase what is held about an account")
    prsub = pr.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    exp = prsub.add_parser("export", parents=[common], help="everything held about an account, as JSON")
    exp.add_argument("code")
    exp.add_argument("--out", type=Path, help="file to write, mode 0600 (default: stdout)")
    era = prsub.add_parser("erase", parents=[common], help="anonymise an account; its money totals stay")
    era.add_argument("code")
    era.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _cmd_privacy(args: argparse.Namespace) -> int:
    from clickphone_agi.adapters import control
    from clickphone_agi.app import numbering
    from clickphone_agi.services import privacy

    code: str = args.code
    try:
        if args.privacy_command == "export":
            return _privacy_export(args, code)
        if not args.yes:
            if not sys.stdin.isatty():
                print("clickphone-agi: privacy erase: add --yes to confirm (no terminal to ask on)", file=sys.stderr)
                return EX_USAGE
            answer = input(f"Erase the personal data of account {code}? This cannot be undone. Type the code: ")
            if answer.strip() != code:
                print("clickphone-agi: not confirmed; nothing erased", file=sys.stderr)
                return EX_USAGE

        def local(loaded: Any) -> Awaitable[Any]:
            return _with_store(
                loaded, lambda store, _clock: privacy.erase_account(store, code, numbering(loaded.config))
            )

        _print(_as_writer(args, "privacy.erase", {"code": code}, local))
        return EX_OK
    except (privacy.UnknownAccount, control.CommandError) as exc:
        if not str(exc).startswith("no account"):
            raise
        print(f"clickphone-agi: {exc}", file=sys.stderr)
        return EX_DATAERR


def _privacy_export(args: argparse.Namespace, code: str) -> int:
    """Through the daemon when it runs, else straight from the database (an export only reads)."""
    import os
    from datetime import UTC, datetime

    from clickphone_agi.adapters import control
    from clickphone_agi.adapters.storage import privacy as privacy_sql
    from clickphone_agi.adapters.storage import sqlite as db
    from clickphone_agi.app import numbering
    from clickphone_agi.services.privacy import UnknownAccount, forms_for

    loaded = _load(args, require_secrets=False)
    dbc = loaded.config.database
    try:
        result = control.call(loaded.config.daemon.control_socket, "privacy.export", {"code": code}, timeout=300)
    except control.ControlUnavailable:
        with contextlib.closing(db.outbox_reader(dbc.path, dbc.busy_timeout, minimum=PRIVACY_SCHEMA)) as conn:
            found = privacy_sql.export_account(conn, code, forms_for(numbering(loaded.config)))
        if found is None:
            raise UnknownAccount(f"no account {code!r}") from None
        result = {"generated_at": datetime.now(UTC).isoformat(), **found}
    text = json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return EX_OK
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data: owner only
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    cdrs, mails = len(result["cdrs"]), len(result["outbox"])
    print(f"clickphone-agi: export of {code} written to {args.out} ({cdrs} CDRs, {mails} mails)")
    return EX_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from clickphone_agi.sim.demo import run_demo

    return asyncio.run(run_demo(args.output))


# ---- the intake verbs: the HTTP API's operations from shell scripts, through the daemon -----------


def _add_intake_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """event, policy, consent and broadcast: the same service layer as the HTTP intake API."""
    ev = sub.add_parser("event", parents=[common], help="report a subscriber event (mails its notice)")
    ev.add_argument("code")
    ev.add_argument("type", help="password_changed, password_recovery, pin_created, topup, payment_confirmed, ...")
    ev.add_argument("--data", default="{}", help="JSON object, or @FILE holding one")
    ev.add_argument("--key", required=True, help="idempotency key: a repeat with the same key does nothing")
    pol = sub.add_parser("policy", help="the privacy-policy archive")
    polsub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    pub = polsub.add_parser("publish", parents=[common], help="archive FILE as a version and mail every account")
    pub.add_argument("file", type=Path)
    pub.add_argument("--version", dest="policy_version", required=True)
    pub.add_argument("--effective", required=True, help="ISO date the version takes effect")
    pub.add_argument("--summary", required=True, help="what changed, for the mail (or @FILE)")
    polsub.add_parser("list", parents=[common], help="every archived version with its sha256")
    show = polsub.add_parser("show", parents=[common], help="one version (--raw: the text only, byte for byte)")
    show.add_argument("policy_version", metavar="VERSION")
    show.add_argument("--raw", action="store_true")
    con = sub.add_parser("consent", parents=[common], help="grant or withdraw an account's marketing consent")
    con.add_argument("code")
    con.add_argument("action", choices=["grant", "withdraw"])
    con.add_argument("--policy-version", help="the policy version consented under (default: the one in force)")
    con.add_argument("--how", help="how it was given or withdrawn, e.g. 'phone call to support, ticket 123'")
    con.add_argument("--key", help="idempotency key (default: a new one)")
    bc = sub.add_parser("broadcast", help="queue a tariff change or an offer")
    bcsub = bc.add_subparsers(dest="broadcast_kind", required=True, metavar="KIND")
    tc = bcsub.add_parser("tariff-change", parents=[common], help="service notice, every selected account")
    tc.add_argument("--tariff", required=True)
    tc.add_argument("--effective", required=True, help="ISO date, at least one month ahead")
    tc.add_argument("--changes", required=True, help="what changes (or @FILE)")
    of = bcsub.add_parser("offer", parents=[common], help="marketing: consenting, unsuppressed accounts only")
    of.add_argument("--title", required=True)
    of.add_argument("--body", required=True, help="the offer's text (or @FILE)")
    of.add_argument("--valid-until", required=True, help="ISO date")
    for p in (tc, of):
        p.add_argument("--id", required=True, help="the broadcast id (its idempotency key)")
        p.add_argument("--url", required=True, help="https link with the details")
        p.add_argument("--account", action="append", help="only this account (repeatable; default: all)")
        p.add_argument("--billing", choices=["prepaid", "postpaid"])


def _text_arg(value: str) -> str:
    """A value given inline, or ``@FILE`` for the file's UTF-8 text."""
    return Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value


def _intake_call(args: argparse.Namespace, cmd: str, payload: dict[str, Any]) -> int:
    """Send one intake request to the daemon; print the body, exit 0 (2xx), 65 (refused), 75 (busy)."""
    from clickphone_agi.adapters import control

    loaded = _load(args, require_secrets=False)
    answer = control.call(loaded.config.daemon.control_socket, cmd, payload, timeout=600)
    status, body = int(answer["status"]), answer["body"]
    if status < 300:
        if getattr(args, "raw", False):
            sys.stdout.write(body["text"])
        else:
            _print(body)
        return EX_OK
    where = f"{body.get('field')}: " if body.get("field") else ""
    print(f"clickphone-agi: {where}{body.get('error')} ({status})", file=sys.stderr)
    return EX_TEMPFAIL if status == 503 else EX_DATAERR


def _cmd_event(args: argparse.Namespace) -> int:
    try:
        data = json.loads(_text_arg(args.data))
    except (OSError, ValueError) as exc:
        print(f"clickphone-agi: --data: not a JSON object: {exc}", file=sys.stderr)
        return EX_USAGE
    body = {"type": args.type, "data": data}
    return _intake_call(args, "intake.event", {"code": args.code, "key": args.key, "body": body})


def _cmd_policy(args: argparse.Namespace) -> int:
    if args.policy_command == "list":
        return _intake_call(args, "intake.policy.list", {})
    if args.policy_command == "show":
        return _intake_call(args, "intake.policy.show", {"version": args.policy_version})
    try:
        text = args.file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"clickphone-agi: {args.file}: cannot read the policy as UTF-8 text: {exc}", file=sys.stderr)
        return EX_DATAERR
    body = {
        "version": args.policy_version,
        "text": text,
        "effective_on": args.effective,
        "summary": _text_arg(args.summary),
    }
    return _intake_call(args, "intake.policy.publish", {"body": body})


def _cmd_consent(args: argparse.Namespace) -> int:
    import uuid

    body: dict[str, Any] = {"marketing": args.action == "grant"}
    if args.how:
        body["how"] = args.how
    if args.policy_version:
        body["policy_version"] = args.policy_version
    key = args.key or f"cli-consent:{uuid.uuid4().hex}"
    return _intake_call(args, "intake.consent", {"code": args.code, "key": key, "body": body})


def _cmd_broadcast(args: argparse.Namespace) -> int:
    body: dict[str, Any]
    if args.broadcast_kind == "tariff-change":
        body = {"kind": "tariff_change", "tariff": args.tariff, "effective": args.effective}
        body["changes"] = _text_arg(args.changes)
    else:
        body = {"kind": "offer", "title": args.title, "body": _text_arg(args.body), "valid_until": args.valid_until}
    body["url"] = args.url
    if args.account:
        body["accounts"] = args.account
    if args.billing:
        body["billing"] = args.billing
    return _intake_call(args, "intake.broadcast", {"key": args.id, "body": body})


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
