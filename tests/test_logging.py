"""structlog configuration: JSON off-TTY, console on TTY, personal data masked."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from clickphone_agi.adapters.logging import configure_logging, debug_enabled, mask_processor


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


class _TTYStringIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_line_has_personal_data_masked_and_secrets_redacted() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream)
    log = structlog.get_logger()

    log.info("call.rated", caller="0721000001", email="ion.popescu@example.ro", secret="labsecret")

    raw = stream.getvalue()
    assert "0721000001" not in raw
    assert "labsecret" not in raw
    assert "ion.popescu" not in raw
    assert '"event": "call.rated"' in raw
    [line] = _json_lines(stream)
    assert line["caller"] == "0721***001"
    assert line["email"] == "io\u2026@example.ro"
    assert line["secret"] == "***"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")


def test_without_masking_the_number_appears_verbatim() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", mask_personal_data=False, stream=stream)

    structlog.get_logger().info("call.rated", caller="0721000001")

    [line] = _json_lines(stream)
    assert line["caller"] == "0721000001"


def test_reconfiguring_switches_masking_for_existing_loggers() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", mask_personal_data=False, stream=stream)
    log = structlog.get_logger()
    log.info("before", caller="0721000001")
    configure_logging(fmt="json", mask_personal_data=True, stream=stream)
    log.info("after", caller="0721000001")

    before, after = _json_lines(stream)
    assert before["caller"] == "0721000001"
    assert after["caller"] == "0721***001"


def test_event_string_context_vars_and_objects_are_masked_too() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream)
    structlog.contextvars.bind_contextvars(callee="+40721000001")
    caller, address = "0721000001", "ion.popescu@example.ro"

    structlog.get_logger().warning(
        f"smtp refused {address} for {caller}",  # a developer's mistake, masked anyway
        error=ValueError("bad recipient 0040212345678"),
        uniqueid="1795882891.0",
        extension="100",
    )

    raw = stream.getvalue()
    for leaked in ("0721000001", "+40721000001", "0040212345678", "ion.popescu"):
        assert leaked not in raw
    [line] = _json_lines(stream)
    assert line["event"] == "smtp refused io\u2026@example.ro for 0721***001"
    assert line["callee"] == "+40721***001"
    assert line["error"] == "ValueError('bad recipient 00402*****678')"
    assert line["uniqueid"] == "1795882891.0"
    assert line["extension"] == "100"


def test_exception_tracebacks_are_masked() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", stream=stream)
    log = structlog.get_logger()

    try:
        raise RuntimeError("no route for 0721000001")
    except RuntimeError:
        log.exception("call.failed")

    raw = stream.getvalue()
    assert "0721000001" not in raw
    [line] = _json_lines(stream)
    assert "RuntimeError: no route for 0721***001" in line["exception"]


def test_level_filters_lower_levels() -> None:
    stream = io.StringIO()
    configure_logging(level="WARNING", fmt="json", stream=stream)
    log = structlog.get_logger()
    log.info("hidden")
    log.warning("shown")

    assert [line["event"] for line in _json_lines(stream)] == ["shown"]


def test_debug_enabled_follows_the_configured_level() -> None:
    """Hot paths skip building debug lines when it says no: it must say yes whenever one would show."""
    assert debug_enabled()  # structlog's defaults log everything
    for level, expected in (("debug", True), ("info", False), ("warning", False), ("debug", True)):
        stream = io.StringIO()
        configure_logging(level=level, fmt="json", stream=stream)
        assert debug_enabled() is expected
        structlog.get_logger().debug("probe")
        assert bool(_json_lines(stream)) is expected


def test_console_format_produces_key_value_text_not_json() -> None:
    stream = io.StringIO()
    configure_logging(fmt="console", stream=stream)

    structlog.get_logger().info("call.rated", caller="0721000001")

    raw = stream.getvalue()
    assert "call.rated" in raw
    assert "caller=0721***001" in raw
    assert "\x1b[" not in raw  # no colours off a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


def test_auto_format_is_json_off_tty_and_console_on_tty() -> None:
    pipe = io.StringIO()
    configure_logging(stream=pipe)
    structlog.get_logger().info("call.rated")
    assert json.loads(pipe.getvalue())["event"] == "call.rated"

    tty = _TTYStringIO()
    configure_logging(stream=tty)
    structlog.get_logger().info("call.rated")
    with pytest.raises(json.JSONDecodeError):
        json.loads(tty.getvalue())
    assert "\x1b[" in tty.getvalue()  # colours on a terminal


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"level": "verbose"}, "log level"), ({"fmt": "xml"}, "log format")],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        configure_logging(**kwargs)


def test_mask_processor_keeps_level_timestamp_and_logger() -> None:
    event_dict = {
        "event": "call 0721000001",
        "level": "info",
        "timestamp": "2024-05-01T12:34:56.123456Z",
        "logger": "clickphone_agi.ami",
        "password": "p",
        "tags": ["0721000001"],
        "seconds": 60,
    }
    assert mask_processor(None, "info", event_dict) == {
        "event": "call 0721***001",
        "level": "info",
        "timestamp": "2024-05-01T12:34:56.123456Z",
        "logger": "clickphone_agi.ami",
        "password": "***",
        "tags": ["0721***001"],
        "seconds": 60,
    }
