"""The fake upstream keeps its promises, so that a failing proxy test blames the proxy."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests

from tests.fake_upstream import (
    FAKE_KEY,
    FakeUpstream,
    auth_failed,
    drop,
    hang,
    openai_error,
    rate_limited,
    respond,
    stream,
)

AUTH = {"Authorization": f"Bearer {FAKE_KEY}"}


def chat(upstream: FakeUpstream, **fields: object) -> requests.Response:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "two words"}], **fields}
    return requests.post(
        f"{upstream.base_url}/chat/completions",
        json=body,
        headers=AUTH,
        stream=bool(fields.get("stream")),
        timeout=5,
    )


def sse_data(response: requests.Response) -> Iterator[str]:
    """The `data:` of each event, as soon as it arrives."""
    for line in response.iter_lines(decode_unicode=True):
        if line:
            yield line.removeprefix("data: ")


def test_default_chat_completion_is_openai_shaped(upstream: FakeUpstream) -> None:
    response = chat(upstream)

    completion = response.json()
    assert completion["id"] == "chatcmpl-fake-1"
    assert completion["model"] == "gpt-4o"
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from the fake upstream.",
        "refusal": None,
    }
    assert completion["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert response.headers["x-request-id"] == "req_fake_1"
    assert response.headers["openai-organization"] == "org-fake"
    assert response.headers["set-cookie"] == "upstream=1"
    [received] = upstream.requests
    assert (received.method, received.path, received.bearer) == (
        "POST",
        "/v1/chat/completions",
        FAKE_KEY,
    )
    assert received.json["model"] == "gpt-4o"


def test_stream_arrives_event_by_event(upstream: FakeUpstream) -> None:
    upstream.enqueue(stream(chunks=["Hel", "lo", "!"], interval=0.15))

    arrivals = []
    with chat(upstream, stream=True, stream_options={"include_usage": True}) as response:
        for data in sse_data(response):
            arrivals.append((time.monotonic(), data))

    assert response.headers["content-type"] == "text/event-stream"
    events = [json.loads(data) for _, data in arrivals[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == "Hello!"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 1
    assert arrivals[-1][1] == "[DONE]"
    assert arrivals[-1][0] - arrivals[0][0] > 0.6  # five intervals: nothing was buffered


def test_default_stream_splits_the_reply_into_words_without_usage_unless_asked(
    upstream: FakeUpstream,
) -> None:
    upstream.reply_text = "one two  three"

    with chat(upstream, stream=True) as response:
        data = list(sse_data(response))

    pieces = [json.loads(d)["choices"][0]["delta"].get("content") for d in data[1:-2]]
    assert pieces == ["one ", "two  ", "three"]
    assert data[-1] == "[DONE]"


def test_stop_after_cuts_the_stream_without_done(upstream: FakeUpstream) -> None:
    upstream.enqueue(stream(chunks=["a", "b", "c"], stop_after=1))

    received = []
    with chat(upstream, stream=True) as response:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            received.extend(line for line in response.iter_lines() if line)

    assert len(received) == 2 and b'"content": "a"' in received[-1]


def test_hang_records_when_the_client_closes(upstream: FakeUpstream) -> None:
    upstream.enqueue(hang(5))

    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{upstream.base_url}/chat/completions", json={}, timeout=0.3)
    gave_up_at = time.monotonic()

    [received] = upstream.requests
    closed_at = upstream.wait_for_close(received, timeout=2)
    assert closed_at is not None and closed_at - gave_up_at < 0.5


def test_hang_after_goes_silent_mid_stream_until_the_client_leaves(upstream: FakeUpstream) -> None:
    upstream.enqueue(stream(chunks=["a", "b"], hang_after=1))

    with chat(upstream, stream=True) as response:
        assert any(b'"content": "a"' in line for line in response.iter_lines())
    left_at = time.monotonic()

    [received] = upstream.requests
    closed_at = upstream.wait_for_close(received, timeout=2)
    assert closed_at is not None and closed_at - left_at < 0.5


def test_drop_closes_without_a_response(upstream: FakeUpstream) -> None:
    upstream.enqueue(drop())

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{upstream.base_url}/models", timeout=2)


def test_rate_limited_sends_the_retry_headers_it_is_given(upstream: FakeUpstream) -> None:
    upstream.enqueue(
        rate_limited(retry_after="2", retry_after_ms="1500"), rate_limited(retry_after=None)
    )

    first, second = (chat(upstream) for _ in range(2))

    assert first.status_code == 429
    assert (first.headers["retry-after"], first.headers["retry-after-ms"]) == ("2", "1500")
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" not in second.headers


def test_auth_failed_quotes_the_key_it_received(upstream: FakeUpstream) -> None:
    upstream.enqueue(auth_failed())

    response = chat(upstream)

    assert response.status_code == 401
    assert FAKE_KEY in response.json()["error"]["message"]


def test_behaviours_answer_in_order_then_the_default(upstream: FakeUpstream) -> None:
    upstream.enqueue(
        openai_error(500, "boom", code="server_error"), respond(201, json={"ok": True})
    )

    statuses = [chat(upstream).status_code for _ in range(3)]

    assert statuses == [500, 201, 200]
    assert [r.attempt for r in upstream.wait_for_requests(3)] == [1, 2, 3]


def test_chunked_request_bodies_are_read(upstream: FakeUpstream) -> None:
    parts = (part.encode() for part in ['{"input": ', '"hello world"}'])

    response = requests.post(f"{upstream.base_url}/embeddings", data=parts, timeout=2)

    assert response.json()["data"][0]["object"] == "embedding"
    [received] = upstream.requests
    assert received.headers["transfer-encoding"] == "chunked"
    assert received.json == {"input": "hello world"}


def test_unknown_routes_are_echoed_and_unknown_models_are_404(upstream: FakeUpstream) -> None:
    echo = requests.get(f"{upstream.base_url}/files?limit=1", timeout=2).json()
    missing = requests.get(f"{upstream.base_url}/models/gpt-nope", timeout=2)

    assert echo == {"object": "echo", "method": "GET", "path": "/v1/files", "query": "limit=1"}
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
