"""The contract's §4 and §5 under faults: what the client gets, what the upstream saw, what is logged.

Each fault is queued on the fake upstream and asserted from three sides where it applies: the
client's answer (status, error body, `Retry-After`, `x-should-retry`), the attempts the upstream
received (how many, with which key, when their connections closed) and the service's log.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate

import openai
import pytest
import requests

from tests.conftest import Service, assert_no_secrets, service_env
from tests.fake_upstream import (
    FAKE_KEY,
    Behaviour,
    FakeUpstream,
    RecordedRequest,
    auth_failed,
    drop,
    hang,
    html,
    invalid_json,
    missing_choices,
    openai_error,
    rate_limited,
    redirect,
    stream,
)

MESSAGES = [{"role": "user", "content": "two words"}]
# One connection per question: gunicorn's graceful stop waits for idle keep-alive connections.
HEADERS = {"Authorization": "Bearer unused-client-key", "Connection": "close"}
CLIENT_TIMEOUT = 20
FAKE_KEY_MASKED = "sk-…cdef"
# Two keys of a pool; dashes inside, as real keys have.
FIRST_KEY = "sk-pool-first-0a1b2c3d-4e5f6a7b"
SECOND_KEY = "sk-pool-second-8c9d0e1f-2a3b4c5d"
POOL = f"{FIRST_KEY},{SECOND_KEY}"
# The shared services: the default one waits long enough for every retry and backoff; the
# impatient one makes silences and long streams fail fast.
RETRIES = 2
PATIENT = {
    "UPSTREAM_TIMEOUT": "5",
    "UPSTREAM_CONNECT_TIMEOUT": "1",
    "UPSTREAM_RETRIES": str(RETRIES),
}
UNREACHABLE_TIMEOUT = 3
IMPATIENT_TIMEOUT = 1.5
IMPATIENT = {
    "UPSTREAM_TIMEOUT": str(IMPATIENT_TIMEOUT),
    "UPSTREAM_CONNECT_TIMEOUT": "1",
    "MAX_STREAM_SECONDS": "1",
}
CHAT, LEGACY, V1 = "/chat", "/callChatGPT", "/v1/chat/completions"


# --- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Service]]:
    """Like `service_factory`, but for services shared by the module's tests."""
    services: list[Service] = []

    def start(**overrides: str | None) -> Service:
        workdir = tmp_path_factory.mktemp("service")
        service = Service(service_env(upstream_server, workdir, overrides), workdir)
        services.append(service)
        return service.start()

    yield start
    with ThreadPoolExecutor() as stopping:  # each takes a second or so to stop gracefully
        list(stopping.map(Service.stop, services))


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Service]) -> Service:
    """The module's default service: two retries, and time enough for their backoff."""
    return start_service(**PATIENT)


@pytest.fixture(scope="module")
def impatient(start_service: Callable[..., Service]) -> Service:
    """A service that gives up on a silent upstream after 1.5 s and on a stream after 1 s."""
    return start_service(**IMPATIENT)


@pytest.fixture(scope="module")
def unreachable(start_service: Callable[..., Service]) -> Service:
    """A service whose upstream is a closed port on 127.0.0.1: every connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    env = {
        **PATIENT,
        "UPSTREAM_TIMEOUT": str(UNREACHABLE_TIMEOUT),
        "OPENAI_BASE_URL": f"http://127.0.0.1:{closed_port}/v1",
    }
    return start_service(**env)


@pytest.fixture
def pool_service(service_factory: Callable[..., Service]) -> Service:
    """A fresh service with a two-key pool, so that no earlier test rested one of its keys."""
    return service_factory(OPENAI_API_KEY=POOL, **PATIENT)


# --- Talking to the service ---------------------------------------------------------------------


def ask(service: Service, endpoint: str, **fields: object) -> requests.Response:
    """One question to `endpoint`, shaped as that endpoint expects; `stream=True` streams it."""
    if endpoint == CHAT:
        body = {"messages": MESSAGES, **fields}
    elif endpoint == LEGACY:
        body = {"input": "two words", **fields}
    else:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, **fields}
    return requests.post(
        f"{service.url}{endpoint}",
        json=body,
        headers=HEADERS,
        stream=bool(fields.get("stream")),
        timeout=CLIENT_TIMEOUT,
    )


def timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@dataclass(frozen=True)
class Received:
    """One SSE item as the client got it: an event, or a comment (`name` ":")."""

    at: float
    name: str
    data: str

    def json(self) -> dict:
        return json.loads(self.data)


def read_sse(response: requests.Response) -> Iterator[Received]:
    """Events and comments as they arrive, each stamped with its arrival time."""
    buffer, name, data = b"", "", []
    for piece in response.iter_content(chunk_size=None):
        now = time.monotonic()
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode().removesuffix("\r")
            if line.startswith(":"):
                yield Received(now, ":", line[1:].strip())
            elif line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
            elif not line and (name or data):
                yield Received(now, name or "message", "\n".join(data))
                name, data = "", []


def events(response: requests.Response) -> list[Received]:
    """Every event of a whole stream, comments left out."""
    with response:
        return [item for item in read_sse(response) if item.name != ":"]


# --- Asserting ----------------------------------------------------------------------------------


def assert_failure(response: requests.Response, endpoint: str, status: int, code: str) -> str:
    """The contract's error for `endpoint`: JSON with this code, or one `error:` text line."""
    assert response.status_code == status, response.text
    if endpoint == LEGACY:
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
        line = response.text.removesuffix("\n")
        assert line.startswith("error: ") and "\n" not in line, response.text
        return line.removeprefix("error: ")
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    expected_type = {400: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "upstream_error"
    )
    assert (error["type"], error["code"]) == (expected_type, code), error
    assert isinstance(error["message"], str) and error["message"], error
    return error["message"]


def assert_final(response: requests.Response) -> None:
    """A final upstream error tells the SDKs not to retry what the proxy already retried."""
    assert response.headers.get("x-should-retry") == "false", dict(response.headers)


def assert_clean(response: requests.Response, service: Service, *secrets: str) -> None:
    """No key in the response (body and headers) nor anywhere in the service's log."""
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    assert_no_secrets(f"{headers}\n{response.text}", *secrets)
    assert_no_secrets(service.log_text(), *secrets)


def attempts(upstream: FakeUpstream) -> list[RecordedRequest]:
    """What reached the upstream; the proxy answered after its last attempt, so this is final."""
    return [r for r in upstream.requests if r.path == "/v1/chat/completions"]


def server_error(status: int) -> Behaviour:
    return openai_error(status, f"The server had an error ({status}).", type="server_error")


# --- 429: retried as the upstream asks, then passed on -------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "retry_after_ms", "least_wait"),
    [("0", None, 0.0), (None, "300", 0.3)],
    ids=["retry-after", "retry-after-ms"],
)
def test_upstream_429_with_a_short_retry_after_is_retried_then_answers(
    service: Service,
    upstream: FakeUpstream,
    retry_after: str | None,
    retry_after_ms: str | None,
    least_wait: float,
) -> None:
    upstream.enqueue(rate_limited(retry_after=retry_after, retry_after_ms=retry_after_ms))

    response = ask(service, CHAT)

    assert response.status_code == 200, response.text
    assert response.json()["content"] == "Hello from the fake upstream."
    first, second = attempts(upstream)
    assert second.received_at - first.received_at >= least_wait - 0.02
    assert first.bearer == second.bearer == FAKE_KEY


