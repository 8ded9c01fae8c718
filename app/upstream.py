"""The only module that talks to the provider.

One `requests.Session` per worker process keeps connections to the upstream open between
requests. `UpstreamClient.send` makes the attempts the contract's §5 allows (retries with
backoff and full jitter, `Retry-After`, key failover) and hands back an `UpstreamAnswer` whose
body has not been read, so that callers can relay it as it arrives. Each attempt carries the
request's `X-Request-ID` and is counted in the request's record and in the metrics.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_auth_from_url, select_proxy
from urllib3 import HTTPConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError

from . import metrics, requestlog, shutdown
from .errors import ApiError
from .keypool import KeyPool, mask_key
from .settings import Settings

log = logging.getLogger("chatproxy.upstream")

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 0.5  # seconds before the first retry, at most (full jitter)
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 60.0  # a longer Retry-After is passed to the client instead of waited out
ERROR_BODY_LIMIT = 1 << 20
READ_SIZE = 64 * 1024
QUOTA_REST = 300.0  # seconds an exhausted key rests when the upstream gives no Retry-After
URL_CACHE_SIZE = 256  # distinct upstream URLs (path and query) whose prepared form is kept
MAX_LINE = 64 * 1024  # longest chunk-size or trailer line, as http.client allows


@dataclass
class UpstreamAnswer:
    """An upstream response whose status is known and whose body is read on demand."""

    response: requests.Response
    attempts: int
    read_timeout: float
    started: float = 0.0  # time.monotonic() when the first attempt was sent
    body: bytes | None = None  # already read: error answers are read whole to look inside
    _closed: bool = field(default=False, repr=False)
    _finished: bool = field(default=False, repr=False)  # the whole body was read
    _aborted: ApiError | None = field(default=None, repr=False)
    _events: EventBody | None = field(default=None, repr=False)

    __hash__ = object.__hash__  # kept in `shutdown`'s set while its body is being read

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self):
        return self.response.headers

    @property
    def content_type(self) -> str:
        return self.response.headers.get("Content-Type", "")

    def iter_bytes(self) -> Iterator[bytes]:
        """The body as it arrives, each piece handed on as soon as the socket gives it.

        An event stream comes as an `EventBody`, which the relay can also wait on with a timeout.
        """
        if self.body is None and self._events is None:
            self._events = EventBody.open(self)
        return self._events if self._events is not None else self._iter_bytes()

    def _iter_bytes(self) -> Iterator[bytes]:
        if self.body is not None:
            if self.body:
                yield self.body
            return
        raw = self.response.raw
        shutdown.relaying(self)
        try:
            while chunk := raw.read1(READ_SIZE, decode_content=True):
                yield chunk
            if self._aborted:  # the closed socket may read as a clean end
                raise self._aborted
            self._finished = True
        except ReadTimeoutError:
            raise ApiError(
                "upstream_timeout",
                f"The upstream sent nothing for {self.read_timeout:g} s.",
            ) from None
        except (Urllib3Error, OSError, ValueError, AttributeError) as exc:
            # A read racing `close()` from another greenlet fails in one of these ways (urllib3
            # drops its file object on close: AttributeError).
            if self._aborted:
                raise self._aborted from None
            if self._closed:
                return
            if isinstance(exc, AttributeError):
                raise
            raise ApiError(
                "upstream_unreachable", "The connection to the upstream broke mid-answer."
            ) from None
        finally:
            shutdown.relayed(self)

    def read(self, limit: int = ERROR_BODY_LIMIT) -> bytes:
        """The whole body (at most `limit` bytes); for answers that are small by nature."""
        if self.body is None:
            parts, size = [], 0
            for chunk in self.iter_bytes():
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    break
            self.body = b"".join(parts)
        return self.body

    def json(self) -> object:
        """The body as JSON, or `upstream_bad_response` when it is not JSON."""
        try:
            return json.loads(self.read())
        except ValueError:
            raise ApiError(
                "upstream_bad_response", "The upstream answered with invalid JSON."
            ) from None

    def abort(self, error: ApiError) -> None:
        """Ends a body being read with `error` for its reader (the service is stopping)."""
        if not self._closed:
            self._aborted = error
            self.close()

    def close(self) -> None:
        """Closes the upstream connection, also when a reader in another thread is blocked on it.

        Shutting the socket down wakes that reader and tells the upstream at once; closing the
        response may then find the reader still inside the buffer, which stops on its own.
        """
        if self._closed:
            return
        self._closed = True
        if self._events is not None:
            shutdown.relayed(self)
        if self._finished:
            self.response.raw.release_conn()  # read to the end: back to the pool for reuse
            return
        connection = getattr(self.response.raw, "connection", None)
        sock = self._events.sock if self._events is not None else getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.response.close()
        except (RuntimeError, OSError, ValueError):
            pass


class EventBody:
    """An event stream's body read straight from the upstream socket, in the caller's thread.

    http.client reads one chunk per call through its own buffer, and a relay that must notice
    silence needed a reader thread for it; reading here saves ~27 us per chunk and ~20 KB per
    open stream (measured, 200 streams under gevent). Each
    `receive` takes all the socket holds (several chunks at once when the worker is behind),
    strips the chunked framing in one pass, and returns None when `timeout` passes in silence.
    After the last chunk, http.client's response is closed as after a read to the end, so the
    connection goes back to the pool; anything unexpected after it closes the connection instead.
    """

    def __init__(self, answer: UpstreamAnswer, sock: socket.socket, head: bytes, chunked: bool):
        self.sock = sock
        self._answer = answer
        self._chunked = chunked
        self._head = head  # what http.client's buffer held past the headers
        self._rest = b""  # framing not yet complete
        self._left = 0  # bytes of the current chunk still to come
        self._after_data = False  # the line ending a chunk's data comes next
        self._in_trailers = False
        self._ended = False
        self._silent_until = 0.0  # time.monotonic() at which silence becomes `upstream_timeout`

    @classmethod
    def open(cls, answer: UpstreamAnswer) -> EventBody | None:
        """The body of an event stream read here; None for any other body (read by urllib3)."""
        raw = answer.response.raw
        if "text/event-stream" not in answer.content_type or raw.headers.get(
            "Content-Encoding", "identity"
        ) not in ("", "identity"):
            return None
        response = getattr(raw, "_fp", None)  # http.client's response, headers read, body not
        reader = getattr(response, "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
        framed = getattr(response, "chunked", False)
        if (
            not isinstance(sock, socket.socket)  # not a TLS-in-TLS transport, for one
            or not isinstance(reader, io.BufferedReader)
            or getattr(raw, "_fp_bytes_read", 1)
            or (not framed and getattr(response, "length", 0) is not None)
        ):
            return None
        timeout = sock.gettimeout()
        sock.settimeout(0)  # peek then returns the buffer, or b"" at once
        try:
            head = reader.peek()
        except (OSError, ValueError):  # SSLWantReadError, a reset: the first receive sees it
            head = b""
        finally:
            sock.settimeout(timeout)
        if not response.will_close:  # frees its 8 KiB buffer; the socket stays open for reuse
            response.close()
        return cls(answer, sock, head, bool(framed))

    def __iter__(self) -> Iterator[bytes]:
        while (piece := self.receive(self._answer.read_timeout)) != b"":
            if piece:
                yield piece

    def receive(self, timeout: float) -> bytes | None:
        """What arrives within `timeout` seconds, unframed: None if nothing did, b"" at the end.

        Raises `upstream_timeout` after the upstream's read timeout of silence, and
        `upstream_unreachable` when the connection breaks or the framing is malformed.
        """
        answer = self._answer
        if self._ended or answer._closed:
            if answer._aborted:
                raise answer._aborted
            return b""
        now = time.monotonic()
        if not self._silent_until:
            shutdown.relaying(answer)
            self._silent_until = now + answer.read_timeout
        while True:
            if self._head:
                data, self._head = self._head, b""
            else:
                wait = min(timeout, self._silent_until - now)
                if wait <= 0:
                    raise ApiError(
                        "upstream_timeout",
                        f"The upstream sent nothing for {answer.read_timeout:g} s.",
                    )
                try:
                    # A TLS socket first hands what it already decrypted (its pending bytes).
                    self.sock.settimeout(wait)
                    data = self.sock.recv(READ_SIZE)
                except TimeoutError:
                    now = time.monotonic()
                    if now < self._silent_until:
                        return None
                    continue
                except (OSError, ValueError):  # also a socket closed by `abort` meanwhile
                    data = None
            if answer._aborted:
                raise answer._aborted
            if not data:
                if answer._closed:
                    return b""
                if data is None or self._chunked:
                    raise _broken()
                return self._end(reusable=True)  # read until close: a clean end
            now = time.monotonic()
            self._silent_until = now + answer.read_timeout
            piece = self._unframe(data) if self._chunked else data
            if self._ended:
                self._end(reusable=not self._rest)
                return piece
            if piece:
                return piece

    def _unframe(self, data: bytes) -> bytes:
        """The chunks' data in `data`, keeping an incomplete size or trailer line for later."""
        buffer = self._rest + data if self._rest else data
        pieces = []
        position, size = 0, len(buffer)
        while position < size:
            if self._left:
                end = min(size, position + self._left)
                pieces.append(buffer[position:end])
                self._left -= end - position
                position = end
                self._after_data = not self._left
                continue
            line_end = buffer.find(b"\n", position)
            if line_end < 0:
                if size - position > MAX_LINE:
                    raise _broken()
                break
            line = buffer[position:line_end].rstrip(b"\r")
            position = line_end + 1
            if self._after_data:
                if line:
                    raise _broken()
                self._after_data = False
            elif self._in_trailers:
                if not line:
                    self._ended = True
                    break
            else:
                try:
                    chunk = int(line.split(b";", 1)[0], 16)  # a chunk extension is ignored
                except ValueError:
                    raise _broken() from None
                if chunk < 0:
                    raise _broken()
                self._left = chunk
                self._in_trailers = chunk == 0
        self._rest = buffer[position:]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _end(self, reusable: bool) -> bytes:
        """After the last chunk: http.client's response closed, as after a read to the end, so
        that `UpstreamAnswer.close` returns the connection to the pool."""
        self._ended = True
        shutdown.relayed(self._answer)
        if reusable:
            self._answer.response.raw._fp.close()
            self._answer._finished = True
        return b""


