"""Logging: readable text on a terminal or one JSON object per line, each line tied to its request.

``RequestObserver`` (``imagegate.observe``) opens a ``RequestLog`` per HTTP request in a context
variable; the flow adds what it learns with ``annotate(model=..., generation_id=..., payer=...)``, and
every line logged while the request runs carries its request id (JSON lines carry every field known
so far). The request's access line carries all of them plus status and duration.

Secrets never reach a log line: every formatted line goes through ``redact``, which removes the
values registered with ``register_secret`` (gas keys, tokens from the environment), anything shaped
like a signature (0x + 130 or more hex digits) and long base64 runs (payment headers). Payment
headers and signatures are also never logged on purpose; this is the net under that rule.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from contextvars import ContextVar
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "imagegate.access"
REDACTED = "[redacted]"
# Runs of 120 or more base64 characters: payment headers (base64 JSON, hundreds of characters) and
# signatures (65-byte ECDSA and longer smart-wallet ones: 130+ hex digits, with or without 0x; hex
# digits and the x are base64 characters). Transaction hashes and nonces (32 bytes: 64 hex digits)
# and addresses (40) stay readable. A match may only start where a run starts (the lookbehind), so
# each line is scanned once instead of once per position inside every run.
_SECRET_SHAPES = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{120,}={0,2}")
# Environment variables whose values are secrets by their name.
_SECRET_ENV_NAMES = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$", re.IGNORECASE)
MIN_SECRET_LENGTH = 12


class RequestLog:
    """What is known about the request being served, for its log lines."""

    __slots__ = ("fields",)

    def __init__(self, request_id: str, method: str, path: str):
        self.fields: dict[str, Any] = {"request_id": request_id, "method": method, "path": path}


REQUEST: ContextVar[RequestLog | None] = ContextVar("imagegate_request_log", default=None)


def annotate(**fields: Any) -> None:
    """Add facts to the current request's log lines (no-op outside a request)."""
    current = REQUEST.get()
    if current is not None:
        current.fields.update(fields)


def request_id() -> str | None:
    current = REQUEST.get()
    return None if current is None else str(current.fields["request_id"])


_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Never print ``value`` (with and without a 0x prefix) in a log line."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _secrets.add(value)
        if value.startswith("0x"):
            _secrets.add(value[2:])


def register_environment_secrets() -> None:
    for name, value in os.environ.items():
        if _SECRET_ENV_NAMES.search(name):
            register_secret(value)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _SECRET_SHAPES.sub(REDACTED, text)


class _RequestFilter(logging.Filter):
    """Ties each record to the request it was logged in."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = REQUEST.get()
        record.request = None if current is None else current.fields
        record.request_tag = "" if current is None else f" [{current.fields['request_id']}]"
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id]: message``; access lines add their fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_tag"):
            record.request_tag = ""
        line = super().format(record)
        access = getattr(record, "access", None)
        if access:
            line += "".join(f" {key}={value}" for key, value in access.items() if value is not None)
        return redact(line)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, message and every known request field."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         timestamp="time", json_ensure_ascii=False,
                         reserved_attrs=[*RESERVED_ATTRS, "request", "request_tag", "access", "color_message"])

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        request = getattr(record, "request", None)
        if request:
            log_data.update(request)
        access = getattr(record, "access", None)
        if access:
            log_data.update(access)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _StrayLines(io.TextIOBase):
    """Stands in for stdout/stderr when logs are JSON: text that libraries write there themselves (their
    own handlers, like transformers'; warnings; progress bars) becomes log events like any other."""

    def __init__(self, original: TextIO, logger: str, level: int):
        self._original = original
        self._logger = logging.getLogger(logger)
        self._level = level
        self._pending = ""
        self._writing = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._original.fileno()

    def write(self, text: str) -> int:
        if self._writing:  # the logging machinery reporting its own trouble: straight out
            return self._original.write(text)
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            line = line.rsplit("\r", 1)[-1].rstrip()  # a progress bar's last state
            if line:
                self._writing = True
                try:
                    self._logger.log(self._level, "%s", line)
                finally:
                    self._writing = False
        return len(text)

    def flush(self) -> None:
        self._original.flush()


def configure(format: str = "text", level: str = "info") -> None:
    """Route every logger (uvicorn's included) to one stderr handler in the chosen format."""
    stdout, stderr = (stream._original if isinstance(stream, _StrayLines) else stream
                      for stream in (sys.stdout, sys.stderr))
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(JsonLineFormatter() if format == "json" else TextFormatter())
    handler.addFilter(_RequestFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        # imagegate.access has one line per request with the request's facts; uvicorn's would repeat it
        # (uvicorn logs access lines when its logger has somewhere to send them).
        logger.propagate = name != "uvicorn.access"
    # One line per outbound request (chain RPC, facilitator, providers) drowns the server's own log.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
    if format == "json":
        sys.stdout = _StrayLines(stdout, "stdout", logging.INFO)  # type: ignore[assignment]
        sys.stderr = _StrayLines(stderr, "stderr", logging.WARNING)  # type: ignore[assignment]
    register_environment_secrets()
