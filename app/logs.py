"""Logging: one handler on stderr, text or JSON, and no secret in any line.

The redaction filter sits on the handler, so it sees every record the handler writes, the
tracebacks of exceptions included, after the message is formatted. Every handler that writes
the service's lines carries it: the service's own, gunicorn's (`gunicorn_logconfig`), and the
root logger's, which libraries (urllib3, SQLAlchemy, Werkzeug) log through.

A record may carry `fields` (the per-request line does): the JSON format writes them as keys of
their own, the text format relies on the message saying them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Collection

from .keypool import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: Collection[str]):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {
                name: redact(value, self.secrets) if isinstance(value, str) else value
                for name, value in fields.items()
            }
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message, self.secrets), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def make_handler(log_format: str, secrets: Collection[str]) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(RedactingFilter(secrets))
    return handler


def configure(level: str, log_format: str, secrets: Collection[str]) -> None:
    """Routes the service's loggers through one redacting handler, and makes sure that every
    handler of the root logger redacts too (under `flask run` nothing else configured one)."""
    logger = logging.getLogger("chatproxy")
    logger.handlers[:] = [make_handler(log_format, secrets)]
    logger.setLevel(level)
    logger.propagate = False
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(make_handler(log_format, secrets))
        root.setLevel(logging.WARNING)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(secrets))
    logging.captureWarnings(True)  # warnings too, as lines of the chosen format


class ReportWriter:
    """A writable stream whose reports become log records: for code that prints to stderr
    (gevent's hub prints the error of a failed greenlet, a traceback ending in a blank line),
    so that what it prints keeps the format, stays one record, and is redacted."""

    def __init__(self, logger: logging.Logger, level: int = logging.ERROR):
        self.logger = logger
        self.level = level
        self._pending = ""

    def write(self, text: str) -> int:
        *reports, self._pending = (self._pending + text).split("\n\n")
        for report in reports:
            self._emit(report)
        return len(text)

    def flush(self) -> None:
        self._emit(self._pending)
        self._pending = ""

    def _emit(self, report: str) -> None:
        if report.strip():
            self.logger.log(self.level, "%s", report.strip("\n"))


def gunicorn_logconfig(level: str, log_format: str, secrets: Collection[str]) -> dict:
    """gunicorn's own loggers in the service's format, through the same redaction."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "service",
        "filters": ["redact"],
    }
    logger = {"level": level, "handlers": ["stderr"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"service": formatter},
        "filters": {"redact": {"()": RedactingFilter, "secrets": tuple(secrets)}},
        "handlers": {"stderr": handler},
        "loggers": {"gunicorn.error": logger, "gunicorn.access": dict(logger)},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }
