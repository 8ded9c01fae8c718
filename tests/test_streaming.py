"""Streams are real: pieces reach the client as the upstream writes them, heartbeats flow while
it is silent, and a client that leaves makes the proxy close the upstream connection (§3, §5).

Timings are measured against the fake upstream's own clock (the same monotonic clock: it runs in
this process), never as absolute thresholds, except the contract's one-second bound.
"""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from tests.conftest import Service, open_raw_request, read_until
from tests.fake_upstream import Behaviour, Exchange, FakeUpstream, RecordedRequest, stream
from tests.test_upstream_faults import CHAT, HEADERS, LEGACY, MESSAGES, V1, ask, events, read_sse

# Eight pieces, one every 0.25 s: the last is written 2 s after the request arrived.
PIECES = ["One ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight"]
INTERVAL = 0.25
DISCONNECT_BOUND = 1.0  # the contract: the upstream connection closes within a second


def assert_relayed_as_written(arrivals: list[float], request: RecordedRequest) -> None:
    """The first piece arrived long before the upstream wrote its last, and they came spread out
    as the upstream wrote them rather than in one batch at the end."""
    assert len(arrivals) >= len(PIECES) - 1, arrivals
    # The upstream wrote piece n (from 1) at `received_at + n * INTERVAL`: the first must arrive
    # before the middle of the stream was even written.
    halfway = request.received_at + INTERVAL * (len(PIECES) / 2 + 1)
    assert arrivals[0] < halfway, arrivals[0] - request.received_at
    assert arrivals[-1] - arrivals[0] >= INTERVAL * (len(PIECES) - 1) / 2, arrivals


def test_chat_deltas_reach_the_client_while_the_upstream_is_still_sending(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=PIECES, interval=INTERVAL))

    received = events(ask(service, CHAT, stream=True))

    deltas = [item for item in received if item.name == "delta"]
    assert "".join(item.json()["content"] for item in deltas) == "".join(PIECES)
    assert_relayed_as_written([item.at for item in deltas], upstream.requests[0])


def test_v1_stream_reaches_the_sdk_while_the_upstream_is_still_sending(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=PIECES, interval=INTERVAL))
    arrivals, text = [], ""

    for chunk in sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            arrivals.append(time.monotonic())
            text += content

    assert text == "".join(PIECES)
    assert_relayed_as_written(arrivals, upstream.requests[0])


def test_callchatgpt_stream_reaches_the_client_while_the_upstream_is_still_sending(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=PIECES, interval=INTERVAL))
    arrivals, text = [], b""

    with requests.get(
        f"{service.url}{LEGACY}",
        params={"input": "two words", "stream": "1"},
        headers=HEADERS,
        stream=True,
        timeout=20,
    ) as response:
        for piece in response.iter_content(chunk_size=None):
            arrivals.append(time.monotonic())
            text += piece

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert text.decode() == "".join(PIECES)
    assert_relayed_as_written(arrivals, upstream.requests[0])


@pytest.mark.parametrize("endpoint", [CHAT, V1])
def test_heartbeats_flow_while_the_upstream_is_silent(
    service: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    upstream.enqueue(stream(chunks=["Hello", " there"], hang_after=1))
    seen = []

    response = requests.post(
        f"{service.url}{endpoint}",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        headers=HEADERS,
        stream=True,
        timeout=(5, 3),  # a silence of 3 s without a heartbeat fails the test
    )
    with response:
        for item in read_sse(response):
            seen.append(item)
            if sum(1 for s in seen if s.name == ":") >= 2:
                break

    assert response.headers["Content-Type"].startswith("text/event-stream")
    pings = [item for item in seen if item.name == ":"]
    assert [ping.data for ping in pings] == ["ping", "ping"]
    # The heartbeats came in the silence, after the piece the upstream did send.
    first_ping = seen.index(pings[0])
    assert any("Hello" in item.data for item in seen[:first_ping]), seen


def open_stream(service: Service, endpoint: str) -> socket.socket:
    """A raw HTTP/1.1 streaming request, so that the test decides exactly when the socket closes."""
    if endpoint == LEGACY:
        return open_raw_request(service, "GET", f"{LEGACY}?input=two+words&stream=1")
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}).encode()
    return open_raw_request(service, "POST", endpoint, body)


@pytest.mark.parametrize("endpoint", [CHAT, V1, LEGACY])
def test_client_disconnect_closes_the_upstream_within_a_second(
    service: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    upstream.enqueue(stream(chunks=["Hello", " there"], hang_after=1))

    sock = open_stream(service, endpoint)
    received = read_until(sock, b"Hello")
    time.sleep(0.2)  # well into the upstream's silence
    sock.close()
    left_at = time.monotonic()

    assert received.startswith(b"HTTP/1.1 200"), received
    [request] = upstream.wait_for_requests(1)
    closed_at = upstream.wait_for_close(request, timeout=5)
    assert closed_at is not None, "the upstream connection stayed open after the client left"
    assert closed_at - left_at < DISCONNECT_BOUND


def test_chat_stream_is_start_then_deltas_then_done_with_usage(
    service: Service, upstream: FakeUpstream
) -> None:
    received = events(ask(service, CHAT, stream=True))

    names = [item.name for item in received]
    assert names == ["start"] + ["delta"] * (len(names) - 2) + ["done"], names
    start, *deltas, done = (item.json() for item in received)
    assert start["model"] == "gpt-4o-mini"
    assert "conversation_id" not in start  # `messages` is stateless
    assert "".join(delta["content"] for delta in deltas) == "Hello from the fake upstream."
    [request] = upstream.requests
    assert request.json["stream"] is True
    assert done == {
        "id": f"chatcmpl-fake-{request.attempt}",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7},
    }


def done_then_linger(seconds: float) -> Behaviour:
    """A whole answer and its `[DONE]`, but the HTTP body ends only `seconds` later, as a
    gateway that flushes its last chunk late sends it."""

    def answer(exchange: Exchange) -> None:
        def chunk(choices: list, usage: dict | None = None) -> dict:
            base = {"id": "chatcmpl-linger", "object": "chat.completion.chunk", "created": 0}
            return {**base, "model": "gpt-4o-mini", "choices": choices, "usage": usage}

        def choice(delta: dict, finish_reason: str | None = None) -> list:
            return [{"index": 0, "delta": delta, "finish_reason": finish_reason}]

        exchange.start_chunked(200, "text/event-stream")
        exchange.write_event(chunk(choice({"role": "assistant", "content": ""})))
        exchange.write_event(chunk(choice({"content": "Hello"})))
        exchange.write_event(chunk(choice({}, "stop")))
        usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
        exchange.write_event(chunk([], usage))
        exchange.write_event("[DONE]")
        exchange.watch_for_close(seconds)
        exchange.end_chunked()

    return answer


def test_chat_stream_ends_with_done_when_the_upstream_body_ends_late(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(done_then_linger(0.5))

    received = events(ask(service, CHAT, stream=True))

    assert [item.name for item in received] == ["start", "delta", "done"]
    assert received[-1].json() == {
        "id": "chatcmpl-linger",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
