"""`/v1/<path>`: the OpenAI-compatible passthrough, seen by the official SDK and by raw clients.

Checks the contract's §3 `/v1` promises: the SDK works against the proxy, its exception classes
match our errors, headers are cleaned both ways, the allowlist and `ALLOWED_MODELS` hold, and
nothing a client sends changes which host receives the request.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import openai
import pytest
import requests

from tests.conftest import Service, assert_no_secrets, service_env
from tests.fake_upstream import (
    DEFAULT_REPLY,
    FAKE_KEY,
    FAKE_MP3,
    MODELS,
    FakeUpstream,
    auth_failed,
    hang,
    rate_limited,
    redirect,
    respond,
)

ACCESS_TOKEN = "tok-alice-7c1d2e3f4a5b6c7d"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "two words"}]}
SPEECH = {"model": "tts-1", "voice": "alloy", "input": "hello"}


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Service]]:
    """Start module-wide services with overrides, so that each configuration starts once."""
    started: list[Service] = []

    def start(**overrides: str | None) -> Service:
        workdir = tmp_path_factory.mktemp("service")
        service = Service(service_env(upstream_server, workdir, overrides), workdir).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def restricted(start_service: Callable[..., Service]) -> Service:
    return start_service(ALLOWED_MODELS="gpt-4o*")


@pytest.fixture(scope="module")
def guarded(start_service: Callable[..., Service]) -> Service:
    return start_service(ACCESS_TOKENS=f"alice:{ACCESS_TOKEN}")


@pytest.fixture(scope="module")
def impatient(start_service: Callable[..., Service]) -> Service:
    return start_service(UPSTREAM_TIMEOUT="1")


@pytest.fixture(scope="module")
def files_open(start_service: Callable[..., Service]) -> Service:
    return start_service(V1_ALLOWED_PATHS="files,files/*,chat/completions")


@pytest.fixture(scope="module")
def attacker() -> Iterator[FakeUpstream]:
    """A second upstream standing for a host an attacker controls: it must hear nothing."""
    fake = FakeUpstream().start()
    yield fake
    assert fake.requests == [], [f"{r.method} {r.path}" for r in fake.requests]
    fake.stop()


def sdk_for(service: Service, api_key: str = "unused-client-key", **options) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{service.url}/v1", api_key=api_key, timeout=20, **{"max_retries": 0, **options}
    )


@pytest.fixture
def restricted_sdk(restricted: Service) -> Iterator[openai.OpenAI]:
    client = sdk_for(restricted)
    yield client
    client.close()


# --- Raw HTTP, for what `requests` would normalise ------------------------------------------


@dataclass
class RawAnswer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def mimetype(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip()

    def error_code(self) -> str:
        return json.loads(self.body)["error"]["code"]


def send_raw(
    service: Service, method: str, target: str, headers: dict[str, str] | None = None
) -> RawAnswer:
    """One request written byte for byte (the target is not normalised), its answer parsed."""
    head = {"Host": f"127.0.0.1:{service.port}", "Connection": "close", **(headers or {})}
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return RawAnswer(response.status, response.headers, response.read())


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert response.json()["error"]["code"] == code


# --- The official SDK works through the proxy -------------------------------------------------


def test_sdk_chat_completion(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    completion = sdk.chat.completions.create(**CHAT)

    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert completion.usage.total_tokens == 7
    [received] = upstream.requests
    assert (received.method, received.path) == ("POST", "/v1/chat/completions")


def test_sdk_chat_stream_with_usage_chunk(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    chunks = list(
        sdk.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == 7


def test_sdk_models_list_and_retrieve(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    assert [model.id for model in sdk.models.list()] == list(MODELS)
    assert sdk.models.retrieve("gpt-4o").id == "gpt-4o"


def test_sdk_embeddings(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    result = sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])

    assert [item.embedding for item in result.data] == [
        [0.0, 0.5, -0.25, 0.125],
        [1.0, 0.5, -0.25, 0.125],
    ]


def test_sdk_text_completion(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    completion = sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")

    assert completion.choices[0].text == DEFAULT_REPLY


def test_sdk_moderation(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    moderation = sdk.moderations.create(input=["one", "two"])

    assert [result.flagged for result in moderation.results] == [False, False]


def test_sdk_speech_returns_the_audio_bytes(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    speech = sdk.audio.speech.create(**SPEECH)

    assert speech.read() == FAKE_MP3
    assert speech.response.headers["content-type"] == "audio/mpeg"


# --- The SDK's exception classes match our errors ---------------------------------------------


def test_sdk_bad_request_for_invalid_path(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.get("/models/%252e%252e/files", cast_to=object)

    assert caught.value.code == "invalid_path"
    assert upstream.requests == []


def test_sdk_bad_request_for_model_not_allowed(
    restricted_sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        restricted_sdk.chat.completions.create(**{**CHAT, "model": "o3-mini"})

    assert caught.value.code == "model_not_allowed"
    assert caught.value.type == "invalid_request_error"
    assert upstream.requests == []


def test_sdk_bad_request_for_invalid_json(sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    body = b'{"model": "gpt-4o-mini", "model": "o3-mini", "messages": []}'

    with pytest.raises(openai.BadRequestError) as caught:
        sdk.post(
            "/chat/completions",
            content=body,
            cast_to=object,
            options={"headers": {"Content-Type": "application/json"}},
        )

    assert caught.value.code == "invalid_json"
    assert upstream.requests == []


def test_sdk_authentication_error_for_a_wrong_access_token(
    guarded: Service, upstream: FakeUpstream
) -> None:
    with sdk_for(guarded, api_key="not-the-token") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(**CHAT)

    assert caught.value.code == "invalid_access_token"
    assert upstream.requests == []


def test_sdk_uses_the_access_token_as_its_api_key(guarded: Service, upstream: FakeUpstream) -> None:
    with sdk_for(guarded, api_key=ACCESS_TOKEN) as client:
        completion = client.chat.completions.create(**CHAT)

    assert completion.choices[0].message.content == DEFAULT_REPLY
    [received] = upstream.requests
    assert received.bearer == FAKE_KEY
    assert ACCESS_TOKEN not in str(received.headers.items()) + received.body.decode()


def test_sdk_permission_denied_for_a_closed_path(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk.files.list()

    assert caught.value.code == "path_not_allowed"
    assert caught.value.type == "permission_error"
    assert upstream.requests == []


def test_sdk_rate_limit_error_is_not_retried_by_the_sdk(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(*[rate_limited(retry_after="0")] * 3)  # UPSTREAM_RETRIES=2: 3 attempts

    with sdk_for(service, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**CHAT)

    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.headers["retry-after"] == "0"
    assert len(upstream.requests) == 3  # the proxy's attempts only: the SDK made no retry


def test_sdk_internal_server_error_for_a_refused_upstream_key(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.enqueue(auth_failed(401))

    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(**CHAT)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_auth_failed"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert_no_secrets(caught.value.response.text)


def test_sdk_internal_server_error_for_an_upstream_timeout(
    impatient: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(hang(10))

    with sdk_for(impatient) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(**CHAT)

    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert len(upstream.requests) == 1  # a read timeout may have been billed: no retry


# --- Header hygiene ---------------------------------------------------------------------------

DROPPED_REQUEST_HEADERS = {
    "Cookie": "session=client-cookie",
    "X-Api-Key": "client-x-api-key",
    "Api-Key": "client-api-key",
    "Proxy-Authorization": "Basic Y2xpZW50OnNlY3JldA==",
    "OpenAI-Organization": "org-client",
    "OpenAI-Project": "proj-client",
    "Keep-Alive": "timeout=5",
    "Proxy-Connection": "keep-alive",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Upgrade": "h2c",
    "X-Named-By-Connection": "hop-only",
    "X-Also-Named": "hop-only-too",
}
# Spacing, key order, escapes and fields the proxy does not know: all must arrive unchanged.
ODD_BODY = (
    b'{ "messages" : [{"role":"user","content":"caf\\u00e9 \xe2\x98\x95"}],\n'
    b'  "model":"gpt-4o-mini", "future_field": {"nested": [1, 2.50, true, null]},'
    b' "temperature": 1.0e0 }'
)


def test_client_credentials_and_hop_headers_are_not_forwarded(
    service: Service, upstream: FakeUpstream
) -> None:
    headers = {
        **DROPPED_REQUEST_HEADERS,
        "Authorization": "Bearer client-own-key",
        "Host": "client.example:8443",
        "Connection": "keep-alive, X-Named-By-Connection,x-also-named",
        "X-Custom-Header": "kept  as; sent=1",
        "Content-Type": "application/json",
    }

    response = requests.post(
        f"{service.url}/v1/chat/completions", data=ODD_BODY, headers=headers, timeout=10
    )

    assert response.status_code == 200, response.text
    [received] = upstream.requests
    assert received.headers.get_all("Authorization") == [f"Bearer {FAKE_KEY}"]
    assert received.headers["Host"] == f"127.0.0.1:{upstream.port}"
    for name in DROPPED_REQUEST_HEADERS.keys() - {"Cookie"}:  # see the test just below
        assert received.headers.get(name) is None, name
    assert "client-cookie" not in str(received.headers.get_all("Cookie"))
    assert received.headers["X-Custom-Header"] == "kept  as; sent=1"
    assert "client-own-key" not in str(dict(received.headers))


def test_no_cookie_reaches_the_upstream(service: Service, upstream: FakeUpstream) -> None:
    """Neither the client's cookies nor those the upstream set earlier (for another client)."""
    statuses = [  # the fake answers every request with `Set-Cookie: upstream=1`
        requests.post(
            f"{service.url}/v1/chat/completions",
            json=CHAT,
            headers={"Cookie": "session=client-cookie"},
            timeout=10,
        ).status_code
        for _ in range(2)
    ]

    assert statuses == [200, 200]
    assert [r.headers.get_all("Cookie") for r in upstream.requests] == [None, None]