def _broken() -> ApiError:
    return ApiError("upstream_unreachable", "The connection to the upstream broke mid-answer.")


class PoolCachingAdapter(HTTPAdapter):
    """An `HTTPAdapter` that finds an origin's connection pool once instead of on every request.

    The pool depends only on the origin, the CA bundle and the proxy, all fixed for the one
    upstream; `HTTPAdapter` builds a pool key and matches it under a lock per call (~30 µs).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._pools: dict[tuple, HTTPConnectionPool] = {}

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        proxies: dict[str, str] | None = None,
        cert: str | tuple[str, str] | None = None,
    ) -> HTTPConnectionPool:
        proxy = select_proxy(request.url, proxies) if proxies else None
        key = (*urlsplit(request.url)[:2], verify, cert, proxy)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # new, or closed by the pool manager since
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[key] = pool
        return pool


class UpstreamClient:
    """Sends through the session's adapter what `Session.request` would, deciding most of it once.

    `Session.request` merges the session's settings, parses the URL, resolves proxies and handles
    cookies on every call (~35% of an upstream call, measured); here the proxies, the CA bundle and
    the default headers are read from the configured session at start, each distinct URL is
    prepared once, and the mounted adapter sends (it never follows redirects nor touches the
    session's cookie jar).
    """

    def __init__(self, settings: Settings, pool_size: int = 10):
        self.settings = settings
        self.keys = KeyPool(settings.api_keys)
        self.session = self._session(pool_size)
        self._adapter = self.session.get_adapter(settings.base_url)
        self._proxies = dict(self.session.proxies)
        self._verify = self.session.verify
        self._headers = dict(self.session.headers)
        # Credentials in OPENAI_BASE_URL become Basic auth, as `requests` does with them.
        url_auth = get_auth_from_url(settings.base_url)
        self._url_auth = url_auth if any(url_auth) else None

    def _session(self, pool_size: int) -> requests.Session:
        session = requests.Session()
        # Proxies were resolved once from the environment in Settings; without trust_env,
        # requests neither rescans the environment nor lets ~/.netrc replace our Authorization.
        session.trust_env = False
        # Requests go through the adapter, which keeps no cookies; the policy guards the jar too.
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        session.proxies.update(self.settings.proxies)
        session.verify = self.settings.ca_bundle or True
        session.headers.clear()
        session.headers["User-Agent"] = "chatgpt-proxy"
        adapter = PoolCachingAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _prepare(
        self, method: str, url: str, headers: dict[str, str] | None, body: bytes | None
    ) -> requests.PreparedRequest:
        """The request all attempts send; each attempt only sets its key."""
        prepared = requests.PreparedRequest()
        prepared.prepare_method(method)
        prepared.url = _prepared_url(url)
        prepared.prepare_headers({**self._headers, **(headers or {})})
        prepared.prepare_body(body, None)
        return prepared

    def url(self, path: str, query: str = "") -> str:
        url = f"{self.settings.base_url}/{path.lstrip('/')}"
        return f"{url}?{query}" if query else url

    def send(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> UpstreamAnswer:
        """The upstream's final answer after the retries §5 allows; raises `ApiError` otherwise.

        Redirects and refused keys raise here, the same for every route; every other status
        (a final 429 or 5xx included) is returned for the caller to relay or translate.
        """
        if not self.keys:
            raise ApiError(
                "upstream_not_configured", "No upstream API key is configured on this server."
            )
        settings = self.settings
        record = requestlog.current()
        if record.request_id:
            headers = {**(headers or {}), requestlog.HEADER: record.request_id}
        try:
            prepared = self._prepare(method, self.url(path, query), headers, body)
        except requests.RequestException as exc:  # a header or URL `requests` refuses to send
            log.warning("upstream request not sent: %s", _brief(exc))
            raise _classify(exc, settings)[0] from None
        started = time.monotonic()
        deadline = started + settings.read_timeout
        refused: set[str] = set()  # keys that failed this request, skipped while others are fresh
        retries_done = attempts = 0
        while True:
            key = self.keys.choose(exclude=refused)
            attempts += 1
            record.upstream_attempts += 1
            attempt_started = time.monotonic()
            remaining = max(deadline - attempt_started, 0.05)
            prepared.headers["Authorization"] = f"Bearer {key}"
            if self._url_auth:
                prepared.prepare_auth(self._url_auth)
            try:
                response = self._adapter.send(
                    prepared,
                    stream=True,
                    timeout=(settings.connect_timeout, min(settings.read_timeout, remaining)),
                    verify=self._verify,
                    proxies=self._proxies,
                )
            except requests.RequestException as exc:
                metrics.labelled(metrics.UPSTREAM_LATENCY, "error").observe(
                    time.monotonic() - attempt_started
                )
                failure, retryable = _classify(exc, settings)
                log.warning("upstream %s on attempt %d: %s", failure.code, attempts, _brief(exc))
                delay = _backoff(retries_done)
                if retryable and self._may_retry(retries_done, delay, deadline):
                    metrics.labelled(metrics.UPSTREAM_RETRIES, "connect_error").inc()
                    retries_done += 1
                    time.sleep(delay)
                    continue
                raise failure from None

            metrics.labelled(metrics.UPSTREAM_LATENCY, str(response.status_code)).observe(
                time.monotonic() - attempt_started
            )
            record.upstream_request_id = response.headers.get("x-request-id")
            answer = UpstreamAnswer(response, attempts, settings.read_timeout, started)
            status = answer.status
            if 300 <= status < 400:
                answer.close()
                log.warning("upstream answered a redirect (%d); not followed", status)
                raise ApiError(
                    "upstream_bad_response",
                    "The upstream answered with a redirect.",
                )
            if status in (401, 403):
                answer.close()
                self.keys.retire(key)
                refused.add(key)
                log.error(
                    "upstream refused key %s with %d; it rests until restart", mask_key(key), status
                )
                if self.keys.has_fresh_key(refused):
                    metrics.labelled(metrics.KEY_FAILOVERS, str(status)).inc()
                    continue
                raise ApiError(
                    "upstream_auth_failed",
                    "The upstream refused this server's API key. Ask the administrator to check it.",
                )
            if status not in RETRYABLE_STATUSES:
                return answer

            answer.read()
            hinted = retry_after_seconds(answer.headers)
            if status == 429:
                exhausted = _error_code(answer.body) == "insufficient_quota"
                self.keys.rest(
                    key, hinted if hinted is not None else (QUOTA_REST if exhausted else 1.0)
                )
                refused.add(key)
                log.warning("upstream rate-limited key %s (attempt %d)", mask_key(key), attempts)
                if self.keys.has_fresh_key(refused):
                    metrics.labelled(
                        metrics.KEY_FAILOVERS, "insufficient_quota" if exhausted else "429"
                    ).inc()
                    answer.close()
                    continue
                if exhausted:
                    return answer
            if hinted is not None and hinted > RETRY_AFTER_CAP:
                return answer
            delay = hinted if hinted is not None else _backoff(retries_done)
            if not self._may_retry(retries_done, delay, deadline):
                return answer
            log.info("upstream answered %d; retrying in %.2f s", status, delay)
            metrics.labelled(metrics.UPSTREAM_RETRIES, str(status)).inc()
            answer.close()
            retries_done += 1
            time.sleep(delay)

    def _may_retry(self, retries_done: int, delay: float, deadline: float) -> bool:
        """Another attempt is allowed while retries remain and it can start before the deadline."""
        return retries_done < self.settings.retries and time.monotonic() + delay < deadline


@functools.lru_cache(maxsize=URL_CACHE_SIZE)
def _prepared_url(url: str) -> str:
    """The URL as `requests` sends it (IDNA host, requoted path and query), worked out once."""
    request = requests.PreparedRequest()
    request.prepare_url(url, None)
    return request.url


def retry_after_seconds(headers) -> float | None:
    """The wait the upstream asked for: `retry-after-ms`, else `Retry-After` (seconds or a date)."""
    milliseconds = _finite(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return max(milliseconds / 1000, 0.0)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _finite(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _backoff(retries_done: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**retries_done))


def _classify(exc: requests.RequestException, settings: Settings) -> tuple[ApiError, bool]:
    """The client's error for a request that got no answer, and whether it may be retried.

    Only failures to connect are retried: once the request was sent, the upstream may have
    processed (and billed) it, so a timeout or a dropped connection after that is final.
    """
    if isinstance(exc, requests.ConnectTimeout):
        message = f"The upstream did not accept a connection within {settings.connect_timeout:g} s."
        return ApiError("upstream_timeout", message), True
    if isinstance(exc, requests.ReadTimeout):
        message = f"The upstream did not answer within {settings.read_timeout:g} s."
        return ApiError("upstream_timeout", message), False
    if isinstance(exc, requests.exceptions.SSLError):
        return ApiError(
            "upstream_unreachable", "The TLS handshake with the upstream failed."
        ), False
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    connect_failed = isinstance(exc, requests.exceptions.ProxyError) or isinstance(
        reason, NewConnectionError
    )
    if connect_failed:
        return ApiError("upstream_unreachable", "The upstream could not be reached."), True
    if isinstance(reason, ProtocolError) or isinstance(exc, requests.ConnectionError):
        message = "The upstream closed the connection without answering."
        return ApiError("upstream_unreachable", message), False
    return ApiError("upstream_unreachable", "The request to the upstream failed."), False


def _brief(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _error_code(body: bytes | None) -> str | None:
    try:
        error = json.loads(body or b"").get("error")
        return error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None