def test_upstream_retry_after_as_an_http_date_is_honoured(
    service: Service, upstream: FakeUpstream
) -> None:
    # An HTTP date has whole seconds: two seconds ahead means a wait of more than one.
    upstream.enqueue(rate_limited(retry_after=formatdate(time.time() + 2, usegmt=True)))

    response = ask(service, CHAT)

    assert response.status_code == 200, response.text
    first, second = attempts(upstream)
    assert second.received_at - first.received_at >= 0.9


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY])
def test_upstream_429_outlasting_the_retries_becomes_429_upstream_rate_limited(
    service: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    upstream.enqueue(*[rate_limited(retry_after="0")] * (RETRIES + 1))

    response = ask(service, endpoint)

    assert_failure(response, endpoint, 429, "upstream_rate_limited")
    assert response.headers.get("Retry-After") == "0"
    assert_final(response)
    assert len(attempts(upstream)) == RETRIES + 1
    assert_clean(response, service)


def test_upstream_429_outlasting_the_retries_passes_through_on_v1(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(*[rate_limited(retry_after="0")] * (RETRIES + 1))

    response = ask(service, V1)

    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.json()["error"]["message"] == "Rate limit reached for requests."
    assert response.headers.get("Retry-After") == "0"
    assert_final(response)
    assert len(attempts(upstream)) == RETRIES + 1


@pytest.mark.parametrize("endpoint", [CHAT, V1])
def test_upstream_retry_after_beyond_the_timeout_is_answered_at_once(
    service: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    upstream.enqueue(rate_limited(retry_after="30"))

    response, elapsed = timed(lambda: ask(service, endpoint))

    assert response.status_code == 429, response.text
    assert response.headers.get("Retry-After") == "30"
    assert_final(response)
    assert len(attempts(upstream)) == 1
    assert elapsed < 3.0  # far from the 30 s asked, and within UPSTREAM_TIMEOUT (5 s)


# --- 5xx: retried with backoff, then translated (or passed on by /v1) ----------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_upstream_5xx_then_success_is_retried(
    service: Service, upstream: FakeUpstream, status: int
) -> None:
    upstream.enqueue(server_error(status))

    response = ask(service, CHAT)

    assert response.status_code == 200, response.text
    assert response.json()["content"] == "Hello from the fake upstream."
    assert len(attempts(upstream)) == 2


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_outlasting_the_retries_becomes_502_upstream_bad_response(
    service: Service, upstream: FakeUpstream, status: int
) -> None:
    upstream.enqueue(*[server_error(status)] * (RETRIES + 1))

    response = ask(service, CHAT)

    assert_failure(response, CHAT, 502, "upstream_bad_response")
    assert_final(response)
    assert len(attempts(upstream)) == RETRIES + 1


def test_upstream_5xx_outlasting_the_retries_is_a_502_error_line_on_callchatgpt(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(*[server_error(503)] * (RETRIES + 1))

    response = ask(service, LEGACY)

    assert_failure(response, LEGACY, 502, "upstream_bad_response")
    assert_final(response)
    assert len(attempts(upstream)) == RETRIES + 1


def test_upstream_5xx_outlasting_the_retries_passes_its_body_through_on_v1(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(*[server_error(503)] * (RETRIES + 1))

    response = ask(service, V1)

    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "The server had an error (503).",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert_final(response)
    assert len(attempts(upstream)) == RETRIES + 1


def test_upstream_504_outlasting_the_retries_becomes_504_upstream_timeout(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(*[server_error(504)] * (RETRIES + 1))

    response = ask(service, CHAT)

    assert_failure(response, CHAT, 504, "upstream_timeout")
    assert_final(response)
    assert len(attempts(upstream)) == RETRIES + 1


def test_no_retries_configured_means_exactly_one_attempt(
    service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    single = service_factory(UPSTREAM_RETRIES="0", **IMPATIENT)
    upstream.enqueue(server_error(500), rate_limited(retry_after="0"))

    failed = ask(single, CHAT)
    assert_failure(failed, CHAT, 502, "upstream_bad_response")
    assert len(attempts(upstream)) == 1

    limited = ask(single, CHAT)
    assert_failure(limited, CHAT, 429, "upstream_rate_limited")
    assert len(attempts(upstream)) == 2


@pytest.mark.parametrize("status", [500, 429])
def test_sdk_does_not_multiply_the_proxys_retries(
    service: Service, upstream: FakeUpstream, status: int
) -> None:
    """With its default retries on, the SDK stops at the proxy's final answer."""
    failure = server_error(status) if status != 429 else rate_limited(retry_after="0")
    upstream.enqueue(*[failure] * (RETRIES + 1))
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused-client-key", timeout=20)

    with client, pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert raised.value.status_code == status
    assert len(attempts(upstream)) == RETRIES + 1


# --- No answer: refused connections, silence, dropped connections --------------------------------


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY, V1])
def test_unreachable_upstream_becomes_502_upstream_unreachable_in_bounded_time(
    unreachable: Service, endpoint: str
) -> None:
    response, elapsed = timed(lambda: ask(unreachable, endpoint))

    assert_failure(response, endpoint, 502, "upstream_unreachable")
    assert_final(response)
    assert elapsed < UNREACHABLE_TIMEOUT + 1.5  # every attempt within UPSTREAM_TIMEOUT
    assert_clean(response, unreachable)


@pytest.mark.parametrize("endpoint", [CHAT, V1])
def test_silent_upstream_becomes_504_upstream_timeout_without_retry(
    impatient: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    upstream.enqueue(hang(seconds=15))

    response, elapsed = timed(lambda: ask(impatient, endpoint))

    assert_failure(response, endpoint, 504, "upstream_timeout")
    assert_final(response)
    assert IMPATIENT_TIMEOUT - 0.3 <= elapsed < IMPATIENT_TIMEOUT + 2.0
    # The request was sent and may have been billed: it is not sent again.
    [only] = attempts(upstream)
    closed_at = upstream.wait_for_close(only, timeout=3)
    assert closed_at is not None, "the proxy kept the silent upstream connection open"
    assert closed_at - only.received_at < IMPATIENT_TIMEOUT + 1.0


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY, V1])
def test_dropped_connection_becomes_502_upstream_unreachable_without_retry(
    service: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    upstream.enqueue(drop())

    response = ask(service, endpoint)

    assert_failure(response, endpoint, 502, "upstream_unreachable")
    assert_final(response)
    assert len(attempts(upstream)) == 1


# --- Answers that cannot be used -----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY])
@pytest.mark.parametrize("behaviour", [html, invalid_json, missing_choices])
def test_unusable_upstream_answer_becomes_502_upstream_bad_response(
    service: Service, upstream: FakeUpstream, endpoint: str, behaviour: Callable[[], Behaviour]
) -> None:
    upstream.enqueue(behaviour())

    response = ask(service, endpoint)

    message = assert_failure(response, endpoint, 502, "upstream_bad_response")
    assert "<html" not in message.lower() and "{not json" not in message
    assert_final(response)
    assert len(attempts(upstream)) == 1


@pytest.mark.parametrize("endpoint", [CHAT, V1])
@pytest.mark.parametrize("status", [302, 307])
def test_upstream_redirect_is_never_followed_and_becomes_502(
    service: Service, upstream: FakeUpstream, endpoint: str, status: int
) -> None:
    upstream.enqueue(redirect(location=f"{upstream.base_url}/redirect-target", status=status))

    response = ask(service, endpoint)

    assert_failure(response, endpoint, 502, "upstream_bad_response")
    assert_final(response)
    assert "Location" not in response.headers
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY, V1])
@pytest.mark.parametrize("status", [401, 403])
def test_upstream_401_becomes_502_without_the_key(
    service: Service, upstream: FakeUpstream, endpoint: str, status: int
) -> None:
    upstream.enqueue(auth_failed(status))

    response = ask(service, endpoint)

    message = assert_failure(response, endpoint, 502, "upstream_auth_failed")
    assert "Incorrect API key" not in response.text, message
    assert_final(response)
    assert "WWW-Authenticate" not in response.headers
    assert [r.bearer for r in attempts(upstream)] == [FAKE_KEY]
    assert_clean(response, service)
    assert FAKE_KEY_MASKED in service.log_text()


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY])
def test_upstream_400_keeps_its_code_and_message(
    service: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    message = "This model's maximum context length is 128000 tokens."
    upstream.enqueue(openai_error(400, message, code="context_length_exceeded"))

    response = ask(service, endpoint)

    assert assert_failure(response, endpoint, 400, "context_length_exceeded") == message
    assert len(attempts(upstream)) == 1


# --- The key pool --------------------------------------------------------------------------------


def test_key_refused_with_401_fails_over_at_once_and_rests(
    pool_service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(auth_failed())

    response = ask(pool_service, CHAT)

    assert response.status_code == 200, response.text
    refused, accepted = attempts(upstream)
    assert {refused.bearer, accepted.bearer} == {FIRST_KEY, SECOND_KEY}
    assert accepted.received_at - refused.received_at < 1.0  # no backoff before another key
    for _ in range(3):
        assert ask(pool_service, CHAT).status_code == 200
    assert [r.bearer for r in attempts(upstream)[2:]] == [accepted.bearer] * 3
    assert_clean(response, pool_service, FIRST_KEY, SECOND_KEY)


def test_every_key_refused_becomes_502_upstream_auth_failed(
    pool_service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(auth_failed(), auth_failed())

    response = ask(pool_service, CHAT)

    assert_failure(response, CHAT, 502, "upstream_auth_failed")
    assert_final(response)
    assert sorted(r.bearer for r in attempts(upstream)) == sorted([FIRST_KEY, SECOND_KEY])
    assert_clean(response, pool_service, FIRST_KEY, SECOND_KEY)


def test_rate_limited_key_fails_over_at_once(pool_service: Service, upstream: FakeUpstream) -> None:
    upstream.enqueue(rate_limited(retry_after="20"))

    response, elapsed = timed(lambda: ask(pool_service, CHAT))

    assert response.status_code == 200, response.text
    assert elapsed < 3.0  # not the 20 s the first key was told to wait
    limited, accepted = attempts(upstream)
    assert {limited.bearer, accepted.bearer} == {FIRST_KEY, SECOND_KEY}
    # The limited key rests for its Retry-After: the next requests go to the other one.
    for _ in range(2):
        assert ask(pool_service, CHAT).status_code == 200
    assert [r.bearer for r in attempts(upstream)[2:]] == [accepted.bearer] * 2


def test_key_out_of_quota_fails_over_at_once(pool_service: Service, upstream: FakeUpstream) -> None:
    upstream.enqueue(
        openai_error(
            429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota"
        )
    )

    response = ask(pool_service, CHAT)

    assert response.status_code == 200, response.text
    exhausted, accepted = attempts(upstream)
    assert {exhausted.bearer, accepted.bearer} == {FIRST_KEY, SECOND_KEY}


def test_requests_rotate_across_the_key_pool(pool_service: Service, upstream: FakeUpstream) -> None:
    for _ in range(4):
        assert ask(pool_service, CHAT).status_code == 200

    used = Counter(r.bearer for r in attempts(upstream))
    assert used == {FIRST_KEY: 2, SECOND_KEY: 2}


# --- Streams that fail after they began ----------------------------------------------------------


def test_chat_stream_cut_midway_ends_with_an_error_event(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["Hel", "lo", " wor", "ld"], stop_after=2))

    received = events(ask(service, CHAT, stream=True))

    assert [item.name for item in received] == ["start", "delta", "delta", "error"]
    assert "".join(item.json()["content"] for item in received[1:3]) == "Hello"
    error = received[-1].json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] in ("upstream_unreachable", "upstream_bad_response")
    assert error["message"]
    assert len(attempts(upstream)) == 1  # bytes went out: never retried


def test_v1_stream_cut_midway_cuts_the_clients_connection(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["Hel", "lo", " wor", "ld"], stop_after=2))
    received = b""

    response = ask(service, V1, stream=True)
    with response, pytest.raises(requests.exceptions.RequestException):
        for piece in response.iter_content(chunk_size=None):
            received += piece

    assert response.status_code == 200
    assert b'"content": "lo"' in received
    assert b"[DONE]" not in received
    assert len(attempts(upstream)) == 1