def test_unknown_body_fields_pass_byte_for_byte(service: Service, upstream: FakeUpstream) -> None:
    response = requests.post(
        f"{service.url}/v1/chat/completions",
        data=ODD_BODY,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )

    assert response.status_code == 200, response.text
    [received] = upstream.requests
    assert received.body == ODD_BODY


def test_query_string_passes_through(service: Service, upstream: FakeUpstream) -> None:
    query = "limit=2&after=model%2Fx&flag&q=a+b&q=%C3%A9"

    response = requests.get(f"{service.url}/v1/models?{query}", timeout=10)

    assert response.status_code == 200
    [received] = upstream.requests
    assert received.query == query


def test_upstream_status_type_and_body_come_back_as_sent(
    service: Service, upstream: FakeUpstream
) -> None:
    body = b"I'm a teapot\x00\xff raw bytes"
    upstream.enqueue(respond(418, body=body, content_type="application/x-teapot; v=1"))

    response = requests.post(f"{service.url}/v1/chat/completions", json=CHAT, timeout=10)

    assert response.status_code == 418
    assert response.headers["Content-Type"] == "application/x-teapot; v=1"
    assert response.content == body


def test_an_unencoded_answer_keeps_its_length_and_an_encoded_one_is_relayed_decoded(
    service: Service, upstream: FakeUpstream
) -> None:
    """A whole length spares the chunked framing and lets a client see a cut body as cut."""
    plain = json.dumps({"id": "chatcmpl-plain", "choices": []}).encode()
    upstream.enqueue(respond(200, body=plain, content_type="application/json"))
    upstream.enqueue(
        respond(
            200,
            body=gzip.compress(plain),
            content_type="application/json",
            headers={"Content-Encoding": "gzip"},
        )
    )

    with requests.Session() as session:
        first = session.post(f"{service.url}/v1/chat/completions", json=CHAT, stream=True)
        assert first.headers["Content-Length"] == str(len(plain))
        assert "Transfer-Encoding" not in first.headers
        assert first.raw.read() == plain
        second = session.post(f"{service.url}/v1/chat/completions", json=CHAT, stream=True)
        assert "Content-Encoding" not in second.headers
        assert "Content-Length" not in second.headers  # the gzip length is not the body's
        assert second.raw.read() == plain


