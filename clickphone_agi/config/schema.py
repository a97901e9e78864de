"""The typed, immutable shape of the configuration.

Each section is a frozen pydantic model that forbids unknown keys, so a typo'd key is an error
and not a silently ignored setting. Adding a section means: a model here, a field on
:class:`Config`, its defaults in ``defaults.yaml`` and its documentation in
``etc/clickphone-agi.yaml``.
"""

from __future__ import annotations

import ipaddress
import re
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from clickphone_agi.domain.accounts import parse_network
from clickphone_agi.domain.retention import MIN_KEY_RETENTION_DAYS

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]


def _check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name such as Europe/Bucharest)") from exc
    return name


def _check_host(host: str) -> str:
    host = host.strip()
    if not host or any(c.isspace() for c in host):
        raise ValueError("expected a host name or IP address")
    return host


def _check_mailbox(value: str) -> str:
    name, addr = parseaddr(value)
    if "@" not in addr or any(ord(c) < 32 for c in value):
        raise ValueError("expected an e-mail address such as 'ClickPhone <no-reply@example.ro>'")
    local, _, domain = addr.rpartition("@")
    Address(display_name=name, username=local, domain=domain)  # raises on header-unsafe input
    return value


def _check_domain(value: str) -> str:
    if not value or any(c in value for c in " <>@\r\n\t") or "." not in value:
        raise ValueError("expected a DNS domain such as clickphone.ro")
    return value


def _check_events(value: str) -> str:
    allowed = {"system", "call", "cdr", "user", "dtmf", "agent", "log", "verbose", "command"}
    forbidden = {"dialplan", "reporting", "on", "all"}
    parts = [p.strip() for p in value.split(",") if p.strip()]
    for part in parts:
        if part in forbidden:
            raise ValueError(
                f"event class {part!r} is not allowed: dialplan events are unescaped and can forge "
                "frames, reporting floods the link"
            )
        if part not in allowed:
            raise ValueError(f"unknown AMI event class {part!r}")
    if not parts:
        raise ValueError("expected a comma-separated list of AMI event classes")
    return ",".join(parts)


def _check_peer(value: str) -> str:
    """One ``agi.allowed_peers`` or ``api.trusted_proxies`` entry, canonical: ``10.0.0.5`` -> ``10.0.0.5/32``."""
    return str(parse_network(value))


