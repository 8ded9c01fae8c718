"""The `/chat` stream as it relays upstream chunks that arrive together: one `delta` event per
chunk still, written in one piece, and nothing lost when a bad event follows good ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from app import create_app, sse
from app.settings import load_settings
from app.sse import EventReader
from tests.conftest import base_env
from tests.fake_upstream import Exchange, FakeUpstream

MODEL = "gpt-4o-mini"
BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def client(upstream: FakeUpstream, tmp_path: Path) -> Iterator[FlaskClient]:
    env = {**base_env(upstream), "DATABASE_URL": f"sqlite:///{tmp_path / 'chat.db'}"}
    yield create_app(load_settings(env)).test_client()


def in_one_read(*events: object):
    """A behaviour that sends every event in one HTTP chunk, as a server that batches would."""

    def answer(exchange: Exchange) -> None:
        exchange.start_chunked(200, "text/event-stream")
        text = "".join(
            f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
            for event in events
        )
        exchange.write_chunk(text.encode())
        exchange.end_chunked()

    return answer


def chunk(content: str | None = None, finish_reason: str | None = None, usage=None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    if finish_reason:
        choices = [{"index": 0, "delta": {}, "finish_reason": finish_reason}]
    return {"id": "c1", "model": f"{MODEL}-2024", "choices": choices, "usage": usage}


def received(client: FlaskClient) -> list[tuple[str, dict]]:
    response = client.post("/chat", json=BODY)
    assert response.status_code == 200
    return [(event.name, json.loads(event.data)) for event in EventReader().feed(response.data)]


@pytest.mark.parametrize(
    "text", ["tok ", "", 'a "quoted" \\ line\nbreak\t', "中文 é 🙂", "\x00\x1f"]
)
def test_a_text_event_is_the_same_bytes_as_the_general_event(text: str) -> None:
    assert sse.text_event("delta", "content", text) == sse.event("delta", {"content": text})


def test_chunks_read_together_still_give_one_delta_each_after_a_start_naming_the_asked_model(
    client: FlaskClient, upstream: FakeUpstream
) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    upstream.enqueue(
        in_one_read(
            chunk("Hel"),
            chunk("lo"),
            chunk("!"),
            chunk(finish_reason="stop"),
            chunk(usage=usage),
            "[DONE]",
        )
    )

    events = received(client)

    assert events == [
        ("start", {"model": MODEL}),
        ("delta", {"content": "Hel"}),
        ("delta", {"content": "lo"}),
        ("delta", {"content": "!"}),
        ("done", {"id": "c1", "finish_reason": "stop", "usage": usage}),
    ]


def test_deltas_before_a_bad_event_in_the_same_read_still_go_out(
    client: FlaskClient, upstream: FakeUpstream
) -> None:
    upstream.enqueue(in_one_read(chunk("Hel"), chunk("lo"), "{not json"))

    events = received(client)

    assert [name for name, _ in events] == ["start", "delta", "delta", "error"]
    assert events[-1][1]["error"]["code"] == "upstream_bad_response"