def test_with_a_daily_budget_an_answer_goes_chunked_so_its_row_precedes_its_end(
    start_service: Callable[..., Service], upstream: FakeUpstream
) -> None:
    """A body with a Content-Length is whole for the client once its last byte arrives, before
    the relay has written the ledger row that the client's next request must meet."""
    budgeted = start_service(DAILY_TOKEN_BUDGET="1000000")
    plain = json.dumps({"id": "chatcmpl-plain", "choices": []}).encode()
    upstream.enqueue(respond(200, body=plain, content_type="application/json"))

    response = requests.post(f"{budgeted.url}/v1/chat/completions", json=CHAT, stream=True)

    assert "Content-Length" not in response.headers
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.raw.read() == plain


def test_upstream_404_error_comes_back_as_sent(service: Service, upstream: FakeUpstream) -> None:
    response = requests.get(f"{service.url}/v1/models/no-such-model", timeout=10)

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"] == {
        "message": "The model 'no-such-model' does not exist",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }


@pytest.mark.parametrize("stream", [False, True], ids=["json", "event-stream"])
def test_account_headers_are_not_passed_back(
    service: Service, upstream: FakeUpstream, stream: bool
) -> None:
    response = requests.post(
        f"{service.url}/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=10
    )

    assert response.status_code == 200
    for name in ("Set-Cookie", "openai-organization", "openai-project"):
        assert name not in response.headers, name
    assert response.headers["x-request-id"] == "req_fake_1"