def test_v1_stream_cut_midway_makes_the_sdk_raise(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["Hel", "lo", " wor", "ld"], stop_after=2))
    pieces = []

    with pytest.raises(Exception) as raised:  # noqa: B017 - the SDK's or its HTTP client's error
        for chunk in sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ):
            pieces.extend(choice.delta.content or "" for choice in chunk.choices)

    cut = raised.value
    assert isinstance(cut, openai.OpenAIError) or type(cut).__module__.startswith("httpx"), cut
    assert "".join(pieces) == "Hello"
    assert len(attempts(upstream)) == 1


def test_callchatgpt_stream_cut_midway_ends_with_an_error_line(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["Hel", "lo", " wor", "ld"], stop_after=2))

    response = requests.get(
        f"{service.url}{LEGACY}",
        params={"input": "two words", "stream": "1"},
        headers=HEADERS,
        timeout=CLIENT_TIMEOUT,
    )

    assert response.status_code == 200
    text, _, last = response.text.rstrip("\n").rpartition("\n")
    assert text == "Hello"
    assert last.startswith("error: ") and len(last) > len("error: ")
    assert len(attempts(upstream)) == 1


def test_stream_longer_than_max_stream_seconds_ends_with_upstream_timeout(
    impatient: Service, upstream: FakeUpstream
) -> None:
    interval, pieces = 0.3, [f"w{n} " for n in range(12)]
    upstream.enqueue(stream(chunks=pieces, interval=interval))

    received = events(ask(impatient, CHAT, stream=True))

    names = [item.name for item in received]
    assert names[0] == "start" and names[-1] == "error" and "done" not in names, names
    assert "delta" in names  # what came before the limit was relayed
    assert received[-1].json()["error"]["code"] == "upstream_timeout"
    [request] = attempts(upstream)
    # Ended by the 1 s limit, long before the upstream would have finished.
    assert received[-1].at < request.received_at + interval * len(pieces) - 1.0
