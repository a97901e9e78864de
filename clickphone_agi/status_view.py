"""``clickphone-agi status`` for a human: the daemon's status reply as a dozen aligned lines.

``--json`` prints the reply itself; this view picks what an operator checks first: health (the
same figures as ``/healthz``), the AMI link, the outbox, the ingest queue, events, today's
charges and the last retention run.
"""

from __future__ import annotations

from typing import Any

from clickphone_agi.domain.money import format_ron

_MAIL_STATUSES = ("pending", "sent", "retried", "dead", "expired", "bounced", "suppressed")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{secs}s"


def _ami(status: dict[str, Any]) -> str:
    ami = status.get("ami")
    if ami is None:
        return "disabled"
    if ami.get("connected"):
        version = f", Asterisk AMI {ami['asterisk_version']}" if ami.get("asterisk_version") else ""
        return f"connected since {ami.get('connected_since') or '?'}{version}; connects {ami.get('connects', 0)}"
    error = f", last error: {ami['last_error']}" if ami.get("last_error") else ""
    return f"NOT CONNECTED (state {ami.get('state')}{error})"


def _outbox(mail: dict[str, Any]) -> str:
    figures = ", ".join(f"{name} {mail.get(name, 0)}" for name in _MAIL_STATUSES)
    oldest = mail.get("oldest_pending_age_seconds")
    return f"oldest pending {_duration(oldest) if oldest is not None else 'none'}; {figures}"


def _retention(retention: dict[str, Any] | None) -> str:
    if retention is None:
        return "not running"
    last = retention.get("last_run")
    if last is None:
        return "no run yet"
    if not last.get("ok"):
        return f"LAST RUN FAILED at {last.get('at')}: {last.get('error')}"
    purged = ", ".join(f"{k} {v}" for k, v in (last.get("purged") or {}).items())
    nxt = retention.get("next_run")
    return f"last run {last['at']} ({last.get('seconds')} s): purged {purged}" + (f"; next {nxt}" if nxt else "")


def format_status(status: dict[str, Any]) -> str:
    health = status.get("health") or {}
    mail = status.get("mail") or {}
    queue = status.get("queue") or {}
    charges = status.get("charges_today") or {}
    events = status.get("events") or {}
    amount = format_ron(int(charges.get("bani", 0)), "ro")
    event_text = ", ".join(f"{k} {v}" for k, v in sorted(events.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
    rows = [
        ("health", "ok" if health.get("ok") else "UNHEALTHY"),
        ("version", f"{status.get('version')}, up {_duration(status.get('uptime_seconds'))}"),
        ("AMI", _ami(status)),
        (
            "database",
            f"{'writable' if health.get('database_writable') else 'NOT WRITABLE'} ({status.get('database')})",
        ),
        ("outbox", _outbox(mail)),
        (
            "ingest queue",
            f"depth {queue.get('depth', 0)} (high water {queue.get('high_water', 0)},"
            f" dropped {queue.get('dropped', 0)})",
        ),
        ("events", event_text),
        ("charges today", f"{charges.get('day', '?')}: {charges.get('calls', 0)} calls, {amount}"),
        ("retention", _retention(status.get("retention"))),
    ]
    outage = status.get("storage_outage")
    if outage:
        rows.insert(
            4,
            (
                "STORAGE OUTAGE",
                f"for {_duration(outage.get('seconds'))}: {outage.get('held_events', 0)} events held,"
                f" next try in {outage.get('retry_in_seconds')} s ({outage.get('error')})",
            ),
        )
    skew = status.get("cdr_clock_skew_seconds")
    if skew is not None:
        rows.insert(
            3,
            (
                "CDR CLOCK",
                f"Cdrs end {abs(skew) / 3600:.1f} h {'before' if skew > 0 else 'after'} they arrive: is"
                " asterisk.timezone the zone Asterisk runs in?",
            ),
        )
    if status.get("restart_required"):
        rows.append(("RESTART REQUIRED", f"changed and not applied: {', '.join(status['restart_required'])}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