def _check_peers(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("expected at least one address or network (to turn FastAGI off, set agi.enabled: false)")
    return value


TimeZoneName = Annotated[str, AfterValidator(_check_timezone)]
Host = Annotated[str, AfterValidator(_check_host)]
PeerNetworks = Annotated[tuple[Annotated[str, AfterValidator(_check_peer)], ...], AfterValidator(_check_peers)]


class Section(BaseModel):
    """Base of every section: immutable, no unknown keys, no silent coercion of bools."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AmiConfig(Section):
    enabled: StrictBool = True
    host: Host = "127.0.0.1"
    port: Port = 5038
    username: Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$")] = "clickphone"
    secret_file: Path | None = None
    events: Annotated[str, AfterValidator(_check_events)] = "system,call,cdr,user"
    connect_timeout: PositiveSeconds = 10
    ping_interval: PositiveSeconds = 20
    ping_timeout: PositiveSeconds = 10
    backoff_initial: PositiveSeconds = 1
    backoff_max: PositiveSeconds = 60
    auth_backoff: PositiveSeconds = 300
    queue_size: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000


class AgiConfig(Section):
    enabled: StrictBool = False
    host: Host = "127.0.0.1"
    port: Port = 4573
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 200
    # FastAGI has no login: who may connect at all (IPv4/IPv6 addresses or networks)
    allowed_peers: PeerNetworks = ("127.0.0.1/32", "::1/128")


class SmtpConfig(Section):
    enabled: StrictBool = True
    host: Host = "127.0.0.1"
    port: Port = 25
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_file: Path | None = None
    from_address: Annotated[str, AfterValidator(_check_mailbox)] = "ClickPhone <no-reply@clickphone.example>"
    message_id_domain: Annotated[str, AfterValidator(_check_domain)] = "clickphone.example"
    timeout: PositiveSeconds = 30
    # DATA: the message and the reply to its final "." (RFC 5321 4.5.3.2.6 gives that reply 10 minutes)
    data_timeout: Annotated[float, Field(gt=0, le=3600)] = 600
    max_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    rate_limit_per_second: Annotated[float, Field(gt=0)] | None = None
    connection_reuse: Annotated[int, Field(ge=1, le=100_000)] = 100
    retry_min: PositiveSeconds = 300
    retry_max: PositiveSeconds = 4020
    lifetime: Annotated[float, Field(gt=0, le=30 * 86_400)] = 432_000
    bounce_domain: Annotated[str, AfterValidator(_check_domain)] | None = None
    verp_key_file: Path | None = None
    hard_bounce_limit: Annotated[int, Field(ge=1, le=100)] = 3

    @field_validator("retry_max")
    @classmethod
    def _retry_gaps_ordered(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("retry_min")
        if low is not None and value < low:
            raise ValueError(f"expected at least smtp.retry_min ({low:g} s)")
        return value


class DatabaseConfig(Section):
    path: Path = Path("/var/lib/clickphone-agi/clickphone-agi.db")
    busy_timeout: PositiveSeconds = 5


class AsteriskConfig(Section):
    system_name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = "pbx1"
    timezone: TimeZoneName = "Europe/Bucharest"
    voicemail_spool: Path = Path("/var/spool/asterisk/voicemail")
    fax_spool: Path = Path("/var/spool/asterisk/fax")
    master_csv: Path | None = Path("/var/log/asterisk/cdr-csv/Master.csv")
    master_csv_gmt: StrictBool = False
    reconcile_interval: PositiveSeconds = 60


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


Percent = Annotated[int, Field(ge=1, le=100)]
Digits = Annotated[str, Field(pattern=r"^[0-9]{1,4}$")]


class BillingCdrConfig(Section):
    last_application: str = "Dial"
    destination_contexts: tuple[str, ...] = ()
    destination_channel_pattern: Annotated[str | None, AfterValidator(_check_regex)] = None


class BillingConfig(Section):
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "RON"
    timezone: TimeZoneName = "Europe/Bucharest"
    billing_cdr: BillingCdrConfig = BillingCdrConfig()  # before tariffs_file, which is checked against it
    tariffs_file: Path | None = None
    country_code: Digits = "40"
    national_prefix: Annotated[str, Field(pattern=r"^[0-9]{0,4}$")] = "0"
    international_prefix: Digits = "00"
    daily_limit_warn_at: Annotated[tuple[Percent, ...], Field(min_length=1, max_length=10)] = (80, 100)
    insufficient_funds_every: PositiveSeconds = 21600
    ip_alert_every: PositiveSeconds = 3600
    emergency_numbers: tuple[Annotated[str, Field(pattern=r"^[0-9]{2,6}$")], ...] = ("112",)
    reservation_margin: PositiveSeconds = 300

    @field_validator("tariffs_file")
    @classmethod
    def _billing_cdr_narrowed(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        rule = info.data.get("billing_cdr")
        narrowed = rule is None or rule.destination_contexts or rule.destination_channel_pattern
        if value is not None and not narrowed:
            raise ValueError(
                "with a tariff file, set billing.billing_cdr.destination_contexts (the outbound context) or"
                " billing.billing_cdr.destination_channel_pattern (the trunk): without either, every ANSWERED"
                " Dial CDR is charged, inbound calls to a subscriber and both halves of a Local-channel call"
                " included"
            )
        return value


class NotificationsConfig(Section):
    default_language: Literal["ro", "en"] = "ro"
    templates_dir: Path | None = None
    inbound_contexts: tuple[str, ...] = ()
    missed_call_grace: PositiveSeconds = 30
    scan_interval: PositiveSeconds = 60
    voicemail_format: Literal["wav", "WAV", "wav49", "gsm"] = "wav"
    max_attachment_bytes: Annotated[int, Field(ge=1024, le=50 * 1024 * 1024)] = 10 * 1024 * 1024
    voicemail_maxmsg_warn_at: Annotated[int, Field(ge=1, le=10_000)] = 90
    # after the 250, remove the message with AMI VoicemailRemove (Asterisk >= 18.20/20.5, write = user)
    voicemail_remove_after_send: StrictBool = False


class ApiConfig(Section):
    enabled: StrictBool = False
    host: Host = "127.0.0.1"
    port: Port = 8089
    token_file: Path | None = None
    # at most 700 characters: with /v1/unsubscribe/<token> the link must fit one List-Unsubscribe
    # header line (998), which is refused, never cut, when it does not
    public_base_url: Annotated[str, Field(max_length=700, pattern=r"^https://[^\s/]+(/[^\s]*)?$")] | None = None
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 65536
    # HMAC key of the one-click unsubscribe links (or the credential 'unsubscribe-secret')
    unsubscribe_secret_file: Path | None = None
    # largest POST /v1/policies body (a policy text is published in one request)
    max_policy_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    # accounts per unit of work when a broadcast or a policy notice is queued
    broadcast_chunk: Annotated[int, Field(ge=1, le=10_000)] = 500
    # reverse proxies whose X-Forwarded-For is believed (consent evidence, "from where" in notices)
    trusted_proxies: tuple[Annotated[str, AfterValidator(_check_peer)], ...] = ()


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    mask_personal_data: StrictBool = True


class PrivacyConfig(Section):
    cdr_retention_days: Annotated[int, Field(ge=1, le=3650)] = 180
    outbox_body_retention_days: Annotated[int, Field(ge=1, le=3650)] = 30
    # idempotency keys; shorter than Master.csv's reach would let a replay look new (domain/retention.py)
    processed_event_retention_days: Annotated[int, Field(ge=MIN_KEY_RETENTION_DAYS, le=3650)] = 400
    api_request_retention_days: Annotated[int, Field(ge=1, le=3650)] = 90
    retention_hour: Annotated[int, Field(ge=0, le=23)] = 3
    retention_batch: Annotated[int, Field(ge=100, le=100_000)] = 2000

    @field_validator("processed_event_retention_days")
    @classmethod
    def _keys_outlive_cdrs(cls, value: int, info: ValidationInfo) -> int:
        cdr_days = info.data.get("cdr_retention_days")
        if cdr_days is not None and value < cdr_days:
            raise ValueError(
                f"expected at least privacy.cdr_retention_days ({cdr_days}): a CDR's idempotency key must"
                " outlive the CDR, so that a Master.csv replay of a kept call is recognised"
            )
        return value


class DaemonConfig(Section):
    control_socket: Path = Path("/run/clickphone-agi/control.sock")
    drain_timeout: PositiveSeconds = 10
    # uvloop (libuv) roughly halves the CPU of a FastAGI session; asyncio is the fallback switch
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class Config(Section):
    """The whole configuration, one attribute per YAML section."""

    ami: AmiConfig = AmiConfig()
    agi: AgiConfig = AgiConfig()
    smtp: SmtpConfig = SmtpConfig()
    database: DatabaseConfig = DatabaseConfig()
    asterisk: AsteriskConfig = AsteriskConfig()
    billing: BillingConfig = BillingConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    api: ApiConfig = ApiConfig()
    logging: LoggingConfig = LoggingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    daemon: DaemonConfig = DaemonConfig()


def is_loopback(host: str) -> bool:
    """True when ``host`` names this machine only (used to warn about exposed listeners)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
