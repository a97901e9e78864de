"""sd_notify(3) without libsystemd: one datagram per state change on ``$NOTIFY_SOCKET``.

The protocol is a few ``KEY=value`` lines in one AF_UNIX datagram, so a dependency would buy
nothing. Everything here is a silent no-op outside systemd (no ``NOTIFY_SOCKET``) and never
raises: losing the notify socket must not take the daemon down with it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

STATUS_MAX_CHARS = 200
# A send blocks only if the manager's socket buffer is full; bound how long that can stall
# the event loop. A lost WATCHDOG=1 is repeated at the next interval anyway.
SEND_TIMEOUT_S = 1.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(text: str) -> str:
    """One line, bounded: a newline in STATUS= would smuggle in another assignment."""
    return _CONTROL.sub(" ", text).strip()[:STATUS_MAX_CHARS]


@dataclass(frozen=True, slots=True)
class SdNotifier:
    """Talks to the service manager. ``address`` None means "not under systemd"."""

    address: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], pid: int | None = None) -> SdNotifier:
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID as systemd sets them for us."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | None = None
        if raw.startswith("@"):  # abstract namespace
            address = "\0" + raw[1:]
        elif raw.startswith("/"):  # other forms (vsock:…) are not supported: stay silent
            address = raw
        return cls(address, _watchdog_usec(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send the lines as one datagram; True if it left, False if disabled or it failed."""
        if self.address is None or not lines:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT_S)
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Call only when really serving: Type=notify makes systemd (and After=) wait for it."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_clean(status)}")

    def status(self, text: str) -> bool:
        """Free text shown by ``systemctl status``."""
        return self.notify(f"STATUS={_clean(text)}")

    def reloading(self, monotonic_usec: int) -> bool:
        """Start of a SIGHUP reload; follow with ready(). MONOTONIC_USEC is required by
        systemd >= 253 (Type=notify-reload) and ignored by older managers."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        """Draining has begun, so systemd shows 'deactivating' rather than a hang."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive; send it from the event loop so a wedged loop stops the pings."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec=, as sd_watchdog_enabled(3) advises)."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1e6


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC if the watchdog is ours; a WATCHDOG_PID naming another process is not."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        owner = environ.get("WATCHDOG_PID")
        if owner is not None and int(owner) != pid:
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None


# documentation addresses (RFC 5737, RFC 3849): a UDP connect() to one only asks the kernel
# which source address it would use to go out, and sends nothing; IPv6 is asked when IPv4 has
# no way out (an IPv6-only host): the unit's fence covers both families alike
PROBE_ROUTES: tuple[tuple[socket.AddressFamily, str], ...] = (
    (socket.AF_INET, "192.0.2.1"),
    (socket.AF_INET6, "2001:db8::1"),
)
_DISCARD_PORT = 9


def _outward_address(family: socket.AddressFamily, route: str) -> str | None:
    """This host's own source address towards ``route``; None without a route, or when it is
    loopback, unspecified or link-local (the last needs a scope a bare address cannot carry)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((route, _DISCARD_PORT))
            address = str(sock.getsockname()[0])
    except OSError:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
        return None
    return str(ip)


def ip_fence_probe(routes: tuple[tuple[socket.AddressFamily, str], ...] = PROBE_ROUTES) -> tuple[str, bool] | None:
    """Whether the unit's ``IPAddressDeny=``/``IPAddressAllow=`` hold: ``(address, refused)``.

    systemd enforces them with BPF programs on the unit's cgroup, and silently does not where it
    cannot: cgroups not unified (a legacy or hybrid host), or a container that refuses ``bpf()``
    (both seen under systemd 252: ``tests/systemd_boot/``). Whether this host is such a place is
    not readable anywhere; it is measured: one empty UDP datagram to this host's own outward
    address (delivered locally, to the discard port) is refused with EPERM by a fence that
    allows only localhost, and goes otherwise. The first family of ``routes`` with such an
    address is probed; None when none has one or the send fails for another reason.
    """
    for family, route in routes:
        address = _outward_address(family, route)
        if address is None:
            continue  # no way out in this family: nothing to fence there
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.setblocking(False)
                probe.sendto(b"", (address, _DISCARD_PORT))
        except PermissionError:
            return address, True
        except OSError:
            return None
        return address, False
    return None
