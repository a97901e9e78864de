"""A small asyncio AMI client that stays connected.

It reads continuously (Asterisk drops a client that falls ``writetimeout`` behind and does not
replay what it missed), hands every message to a synchronous callback that must only enqueue,
logs in, pings to notice a half-open link, backs off with full jitter after a lost connection,
and waits much longer after a refused login so it does not hammer Asterisk or trip fail2ban.
Every delay goes through the injected :class:`~clickphone_agi.clock.Clock` and returns early
when the stop event is set.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import random
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from datetime import datetime
from typing import Any, Literal, TypeVar

import structlog

from clickphone_agi.adapters.ami.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    AmiMessage,
    AmiProtocolError,
    Banner,
    FrameParser,
    encode_action,
)
from clickphone_agi.clock import Clock
from clickphone_agi.faults import crash_point

__all__ = ["AmiAuthError", "AmiClient", "AmiNotConnectedError", "ClientState"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

ClientState = Literal["connecting", "connected", "backoff", "auth_failed", "stopped"]

_READ_SIZE = 65536
_CLOSE_TIMEOUT = 1.0


class AmiAuthError(Exception):
    """Asterisk refused the login (wrong username/secret, or not permitted from this host)."""


class AmiNotConnectedError(Exception):
    """An action was asked for while no logged-in AMI session exists, or the session ended
    before the action's response arrived."""


class _LinkLost(Exception):
    """The link ended before or during login (EOF, reset)."""


class _Outcome(enum.Enum):
    LOST = "lost"
    AUTH_FAILED = "auth_failed"