# --- The allowlist of paths -------------------------------------------------------------------

IMAGE = ("image.png", b"\x89PNG\r\n\x1a\nfake", "image/png")
AUDIO = ("audio.mp3", FAKE_MP3, "audio/mpeg")
DEFAULT_PATHS = [
    ("GET", "models", {}),
    ("GET", "models/gpt-4o", {}),
    ("POST", "chat/completions", {"json": CHAT}),
    ("POST", "completions", {"json": {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}}),
    ("POST", "embeddings", {"json": {"model": "text-embedding-3-small", "input": "hi"}}),
    ("POST", "moderations", {"json": {"input": "hi"}}),
    ("POST", "responses", {"json": {"model": "gpt-4o", "input": "hi"}}),
    ("POST", "images/generations", {"json": {"model": "dall-e-3", "prompt": "a cat"}}),
    ("POST", "images/edits", {"files": {"image": IMAGE}, "data": {"prompt": "a hat"}}),
    ("POST", "images/variations", {"files": {"image": IMAGE}}),
    ("POST", "audio/speech", {"json": SPEECH}),
    ("POST", "audio/transcriptions", {"files": {"file": AUDIO}, "data": {"model": "whisper-1"}}),
    ("POST", "audio/translations", {"files": {"file": AUDIO}, "data": {"model": "whisper-1"}}),
]
CLOSED_PATHS = [
    ("GET", "files"),
    ("POST", "files"),
    ("GET", "files/file-abc/content"),
    ("GET", "batches"),
    ("POST", "batches"),
    ("GET", "assistants"),
    ("POST", "threads"),
    ("GET", "responses/resp_123"),
    ("DELETE", "responses/resp_123"),
    ("GET", "chat/completions"),
    ("GET", "fine_tuning/jobs"),
    ("GET", "organization/usage/completions"),
    ("GET", "vector_stores"),
    ("DELETE", "models/x"),
]


@pytest.mark.parametrize(
    ("method", "path", "send"), DEFAULT_PATHS, ids=[f"{m} {p}" for m, p, _ in DEFAULT_PATHS]
)
def test_default_paths_reach_the_upstream(
    service: Service, upstream: FakeUpstream, method: str, path: str, send: dict
) -> None:
    response = requests.request(method, f"{service.url}/v1/{path}", timeout=10, **send)

    assert response.status_code == 200, response.text
    [received] = upstream.requests
    assert (received.method, received.path) == (method, f"/v1/{path}")


@pytest.mark.parametrize(("method", "path"), CLOSED_PATHS, ids=[" ".join(c) for c in CLOSED_PATHS])
def test_stored_object_paths_are_closed_by_default(
    service: Service, upstream: FakeUpstream, method: str, path: str
) -> None:
    body = json.dumps({"model": "gpt-4o-mini"}) if method == "POST" else None
    response = requests.request(method, f"{service.url}/v1/{path}", data=body, timeout=10)

    assert_error(response, 403, "path_not_allowed")
    assert response.json()["error"]["type"] == "permission_error"
    assert upstream.requests == []


def test_v1_allowed_paths_opens_files(files_open: Service, upstream: FakeUpstream) -> None:
    upstream.enqueue(respond(200, json={"object": "list", "data": [], "has_more": False}))

    with sdk_for(files_open) as client:
        assert list(client.files.list()) == []
    posted = requests.post(f"{files_open.url}/v1/files", data={"purpose": "batch"}, timeout=10)
    closed = requests.get(f"{files_open.url}/v1/batches", timeout=10)

    assert posted.status_code == 200
    assert_error(closed, 403, "path_not_allowed")
    assert [(r.method, r.path) for r in upstream.requests] == [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
    ]


# --- ALLOWED_MODELS ---------------------------------------------------------------------------


