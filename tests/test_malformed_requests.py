"""Malformed and malicious requests get the contract's 4xx answer (§4), never a 500 or HTML.

Every request is written byte for byte on a raw socket, so that nothing is normalised on the way
(`..` segments, encoded slashes, bodies that no JSON library would write). None of them may
reach the upstream.
"""

from __future__ import annotations

import http.client
import json
import socket
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import Service, service_env
from tests.fake_upstream import FakeUpstream

ACCESS_TOKEN = "tok-mallory-test-5e6f7a8b9c0d"
MAX_BYTES = 1024
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    """One bad request and the answer it must get."""

    id: str
    method: str
    target: str
    status: int
    code: str  # the JSON error code; for the text route, "" (its body is `error: …`)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    service: str = "default"  # which configuration answers: see `services`
    declared_length: int | None = None  # a Content-Length other than the body's
    chunked: bool = False

    @property
    def text_route(self) -> bool:
        return self.target.startswith("/callChatGPT")


def chat(body: bytes | str, **options) -> dict:
    raw = body.encode() if isinstance(body, str) else body
    return dict(method="POST", target="/chat", body=raw, **options)


def chat_json(document: dict, **options) -> dict:
    return chat(json.dumps(document), **options)


def v1_json(body: bytes | str, path: str = "chat/completions") -> dict:
    raw = body.encode() if isinstance(body, str) else body
    return dict(
        method="POST",
        target=f"/v1/{path}",
        body=raw,
        headers={"Content-Type": "application/json"},
    )


def bad_json(id: str, **request) -> Case:
    return Case(id, status=400, code="invalid_json", **request)


def bad_value(id: str, **request) -> Case:
    return Case(id, status=400, code="invalid_value", **request)


def bad_path(id: str, target: str) -> Case:
    return Case(id, "GET", target, 400, "invalid_path")


def unauthenticated(id: str, target: str = "/v1/models", **request) -> Case:
    text = target.startswith("/callChatGPT")
    code = "" if text else "invalid_access_token"
    return Case(id, request.pop("method", "GET"), target, 401, code, service="guarded", **request)


def too_large(id: str, target: str, **request) -> Case:
    code = "" if target.startswith("/callChatGPT") else "request_too_large"
    body = json.dumps({"message": "x" * 3000, "messages": HELLO, "input": "x"}).encode()
    return Case(id, "POST", target, 413, code, body=body, service="small", **request)


def text_error(id: str, method: str, target: str, status: int = 400, **request) -> Case:
    return Case(id, method, target, status, "", **request)


DEEP = "[" * 10_000 + "]" * 10_000
CASES = [
    # Bodies of /chat that are not one JSON object.
    bad_json("chat-truncated", **chat('{"message": "hi"')),
    bad_json("chat-trailing-garbage", **chat('{"message": "hi"} {"x": 1}')),
    bad_json("chat-duplicate-key", **chat('{"message": "a", "message": "b"}')),
    bad_json("chat-duplicate-model", **chat('{"message": "a", "model": "x", "model": "y"}')),
    bad_json("chat-nested-duplicate", **chat('{"messages": [{"role": "user", "role": "x"}]}')),
    bad_json("chat-nan", **chat('{"message": "a", "temperature": NaN}')),
    bad_json("chat-infinity", **chat('{"message": "a", "temperature": Infinity}')),
    bad_json("chat-minus-infinity", **chat('{"message": "a", "temperature": -Infinity}')),
    bad_json("chat-deep-nesting", **chat('{"message": "a", "x": ' + DEEP + "}")),
    bad_json("chat-invalid-utf8", **chat(b'{"message": "caf\xe9 \xff"}')),
    bad_json("chat-lone-surrogate-bytes", **chat(b'{"message": "\xed\xa0\x80"}')),
    bad_json("chat-utf8-bom", **chat(b'\xef\xbb\xbf{"message": "hi"}')),
    bad_json("chat-array", **chat('[{"message": "hi"}]')),
    bad_json("chat-string", **chat('"hi"')),
    bad_json("chat-number", **chat("42")),
    bad_json("chat-null", **chat("null")),
    bad_json("chat-empty", **chat("")),
    bad_json("chat-whitespace", **chat(" \r\n\t ")),
    bad_json("chat-form-encoded", **chat("message=hi&model=gpt-4o")),
    # Well-formed JSON with wrong fields or values.
    bad_value("chat-message-number", **chat_json({"message": 5})),
    bad_value("chat-message-object", **chat_json({"message": {"text": "hi"}})),
    bad_value("chat-messages-string", **chat_json({"messages": "x"})),
    bad_value("chat-messages-empty", **chat_json({"messages": []})),
    bad_value("chat-messages-item-number", **chat_json({"messages": [5]})),
    bad_value("chat-bad-role", **chat_json({"messages": [{"role": "root", "content": "hi"}]})),
    bad_value("chat-content-number", **chat_json({"messages": [{"role": "user", "content": 5}]})),
    bad_value("chat-temperature-word", **chat_json({"message": "a", "temperature": "hot"})),
    bad_value("chat-temperature-high", **chat_json({"message": "a", "temperature": 5})),
    bad_value("chat-temperature-bool", **chat_json({"message": "a", "temperature": True})),
    bad_value("chat-top-p-high", **chat_json({"message": "a", "top_p": 1.5})),
    bad_value("chat-max-tokens-zero", **chat_json({"message": "a", "max_tokens": 0})),
    bad_value("chat-max-tokens-fraction", **chat_json({"message": "a", "max_tokens": 1.5})),
    bad_value("chat-max-tokens-string", **chat_json({"message": "a", "max_tokens": "10"})),
    bad_value("chat-stream-word", **chat_json({"message": "a", "stream": "yes"})),
    bad_value("chat-stop-five", **chat_json({"message": "a", "stop": list("abcde")})),
    bad_value("chat-stop-number", **chat_json({"message": "a", "stop": 7})),
    bad_value("chat-model-number", **chat_json({"message": "a", "model": 4})),
    bad_value("chat-system-list", **chat_json({"message": "a", "system": ["x"]})),
    bad_value("chat-message-and-messages", **chat_json({"message": "a", "messages": HELLO})),
    bad_value("chat-api-base", **chat_json({"message": "a", "api_base": "http://evil/v1"})),
    bad_value("chat-base-url", **chat_json({"message": "a", "base_url": "http://evil/v1"})),
    bad_value("chat-api-key", **chat_json({"message": "a", "api_key": "sk-mine"})),
    Case("chat-missing-message", status=400, code="missing_field", **chat_json({})),
    Case("chat-blank-message", status=400, code="missing_field", **chat_json({"message": " "})),
    Case("chat-null-message", status=400, code="missing_field", **chat_json({"message": None})),
    # /callChatGPT answers in text: `error: …`.
    text_error("legacy-get-no-input", "GET", "/callChatGPT"),
    text_error("legacy-get-blank-input", "GET", "/callChatGPT?input=%20%20"),
    text_error("legacy-post-empty-json", **chat_json({}) | {"target": "/callChatGPT"}),
    text_error("legacy-post-no-body", "POST", "/callChatGPT"),
    text_error(
        "legacy-post-empty-form",
        "POST",
        "/callChatGPT",
        body=b"input=",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    text_error("legacy-temperature-word", "GET", "/callChatGPT?input=hi&temperature=hot"),
    text_error("legacy-max-tokens-zero", "GET", "/callChatGPT?input=hi&max_tokens=0"),
    text_error("legacy-stream-word", "GET", "/callChatGPT?input=hi&stream=perhaps"),
    text_error(
        "legacy-duplicate-input",
        "POST",
        "/callChatGPT",
        body=b'{"input": "a", "input": "b"}',
        headers={"Content-Type": "application/json"},
    ),
    text_error(
        "legacy-truncated-json",
        "POST",
        "/callChatGPT",
        body=b'{"input": "a"',
        headers={"Content-Type": "application/json"},
    ),
    text_error(
        "legacy-nan",
        "POST",
        "/callChatGPT",
        body=b'{"input": "a", "temperature": NaN}',
        headers={"Content-Type": "application/json"},
    ),
    text_error("legacy-delete", "DELETE", "/callChatGPT?input=hi", status=405),
    # Wrong methods and routes.
    Case("chat-get", "GET", "/chat", 405, "method_not_allowed"),
    Case("chat-put", "PUT", "/chat", 405, "method_not_allowed", body=b"{}"),
    Case("chat-trace", "TRACE", "/chat", 405, "method_not_allowed"),
    Case("v1-trace", "TRACE", "/v1/models", 405, "method_not_allowed"),
    Case("unknown-route", "GET", "/nope", 404, "not_found"),
    Case("unknown-api-route", "POST", "/api/chat", 404, "not_found", body=b"{}"),
    Case("chat-traversal", "GET", "/chat/../../etc/passwd", 404, "not_found"),
    Case("v1-put-chat-completions", "PUT", "/v1/chat/completions", 403, "path_not_allowed"),
    # /v1 paths that could leave the upstream's API.
    bad_path("v1-dotdot", "/v1/../files"),
    bad_path("v1-dotdot-inner", "/v1/models/../../files"),
    bad_path("v1-dot", "/v1/./models"),
    bad_path("v1-encoded-dotdot", "/v1/%2e%2e/files"),
    bad_path("v1-encoded-dotdot-upper", "/v1/%2E%2E/files"),
    bad_path("v1-half-encoded-dotdot", "/v1/.%2e/files"),
    bad_path("v1-double-encoded-dotdot", "/v1/%252e%252e/files"),
    bad_path("v1-encoded-slash-dotdot", "/v1/models/..%2f..%2ffiles"),
    bad_path("v1-empty-segment", "/v1//models"),
    bad_path("v1-trailing-empty-segment", "/v1/models//"),
    bad_path("v1-encoded-empty-segment", "/v1/%2f%2fevil/models"),
    bad_path("v1-backslash", "/v1/models\\x"),
    bad_path("v1-encoded-backslash", "/v1/models%5c..%5cfiles"),
    bad_path("v1-scheme", "/v1/http://evil/x"),
    bad_path("v1-encoded-scheme", "/v1/https:%2f%2fevil/x"),
    bad_path("v1-crlf", "/v1/%0d%0a"),
    bad_path("v1-header-injection", "/v1/models%0d%0aX-Injected:%201"),
    bad_path("v1-nul", "/v1/models%00"),
    bad_path("v1-double-encoded-nul", "/v1/models%2500"),
    bad_path("v1-tab", "/v1/models%09x"),
    bad_path("v1-del", "/v1/models%7f"),
    # /v1 bodies that the proxy and the upstream could read differently.
    bad_json("v1-duplicate-model", **v1_json('{"model": "gpt-4o", "model": "o3-mini"}')),
    bad_json("v1-nested-duplicate", **v1_json('{"messages": [{"role": "user", "role": "x"}]}')),
    bad_json("v1-nan", **v1_json('{"model": "gpt-4o", "temperature": NaN}')),
    bad_json("v1-infinity", **v1_json('{"model": "gpt-4o", "temperature": Infinity}')),
    bad_json("v1-invalid-utf8", **v1_json(b'{"model": "gpt-4o", "user": "\xff"}')),
    bad_json("v1-truncated", **v1_json('{"model": "gpt-4o"')),
    bad_json("v1-deep-nesting", **v1_json('{"model": "gpt-4o", "x": ' + DEEP + "}")),
    bad_json("v1-embeddings-duplicate", **v1_json('{"input": "a", "input": "b"}', "embeddings")),
    # With ACCESS_TOKENS, only `Authorization: Bearer <token>` lets a client in.
    unauthenticated("auth-none"),
    unauthenticated("auth-x-api-key", headers={"X-Api-Key": ACCESS_TOKEN}),
    unauthenticated("auth-api-key", headers={"Api-Key": ACCESS_TOKEN}),
    unauthenticated(
        "auth-basic",
        headers={"Authorization": "Basic " + b64encode(f"u:{ACCESS_TOKEN}".encode()).decode()},
    ),
    unauthenticated("auth-basic-bare", headers={"Authorization": f"Basic {ACCESS_TOKEN}"}),
    unauthenticated("auth-bearer-empty", headers={"Authorization": "Bearer "}),
    unauthenticated("auth-bearer-only", headers={"Authorization": "Bearer"}),
    unauthenticated("auth-no-scheme", headers={"Authorization": ACCESS_TOKEN}),
    unauthenticated("auth-wrong-token", headers={"Authorization": f"Bearer {ACCESS_TOKEN}x"}),
    unauthenticated("auth-token-prefix", headers={"Authorization": f"Bearer {ACCESS_TOKEN[:-1]}"}),
    unauthenticated("auth-cookie", headers={"Cookie": f"token={ACCESS_TOKEN}"}),
    unauthenticated("auth-query-api-key", f"/v1/models?api_key={ACCESS_TOKEN}"),
    unauthenticated("auth-query-key", f"/v1/models?key={ACCESS_TOKEN}"),
    unauthenticated("auth-query-token", f"/v1/models?access_token={ACCESS_TOKEN}"),
    unauthenticated("auth-chat", **chat_json({"message": "hi"})),
    unauthenticated("auth-legacy-query-token", f"/callChatGPT?input=hi&api_key={ACCESS_TOKEN}"),
    # Bodies over MAX_REQUEST_BYTES, declared or chunked.
    too_large("large-chat", "/chat"),
    too_large("large-chat-chunked", "/chat", chunked=True),
    too_large("large-chat-lying-length", "/chat", declared_length=50_000_000),
    too_large("large-v1", "/v1/chat/completions", headers={"Content-Type": "application/json"}),
    too_large(
        "large-v1-chunked",
        "/v1/chat/completions",
        headers={"Content-Type": "application/json"},
        chunked=True,
    ),
    too_large("large-v1-lying-length", "/v1/embeddings", declared_length=50_000_000),
    too_large(
        "large-v1-binary-chunked",
        "/v1/audio/transcriptions",
        headers={"Content-Type": "application/octet-stream"},
        chunked=True,
    ),
    too_large("large-legacy", "/callChatGPT", headers={"Content-Type": "application/json"}),
    too_large(
        "large-legacy-chunked",
        "/callChatGPT",
        headers={"Content-Type": "application/json"},
        chunked=True,
    ),
]


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(
    service: Service, upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Service]]:
    """The service for a case: the default one, `guarded` (ACCESS_TOKENS) or `small` bodies."""
    overrides = {
        "guarded": {"ACCESS_TOKENS": f"mallory:{ACCESS_TOKEN}"},
        "small": {"MAX_REQUEST_BYTES": str(MAX_BYTES)},
    }
    started: dict[str, Service] = {"default": service}

    def get(name: str) -> Service:
        if name not in started:
            workdir = tmp_path_factory.mktemp("service")
            env = service_env(upstream_server, workdir, overrides[name])
            started[name] = Service(env, workdir).start()
        return started[name]

    yield get
    for name, running in started.items():
        if name != "default":
            running.stop()


