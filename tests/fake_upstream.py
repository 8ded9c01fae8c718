"""A fake OpenAI API on 127.0.0.1 that records what it received and misbehaves on command.

The proxy is tested over real sockets, as it runs in production: the fake answers like the OpenAI
API by default, and a test queues behaviours (errors, hangs, cut streams ...) to answer the next
requests. It runs in a background thread of the pytest process, so tests steer it directly.
"""

from __future__ import annotations

import base64
import re
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from json import dumps, loads

FAKE_KEY = "sk-test-FAKEKEY-0123456789abcdef"
DEFAULT_REPLY = "Hello from the fake upstream."
DEFAULT_MODEL = "gpt-4o-mini"
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "o3-mini", "text-embedding-3-small")
# Headers the real API sends that the proxy must not pass back to its clients.
ACCOUNT_HEADERS = {
    "openai-organization": "org-fake",
    "openai-project": "proj-fake",
    "Set-Cookie": "upstream=1",
}
FAKE_MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 8
CLOSE_POLL_SECONDS = 0.02
HANG_AFTER_SECONDS = 30.0


@dataclass
class RecordedRequest:
    """One request as the fake received it, for tests to inspect what the proxy sent."""

    method: str
    path: str
    query: str
    headers: Message
    body: bytes
    json: object | None
    received_at: float
    attempt: int
    closed_at: float | None = None

    @property
    def bearer(self) -> str | None:
        """The token of the Authorization header: which upstream key the proxy used."""
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return token if scheme.lower() == "bearer" else None


class Exchange:
    """One request being answered: the request, and the ways a behaviour can reply to it."""

    def __init__(self, handler: _Handler, fake: FakeUpstream, request: RecordedRequest) -> None:
        self._handler = handler
        self.fake = fake
        self.request = request

    @property
    def json_body(self) -> dict:
        """The request's JSON object, or {} so that behaviours need not check its shape."""
        return self.request.json if isinstance(self.request.json, dict) else {}

    def send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a whole response with a Content-Length, keeping the connection alive."""
        self._send_head(status, content_type, headers, {"Content-Length": str(len(body))})
        if self.request.method != "HEAD":
            self._handler.wfile.write(body)

    def send_json(
        self, status: int, payload: object, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send(status, dumps(payload).encode(), "application/json", headers)

    def start_chunked(
        self, status: int, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self._send_head(status, content_type, headers, {"Transfer-Encoding": "chunked"})

    def write_chunk(self, data: bytes) -> None:
        """Send one HTTP chunk at once (the socket writer is unbuffered and Nagle is off)."""
        self._handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def write_event(self, data: object) -> None:
        """Send one SSE `data:` event in its own chunk; strings go as they are, the rest as JSON."""
        text = data if isinstance(data, str) else dumps(data)
        self.write_chunk(f"data: {text}\n\n".encode())

    def end_chunked(self) -> None:
        self._handler.wfile.write(b"0\r\n\r\n")

    def cut(self) -> None:
        """Close the connection now, whatever was sent, as a crashing upstream would."""
        self._handler.close_connection = True
        try:
            self._handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def watch_for_close(self, seconds: float) -> bool:
        """Stay silent for `seconds`; return early, recording `closed_at`, if the client leaves."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.fake.stopping:
            if self._client_closed():
                self._handler.close_connection = True
                self.fake.mark_closed(self.request)
                return True
        return False

    def _client_closed(self) -> bool:
        sock = self._handler.connection
        try:
            readable, _, _ = select.select([sock], [], [], CLOSE_POLL_SECONDS)
            if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                return True
        except OSError:  # reset by the peer
            return True
        if readable:  # data from the client (a pipelined request) is not a close
            time.sleep(CLOSE_POLL_SECONDS)
        return False

    def _send_head(
        self,
        status: int,
        content_type: str | None,
        headers: Mapping[str, str] | None,
        framing: Mapping[str, str],
    ) -> None:
        identity = {"x-request-id": f"req_fake_{self.request.attempt}", **ACCOUNT_HEADERS}
        typed = {"Content-Type": content_type} if content_type else {}
        self._handler.send_response(status)
        for name, value in _merge_headers(identity, typed, headers or {}, framing).items():
            self._handler.send_header(name, value)
        self._handler.end_headers()


