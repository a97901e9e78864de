"""structlog configuration for the daemon, with masking of personal data.

:func:`configure_logging` is called from ``main`` (and again on reload), never
at import time.  Logs go to stdout by default: under systemd that is journald.
JSON lines when the stream is not a terminal, coloured key=value on a
terminal.

With masking on (the default), every logged value goes through
:func:`mask_processor`: secret-named keys become ``'***'``, phone numbers and
email addresses are masked with the rules of
:mod:`clickphone_agi.domain.masking`, including inside the ``event`` string
and rendered tracebacks.
"""

from __future__ import annotations

import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from clickphone_agi.domain.masking import mask_text, mask_value, redact_mapping

__all__ = ["LogFormat", "configure_logging", "mask_processor"]

LogFormat = Literal["auto", "json", "console"]

# Added by our own processors; never personal data.
_UNMASKED_KEYS = frozenset({"event", "level", "timestamp", "logger"})
_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEBUG = 10  # the stdlib logging number structlog's filtering loggers compare with
_PLAIN_TYPES = (str, int, float, bool, type(None), dict, list, tuple)


def _mask_any(value: object) -> object:
    masked = mask_value(value)
    if isinstance(masked, _PLAIN_TYPES):
        return masked
    # Both renderers print other objects (exceptions, dataclasses, Decimal)
    # via repr(), which may hold a phone number or an address: mask that text.
    return mask_text(repr(masked))


def mask_processor(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact secrets, then mask personal data.

    Values of secret-named keys become ``'***'`` (at any depth).  Every other
    value except ``level``, ``timestamp`` and ``logger`` is masked with
    :func:`~clickphone_agi.domain.masking.mask_value`; objects that are not
    str/number/bool/None/dict/list/tuple are replaced by their masked
    ``repr()``.  The ``event`` string is masked with
    :func:`~clickphone_agi.domain.masking.mask_text`, in case a number was
    formatted into it.  Integers are not masked (counts, sizes, ids).
    """
    redacted = redact_mapping(event_dict)
    out: EventDict = {}
    for key, value in redacted.items():
        if key == "event" and isinstance(value, str):
            out[key] = mask_text(value)
        elif key in _UNMASKED_KEYS:
            out[key] = value
        else:
            out[key] = _mask_any(value)
    return out


def debug_enabled() -> bool:
    """Whether a debug line would be emitted under the configuration in force now.

    For hot paths (a FastAGI session, a CDR in a burst) to skip building a line nobody sees: a
    debug call through a module's lazy logger binds a new logger first (~6 us), this costs ~0.6 us.
    """
    wrapper = structlog.get_config()["wrapper_class"]
    enabled = getattr(wrapper, "is_enabled_for", None)  # the filtering loggers have it
    return True if enabled is None else bool(enabled(wrapper, _DEBUG))


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # closed or detached stream
        return False


def configure_logging(
    *,
    level: str = "info",
    fmt: LogFormat = "auto",
    mask_personal_data: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the whole process.

    Call it once from ``main`` and again on reload (SIGHUP) to change the level,
    the format or masking: the last call wins.  Loggers obtained with
    ``structlog.get_logger()`` pick up the new configuration on their next
    call, because loggers are not cached.

    *fmt* ``"json"`` renders one JSON object per line; ``"console"`` renders
    key=value text, coloured only when *stream* is a terminal; ``"auto"``
    picks console on a terminal and JSON otherwise (journald, files, pipes).
    *stream* defaults to ``sys.stdout`` as it is at call time.

    Raises ``ValueError`` for an unknown *level* or *fmt*.
    """
    level_name = level.lower()
    if level_name not in _LEVELS:
        raise ValueError(f"log level: expected one of {', '.join(_LEVELS)}, got {level!r}")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format: expected auto, json or console, got {fmt!r}")

    out = stream if stream is not None else sys.stdout
    tty = _is_tty(out)
    use_json = fmt == "json" or (fmt == "auto" and not tty)

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if mask_personal_data:
        # Tracebacks are rendered to text *before* masking so that exception
        # messages are masked too; on the console this gives up the pretty
        # (rich) traceback, which would also print unmasked local variables.
        processors += [structlog.processors.format_exc_info, mask_processor]
    elif use_json:
        processors.append(structlog.processors.format_exc_info)
    # else: ConsoleRenderer renders exc_info itself.

    renderer: Processor
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=tty)
    processors.append(renderer)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_name),
        context_class=dict,
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
