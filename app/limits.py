"""Rate limits: `RATE_LIMIT` per client on the routes that reach the upstream, with Flask-Limiter.

A client is its access token's name, else its address: the limiter keys on `auth.client_name()`,
which `auth.authenticate` sets, so `init_app` runs after `auth.init_app` (Flask calls
`before_request` hooks in the order they were added). Only `/callChatGPT`, `POST /chat` and
`/v1/…` spend the allowance, all three from one bucket; pages, static files, probes,
`/chat/conversations` and `/usage` do not.

Failed authentications count against the address, in a bucket of the same size: once it is
spent, further failures from that address get 429 instead of 401, which slows a brute force to
`RATE_LIMIT`. A valid token is a client of its own (its name) and is never refused for the
failures of others behind the same address.

`memory://` keeps the counters in the process; with gunicorn's one gevent worker that is the
whole service. `redis://…` shares them between processes and machines. When Redis does not
answer, Flask-Limiter counts in each process's memory (logged once) and goes back to Redis once
it answers again (it looks again after 1, 2, 4 … 32 s); `/readyz` says `degraded` meanwhile.
"""

from __future__ import annotations

import logging
import math
import os
import time

from flask import Flask, Response, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from . import auth
from .errors import ApiError, render

log = logging.getLogger("chatproxy")

UPSTREAM_ENDPOINTS = frozenset({"legacy.call_chatgpt", "chat.chat", "passthrough.relay"})
KEY_PREFIX = "chatgpt-proxy"  # several services may share one Redis database
# Seconds Redis may take to connect or to answer before a request counts in memory instead.
STORAGE_TIMEOUT = 2.0
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class RateLimits:
    """The limits of one app: Flask-Limiter on the upstream routes, and failed authentications
    per address counted in the same storage."""

    def __init__(self, limiter: Limiter, rate_limit: str, shared: bool):
        self.limiter = limiter
        self.items: list[RateLimitItem] = parse_many(rate_limit)
        self.shared = shared
        # For failed authentications when Redis fails before Flask-Limiter has noticed.
        self._memory = FixedWindowRateLimiter(MemoryStorage())

    @property
    def in_fallback(self) -> bool:
        """Whether Flask-Limiter counts in this process's memory because Redis did not answer."""
        return self.limiter.limiter.storage is not self.limiter.storage

    def storage_state(self) -> str:
        """`memory` (as configured), `ok` (Redis answers and is used), or `unreachable`
        (Redis does not answer, or has not been looked at again yet: limits are per process)."""
        if not self.shared:
            return "memory"
        if self.in_fallback or not self.limiter.storage.check():
            return "unreachable"
        return "ok"

    def refuse_spent_address(self, address: str) -> None:
        """429 once `address` has spent its allowance on failed authentications."""
        for item in self.items:
            if not self._failures("test", item, address):
                raise self._failures_exceeded(item, address)

    def count_failed_authentication(self, address: str) -> None:
        for item in self.items:
            self._failures("hit", item, address)

    def _failures(self, method: str, item: RateLimitItem, address: str) -> bool:
        identifiers = (KEY_PREFIX, "failed-authentication", address)
        try:
            return getattr(self.limiter.limiter, method)(item, *identifiers)
        except StorageError:
            return getattr(self._memory, method)(item, *identifiers)

    def _failures_exceeded(self, item: RateLimitItem, address: str) -> ApiError:
        identifiers = (KEY_PREFIX, "failed-authentication", address)
        try:
            reset = self.limiter.limiter.get_window_stats(item, *identifiers).reset_time
        except StorageError:
            reset = self._memory.get_window_stats(item, *identifiers).reset_time
        wait = _seconds_until(reset)
        return ApiError(
            "rate_limit_exceeded",
            f"Too many requests without a valid access token from this address "
            f"(at most {item}); retry in {wait} s.",
            headers={"Retry-After": str(wait), **_headers(item, 0, reset)},
        )

    def render_exceeded(self, exc: RateLimitExceeded) -> Response:
        """Our JSON (or text) 429 with `Retry-After`, never Flask-Limiter's HTML page."""
        item = exc.limit.limit
        current = self.limiter.current_limit
        try:
            reset = current.window.reset_time if current else time.time() + item.get_expiry()
        except StorageError:  # failed since the check: the whole window is an upper bound
            reset = time.time() + item.get_expiry()
        wait = _seconds_until(reset)
        return render(
            ApiError(
                "rate_limit_exceeded",
                f"Too many requests: this client may make {item}; retry in {wait} s.",
                headers={"Retry-After": str(wait)},
            )
        )

    def add_headers(self, response: Response) -> Response:
        """`X-RateLimit-*` on the limited routes: the allowance, what is left, and when it
        resets (Unix time)."""
        current = self.limiter.current_limit
        if current is None:
            return response
        try:
            reset, remaining = current.window
        except StorageError:  # failed since the check: the headers are only a hint
            return response
        response.headers.update(_headers(current.limit, remaining, reset))
        return response


def _seconds_until(reset: float) -> int:
    return max(1, math.ceil(reset - time.time()))


def _headers(item: RateLimitItem, remaining: int, reset: float) -> dict[str, str]:
    values = (str(item.amount), str(remaining), str(math.ceil(reset)))
    return dict(zip(LIMIT_HEADERS, values, strict=True))


def _exempt() -> bool:
    return request.method == "OPTIONS" or request.endpoint not in UPSTREAM_ENDPOINTS


def init_app(app: Flask) -> RateLimits:
    """Binds the limits to `app`; call after `auth.init_app`, whose client name is the key."""
    settings = app.config["SETTINGS"]
    shared = not settings.ratelimit_storage_uri.startswith("memory:")
    options: dict = {"wrap_exceptions": True}
    if shared:
        options.update(socket_connect_timeout=STORAGE_TIMEOUT, socket_timeout=STORAGE_TIMEOUT)
    limiter = Limiter(
        auth.client_name,
        application_limits=[settings.rate_limit],
        application_limits_exempt_when=_exempt,
        strategy="fixed-window",
        storage_uri=settings.ratelimit_storage_uri,
        storage_options=options,
        in_memory_fallback_enabled=True,
        # A request whose Redis call fails while another request is switching to memory
        # passes unlimited, rather than failing with a 500.
        swallow_errors=True,
        headers_enabled=False,  # ours: Flask-Limiter's put Retry-After on every 200
        key_prefix=KEY_PREFIX,
    )
    limiter.logger = log.getChild("limits")  # "storage unreachable" / "recovered", redacted
    limiter.init_app(app)
    rate_limits = RateLimits(limiter, settings.rate_limit, shared)
    app.extensions["rate_limits"] = rate_limits
    app.register_error_handler(RateLimitExceeded, rate_limits.render_exceeded)
    app.after_request(rate_limits.add_headers)
    _warn_if_per_process(shared)
    return rate_limits


def _warn_if_per_process(shared: bool) -> None:
    # gunicorn.conf.py (and gunicorn itself) size the worker pool from WEB_CONCURRENCY; the app
    # has no other way to know that other processes serve it too.
    workers = os.environ.get("WEB_CONCURRENCY", "1").strip()
    if not shared and workers.isdigit() and int(workers) > 1:
        log.warning(
            "RATELIMIT_STORAGE_URI=memory:// with WEB_CONCURRENCY=%s: each worker process "
            "counts on its own, so a client may make up to %s times RATE_LIMIT; set "
            "RATELIMIT_STORAGE_URI=redis://host:6379/0 for one limit across processes",
            workers,
            workers,
        )
