"""The service's own surfaces (CONTRACT §3): `/callChatGPT`, `/chat`, `/healthz` and `/readyz`,
over real sockets against the fake upstream."""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import Service, service_env
from tests.fake_upstream import (
    FAKE_KEY,
    Exchange,
    FakeUpstream,
    openai_error,
    rate_limited,
    stream,
)

SYSTEM_PROMPT = "You are a terse assistant."
DEFAULT_MODEL = "o3-mini"
CHINESE_QUESTION = "你好，世界！请用中文回答。"
CHINESE_ANSWER = "你好！我是一个助手。😀"
ERROR_LINE = re.compile(r"error: [^\n]+\n?")


@pytest.fixture(scope="module")
def proxy(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service for the module: a system prompt, a default model, an allow-list, no retries."""
    workdir = tmp_path_factory.mktemp("surfaces")
    overrides = {
        "SYSTEM_PROMPT": SYSTEM_PROMPT,
        "OPENAI_MODEL": DEFAULT_MODEL,
        "ALLOWED_MODELS": "gpt-4o*, o3-mini",
        "UPSTREAM_RETRIES": "0",
    }
    service = Service(service_env(upstream_server, workdir, overrides), workdir).start()
    yield service
    gc.collect()  # gunicorn waits for keep-alive connections that live responses hold open
    service.stop()


def sent(upstream: FakeUpstream) -> dict:
    """The JSON body of the one request the upstream received."""
    [received] = upstream.requests
    assert (received.method, received.path) == ("POST", "/v1/chat/completions")
    return received.json


def ask(proxy: Service, how: str, **values: object) -> requests.Response:
    """`/callChatGPT` with `values` in the query string, a form, or a JSON body."""
    url = f"{proxy.url}/callChatGPT"
    if how == "query":
        return requests.get(url, params=values, timeout=15)
    if how == "form":
        return requests.post(url, data=values, timeout=15)
    return requests.post(url, json=values, timeout=15)


def chat(proxy: Service, body: object, **kwargs) -> requests.Response:
    return requests.post(f"{proxy.url}/chat", json=body, timeout=15, **kwargs)


def read_events(text: str) -> list[tuple[str, object]]:
    """The events of an SSE body as (name, JSON data); comments and heartbeats left out."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def timed_pieces(response: requests.Response) -> list[tuple[float, bytes]]:
    with response:
        return [(time.monotonic(), piece) for piece in response.iter_content(None) if piece]


def done_then_linger(exchange: Exchange) -> None:
    """A whole answer and its `[DONE]`, then a second before the body's last chunk: an upstream
    (or a proxy in front of it) that is slow to end the HTTP body after the stream ended."""
    exchange.start_chunked(200, "text/event-stream")
    for delta, finish_reason in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": "All of it."}, None),
        ({}, "stop"),
    ):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {
            "id": "chatcmpl-linger",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": exchange.json_body.get("model"),
            "choices": [choice],
        }
        exchange.write_event(chunk)
    exchange.write_event("[DONE]")
    exchange.watch_for_close(1.0)
    exchange.end_chunked()


