"""One log line per request, its request ID, and its count in the metrics.

Every request gets an ID: the client's `X-Request-ID` when it is printable ASCII of at most 128
characters, else a new uuid4 hex. It is returned in the response's `X-Request-ID` and sent to
the upstream with every attempt. On `/v1` the upstream's own `x-request-id` is passed back
instead when it sent one (the OpenAI SDKs show it as the request's id); the line names both.

The line is written when the response ends — after the last byte of a stream — so that it can
say what the request spent: the services add upstream attempts and tokens to the request's
`RequestRecord`, which `current()` finds in a context variable (each greenlet or thread serving
a request has its own), without knowing about Flask.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from urllib.parse import quote

from flask import Flask, Response, g, request

from . import metrics

HEADER = "X-Request-ID"
MAX_ID_LENGTH = 128
_VALID_ID = re.compile(rf"[\x20-\x7e]{{1,{MAX_ID_LENGTH}}}")
# Probes and scrapes arrive every few seconds: their successes are logged at DEBUG.
QUIET_ENDPOINTS = frozenset({"ops.healthz", "ops.readyz", "ops.metrics"})
REFUSALS = frozenset({"rate_limit_exceeded", "budget_exceeded"})
_RULE_VARIABLE = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")
_PATH_SAFE = "/:@!$&'()*+,;=-._~"

log = logging.getLogger("chatproxy.access")


@dataclass
class RequestRecord:
    """What one request did, filled in by whichever layer knows it."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    upstream_attempts: int = 0
    upstream_request_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the code of the error the client was given


_current: ContextVar[RequestRecord | None] = ContextVar("chatproxy_request", default=None)


def current() -> RequestRecord:
    """The record of the request being served; outside a request, a throwaway one."""
    return _current.get() or RequestRecord(request_id="")


def request_id(offered: str | None) -> str:
    """The client's ID when it is usable, else a new one."""
    if offered and _VALID_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


@functools.cache
def route_template(rule: str) -> str:
    """A URL rule as OpenAPI and the metrics name it: `/v1/<anypath:path>` -> `/v1/{path}`."""
    return _RULE_VARIABLE.sub(r"{\1}", rule)


def _begin() -> None:
    _current.set(RequestRecord(request_id(request.headers.get(HEADER))))


def _finish(response: Response) -> Response:
    record = _current.get()
    if record is None:  # not a request `_begin` saw (the app used without its hooks)
        return response
    response.headers.setdefault(HEADER, record.request_id)
    rule = request.url_rule
    entry = _Entry(
        record,
        method=request.method,
        path=request.path,  # no query string: it may hold a question
        route=route_template(rule.rule) if rule else "unmatched",
        status=response.status_code,
        client=g.get("client_name", "-"),
        quiet=request.endpoint in QUIET_ENDPOINTS,
    )
    if response.direct_passthrough:  # a file: Werkzeug hands it to the server unwrapped
        entry.write()
    else:
        response.call_on_close(entry.write)
    return response


@dataclass
class _Entry:
    record: RequestRecord
    method: str
    path: str
    route: str
    status: int
    client: str
    quiet: bool

    def write(self) -> None:
        """Counts the request and logs its line; runs once the response has ended."""
        record = self.record
        metrics.labelled(metrics.HTTP_REQUESTS, self.route, self.method, str(self.status)).inc()
        if record.error in REFUSALS:
            metrics.labelled(metrics.RATE_LIMIT_REFUSALS, record.error).inc()
        level = logging.WARNING if self.status >= 500 else logging.INFO
        if self.quiet and self.status < 400:
            level = logging.DEBUG
        if not log.isEnabledFor(level):
            return
        duration_ms = round((time.perf_counter() - record.started) * 1000, 1)
        tokens = record.prompt_tokens + record.completion_tokens
        path = quote(self.path, safe=_PATH_SAFE)  # only for a line that is written
        fields = {
            "request_id": record.request_id,
            "method": self.method,
            "path": path,
            "status": self.status,
            "duration_ms": duration_ms,
            "client": self.client,
            "upstream_attempts": record.upstream_attempts,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "tokens": tokens,
        }
        extra = ""
        if record.error:
            fields["error"] = record.error
            extra += f" error={record.error}"
        if record.upstream_request_id:
            fields["upstream_request_id"] = record.upstream_request_id
            extra += f" upstream_request_id={record.upstream_request_id}"
        log.log(
            level,
            '"%s %s" %d %.1fms client=%s request_id=%s attempts=%d tokens=%d%s',
            self.method,
            path,
            self.status,
            duration_ms,
            self.client,
            record.request_id,
            record.upstream_attempts,
            tokens,
            extra,
            extra={"fields": fields},
        )


def init_app(app: Flask) -> None:
    """Registers the hooks; call first, so that the ID exists before any other hook can fail."""
    app.before_request(_begin)
    app.after_request(_finish)