def test_allowed_model_passes(restricted_sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    completion = restricted_sdk.chat.completions.create(**{**CHAT, "model": "gpt-4o"})

    assert completion.model == "gpt-4o"
    assert len(upstream.requests) == 1


def test_multipart_model_not_allowed(restricted_sdk: openai.OpenAI, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        restricted_sdk.audio.transcriptions.create(model="whisper-1", file=AUDIO)

    assert caught.value.code == "model_not_allowed"
    assert upstream.requests == []


def test_multipart_allowed_model_passes(
    restricted_sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.enqueue(respond(200, json={"text": "transcribed"}))

    transcription = restricted_sdk.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=AUDIO
    )

    assert transcription.text == "transcribed"
    [received] = upstream.requests
    assert received.path == "/v1/audio/transcriptions"
    assert b'name="model"\r\n\r\ngpt-4o-transcribe\r\n' in received.body


def test_model_list_shows_only_allowed_models(
    restricted_sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    assert [model.id for model in restricted_sdk.models.list()] == ["gpt-4o-mini", "gpt-4o"]


def test_a_model_not_allowed_is_not_found(restricted: Service, upstream: FakeUpstream) -> None:
    response = requests.get(f"{restricted.url}/v1/models/o3-mini", timeout=10)

    assert_error(response, 404, "not_found")


# --- Nothing changes which host receives the request ------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_never_followed(
    service: Service, upstream: FakeUpstream, attacker: FakeUpstream, status: int
) -> None:
    upstream.enqueue(redirect(f"{attacker.base_url}/chat/completions", status))

    response = requests.post(f"{service.url}/v1/chat/completions", json=CHAT, timeout=10)

    assert_error(response, 502, "upstream_bad_response")
    assert len(upstream.requests) == 1
    assert attacker.requests == []


def test_host_headers_do_not_change_the_upstream(
    service: Service, upstream: FakeUpstream, attacker: FakeUpstream
) -> None:
    evil = f"127.0.0.1:{attacker.port}"
    headers = {
        "Host": evil,
        "X-Forwarded-Host": evil,
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Port": str(attacker.port),
        "Forwarded": f"host={evil};proto=http",
        "X-Original-URL": f"http://{evil}/v1/chat/completions",
    }

    response = requests.post(
        f"{service.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=10
    )

    assert response.status_code == 200
    assert len(upstream.requests) == 1
    assert attacker.requests == []


def test_body_fields_do_not_change_the_upstream(
    service: Service, upstream: FakeUpstream, attacker: FakeUpstream
) -> None:
    body = {**CHAT, "api_base": attacker.base_url, "base_url": attacker.base_url}

    response = requests.post(f"{service.url}/v1/chat/completions", json=body, timeout=10)

    assert response.status_code == 200
    [received] = upstream.requests
    assert received.json["base_url"] == attacker.base_url  # passed on, and harmless
    assert attacker.requests == []


def test_absolute_form_target_still_reaches_the_configured_upstream(
    service: Service, upstream: FakeUpstream, attacker: FakeUpstream
) -> None:
    evil = f"127.0.0.1:{attacker.port}"

    answer = send_raw(service, "GET", f"http://{evil}/v1/models", {"Host": evil})

    assert answer.status in (200, 400), answer.body
    assert attacker.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "/v1/http://{evil}/v1/models",
        "/v1/http:%2f%2f{evil}/v1/models",
        "/v1//{evil}/v1/models",
        "/v1/%2f%2f{evil}/v1/models",
        "/v1/models/..%2f..%2f..%2f%2f{evil}",
    ],
)
def test_hosts_in_the_path_are_refused(
    service: Service, upstream: FakeUpstream, attacker: FakeUpstream, target: str
) -> None:
    answer = send_raw(service, "GET", target.format(evil=f"127.0.0.1:{attacker.port}"))

    assert answer.status == 400, answer.body
    assert answer.mimetype == "application/json"
    assert answer.error_code() == "invalid_path"
    assert upstream.requests == []
    assert attacker.requests == []


def test_userinfo_in_the_path_does_not_change_the_host(
    service: Service, upstream: FakeUpstream, attacker: FakeUpstream
) -> None:
    answer = send_raw(service, "GET", f"/v1/models/@127.0.0.1:{attacker.port}")

    assert answer.status < 500, answer.body
    assert all(r.path.startswith("/v1/models/") for r in upstream.requests)
    assert attacker.requests == []
