"""The relay's parts on their own, over real sockets: a stream's ledger row is written when the
server closes the response, not when its body runs out; the usage meter reads only the event
that carries usage, with the same figures; chunks that wait are handed on as one piece.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from app import db
from app.relay import IDLE, pace
from app.services.completions import ChatRequest, ChatService
from app.services.context import estimate_prompt_tokens, estimate_tokens
from app.services.ledger import Ledger
from app.services.meter import KEEP_LIMIT, Meter
from app.services.passthrough import Metered, Passthrough
from app.settings import load_settings
from app.sse import Event
from app.upstream import UpstreamClient
from tests.conftest import REPO, send_chat
from tests.fake_upstream import FAKE_KEY, FakeUpstream, stream

MESSAGES = [{"role": "user", "content": "Say hello"}]
CHAT_BODY = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'chatproxy.db'}")
    db.upgrade(engine)
    yield Ledger(engine)
    engine.dispose()


def rows(ledger: Ledger) -> list[sa.Row]:
    with ledger.engine.connect() as connection:
        return connection.execute(sa.select(db.ledger).order_by(db.ledger.c.id)).all()


def services(upstream: FakeUpstream, ledger: Ledger) -> tuple[Passthrough, ChatService]:
    settings = load_settings({"OPENAI_API_KEY": FAKE_KEY, "OPENAI_BASE_URL": upstream.base_url})
    client = UpstreamClient(settings)
    return Passthrough(settings, client, ledger), ChatService(settings, client, ledger)


# --- the ledger row waits for close() ------------------------------------------------------------


def test_a_relayed_stream_is_recorded_when_closed_not_when_its_body_ends(
    upstream: FakeUpstream, ledger: Ledger
) -> None:
    passthrough, _ = services(upstream, ledger)
    upstream.enqueue(stream(chunks=["Hello ", "there"]))
    body = {**CHAT_BODY, "stream_options": {"include_usage": True}}
    metered = Metered("alice", "/v1/chat/completions", body)

    relayed = passthrough.relay(send_chat(passthrough, body), {}, metered)
    text = b"".join(relayed)

    assert b"data: [DONE]" in text
    assert rows(ledger) == [], "the row was written before the server sent the last bytes"
    relayed.close()
    relayed.close()
    [row] = rows(ledger)
    assert (row.model, row.estimated, row.partial) == ("gpt-4o-mini", False, False)
    assert (row.prompt_tokens, row.completion_tokens) == (2, 2)  # the fake's own count


@pytest.mark.parametrize(
    ("budget", "rows_when_the_body_ends"), [("0", 0), ("1000000", 1)], ids=["no-budget", "budget"]
)
def test_a_json_answer_is_recorded_on_close_or_with_a_budget_when_its_body_ends(
    upstream: FakeUpstream, ledger: Ledger, budget: str, rows_when_the_body_ends: int
) -> None:
    """Without a budget the client does not wait for the database; with one, its next request
    (to any instance) must meet the row, so the row comes before the last bytes."""
    settings = load_settings(
        {
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": upstream.base_url,
            "DAILY_TOKEN_BUDGET": budget,
        }
    )
    passthrough = Passthrough(settings, UpstreamClient(settings), ledger)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    metered = Metered("alice", "/v1/chat/completions", body)

    relayed = passthrough.relay(send_chat(passthrough, body), {}, metered)
    assert b'"chat.completion"' in b"".join(relayed)

    assert len(rows(ledger)) == rows_when_the_body_ends
    relayed.close()
    relayed.close()
    [row] = rows(ledger)
    assert (row.client, row.partial, row.estimated) == ("alice", False, False)


def test_a_stream_the_client_leaves_is_recorded_once_as_partial_on_close(
    upstream: FakeUpstream, ledger: Ledger
) -> None:
    passthrough, _ = services(upstream, ledger)
    upstream.enqueue(stream(chunks=["Hello ", "there"], hang_after=1))
    metered = Metered("alice", "/v1/chat/completions", CHAT_BODY)
    relayed = passthrough.relay(send_chat(passthrough, CHAT_BODY), {}, metered)

    for piece in relayed:
        if b"Hello" in piece:
            break
    relayed.close()

    [row] = rows(ledger)
    assert (row.estimated, row.partial) == (True, True)
    [request] = upstream.wait_for_requests(1)
    assert upstream.wait_for_close(request) is not None, "the upstream stream stayed open"


def test_a_body_never_read_is_still_recorded_and_its_upstream_closed(
    upstream: FakeUpstream, ledger: Ledger
) -> None:
    passthrough, _ = services(upstream, ledger)
    upstream.enqueue(stream(chunks=["Hello"], hang_after=0))
    metered = Metered("alice", "/v1/chat/completions", CHAT_BODY)

    passthrough.relay(send_chat(passthrough, CHAT_BODY), {}, metered).close()

    assert [row.partial for row in rows(ledger)] == [True]
    [request] = upstream.wait_for_requests(1)
    assert upstream.wait_for_close(request) is not None


def test_a_chat_stream_stopped_by_its_reader_is_recorded_by_close_only(
    upstream: FakeUpstream, ledger: Ledger
) -> None:
    _, chat = services(upstream, ledger)
    upstream.enqueue(stream(chunks=["Hello ", "there"]))
    ended = []
    answer = chat.stream(ChatRequest(MESSAGES, "gpt-4o-mini"), "alice", "/chat")
    answer.on_close(ended.append)

    assert "".join(getattr(item, "content", "") for item in answer) == "Hello there"
    answer.stop()
    assert (rows(ledger), ended) == ([], [])
    answer.close()
    answer.close()

    assert ended == [answer] and answer.finished
    assert [(row.endpoint, row.partial) for row in rows(ledger)] == [("/chat", False)]


# --- the meter reads only what it needs ----------------------------------------------------------


def chunk(content: str | None = None, usage: dict | None = None, model: str = "gpt-4o") -> Event:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    data = {"object": "chat.completion.chunk", "model": model, "choices": choices, "usage": usage}
    return Event("message", json.dumps(data))


def test_the_meter_takes_usage_from_the_event_that_carries_it() -> None:
    meter = Meter({"model": "gpt-4o", "messages": MESSAGES})
    for content in ("Hel", "lo"):
        meter.event(chunk(content))
    meter.event(chunk(usage={"prompt_tokens": 9, "completion_tokens": 2}, model="gpt-4o-2024"))
    meter.event(Event("message", "[DONE]"))

    assert meter.tokens() == (9, 2, False)
    assert meter.model == "gpt-4o-2024"


def test_without_usage_the_meter_estimates_from_every_event_it_kept() -> None:
    meter = Meter({"model": "gpt-4o", "messages": MESSAGES})
    pieces = [f"word{index} " for index in range(KEEP_LIMIT // 50)]  # beyond what is kept unread
    for content in pieces:
        meter.event(chunk(content, model="gpt-4o-2024"))

    expected = (estimate_prompt_tokens(MESSAGES), estimate_tokens("".join(pieces)), True)
    assert meter.tokens() == expected
    assert meter.model == "gpt-4o-2024"


def test_usage_events_without_a_model_leave_it_to_the_other_events() -> None:
    meter = Meter({"model": "gpt-4o", "messages": MESSAGES})
    meter.event(chunk("Hi", model="gpt-4o-2024"))
    meter.event(Event("message", '{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}'))

    assert meter.tokens() == (3, 1, False)
    assert meter.model == "gpt-4o-2024"


# --- pace hands waiting chunks on as one piece ---------------------------------------------------


class Source:
    """An upstream body that says when the reader has taken everything it had."""

    def __init__(self, planned: list[bytes | BaseException]) -> None:
        self.planned = planned
        self.start = threading.Event()
        self.taken = threading.Event()
        self.stopped = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        self.start.wait(5)
        for item in self.planned:
            if isinstance(item, BaseException):
                self.taken.set()
                raise item
            yield item
        self.taken.set()

    def stop(self) -> None:
        self.stopped.set()


@pytest.mark.parametrize("end", [None, OSError("reset")])
def test_joined_pace_hands_on_the_chunks_that_wait_as_one_piece(end: BaseException | None) -> None:
    source = Source([b"a", b"b", b"c", *([end] if end else [])])
    paced = pace(iter(source), idle_every=0.05, max_seconds=10, on_stop=source.stop, joined=True)

    assert next(paced) is IDLE  # the reader is waiting for the source
    source.start.set()
    assert source.taken.wait(5)
    if end is None:
        assert list(paced) == [b"abc"]
    else:
        assert next(paced) == b"abc"
        with pytest.raises(OSError):
            next(paced)
    assert source.stopped.is_set()


# --- a gone client, seen past select()'s descriptor limit ---------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["threads", "gevent"])
def test_a_client_is_seen_gone_or_present_on_a_descriptor_past_1024(patched: bool) -> None:
    """A worker holding 500 streams has 1,000 sockets open; select() would refuse them, and
    every idle tick would end a live stream as if its client had left."""
    script = f"""
import os, resource, socket
if {patched}:
    from gevent import monkey
    monkey.patch_all()
from app.relay import client_gone
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 2048), hard), hard))
def high_pair(fd):
    ours, theirs = socket.socketpair()
    return socket.socket(fileno=os.dup2(ours.detach(), fd)), theirs
quiet, quiet_peer = high_pair(1500)
talking, talking_peer = high_pair(1501)
assert quiet.fileno() > 1023 and talking.fileno() > 1023
present = client_gone({{"gunicorn.socket": quiet}})
talking_peer.sendall(b"a pipelined request")
with_data = client_gone({{"gunicorn.socket": talking}})
quiet_peer.close()
print(present, with_data, client_gone({{"gunicorn.socket": quiet}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True"]