Behaviour = Callable[[Exchange], None]


class FakeUpstream:
    """The fake server: start it, point the proxy at `base_url`, queue behaviours, read `requests`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # a server context: answer over TLS, as the real provider does
        self.connections = 0  # accepted so far: tells whether the client kept one alive
        self.reply_text = DEFAULT_REPLY
        self.requests: list[RecordedRequest] = []
        self._queue: deque[Behaviour] = deque()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeUpstream:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-upstream",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests and end the behaviours still waiting (hangs, delays)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Answer the next requests with these behaviours, one each, in order."""
        with self._changed:
            self._queue.extend(behaviours)

    def reset(self) -> None:
        """Forget queued behaviours and recorded requests, and restore the default reply."""
        with self._changed:
            self._queue.clear()
            self.requests.clear()
            self.reply_text = DEFAULT_REPLY

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least `n` requests arrived (the proxy may still be retrying)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= n, timeout):
                seen = [f"{r.method} {r.path}" for r in self.requests]
                raise AssertionError(f"expected {n} upstream requests within {timeout} s: {seen}")
            return list(self.requests)

    def wait_for_close(self, request: RecordedRequest, timeout: float = 5.0) -> float | None:
        """Wait until the client closed the connection of a hanging or streaming answer."""
        with self._changed:
            self._changed.wait_for(lambda: request.closed_at is not None, timeout)
            return request.closed_at

    def record(self, method: str, target: str, headers: Message, body: bytes) -> RecordedRequest:
        """Called by the server thread for each request, before any behaviour answers it."""
        path, _, query = target.partition("?")
        with self._changed:
            request = RecordedRequest(
                method=method,
                path=path,
                query=query,
                headers=headers,
                body=body,
                json=_parse_json(body),
                received_at=time.monotonic(),
                attempt=len(self.requests) + 1,
            )
            self.requests.append(request)
            self._changed.notify_all()
            return request

    def next_behaviour(self) -> Behaviour:
        """The queued behaviour for this request, else the OpenAI-like default."""
        with self._changed:
            return self._queue.popleft() if self._queue else answer_like_openai

    def mark_closed(self, request: RecordedRequest) -> None:
        with self._changed:
            request.closed_at = time.monotonic()
            self._changed.notify_all()


class _Server(ThreadingHTTPServer):
    # Load tests open hundreds of connections at once: socketserver's default backlog of 5
    # would make the kernel drop some of them after the request was sent.
    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        self.fake.connections += 1
        if self.fake.tls is not None:
            sock = self.fake.tls.wrap_socket(sock, server_side=True)
        return sock, address

    def handle_error(self, request: object, client_address: object) -> None:
        """Stay quiet when a client hangs up: the tests make the proxy do that on purpose."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def _answer(self) -> None:
        fake = self.server.fake
        request = fake.record(self.command, self.path, self.headers, self._read_body())
        try:
            fake.next_behaviour()(Exchange(self, fake, request))
        except OSError:  # the client went away mid-answer
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked_body()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked_body(self) -> bytes:
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailer fields
            pass
        return b"".join(parts)

    def log_message(self, format: str, *args: object) -> None:
        """Tests read `FakeUpstream.requests` rather than an access log on stderr."""


# --- Behaviours: what a test queues to answer the next request ---------------------------------


def respond(
    status: int = 200,
    json: object = None,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    content_type: str | None = None,
) -> Behaviour:
    """Any canned response; `json` sets the body and, unless given, the Content-Type."""
    if json is not None:
        body = dumps(json).encode()
        content_type = content_type or "application/json"
    return partial(_send, status=status, body=body, content_type=content_type, headers=headers)


def openai_error(
    status: int,
    message: str,
    code: str | None = None,
    type: str = "invalid_request_error",
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    return respond(status, json=_error_body(message, type, code), headers=headers)


def rate_limited(
    retry_after: str | None = "1",
    retry_after_ms: str | None = None,
    code: str = "rate_limit_exceeded",
) -> Behaviour:
    """A 429 as OpenAI sends it; a header given as None is left out."""
    headers = {"retry-after": retry_after, "retry-after-ms": retry_after_ms}
    present = {name: str(value) for name, value in headers.items() if value is not None}
    return openai_error(429, "Rate limit reached for requests.", code, "requests", present)


def auth_failed(status: int = 401) -> Behaviour:
    """A refused key whose message quotes the key, as the real API does: it must not reach clients."""
    return partial(_auth_failed, status=status)


def hang(seconds: float = 30) -> Behaviour:
    """Read the request, answer nothing, and close after `seconds` unless the client leaves first."""
    return partial(_silence_then_cut, seconds=seconds)


def drop() -> Behaviour:
    """Close the connection without sending a byte."""
    return Exchange.cut


def stream(
    text: str | None = None,
    chunks: Sequence[str] | None = None,
    interval: float = 0.0,
    usage: bool = True,
    done: bool = True,
    stop_after: int | None = None,
    hang_after: int | None = None,
    content_type: str = "text/event-stream",
) -> Behaviour:
    """A chat.completion.chunk SSE stream, one event per HTTP chunk, sent as it is written.

    `chunks` are the content pieces; else `text` (else `reply_text`) split into words.
    `stop_after=n` cuts the connection after n pieces; `hang_after=n` goes silent after n pieces
    until the client leaves (recorded as `closed_at`) or 30 s pass.
    """
    return partial(
        _stream,
        text=text,
        chunks=chunks,
        interval=interval,
        usage=usage,
        done=done,
        stop_after=stop_after,
        hang_after=hang_after,
        content_type=content_type,
    )


def html(status: int = 200) -> Behaviour:
    """A web page where JSON was expected, as a captive portal or a misconfigured gateway sends."""
    page = b"<!DOCTYPE html><html><head><title>Gateway</title></head><body>oops</body></html>"
    return respond(status, body=page, content_type="text/html; charset=utf-8")


def redirect(
    location: str = "http://127.0.0.1:9/v1/chat/completions", status: int = 302
) -> Behaviour:
    return respond(status, headers={"Location": location})


def invalid_json() -> Behaviour:
    return respond(200, body=b"{not json", content_type="application/json")


def missing_choices() -> Behaviour:
    completion = {
        "id": "chatcmpl-fake-nochoices",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": DEFAULT_MODEL,
        "usage": _usage(1, 0),
    }
    return respond(200, json=completion)


def delay(seconds: float, behaviour: Behaviour) -> Behaviour:
    """Wait before answering (for first-byte timeouts); a client that leaves is recorded."""
    return partial(_delay, seconds=seconds, behaviour=behaviour)


def slow_body(seconds: float) -> Behaviour:
    """Send 200 headers, then nothing for `seconds`: the body never comes (a read timeout)."""
    return partial(_headers_then_silence, seconds=seconds)


def _send(
    exchange: Exchange,
    status: int,
    body: bytes,
    content_type: str | None,
    headers: Mapping[str, str] | None,
) -> None:
    exchange.send(status, body, content_type, headers)


def _auth_failed(exchange: Exchange, status: int) -> None:
    message = (
        f"Incorrect API key provided: {exchange.request.bearer or ''}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    exchange.send_json(status, _error_body(message, "invalid_request_error", "invalid_api_key"))


def _silence_then_cut(exchange: Exchange, seconds: float) -> None:
    exchange.watch_for_close(seconds)
    exchange.cut()


def _delay(exchange: Exchange, seconds: float, behaviour: Behaviour) -> None:
    if not exchange.watch_for_close(seconds):
        behaviour(exchange)


def _headers_then_silence(exchange: Exchange, seconds: float) -> None:
    exchange.start_chunked(200, "application/json")
    _silence_then_cut(exchange, seconds)


def _stream(
    exchange: Exchange,
    text: str | None,
    chunks: Sequence[str] | None,
    interval: float,
    usage: bool,
    done: bool,
    stop_after: int | None,
    hang_after: int | None,
    content_type: str,
) -> None:
    request = exchange.json_body
    if chunks is None:
        chunks = _split_words(exchange.fake.reply_text if text is None else text)
    pieces = list(chunks)
    with_usage = usage and bool((request.get("stream_options") or {}).get("include_usage"))
    chunk = partial(_completion_chunk, exchange, _model_of(request), with_usage)

    def emit(event: object) -> None:
        time.sleep(interval)
        exchange.write_event(event)

    exchange.start_chunked(200, content_type, {"Cache-Control": "no-cache"})
    exchange.write_event(chunk({"role": "assistant", "content": ""}))
    for sent, piece in enumerate(pieces):
        if _interrupted(exchange, sent, stop_after, hang_after):
            return
        emit(chunk({"content": piece}))
    if _interrupted(exchange, len(pieces), stop_after, hang_after):
        return
    emit(chunk({}, finish_reason="stop"))
    if with_usage:
        prompt_tokens = _words(_text_of(request.get("messages")))
        emit(chunk(None, usage=_usage(prompt_tokens, _words("".join(pieces)))))
    if done:
        emit("[DONE]")
    exchange.end_chunked()


def _interrupted(
    exchange: Exchange, sent: int, stop_after: int | None, hang_after: int | None
) -> bool:
    """Cut the stream (after a silence, for `hang_after`) once `sent` pieces went out."""
    if sent == hang_after:
        exchange.watch_for_close(HANG_AFTER_SECONDS)
    elif sent != stop_after:
        return False
    exchange.cut()
    return True


def _completion_chunk(
    exchange: Exchange,
    model: object,
    with_usage: bool,
    delta: dict | None,
    finish_reason: str | None = None,
    usage: dict | None = None,
) -> dict:
    """A chat.completion.chunk; `delta=None` makes the usage chunk, which has no choices."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    chunk = {
        "id": f"chatcmpl-fake-{exchange.request.attempt}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if with_usage:
        chunk["usage"] = usage
    return chunk