class AmiClient:
    """Keeps one AMI session alive until ``stop`` is set; see :meth:`run`.

    ``on_message`` receives, in order, every frame except the responses to the client's own
    Login, Ping and Logoff. It runs inside the reader and must not block: enqueue and return.
    If it raises, the error is logged and counted and reading goes on.
    """

    def __init__(  # noqa: PLR0917 - the positional order is the documented constructor
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        events: str,
        clock: Clock,
        on_message: Callable[[AmiMessage], None],
        *,
        ping_interval: float = 20.0,
        ping_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        auth_backoff: float = 300.0,
        rng: random.Random | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        if ping_interval <= 0 or ping_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("ping_interval, ping_timeout and connect_timeout must be > 0")
        if backoff_initial <= 0 or backoff_max < backoff_initial or auth_backoff < 0:
            raise ValueError("need 0 < backoff_initial <= backoff_max and auth_backoff >= 0")
        self._host = host
        self._port = port
        self._username = username
        self._secret = secret
        self._events = events
        self._clock = clock
        self._on_message = on_message
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._auth_backoff = auth_backoff
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._max_frame_bytes = max_frame_bytes
        # a CR/LF in the credentials is a configuration error: refuse it now, not per connect
        encode_action("Login", "check", Username=username, Secret=secret, Events=events)

        self._ids = itertools.count(1)
        self._id_prefix = f"clickphone-agi-{id(self):x}"
        self._pending: dict[str, asyncio.Future[AmiMessage]] = {}
        self._banner: asyncio.Future[Banner] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._running = False

        self._state: ClientState = "stopped"
        self._connects = 0
        self._disconnects = 0
        self._auth_failures = 0
        self._pings_missed = 0
        self._messages_received = 0
        self._callback_errors = 0
        self._last_error: str | None = None
        self._asterisk_version: str | None = None
        self._connected_since: datetime | None = None  # when the current session logged in

    # -- read-only status -------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def connects(self) -> int:
        """Successful logins."""
        return self._connects

    @property
    def disconnects(self) -> int:
        """Logged-in sessions that ended without a stop request."""
        return self._disconnects

    @property
    def auth_failures(self) -> int:
        return self._auth_failures

    @property
    def pings_missed(self) -> int:
        return self._pings_missed

    @property
    def messages_received(self) -> int:
        """Every frame read from Asterisk, own responses included (banner excluded)."""
        return self._messages_received

    @property
    def callback_errors(self) -> int:
        return self._callback_errors

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def asterisk_version(self) -> str | None:
        """Version from the banner (the AMI protocol version, e.g. ``11.0.0`` on Asterisk 22)."""
        return self._asterisk_version

    def snapshot(self) -> dict[str, object]:
        """All status fields, for a health endpoint or a log line."""
        return {
            "state": self._state,
            "connects": self._connects,
            "disconnects": self._disconnects,
            "auth_failures": self._auth_failures,
            "pings_missed": self._pings_missed,
            "messages_received": self._messages_received,
            "callback_errors": self._callback_errors,
            "last_error": self._last_error,
            "asterisk_version": self._asterisk_version,
            "connected_since": self._connected_since.isoformat() if self._connected_since else None,
        }

    # -- actions ----------------------------------------------------------------------------

    async def send_action(self, action: str, fields: Mapping[str, str], timeout: float) -> AmiMessage:
        """Send one action on the logged-in session and return its ``Response`` frame.

        The response is matched by a unique ``ActionID`` in the reader, so it never reaches
        ``on_message``; the reader itself never waits for this call. Raises
        :class:`AmiNotConnectedError` at once when no session is logged in (or the session ends
        before the response), :class:`TimeoutError` after ``timeout`` seconds on the client's
        clock, and ``ValueError`` for a CR/LF in a field. A ``Response: Error`` is returned, not
        raised: the caller decides what it means.
        """
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        reserved = {name.lower() for name in fields} & {"action", "actionid"}
        if reserved:
            raise ValueError(f"fields must not set {sorted(reserved)}: the client sets them")
        writer = self._writer
        if writer is None or self._state != "connected" or writer.is_closing():
            raise AmiNotConnectedError(f"AMI is not connected (state {self._state})")
        try:
            return await self._with_timeout(self._request(writer, action, **fields), timeout)
        except asyncio.CancelledError:
            # the session ended (its pending futures are cancelled); a caller's own cancel propagates
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise AmiNotConnectedError(f"AMI session ended before the {action} response") from None

    # -- main loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, log in and read until ``stop`` is set; then log off and close."""
        if self._running:
            raise RuntimeError("AmiClient.run() is already running")
        self._running = True
        self._stopping = False
        attempt = 0
        stop_waiter = asyncio.ensure_future(stop.wait())
        session: asyncio.Task[_Outcome] | None = None
        try:
            while not stop.is_set():
                connects_before = self._connects
                session = asyncio.ensure_future(self._session())
                await asyncio.wait({session, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done():
                    break
                outcome = session.result()
                session = None
                if stop.is_set():
                    break
                if outcome is _Outcome.AUTH_FAILED:
                    self._state = "auth_failed"
                    log.warning("ami.auth_retry_wait", seconds=self._auth_backoff, user=self._username)
                    await self._sleep_or_stop(self._auth_backoff, stop_waiter)
                    continue
                if self._connects != connects_before:
                    attempt = 0
                delay = self._rng.uniform(0.0, min(self._backoff_max, self._backoff_initial * 2.0**attempt))
                attempt = min(attempt + 1, 62)
                self._state = "backoff"
                log.info("ami.backoff", seconds=round(delay, 3), attempt=attempt)
                await self._sleep_or_stop(delay, stop_waiter)
        finally:
            self._stopping = True
            if session is not None and not session.done():
                await self._logoff()
                session.cancel()
                await asyncio.gather(session, return_exceptions=True)
            stop_waiter.cancel()
            self._state = "stopped"
            self._running = False
            log.info("ami.stopped", **self._counters())

    async def _session(self) -> _Outcome:
        """One connection: connect, log in, read until it breaks. Never raises for I/O errors."""
        self._state = "connecting"
        log.info("ami.connecting", host=self._host, port=self._port)
        try:
            reader, writer = await self._with_timeout(
                asyncio.open_connection(self._host, self._port), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self._note_error("ami.connect_failed", exc)
            return _Outcome.LOST

        self._writer = writer
        self._banner = asyncio.get_running_loop().create_future()
        parser = FrameParser(max_frame_bytes=self._max_frame_bytes)
        reading = asyncio.ensure_future(self._read_loop(reader, parser))
        pinging: asyncio.Task[None] | None = None
        try:
            try:
                await self._login(writer, reading)
            except AmiAuthError as exc:
                # the state turns to auth_failed in run(), where the auth backoff starts: one
                # moment for both, so a reader of the state never sees it before the wait began
                self._auth_failures += 1
                self._last_error = str(exc)
                log.error(
                    "ami.auth_failed",
                    user=self._username,
                    reason=str(exc),
                    failures=self._auth_failures,
                )
                return _Outcome.AUTH_FAILED
            except (OSError, TimeoutError, AmiProtocolError, _LinkLost) as exc:
                self._note_error("ami.login_failed", exc)
                return _Outcome.LOST

            self._state = "connected"
            self._connected_since = self._clock.now()
            self._connects += 1
            log.info(
                "ami.connected",
                host=self._host,
                port=self._port,
                asterisk_version=self._asterisk_version,
                connects=self._connects,
            )
            pinging = asyncio.ensure_future(self._ping_loop(writer))
            await asyncio.wait({reading, pinging}, return_when=asyncio.FIRST_COMPLETED)
            if not self._stopping:
                self._disconnects += 1
                self._note_disconnect(reading, pinging)
            return _Outcome.LOST
        finally:
            for task in (reading, pinging):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (reading, pinging) if t is not None), return_exceptions=True)
            for fut in self._pending.values():
                fut.cancel()
            self._pending.clear()
            self._writer = None
            self._connected_since = None
            writer.transport.abort()

    async def _login(self, writer: asyncio.StreamWriter, reading: asyncio.Future[None]) -> None:
        """Banner, then Login; the whole exchange bounded by ``connect_timeout``."""
        assert self._banner is not None
        banner_fut = self._banner

        async def exchange() -> AmiMessage:
            banner = await banner_fut
            self._asterisk_version = banner.version
            return await self._request(
                writer,
                "Login",
                Username=self._username,
                Secret=self._secret,
                Events=self._events,
            )

        step = asyncio.ensure_future(exchange())
        racers: set[asyncio.Future[Any]] = {step, reading}
        try:
            await self._with_timeout(
                asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED),
                self._connect_timeout,
            )
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        if not step.done() or step.cancelled():
            failure = reading.exception() if reading.done() and not reading.cancelled() else None
            if failure is not None:
                raise failure
            raise _LinkLost("connection closed before login completed")
        response = step.result()
        if (response.response or "").lower() != "success":
            raise AmiAuthError(response.get("Message") or response.response or "login refused")

    async def _request(self, writer: asyncio.StreamWriter, action: str, **fields: str) -> AmiMessage:
        action_id = f"{self._id_prefix}-{next(self._ids)}"
        fut: asyncio.Future[AmiMessage] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = fut
        try:
            writer.write(encode_action(action, action_id, **fields))
            return await fut
        finally:
            self._pending.pop(action_id, None)

    async def _read_loop(self, reader: asyncio.StreamReader, parser: FrameParser) -> None:
        """Read until EOF; the only await is the socket. A protocol error ends the link, after the
        complete frames that came ahead of the bad one in the same read are dispatched."""
        while True:
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            failure: AmiProtocolError | None = None
            try:
                items = parser.feed(data)
            except AmiProtocolError as exc:
                items, failure = list(exc.parsed), exc
            for item in items:
                if isinstance(item, Banner):
                    if self._banner is not None and not self._banner.done():
                        self._banner.set_result(item)
                    continue
                self._dispatch(item)
            if failure is not None:
                raise failure
            if parser.buffered:
                crash_point("ami.mid_frame")

    def _dispatch(self, message: AmiMessage) -> None:
        self._messages_received += 1
        if message.is_response:
            fut = self._pending.get(message.action_id or "")
            if fut is not None:
                if not fut.done():
                    fut.set_result(message)
                return
        if message.event == "Shutdown":
            log.warning(
                "ami.asterisk_shutdown",
                shutdown=message.get("Shutdown"),
                restart=message.get("Restart"),
            )
        try:
            self._on_message(message)
        except Exception as exc:
            self._callback_errors += 1
            log.exception(
                "ami.callback_error",
                ami_event=message.event,
                error=repr(exc),
                callback_errors=self._callback_errors,
            )

    async def _ping_loop(self, writer: asyncio.StreamWriter) -> None:
        """Ping every ``ping_interval``; abort the link if one gets no answer in time."""
        while True:
            await self._clock.sleep(self._ping_interval)
            try:
                await self._with_timeout(self._request(writer, "Ping"), self._ping_timeout)
            except TimeoutError:
                self._pings_missed += 1
                self._last_error = f"no Ping response within {self._ping_timeout:g} s"
                log.warning(
                    "ami.ping_timeout",
                    timeout=self._ping_timeout,
                    pings_missed=self._pings_missed,
                )
                writer.transport.abort()
                return

    async def _logoff(self) -> None:
        """Best effort: send Logoff on a logged-in link and close it, without waiting long."""
        writer = self._writer
        if writer is None or self._state != "connected":
            return
        with suppress(Exception):
            writer.write(encode_action("Logoff", f"{self._id_prefix}-{next(self._ids)}"))
            writer.close()
            await self._with_timeout(writer.wait_closed(), _CLOSE_TIMEOUT)
        log.info("ami.logoff")

    # -- timing helpers ---------------------------------------------------------------------

    async def _sleep_or_stop(self, seconds: float, stop_waiter: asyncio.Future[Any]) -> None:
        sleeper: asyncio.Future[Any] = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({sleeper, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    async def _with_timeout(self, aw: Awaitable[T], seconds: float) -> T:
        """Like ``asyncio.wait_for`` but timed by the injected clock."""
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            timer.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise TimeoutError(f"timed out after {seconds:g} s")

    def _note_disconnect(self, reading: asyncio.Future[None], pinging: asyncio.Future[None]) -> None:
        """Record why a logged-in link ended. The ping watchdog's verdict wins: its abort also
        ends the reader, which would otherwise look like an ordinary close."""
        for task in (pinging, reading):
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._note_error("ami.disconnected", task.exception())
                return
        if not pinging.done():
            self._last_error = "connection closed by Asterisk"
        log.warning("ami.disconnected", reason=self._last_error, disconnects=self._disconnects)

    def _note_error(self, event: str, exc: BaseException | None) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}" if exc is not None else None
        log.warning(event, host=self._host, port=self._port, error=self._last_error)

    def _counters(self) -> dict[str, object]:
        snap = self.snapshot()
        snap.pop("state")
        return snap
