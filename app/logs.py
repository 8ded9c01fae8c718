"""Logging: one handler on stderr, text or JSON, and no secret in any line.

The redaction filter sits on the handler, so it sees every record the handler writes, the
tracebacks of exceptions included, after the message is formatted.
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
    """Routes the service's loggers through one redacting handler."""
    logger = logging.getLogger("chatproxy")
    logger.handlers[:] = [make_handler(log_format, secrets)]
    logger.setLevel(level)
    logger.propagate = False


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