# --- Raw HTTP ---------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def mimetype(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip()


def send(service: Service, case: Case) -> RawAnswer:
    """Writes the case's request as it is and reads the answer, chunked or not."""
    headers = {"Host": f"127.0.0.1:{service.port}", "Connection": "close", **case.headers}
    if case.chunked:
        headers["Transfer-Encoding"] = "chunked"
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part)
            for part in (case.body[i : i + 500] for i in range(0, len(case.body), 500))
        )
        body += b"0\r\n\r\n"
    else:
        length = len(case.body) if case.declared_length is None else case.declared_length
        if length or case.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(length)
        body = case.body
    lines = [f"{case.method} {case.target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock, method=case.method)
        response.begin()
        return RawAnswer(response.status, response.headers, response.read())


# --- The promise ------------------------------------------------------------------------------


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_request_gets_the_contract_error(
    services: Callable[[str], Service], upstream: FakeUpstream, case: Case
) -> None:
    answer = send(services(case.service), case)

    shown = answer.body[:300]
    assert answer.status == case.status, shown
    if case.text_route:
        assert answer.mimetype == "text/plain", shown
        assert answer.body.startswith(b"error: "), shown
        assert answer.body.count(b"\n") <= 1, shown
    else:
        assert answer.mimetype == "application/json", shown
        error = json.loads(answer.body)["error"]
        assert error["code"] == case.code, shown
        assert error["message"], shown
        assert error["type"], shown
    assert upstream.requests == []