def assert_error_line(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert ERROR_LINE.fullmatch(response.text), repr(response.text)


def assert_json_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    """The OpenAI-shaped error of `response`, checked; `code` when the contract names one."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["code"], str) and (code is None or error["code"] == code)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


# --- /callChatGPT --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["query", "form", "json"])
def test_callchatgpt_answers_a_question_in_plain_text(
    proxy: Service, upstream: FakeUpstream, how: str
) -> None:
    response = ask(proxy, how, input="What is two plus two?")

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == "Hello from the fake upstream."
    body = sent(upstream)
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is two plus two?"},
    ]
    assert body["model"] == DEFAULT_MODEL
    assert not body.get("stream")


@pytest.mark.parametrize("how", ["query", "form", "json"])
def test_callchatgpt_forwards_model_temperature_max_tokens_and_system(
    proxy: Service, upstream: FakeUpstream, how: str
) -> None:
    response = ask(
        proxy, how, input="hi", model="gpt-4o", temperature=0.2, max_tokens=50, system="Be brief."
    )

    assert response.status_code == 200, response.text
    body = sent(upstream)
    assert body["model"] == "gpt-4o"
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 50 and isinstance(body["max_tokens"], int)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [m for m in body["messages"] if m["role"] == "system"] == [body["messages"][0]]
    assert body["messages"][-1] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("streamed", ["0", "1"])
def test_callchatgpt_strips_the_white_space_around_the_answer(
    proxy: Service, upstream: FakeUpstream, streamed: str
) -> None:
    upstream.reply_text = "  \n answer \n "

    response = ask(proxy, "query", input="hi", **({"stream": "1"} if streamed == "1" else {}))

    assert response.status_code == 200
    assert response.text == "answer"


@pytest.mark.parametrize(
    ("how", "flag"),
    [("query", "1"), ("query", "true"), ("form", "1"), ("form", "true"), ("json", True)],
)
def test_callchatgpt_streams_the_same_text_chunked(
    proxy: Service, upstream: FakeUpstream, how: str, flag: object
) -> None:
    upstream.reply_text = "one two three, four five."

    response = ask(proxy, how, input="count", stream=flag)

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert response.text == "one two three, four five."
    assert sent(upstream)["stream"] is True


def test_callchatgpt_streams_the_text_as_it_is_generated(
    proxy: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["alpha ", "beta ", "gamma ", "delta"], interval=0.3))

    pieces = timed_pieces(
        requests.get(
            f"{proxy.url}/callChatGPT",
            params={"input": "go", "stream": "1"},
            stream=True,
            timeout=15,
        )
    )

    assert b"".join(piece for _, piece in pieces) == b"alpha beta gamma delta"
    assert pieces[0][1].startswith(b"alpha")
    assert pieces[-1][0] - pieces[0][0] >= 0.5, "the text came all at once"


@pytest.mark.parametrize(
    ("how", "streamed"), [("query", "0"), ("form", "0"), ("json", "0"), ("query", "1")]
)
def test_callchatgpt_round_trips_chinese_in_utf8(
    proxy: Service, upstream: FakeUpstream, how: str, streamed: str
) -> None:
    upstream.reply_text = CHINESE_ANSWER

    flag = {"stream": "1"} if streamed == "1" else {}
    response = ask(proxy, how, input=CHINESE_QUESTION, **flag)

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.content.decode("utf-8") == CHINESE_ANSWER
    assert sent(upstream)["messages"][-1] == {"role": "user", "content": CHINESE_QUESTION}


@pytest.mark.parametrize(
    ("values", "status"),
    [
        ({}, 400),
        ({"input": "   "}, 400),
        ({"input": "hi", "model": "gpt-4.1"}, 400),
        ({"input": "hi", "temperature": "hot"}, 400),
        ({"input": "hi", "temperature": "7"}, 400),
        ({"input": "hi", "max_tokens": "1.5"}, 400),
        ({"input": "hi", "stream": "maybe"}, 400),
    ],
    ids=[
        "no input",
        "blank input",
        "model",
        "temperature",
        "temperature range",
        "max_tokens",
        "stream",
    ],
)
def test_callchatgpt_refuses_bad_values_with_an_error_line(
    proxy: Service, upstream: FakeUpstream, values: dict, status: int
) -> None:
    for how in ("query", "form", "json"):
        assert_error_line(ask(proxy, how, **values), status)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "body", [b"{", b'{"input": "a", "input": "b"}', b'{"input": NaN}', b"[1]", b'{"input": 5}']
)
def test_callchatgpt_refuses_a_bad_json_body_with_an_error_line(
    proxy: Service, upstream: FakeUpstream, body: bytes
) -> None:
    response = requests.post(
        f"{proxy.url}/callChatGPT",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=15,
    )

    assert_error_line(response, 400)
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("behaviour", "status"),
    [
        (
            openai_error(
                400,
                "This model's maximum context length is 128000 tokens.",
                "context_length_exceeded",
            ),
            400,
        ),
        (openai_error(500, "The server had an error.", type="server_error"), 502),
        (openai_error(503, "Overloaded.", type="server_error"), 502),
        (openai_error(504, "Gateway timeout.", type="server_error"), 504),
        (rate_limited(retry_after="7"), 429),
    ],
    ids=["400", "500", "503", "504", "429"],
)
@pytest.mark.parametrize("streamed", ["0", "1"])
def test_callchatgpt_reports_upstream_failures_as_one_error_line(
    proxy: Service, upstream: FakeUpstream, behaviour, status: int, streamed: str
) -> None:
    upstream.enqueue(behaviour)

    response = ask(proxy, "query", input="hi", stream=streamed)  # stream=0 is a valid flag

    assert_error_line(response, status)
    assert response.headers.get("x-should-retry") == "false"
    if status == 400:
        assert "maximum context length" in response.text
    if status == 429:
        assert response.headers.get("Retry-After") == "7"


# --- /chat -------------------------------------------------------------------------------------------


def test_chat_answers_a_message_as_json(proxy: Service, upstream: FakeUpstream) -> None:
    response = chat(proxy, {"message": "Say hello."})

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    answer = response.json()
    assert {"id", "model", "content", "finish_reason", "usage"} <= set(answer)
    assert answer["id"] and isinstance(answer["id"], str)
    assert answer["model"] == DEFAULT_MODEL
    assert answer["content"] == "Hello from the fake upstream."
    assert answer["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert sent(upstream)["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Say hello."},
    ]


def test_chat_puts_a_given_system_prompt_first(proxy: Service, upstream: FakeUpstream) -> None:
    response = chat(proxy, {"message": "hi", "system": "Answer in French."})

    assert response.status_code == 200, response.text
    assert sent(upstream)["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hi"},
    ]


def test_chat_messages_are_stateless(proxy: Service, upstream: FakeUpstream) -> None:
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]

    response = chat(proxy, {"messages": history})

    assert response.status_code == 200, response.text
    answer = response.json()
    assert "conversation_id" not in answer
    assert answer["content"] == "Hello from the fake upstream."
    assert sent(upstream)["messages"][-3:] == history


def test_chat_messages_that_bring_a_system_prompt_keep_it(
    proxy: Service, upstream: FakeUpstream
) -> None:
    history = [
        {"role": "system", "content": "Only say yes."},
        {"role": "user", "content": "Well?"},
    ]

    response = chat(proxy, {"messages": history})

    assert response.status_code == 200, response.text
    assert sent(upstream)["messages"] == history


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_chat_reads_the_body_as_json_whatever_its_content_type(
    proxy: Service, upstream: FakeUpstream, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}

    response = requests.post(
        f"{proxy.url}/chat",
        data=json.dumps({"message": "sent like curl -d"}).encode(),
        headers=headers,
        timeout=15,
    )

    assert response.status_code == 200, response.text
    assert sent(upstream)["messages"][-1] == {"role": "user", "content": "sent like curl -d"}


@pytest.mark.parametrize(
    "body", [b"", b"[]", b'"hi"', b"42", b"null", b'{"message": "hi"', b"message=hi"]
)
def test_chat_refuses_anything_but_a_json_object(
    proxy: Service, upstream: FakeUpstream, body: bytes
) -> None:
    response = requests.post(
        f"{proxy.url}/chat",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=15,
    )

    error = assert_json_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert upstream.requests == []


def test_chat_forwards_the_generation_options(proxy: Service, upstream: FakeUpstream) -> None:
    options = {
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 64,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "stop": ["END", "STOP"],
    }

    response = chat(proxy, {"message": "hi", "model": "gpt-4o-mini", **options})

    assert response.status_code == 200, response.text
    body = sent(upstream)
    assert body["model"] == "gpt-4o-mini"
    assert {name: body.get(name) for name in options} == options


def test_chat_uses_openai_model_when_the_request_names_none(
    proxy: Service, upstream: FakeUpstream
) -> None:
    response = chat(proxy, {"messages": [{"role": "user", "content": "hi"}]})

    assert response.status_code == 200, response.text
    assert response.json()["model"] == DEFAULT_MODEL
    assert sent(upstream)["model"] == DEFAULT_MODEL


@pytest.mark.parametrize("streamed", [False, True])
def test_chat_refuses_a_model_that_is_not_allowed(
    proxy: Service, upstream: FakeUpstream, streamed: bool
) -> None:
    response = chat(proxy, {"message": "hi", "model": "gpt-4.1", "stream": streamed})

    error = assert_json_error(response, 400, "model_not_allowed")
    assert error["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("extra", "headers"),
    [({"stream": True}, {}), ({}, {"Accept": "text/event-stream"})],
    ids=["stream true", "accept"],
)
def test_chat_streams_start_delta_done_events(
    proxy: Service, upstream: FakeUpstream, extra: dict, headers: dict
) -> None:
    upstream.reply_text = "Streaming works fine."

    response = chat(proxy, {"message": "hi", **extra}, headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = read_events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done", names
    assert set(names[1:-1]) == {"delta"}
    assert events[0][1]["model"] == DEFAULT_MODEL
    assert "".join(data["content"] for name, data in events if name == "delta") == (
        "Streaming works fine."
    )
    done = events[-1][1]
    assert done["id"] and done["finish_reason"] == "stop"
    assert done["usage"]["total_tokens"] > 0
    assert sent(upstream)["stream"] is True


def test_chat_streams_each_piece_as_it_arrives(proxy: Service, upstream: FakeUpstream) -> None:
    upstream.enqueue(stream(chunks=["one ", "two ", "three"], interval=0.3))

    pieces = timed_pieces(
        requests.post(
            f"{proxy.url}/chat",
            json={"message": "count", "stream": True},
            stream=True,
            timeout=15,
        )
    )

    first_delta = next(at for at, piece in pieces if b"event: delta" in piece)
    done = next(at for at, piece in pieces if b"event: done" in piece)
    assert done - first_delta >= 0.5, "the deltas came all at once"


def test_chat_stream_ends_with_done_when_the_upstream_is_slow_to_end_its_body(
    proxy: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(done_then_linger)

    response = chat(proxy, {"message": "hi", "stream": True})

    events = read_events(response.text)
    assert [name for name, _ in events] == ["start", "delta", "done"]
    assert events[-1][1]["finish_reason"] == "stop"


def test_callchatgpt_stream_is_whole_when_the_upstream_is_slow_to_end_its_body(
    proxy: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(done_then_linger)

    response = ask(proxy, "query", input="hi", stream="1")

    assert (response.status_code, response.text) == (200, "All of it.")


def test_chat_stream_that_fails_midway_ends_with_an_error_event(
    proxy: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["partial ", "never"], stop_after=1))

    response = chat(proxy, {"message": "hi", "stream": True})

    assert response.status_code == 200
    events = read_events(response.text)
    names = [name for name, _ in events]
    assert names[:2] == ["start", "delta"] and names[-1] == "error", names
    assert "done" not in names
    error = events[-1][1]["error"]
    assert {"message", "type", "code"} <= set(error)
    assert error["code"].startswith("upstream_")


# --- probes -------------------------------------------------------------------------------------------


def test_healthz_says_ok(proxy: Service) -> None:
    response = requests.get(f"{proxy.url}/healthz", timeout=5)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"status": "ok"}


def test_readyz_says_ok_and_that_a_key_is_set_but_not_which(proxy: Service) -> None:
    response = requests.get(f"{proxy.url}/readyz", timeout=5)

    assert response.status_code == 200
    ready = response.json()
    assert ready["status"] == "ok"
    flags = re.findall(r'"[^"]*key[^"]*"\s*:\s*(true|false)', response.text, re.I)
    assert flags == ["true"], response.text
    assert FAKE_KEY[-4:] not in response.text
    assert "sk-" not in response.text
