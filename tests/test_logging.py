"""Logs (CONTRACT §2 `LOG_FORMAT`, §5 no secret in a log line) and request IDs.

One line per request, written when the response ends, with its request ID, method, path (no
query string), status, duration, client, upstream attempts and tokens; under `LOG_FORMAT=json`
every line the service writes — gunicorn's included — is one JSON object with these as keys.
`X-Request-ID` is taken from the client when printable ASCII of at most 128 characters, else
made; it comes back in the response and goes to the upstream with every attempt.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from app.logs import JsonFormatter, RedactingFilter, ReportWriter
from tests.conftest import Service, assert_no_secrets, service_env
from tests.fake_upstream import (
    FAKE_KEY,
    FakeUpstream,
    auth_failed,
    drop,
    openai_error,
    stream,
)
from tests.test_upstream_faults import read_sse

ALICE = "tok-alice-5f3c9a0e7d1b2c4a"
AUTH = {"Authorization": f"Bearer {ALICE}"}
TIMEOUT = 20
SETTLE = 5.0
MADE_ID = re.compile(r"[0-9a-f]{32}")
ACCESS_FIELDS = {
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "client",
    "upstream_attempts",
    "prompt_tokens",
    "completion_tokens",
    "tokens",
}


@pytest.fixture(scope="module")
def json_service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("service")
    overrides = {"LOG_FORMAT": "json", "ACCESS_TOKENS": f"alice:{ALICE}"}
    started = Service(service_env(upstream_server, workdir, overrides), workdir).start()
    yield started
    started.stop()


def new_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def access_entries(service: Service, request_id: str, count: int = 1) -> list[dict]:
    """The JSON access lines of `request_id`, once `count` of them were written (or time ran out)."""
    deadline = time.monotonic() + SETTLE
    while True:
        entries = [
            entry
            for entry in map(json.loads, service.log_text().splitlines())
            if entry.get("logger") == "chatproxy.access" and entry.get("request_id") == request_id
        ]
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def test_a_request_line_has_its_fields_as_json_keys(
    json_service: Service, upstream: FakeUpstream
) -> None:
    request_id = new_id()
    answer = requests.post(
        f"{json_service.url}/chat",
        json={"message": "two words"},
        headers={**AUTH, "X-Request-ID": request_id},
        timeout=TIMEOUT,
    ).json()

    [entry] = access_entries(json_service, request_id)
    assert ACCESS_FIELDS <= set(entry)
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/chat", 200)
    assert entry["client"] == "alice"
    assert entry["upstream_attempts"] == 1
    assert entry["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert entry["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert entry["tokens"] == answer["usage"]["total_tokens"]
    assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
    assert entry["upstream_request_id"] == "req_fake_1"
    assert entry["level"] == "INFO"


def test_a_stream_is_logged_when_it_ends_with_what_it_spent(
    json_service: Service, upstream: FakeUpstream
) -> None:
    request_id = new_id()
    upstream.enqueue(stream(chunks=["a ", "b ", "c"], interval=0.3))
    response = requests.post(
        f"{json_service.url}/chat",
        json={"message": "count", "stream": True},
        headers={**AUTH, "X-Request-ID": request_id},
        stream=True,
        timeout=TIMEOUT,
    )
    items = read_sse(response)
    next(item for item in items if item.name == "start")
    started_at = time.monotonic()
    done = [item for item in items if item.name == "done"][0].json()

    [entry] = access_entries(json_service, request_id)
    assert entry["tokens"] == done["usage"]["total_tokens"] > 0
    assert entry["duration_ms"] >= 600  # the whole stream, not just its headers
    assert time.monotonic() - started_at >= 0.6


def test_concurrent_requests_each_log_their_own_attempts_and_tokens(
    json_service: Service, upstream: FakeUpstream
) -> None:
    def ask(words: int) -> tuple[str, dict]:
        request_id = new_id()
        body = {"message": " ".join(["word"] * words), "stream": True}
        with requests.post(
            f"{json_service.url}/chat",
            json=body,
            headers={**AUTH, "X-Request-ID": request_id, "Connection": "close"},
            stream=True,
            timeout=TIMEOUT,
        ) as response:
            done = [item for item in read_sse(response) if item.name == "done"][0].json()
        return request_id, done["usage"]

    for _ in range(8):
        upstream.enqueue(stream(chunks=["a ", "b ", "c"], interval=0.1))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(1, 9)))

    for request_id, usage in answers:
        [entry] = access_entries(json_service, request_id)
        assert entry["upstream_attempts"] == 1
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
    assert len({usage["prompt_tokens"] for _, usage in answers}) == 8  # all different


def test_errors_are_named_and_the_query_string_is_left_out(json_service: Service) -> None:
    refused_id, question_id = new_id(), new_id()
    requests.get(
        f"{json_service.url}/usage",
        headers={"Authorization": "Bearer wrong", "X-Request-ID": refused_id},
        timeout=TIMEOUT,
    )
    requests.get(
        f"{json_service.url}/callChatGPT",
        params={"input": "my-private-question"},
        headers={**AUTH, "X-Request-ID": question_id},
        timeout=TIMEOUT,
    )

    [refused] = access_entries(json_service, refused_id)
    [question] = access_entries(json_service, question_id)
    assert (refused["status"], refused["error"], refused["client"]) == (
        401,
        "invalid_access_token",
        "127.0.0.1",
    )
    assert question["path"] == "/callChatGPT"
    assert "my-private-question" not in json_service.log_text()


def test_every_line_of_a_json_run_is_json_and_names_no_secret(
    service_factory, upstream: FakeUpstream
) -> None:
    service = service_factory(LOG_FORMAT="json", ACCESS_TOKENS=f"alice:{ALICE}")
    sent_ids = []

    def call(method: str, path: str, **kwargs) -> requests.Response:
        headers = {**AUTH, "X-Request-ID": new_id(), **kwargs.pop("headers", {})}
        sent_ids.append(headers["X-Request-ID"])
        return requests.request(
            method, f"{service.url}{path}", headers=headers, timeout=TIMEOUT, **kwargs
        )

    call("GET", "/")
    call("GET", "/static/js/app.js")
    call("GET", "/healthz")
    call("POST", "/chat", json={"message": "hello"})
    call("GET", "/callChatGPT", params={"input": "hi", "stream": "1"})
    upstream.enqueue(auth_failed(401))  # its message quotes the key
    call("POST", "/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    upstream.enqueue(drop())
    call("POST", "/chat", json={"messages": [{"role": "user", "content": "hi"}]})
    upstream.enqueue(openai_error(400, f"Bad key {FAKE_KEY}", code="invalid_value"))
    call("POST", "/callChatGPT", data={"input": "hi"})
    call("GET", f"/v1/files/{ALICE}")  # a token in the path
    call("GET", "/usage", headers={"X-Request-ID": ALICE})  # a token as the request ID
    call("GET", "/usage", headers={"Authorization": f"Bearer {FAKE_KEY}"})  # the key as token
    call("POST", "/chat", data=b"{not json")
    call("PUT", "/chat")
    upstream.enqueue(stream(hang_after=1))
    with call("POST", "/chat", json={"message": "go", "stream": True}, stream=True) as gone:
        next(gone.iter_content(chunk_size=None))  # then leave mid-stream
    upstream.wait_for_close(upstream.requests[-1])
    sdk = openai.OpenAI(base_url=f"{service.url}/v1", api_key=ALICE, max_retries=0)
    sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    time.sleep(0.5)
    service.stop()

    log = service.log_text()
    lines = log.splitlines()
    assert len(lines) > 20
    for line in lines:
        entry = json.loads(line)  # every line, gunicorn's too
        assert {"time", "level", "logger", "message"} <= set(entry), line
    assert_no_secrets(log, ALICE)
    entries = [json.loads(line) for line in lines]
    assert any(e["logger"].startswith("gunicorn") for e in entries)
    access = [e for e in entries if e["logger"] == "chatproxy.access"]
    for request_id in sent_ids:
        if request_id == ALICE:
            continue
        mine = [e for e in access if e["request_id"] == request_id]
        assert len(mine) == 1, (request_id, mine)  # one line per request, not two
        assert ACCESS_FIELDS <= set(mine[0])
    assert f"/v1/files/…{ALICE[-4:]}" in {e["path"] for e in access}  # masked, not dropped


def test_the_text_format_has_one_line_per_request(service: Service) -> None:
    request_id = new_id()
    requests.get(
        f"{service.url}/chat/conversations?limit=5",
        headers={"X-Request-ID": request_id},
        timeout=TIMEOUT,
    )

    deadline = time.monotonic() + SETTLE
    while request_id not in service.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in service.log_text().splitlines() if request_id in line]
    assert len(lines) == 1, lines
    assert ' INFO chatproxy.access: "GET /chat/conversations" 200 ' in lines[0]
    assert "client=127.0.0.1" in lines[0] and "attempts=0 tokens=0" in lines[0]
    assert "limit=5" not in lines[0]


# --- X-Request-ID -----------------------------------------------------------------------------


def test_the_clients_request_id_comes_back_and_reaches_the_upstream(
    service: Service, upstream: FakeUpstream
) -> None:
    request_id = "client-chosen id/42"
    upstream.enqueue(openai_error(503, "busy", type="server_error"))  # retried: two attempts

    response = requests.post(
        f"{service.url}/chat",
        json={"message": "hi"},
        headers={"X-Request-ID": request_id},
        timeout=TIMEOUT,
    )

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == request_id
    attempts = upstream.wait_for_requests(2)
    assert [a.headers["X-Request-ID"] for a in attempts] == [request_id, request_id]


def test_a_request_id_is_made_when_the_client_sends_none(
    service: Service, upstream: FakeUpstream
) -> None:
    first = requests.post(f"{service.url}/chat", json={"message": "hi"}, timeout=TIMEOUT)
    second = requests.get(f"{service.url}/healthz", timeout=TIMEOUT)

    made = first.headers["X-Request-ID"]
    assert MADE_ID.fullmatch(made) and MADE_ID.fullmatch(second.headers["X-Request-ID"])
    assert made != second.headers["X-Request-ID"]
    [sent] = upstream.wait_for_requests(1)
    assert sent.headers["X-Request-ID"] == made


@pytest.mark.parametrize(
    "offered",
    ["x" * 129, "caf\u00e9", "tab\there", ""],
    ids=["too-long", "not-ascii", "tab", "empty"],
)
def test_an_unusable_request_id_is_replaced(
    service: Service, upstream: FakeUpstream, offered: str
) -> None:
    response = requests.post(
        f"{service.url}/chat",
        json={"message": "hi"},
        headers={"X-Request-ID": offered.encode("latin-1")},
        timeout=TIMEOUT,
    )

    made = response.headers["X-Request-ID"]
    assert MADE_ID.fullmatch(made), made
    [sent] = upstream.wait_for_requests(1)
    assert sent.headers["X-Request-ID"] == made


def test_a_request_id_of_128_characters_is_kept(service: Service) -> None:
    offered = "r" * 128
    response = requests.get(f"{service.url}/healthz", headers={"X-Request-ID": offered}, timeout=5)
    assert response.headers["X-Request-ID"] == offered


def test_on_v1_the_upstream_gets_ours_and_the_client_the_upstreams(
    service: Service, upstream: FakeUpstream, sdk: openai.OpenAI
) -> None:
    request_id = new_id()

    completion = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Request-ID": request_id},
    )

    [sent] = upstream.wait_for_requests(1)
    assert sent.headers.get_all("X-Request-ID") == [request_id]
    assert completion.headers["x-request-id"] == "req_fake_1"  # what the SDKs report
    deadline = time.monotonic() + SETTLE
    while request_id not in service.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [line for line in service.log_text().splitlines() if request_id in line]
    assert "upstream_request_id=req_fake_1" in line


def test_what_gevent_prints_becomes_one_redacted_json_record() -> None:
    stream_ = io.StringIO()
    handler = logging.StreamHandler(stream_)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter([FAKE_KEY]))
    logger = logging.getLogger("chatproxy.test-report-writer")
    logger.handlers[:] = [handler]
    logger.propagate = False
    writer = ReportWriter(logger)

    # As gevent's hub prints a failed greenlet: traceback lines, then a closing line and a blank.
    writer.write("Traceback (most recent call last):\n")
    writer.write(f'  File "x.py", line 1, in run\nValueError: bad key {FAKE_KEY}\n')
    writer.write("2025-06-01T10:00:00Z <Greenlet at 0x1: run> failed with ValueError\n\n")

    [line] = stream_.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "chatproxy.test-report-writer"
    assert entry["message"].startswith("Traceback") and "failed with ValueError" in entry["message"]
    assert FAKE_KEY not in line and "sk-…cdef" in line
