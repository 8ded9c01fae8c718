"""Rate limits: `RATE_LIMIT` per client on the routes that reach the upstream.

A client is its access token's name, else its address: the check keys on `auth.client_name()`,
which `auth.authenticate` sets, so `init_app` runs after `auth.init_app` (Flask calls
`before_request` hooks in the order they were added). Only `/callChatGPT`, `POST /chat` and
`/v1/…` spend the allowance, all three from one bucket; pages, static files, probes,
`/chat/conversations` and `/usage` do not.

Failed authentications count against the address, in a bucket of the same size: once it is
spent, further failures from that address get 429 instead of 401, which slows a brute force to
`RATE_LIMIT`. A valid token is a client of its own (its name) and is never refused for the
failures of others behind the same address.

The counting is `limits`' fixed windows (the library under Flask-Limiter), with the keys
Flask-Limiter gave them (`chatgpt-proxy/<client>/global`). Flask-Limiter itself is not used: it
resolves, parses and sorts the limits again on every request (~150 µs measured), where this
module does one counter increment.

`memory://` keeps the counters in the process; with gunicorn's one gevent worker that is the
whole service. `redis://…` shares them between processes and machines. When Redis does not
answer, each process counts in its own memory (logged once) and goes back to Redis once it
answers again (it looks again after 1, 2, 4 … 32 s); `/readyz` says `degraded` meanwhile.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from flask import Flask, Response, g, request
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from . import auth
from .errors import ApiError

log = logging.getLogger("chatproxy")
storage_log = log.getChild("limits")  # "storage unreachable" / "recovered"

UPSTREAM_ENDPOINTS = frozenset({"legacy.call_chatgpt", "chat.chat", "passthrough.relay"})
KEY_PREFIX = "chatgpt-proxy"  # several services may share one Redis database
SCOPE = "global"  # Flask-Limiter's scope for an application-wide limit: the same Redis keys
# Seconds Redis may take to connect or to answer before a request counts in memory instead.
STORAGE_TIMEOUT = 2.0
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
MAX_LOOK_INTERVAL = 32.0  # seconds between looks at an unreachable Redis, at most
SWEEP_EVERY = 60.0  # seconds between two passes that drop the counters of ended windows


class WindowCounts(Storage):
    """Fixed-window counters of one process, for `limits`' `FixedWindowRateLimiter`.

    `limits.storage.MemoryStorage` starts a timer thread (a greenlet under gevent) every 10 ms of
    traffic to expire its counters: ~60 µs of a request measured; ended windows are dropped
    here by the requests themselves, once a minute.
    """

    STORAGE_SCHEME = None  # not selectable by URI: `memory://` is mapped to it by `init_app`

    def __init__(self, sweep_every: float = SWEEP_EVERY) -> None:
        super().__init__()
        self._windows: dict[str, list] = {}  # key -> [end of its window, count]
        self._lock = threading.Lock()  # gthread workers count from several threads
        self._sweep_every = sweep_every
        self._next_sweep = time.time() + sweep_every

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return ()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        with self._lock:
            if now >= self._next_sweep:
                self._windows = {k: w for k, w in self._windows.items() if w[0] > now}
                self._next_sweep = now + self._sweep_every
            window = self._windows.get(key)
            if window is None or window[0] <= now:
                window = self._windows[key] = [now + expiry, 0]
            window[1] += amount
            return window[1]

    def get(self, key: str) -> int:
        window = self._windows.get(key)
        return window[1] if window and window[0] > time.time() else 0

    def get_expiry(self, key: str) -> float:
        now = time.time()
        window = self._windows.get(key)
        return window[0] if window and window[0] > now else now

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            count, self._windows = len(self._windows), {}
        return count

    def clear(self, key: str) -> None:
        self._windows.pop(key, None)


class RateLimits:
    """The limits of one app: `RATE_LIMIT` per client on the upstream routes, and failed
    authentications per address, in the configured storage or, while it fails, in memory."""

    def __init__(self, rate_limit: str, storage_uri: str):
        # Smallest window first: it is the one the headers describe, as with Flask-Limiter.
        self.items: list[RateLimitItem] = sorted(parse_many(rate_limit))
        self.shared = not storage_uri.startswith("memory:")
        memory = FixedWindowRateLimiter(WindowCounts())
        if self.shared:
            self.storage = storage_from_string(
                storage_uri,
                wrap_exceptions=True,
                socket_connect_timeout=STORAGE_TIMEOUT,
                socket_timeout=STORAGE_TIMEOUT,
            )
            self._configured = FixedWindowRateLimiter(self.storage)
        else:
            self.storage, self._configured = memory.storage, memory
        self._memory = memory
        self.in_fallback = False  # counting in memory because Redis did not answer
        self._looks = 0  # looks at Redis since it failed
        self._last_look = 0.0

    def storage_state(self) -> str:
        """`memory` (as configured), `ok` (Redis answers and is used), or `unreachable`
        (Redis does not answer, or has not been looked at again yet: limits are per process)."""
        if not self.shared:
            return "memory"
        if self.in_fallback:
            self._look_again()
            return "unreachable" if self.in_fallback else "ok"
        return "ok" if self._safe_check() else "unreachable"

    def check_request(self) -> None:
        """`before_request`: spends one request of the client's allowance on the upstream
        routes; 429 once it is spent."""
        if request.endpoint not in UPSTREAM_ENDPOINTS or request.method == "OPTIONS":
            return
        identifiers = (KEY_PREFIX, auth.client_name(), SCOPE)
        g.rate_limit = (self.items[0], identifiers)
        for item in self.items:
            if not self._call("hit", item, identifiers):
                g.rate_limit = (item, identifiers)
                raise self._exceeded(item, identifiers)

    def add_headers(self, response: Response) -> Response:
        """`X-RateLimit-*` on the limited routes: the allowance, what is left, and when it
        resets (Unix time)."""
        limit = g.get("rate_limit")
        if limit is None:
            return response
        item, identifiers = limit
        try:
            reset, remaining = self._strategy().get_window_stats(item, *identifiers)
        except StorageError:  # failed since the check: the headers are only a hint
            return response
        response.headers.update(_headers(item, remaining, reset))
        return response

    def refuse_spent_address(self, address: str) -> None:
        """429 once `address` has spent its allowance on failed authentications."""
        identifiers = (KEY_PREFIX, "failed-authentication", address)
        for item in self.items:
            if not self._call("test", item, identifiers):
                raise self._failures_exceeded(item, identifiers, address)

    def count_failed_authentication(self, address: str) -> None:
        identifiers = (KEY_PREFIX, "failed-authentication", address)
        for item in self.items:
            self._call("hit", item, identifiers)

    def _exceeded(self, item: RateLimitItem, identifiers: tuple[str, ...]) -> ApiError:
        wait = _seconds_until(self._reset_time(item, identifiers))
        return ApiError(
            "rate_limit_exceeded",
            f"Too many requests: this client may make {item}; retry in {wait} s.",
            headers={"Retry-After": str(wait)},
        )

    def _failures_exceeded(
        self, item: RateLimitItem, identifiers: tuple[str, ...], address: str
    ) -> ApiError:
        reset = self._reset_time(item, identifiers)
        wait = _seconds_until(reset)
        return ApiError(
            "rate_limit_exceeded",
            f"Too many requests without a valid access token from this address "
            f"(at most {item}); retry in {wait} s.",
            headers={"Retry-After": str(wait), **_headers(item, 0, reset)},
        )

    def _reset_time(self, item: RateLimitItem, identifiers: tuple[str, ...]) -> float:
        try:
            return self._strategy().get_window_stats(item, *identifiers).reset_time
        except StorageError:  # failed since the check: the whole window is an upper bound
            return time.time() + item.get_expiry()

    def _strategy(self) -> FixedWindowRateLimiter:
        return self._memory if self.in_fallback else self._configured

    def _call(self, method: str, item: RateLimitItem, identifiers: tuple[str, ...]) -> bool:
        """`hit` or `test` in the storage in use, moving to memory when Redis fails."""
        if self.in_fallback:
            self._look_again()
        try:
            return getattr(self._strategy(), method)(item, *identifiers)
        except StorageError:
            if not self.in_fallback:
                storage_log.warning(
                    "Rate limit storage unreachable - falling back to in-memory storage"
                )
                self.in_fallback, self._looks, self._last_look = True, 0, time.time()
            return getattr(self._memory, method)(item, *identifiers)

    def _look_again(self) -> None:
        """Goes back to Redis when it answers again, looking at most after 1, 2, 4 … 32 s."""
        now = time.time()
        if now - self._last_look <= min(2.0**self._looks, MAX_LOOK_INTERVAL):
            return
        self._last_look, self._looks = now, self._looks + 1
        if self._safe_check():
            storage_log.info("Rate limit storage recovered")
            self.in_fallback = False

    def _safe_check(self) -> bool:
        try:
            return self.storage.check()
        except StorageError:
            return False


def _seconds_until(reset: float) -> int:
    return max(1, math.ceil(reset - time.time()))


def _headers(item: RateLimitItem, remaining: int, reset: float) -> dict[str, str]:
    values = (str(item.amount), str(remaining), str(math.ceil(reset)))
    return dict(zip(LIMIT_HEADERS, values, strict=True))


def init_app(app: Flask) -> RateLimits:
    """Binds the limits to `app`; call after `auth.init_app`, whose client name is the key."""
    settings = app.config["SETTINGS"]
    rate_limits = RateLimits(settings.rate_limit, settings.ratelimit_storage_uri)
    app.extensions["rate_limits"] = rate_limits
    app.before_request(rate_limits.check_request)
    app.after_request(rate_limits.add_headers)
    _warn_if_per_process(rate_limits.shared)
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