# --- The default behaviour: answer like the OpenAI API ------------------------------------------


def answer_like_openai(exchange: Exchange) -> None:
    """Answer as the OpenAI API would; an unknown route is echoed so that tests see what came."""
    request = exchange.request
    route = _ROUTES.get((request.method, request.path))
    if route is not None:
        route(exchange)
    elif request.method == "GET" and request.path.startswith("/v1/models/"):
        _model(exchange, request.path.removeprefix("/v1/models/"))
    else:
        payload = {"object": "echo", "method": request.method, "path": request.path}
        exchange.send_json(200, {**payload, "query": request.query})


def _chat_completion(exchange: Exchange) -> None:
    request = exchange.json_body
    if request.get("stream"):
        stream()(exchange)
        return
    reply = exchange.fake.reply_text
    message = {"role": "assistant", "content": reply, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    completion = {
        "id": f"chatcmpl-fake-{exchange.request.attempt}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": _model_of(request),
        "choices": [choice],
        "usage": _usage(_words(_text_of(request.get("messages"))), _words(reply)),
    }
    exchange.send_json(200, completion)


def _text_completion(exchange: Exchange) -> None:
    request = exchange.json_body
    reply = exchange.fake.reply_text
    choice = {"text": reply, "index": 0, "logprobs": None, "finish_reason": "stop"}
    completion = {
        "id": f"cmpl-fake-{exchange.request.attempt}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": _model_of(request),
        "choices": [choice],
        "usage": _usage(_words(_text_of(request.get("prompt"))), _words(reply)),
    }
    exchange.send_json(200, completion)


def _embeddings(exchange: Exchange) -> None:
    request = exchange.json_body
    inputs = _embedding_inputs(request.get("input"))
    as_base64 = request.get("encoding_format") == "base64"
    data = [
        {"object": "embedding", "index": index, "embedding": _vector(index, as_base64)}
        for index in range(len(inputs))
    ]
    words = _words(_text_of(inputs))
    usage = {"prompt_tokens": words, "total_tokens": words}
    model = request.get("model") or "text-embedding-3-small"
    exchange.send_json(200, {"object": "list", "data": data, "model": model, "usage": usage})


def _moderations(exchange: Exchange) -> None:
    request = exchange.json_body
    categories = ("harassment", "hate", "self-harm", "sexual", "violence")
    result = {
        "flagged": False,
        "categories": dict.fromkeys(categories, False),
        "category_scores": dict.fromkeys(categories, 0.0),
    }
    inputs = request.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    moderation = {
        "id": f"modr-fake-{exchange.request.attempt}",
        "model": request.get("model") or "omni-moderation-latest",
        "results": [result] * count,
    }
    exchange.send_json(200, moderation)


def _responses(exchange: Exchange) -> None:
    request = exchange.json_body
    reply = exchange.fake.reply_text
    attempt = exchange.request.attempt
    content = [{"type": "output_text", "text": reply, "annotations": []}]
    message = {
        "type": "message",
        "id": f"msg_fake_{attempt}",
        "status": "completed",
        "role": "assistant",
        "content": content,
    }
    input_tokens, output_tokens = _words(_text_of(request.get("input"))), _words(reply)
    response = {
        "id": f"resp_fake_{attempt}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": _model_of(request),
        "output": [message],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    }
    exchange.send_json(200, response)


def _models(exchange: Exchange) -> None:
    exchange.send_json(200, {"object": "list", "data": [_model_object(name) for name in MODELS]})


def _model(exchange: Exchange, model_id: str) -> None:
    if model_id in MODELS:
        exchange.send_json(200, _model_object(model_id))
    else:
        error = _error_body(
            f"The model '{model_id}' does not exist", "invalid_request_error", "model_not_found"
        )
        exchange.send_json(404, error)


def _speech(exchange: Exchange) -> None:
    exchange.send(200, FAKE_MP3, "audio/mpeg")


_ROUTES: dict[tuple[str, str], Behaviour] = {
    ("POST", "/v1/chat/completions"): _chat_completion,
    ("POST", "/v1/completions"): _text_completion,
    ("POST", "/v1/embeddings"): _embeddings,
    ("POST", "/v1/moderations"): _moderations,
    ("POST", "/v1/responses"): _responses,
    ("GET", "/v1/models"): _models,
    ("POST", "/v1/audio/speech"): _speech,
}


# --- Small helpers ------------------------------------------------------------------------------


def _merge_headers(*layers: Mapping[str, str]) -> dict[str, str]:
    """Later layers win, whatever the case of the header names."""
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            merged[name.lower()] = (name, value)
    return dict(merged.values())


def _parse_json(body: bytes) -> object | None:
    try:
        return loads(body) if body else None
    except ValueError:
        return None


def _error_body(message: str, type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _model_of(request: dict) -> object:
    return request.get("model") or DEFAULT_MODEL


def _model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "fake"}


def _text_of(value: object) -> str:
    """The text in a prompt, in message contents or content parts (the token counts use it)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _text_of(value.get("text", value.get("content")))
    if isinstance(value, list):
        return " ".join(map(_text_of, value))
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _split_words(text: str) -> list[str]:
    """Pieces of a stream: each word with the white space after it, so that they join back."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


def _embedding_inputs(value: object) -> list:
    """A string or a list of token ids is one input; a list of those is several."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return value
    return [value]


def _vector(index: int, as_base64: bool) -> list[float] | str:
    """A small vector, exact in float32, as floats or as the SDK's default base64 encoding."""
    values = [float(index), 0.5, -0.25, 0.125]
    if as_base64:
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values
