"""The usage ledger over HTTP (CONTRACT §3 `/usage`, §2 `DAILY_TOKEN_BUDGET` and `MODEL_PRICES`,
§5 every answered upstream call in the ledger exactly once).

The fake upstream reports `prompt_tokens` as the words of the messages it received and
`completion_tokens` as the words of its answer, so what it served is computed from its recorded
requests; the ledger table is read directly with SQLAlchemy and compared with that and with
`/usage`. The load test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import openai
import pytest
import requests
import sqlalchemy as sa

from app import db
from tests.conftest import Service, open_raw_request, service_env
from tests.fake_upstream import (
    DEFAULT_REPLY,
    Exchange,
    FakeUpstream,
    answer_like_openai,
    stream,
)
from tests.test_upstream_faults import events

pytest_plugins = ["tests.postgres"]

CHAT, LEGACY, V1 = "/chat", "/callChatGPT", "/v1/chat/completions"
CLIENT_TIMEOUT = 30
REPLY_WORDS = len(DEFAULT_REPLY.split())
BUILT_IN_MINI = (0.00015, 0.0006)  # gpt-4o-mini, USD per 1k prompt / completion tokens
BUILT_IN_4O = (0.0025, 0.01)
ALICE, BOB = "tok-a-1", "tok-b-2"
ACCESS_TOKENS = f"alice:{ALICE},bob:{BOB}"
BUDGET = 30
TEN_WORDS = "one two three four five six seven eight nine ten"  # 10 + 5 tokens a call
# The load test: requests, client threads, and the long answer that a client cuts midway.
LOAD_REQUESTS = 216
LOAD_THREADS = 32
WORKERS = 3
CUT_MARK = "CUTME"
LONG_REPLY = "Once " + "upon a time " * 13 + "the end."  # 42 words, 0.05 s apart
LEDGER_SETTLES_WITHIN = 15.0


# --- Talking to the service ---------------------------------------------------------------------


def headers(token: str | None = None) -> dict[str, str]:
    # One connection per request: gunicorn's graceful stop waits for idle keep-alive ones.
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return {**auth, "Connection": "close"}


def post(
    service: Service, path: str, body: dict, token: str | None = None, **kwargs
) -> requests.Response:
    return requests.post(
        f"{service.url}{path}",
        json=body,
        headers=headers(token),
        timeout=CLIENT_TIMEOUT,
        stream=bool(body.get("stream")),
        **kwargs,
    )


def ask(service: Service, endpoint: str, text: str, token: str | None = None, **fields):
    """One question to `endpoint`, shaped as that endpoint expects."""
    if endpoint == CHAT:
        body = {"messages": [{"role": "user", "content": text}], **fields}
    elif endpoint == LEGACY:
        body = {"input": text, **fields}
    else:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **fields}
    return post(service, endpoint, body, token)


def usage(service: Service, token: str | None = None, days: int = 1) -> dict:
    response = requests.get(
        f"{service.url}/usage", params={"days": days}, headers=headers(token), timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def chat_requests(upstream: FakeUpstream) -> list:
    return [r for r in upstream.requests if r.path == "/v1/chat/completions"]


def served_prompt_tokens(request) -> int:
    """What the fake reports as a request's prompt tokens: the words of its messages."""
    return sum(len(str(m.get("content") or "").split()) for m in request.json["messages"])


def cost(prompt: int, completion: int, price: tuple[float, float]) -> float:
    return (prompt * price[0] + completion * price[1]) / 1000


def ledger_rows(database_url: str) -> list[sa.Row]:
    """The ledger table as the service wrote it, read from outside the service."""
    engine = sa.create_engine(db.engine_url(database_url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.select(db.ledger).order_by(db.ledger.c.id)).all()
    finally:
        engine.dispose()


def sqlite_url(service: Service) -> str:
    return service.env["DATABASE_URL"]


def wait_for_rows(database_url: str, count: int, within: float = 5.0) -> list[sa.Row]:
    """The ledger once it holds `count` rows (streams write theirs as they close)."""
    deadline = time.monotonic() + within
    rows = ledger_rows(database_url)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = ledger_rows(database_url)
    return rows


def seconds_to_utc_midnight() -> float:
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (midnight - now).total_seconds()


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


# --- /usage -------------------------------------------------------------------------------------


def test_usage_sums_calls_per_day_and_model_with_the_built_in_prices(
    service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    service = service_factory()
    assert ask(service, CHAT, "alpha beta gamma").status_code == 200
    assert events(ask(service, CHAT, "one two three four", stream=True))[-1].name == "done"
    stored = post(service, CHAT, {"message": "a stored question here"})
    assert stored.status_code == 200, stored.text
    assert ask(service, LEGACY, "a b c d e").text == DEFAULT_REPLY
    assert ask(service, V1, "x y").status_code == 200
    assert ask(service, CHAT, "hello there", model="gpt-4o").status_code == 200

    sent = chat_requests(upstream)
    assert len(sent) == 6
    by_model: dict[str, list[int]] = {}
    for request in sent:
        by_model.setdefault(request.json["model"], []).append(served_prompt_tokens(request))
    mini_prompt, o4_prompt = sum(by_model["gpt-4o-mini"]), sum(by_model["gpt-4o"])
    mini_completion, o4_completion = 5 * REPLY_WORDS, REPLY_WORDS
    rows = wait_for_rows(sqlite_url(service), 6)

    report = usage(service, days=30)

    assert report["data"] == [
        {
            "date": today(),
            "model": "gpt-4o",
            "requests": 1,
            "prompt_tokens": o4_prompt,
            "completion_tokens": o4_completion,
            "total_tokens": o4_prompt + o4_completion,
            "cost_usd": pytest.approx(cost(o4_prompt, o4_completion, BUILT_IN_4O), abs=1e-6),
        },
        {
            "date": today(),
            "model": "gpt-4o-mini",
            "requests": 5,
            "prompt_tokens": mini_prompt,
            "completion_tokens": mini_completion,
            "total_tokens": mini_prompt + mini_completion,
            "cost_usd": pytest.approx(cost(mini_prompt, mini_completion, BUILT_IN_MINI), abs=1e-6),
        },
    ]
    assert report["total"] == {
        "requests": 6,
        "prompt_tokens": mini_prompt + o4_prompt,
        "completion_tokens": mini_completion + o4_completion,
        "total_tokens": mini_prompt + o4_prompt + mini_completion + o4_completion,
        "cost_usd": pytest.approx(
            cost(mini_prompt, mini_completion, BUILT_IN_MINI)
            + cost(o4_prompt, o4_completion, BUILT_IN_4O),
            abs=1e-6,
        ),
    }
    assert len(rows) == 6
    assert not any(row.estimated or row.partial for row in rows)
    assert Counter(row.endpoint for row in rows) == {CHAT: 4, LEGACY: 1, V1: 1}


@pytest.mark.parametrize("days", ["0", "367", "-1", "lots"])
def test_usage_days_outside_1_to_366_is_400(
    service_factory: Callable[..., Service], days: str
) -> None:
    service = service_factory()
    response = requests.get(
        f"{service.url}/usage", params={"days": days}, headers=headers(), timeout=10
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"


def test_model_prices_file_sets_the_cost(
    service_factory: Callable[..., Service], upstream: FakeUpstream, tmp_path
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "gpt-4o-mini": {"prompt": 1.0, "completion": 2.0},
                "house-model": {"prompt": 0.5, "completion": 0.25},
            }
        )
    )
    service = service_factory(MODEL_PRICES=str(prices))

    assert ask(service, CHAT, "one two three").status_code == 200  # 3 + 5 tokens
    assert ask(service, CHAT, "a b", model="house-model").status_code == 200  # 2 + 5
    assert ask(service, CHAT, "c d e f", model="gpt-4o").status_code == 200  # 4 + 5, built in

    report = usage(service)
    costs = {entry["model"]: entry["cost_usd"] for entry in report["data"]}
    assert costs == {
        "gpt-4o-mini": pytest.approx(cost(3, 5, (1.0, 2.0))),
        "house-model": pytest.approx(cost(2, 5, (0.5, 0.25))),
        "gpt-4o": pytest.approx(cost(4, 5, BUILT_IN_4O), abs=1e-6),
    }
    assert report["total"]["cost_usd"] == pytest.approx(sum(costs.values()), abs=1e-6)


def test_rows_without_upstream_usage_are_estimated(
    service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    service = service_factory()
    upstream.enqueue(stream(usage=False), stream(usage=False))

    chat_events = events(ask(service, CHAT, "count my words please", stream=True))
    legacy = ask(service, LEGACY, "and these too", stream=True)
    assert legacy.text == DEFAULT_REPLY
    sdk = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=20)
    try:  # the SDK does not ask for the usage chunk unless told: the fake sends none
        pieces = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "sdk stream"}],
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
    finally:
        sdk.close()
    assert text == DEFAULT_REPLY
    assert chat_events[-1].name == "done" and chat_events[-1].json()["usage"] is None
    assert ask(service, CHAT, "a reported call").status_code == 200

    rows = wait_for_rows(sqlite_url(service), 4)

    assert [(row.endpoint, row.estimated, row.partial) for row in rows] == [
        (CHAT, True, False),
        (LEGACY, True, False),
        (V1, True, False),
        (CHAT, False, False),
    ]
    for row in rows[:3]:  # counted from the text: a 29-character answer, a short question
        assert 1 <= row.completion_tokens <= 2 * REPLY_WORDS, row
        assert row.prompt_tokens >= 1, row
        assert row.total_tokens == row.prompt_tokens + row.completion_tokens
    assert (rows[3].prompt_tokens, rows[3].completion_tokens) == (3, REPLY_WORDS)
    report = usage(service)
    assert report["total"]["requests"] == 4
    assert report["total"]["total_tokens"] == sum(row.total_tokens for row in rows)


# --- DAILY_TOKEN_BUDGET -------------------------------------------------------------------------


def assert_budget_exceeded(response: requests.Response, endpoint: str) -> None:
    assert response.status_code == 429, response.text
    retry_after = response.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit(), dict(response.headers)
    assert abs(int(retry_after) - seconds_to_utc_midnight()) <= 5, retry_after
    if endpoint == LEGACY:
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
        assert response.text.startswith("error: "), response.text
        return
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "budget_exceeded"), error


def test_a_spent_daily_budget_is_429_until_utc_midnight_without_calling_the_upstream(
    service_factory: Callable[..., Service], upstream: FakeUpstream
) -> None:
    service = service_factory(DAILY_TOKEN_BUDGET=str(BUDGET), ACCESS_TOKENS=ACCESS_TOKENS)

    first = ask(service, CHAT, TEN_WORDS, ALICE)  # 15 tokens: under the budget
    second = ask(service, LEGACY, TEN_WORDS, ALICE)  # 30: the budget is reached
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert usage(service, ALICE)["total"]["total_tokens"] == BUDGET
    served = len(upstream.requests)

    assert_budget_exceeded(ask(service, CHAT, "one more", ALICE), CHAT)
    assert_budget_exceeded(ask(service, CHAT, "one more", ALICE, stream=True), CHAT)
    assert_budget_exceeded(post(service, CHAT, {"message": "stored?"}, ALICE), CHAT)
    assert_budget_exceeded(ask(service, LEGACY, "one more", ALICE), LEGACY)
    assert_budget_exceeded(ask(service, LEGACY, "one more", ALICE, stream=True), LEGACY)
    assert_budget_exceeded(ask(service, V1, "one more", ALICE), V1)
    assert_budget_exceeded(ask(service, V1, "one more", ALICE, stream=True), V1)

    assert len(upstream.requests) == served  # none of those reached the upstream
    assert usage(service, ALICE)["total"]["requests"] == 2
    # The refused turn stored nothing, and the budget is Alice's alone.
    conversations = requests.get(
        f"{service.url}/chat/conversations", headers=headers(ALICE), timeout=10
    )
    assert conversations.json()["data"] == []
    assert ask(service, V1, "bob asks", BOB).status_code == 200
    assert len(upstream.requests) == served + 1


def test_a_daily_budget_holds_across_two_instances_sharing_postgresql(
    service_factory: Callable[..., Service], upstream: FakeUpstream, postgres
) -> None:
    database_url = postgres.new_database()
    env = {"DATABASE_URL": database_url, "DAILY_TOKEN_BUDGET": str(BUDGET)}
    east = service_factory(ACCESS_TOKENS=ACCESS_TOKENS, **env)
    west = service_factory(ACCESS_TOKENS=ACCESS_TOKENS, **env)

    first = ask(east, CHAT, TEN_WORDS, ALICE)  # 15 tokens, spent through one instance
    second = ask(west, V1, TEN_WORDS, ALICE)  # 30, through the other: the budget is reached
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    served = len(upstream.requests)

    assert_budget_exceeded(ask(east, CHAT, "one more", ALICE), CHAT)
    assert_budget_exceeded(ask(west, LEGACY, "one more", ALICE), LEGACY)
    assert len(upstream.requests) == served
    assert usage(east, ALICE)["total"] == usage(west, ALICE)["total"]
    assert usage(east, ALICE)["total"]["total_tokens"] == BUDGET


# --- Streams cut short -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service for the module's tests that only look at the rows they add."""
    workdir = tmp_path_factory.mktemp("service")
    started = Service(service_env(upstream_server, workdir), workdir).start()
    yield started
    started.stop()


def stream_body(endpoint: str) -> dict:
    messages = [{"role": "user", "content": "tell me more"}]
    if endpoint == LEGACY:
        return {"input": "tell me more", "stream": True}
    if endpoint == V1:
        return {"model": "gpt-4o-mini", "messages": messages, "stream": True}
    return {"messages": messages, "stream": True}


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY, V1])
def test_a_stream_the_client_leaves_in_a_silence_is_recorded_once_as_partial(
    shared: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    url = sqlite_url(shared)
    before = len(ledger_rows(url))
    upstream.enqueue(stream(chunks=["Hello", " there"], hang_after=1))

    with open_raw_stream(shared, endpoint, stream_body(endpoint)) as sock:
        read_body_until(sock, b"Hello")
        time.sleep(0.2)  # into the upstream's silence: only the heartbeat check sees the leave
    [request] = upstream.wait_for_requests(1)
    assert upstream.wait_for_close(request) is not None, "the upstream stream stayed open"

    rows = wait_for_rows(url, before + 1)[before:]
    time.sleep(0.3)
    assert len(ledger_rows(url)) == before + 1
    [row] = rows
    assert (row.endpoint, row.model) == (endpoint, "gpt-4o-mini")
    assert (row.estimated, row.partial) == (True, True), (
        f"a stream the client left after 'Hello' is recorded estimated={row.estimated}, "
        f"partial={row.partial}"
    )
    assert row.completion_tokens >= 1


@pytest.mark.parametrize("endpoint", [CHAT, LEGACY, V1])
def test_a_stream_that_fails_midway_is_recorded_once_as_partial(
    shared: Service, upstream: FakeUpstream, endpoint: str
) -> None:
    url = sqlite_url(shared)
    before = len(ledger_rows(url))
    upstream.enqueue(stream(chunks=["Hel", "lo", " wor", "ld"], stop_after=2))

    response = post(shared, endpoint, stream_body(endpoint))
    assert response.status_code == 200
    with pytest.raises(requests.RequestException) if endpoint == V1 else nullcontext():
        response.content  # noqa: B018 - read it all: /v1 cuts the connection

    rows = wait_for_rows(url, before + 1)[before:]
    time.sleep(0.3)
    assert len(ledger_rows(url)) == before + 1
    [row] = rows
    assert (row.endpoint, row.estimated, row.partial) == (endpoint, True, True)
    assert row.completion_tokens >= 1


# --- Exactly once under load --------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request of the load test: what is asked, how, and whether the client cuts it."""

    n: int
    kind: str
    token: str

    @property
    def cut(self) -> bool:
        return self.kind.endswith("_cut")

    @property
    def text(self) -> str:
        # n + 1 words: the fake's prompt_tokens tell the requests apart.
        words = ["word"] * (self.n + 1)
        if self.cut:
            words[0] = CUT_MARK
        return " ".join(words)

    @property
    def endpoint(self) -> str:
        return {"chat": CHAT, "legacy": LEGACY, "v1": V1}[self.kind.split("_")[0]]

    @property
    def reported(self) -> bool:
        """Whether the upstream reports this call's usage (the SDK stream asks for none)."""
        return not self.cut and self.kind != "v1_sdk_stream"

    @property
    def stored(self) -> bool:
        return "_message" in self.kind


KINDS = (
    "chat_messages",
    "chat_messages_stream",
    "chat_message",
    "chat_message_stream",
    "legacy",
    "legacy_stream",
    "v1_raw_stream",
    "v1_sdk_stream",
    "chat_message_stream_cut",
    "chat_messages_stream_cut",
    "legacy_stream_cut",
    "v1_stream_cut",
)


def load_calls() -> list[Call]:
    return [
        Call(n, KINDS[n % len(KINDS)], (ALICE, BOB)[(n // len(KINDS)) % 2])
        for n in range(LOAD_REQUESTS)
    ]


def answer_by_mark(exchange: Exchange) -> None:
    """A slow, long stream for the requests a client will cut; the usual answer for the rest."""
    if CUT_MARK in json.dumps(exchange.json_body.get("messages")):
        stream(text=LONG_REPLY, interval=0.05)(exchange)
    else:
        answer_like_openai(exchange)


def body_of(call: Call) -> dict:
    streamed = "stream" in call.kind
    if call.endpoint == LEGACY:
        return {"input": call.text, **({"stream": True} if streamed else {})}
    messages = [{"role": "user", "content": call.text}]
    if call.endpoint == V1:
        body = {"model": "gpt-4o-mini", "messages": messages, "stream": True}
        if call.kind == "v1_raw_stream":
            body["stream_options"] = {"include_usage": True}
        return body
    body = {"message": call.text} if call.stored else {"messages": messages}
    return {**body, "stream": streamed}


def open_raw_stream(
    service: Service, path: str, body: dict, token: str | None = None
) -> socket.socket:
    """A raw streaming request, so that the test decides exactly when the socket closes."""
    payload = json.dumps(body).encode()
    return open_raw_request(service, "POST", path, payload, token, timeout=CLIENT_TIMEOUT)


def read_body_until(sock: socket.socket, marker: bytes) -> bytes:
    """What came until `marker` showed in the body; fails if the answer is not a 200."""
    received = b""
    while marker not in received.partition(b"\r\n\r\n")[2]:
        piece = sock.recv(4096)
        assert piece, f"the stream ended before {marker!r}: {received!r}"
        received += piece
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    return received


def cut_after_first_chunk(service: Service, call: Call) -> None:
    """Closes the connection once the answer's first piece is in."""
    marker = {CHAT: b"event: delta", LEGACY: b"Once", V1: b"data:"}[call.endpoint]
    with open_raw_stream(service, call.endpoint, body_of(call), call.token) as sock:
        read_body_until(sock, marker)


def run_call(service: Service, sdks: dict[str, openai.OpenAI], call: Call) -> None:
    """One request of the load; fails unless the client got the whole answer (or cut it)."""
    if call.cut:
        cut_after_first_chunk(service, call)
        return
    if call.kind == "v1_sdk_stream":
        pieces = sdks[call.token].chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": call.text}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
        assert text == DEFAULT_REPLY, call
        return
    response = post(service, call.endpoint, body_of(call), call.token)
    assert response.status_code == 200, (call, response.text)
    if call.endpoint == LEGACY:
        assert response.text == DEFAULT_REPLY, call
    elif call.endpoint == V1:
        with response:
            data = [line for line in response.iter_lines() if line.startswith(b"data:")]
        assert data[-1] == b"data: [DONE]", (call, data[-3:])
        assert b'"usage": {' in data[-2], (call, data[-2])
    elif "stream" in call.kind:
        received = events(response)
        assert [item.name for item in received][-1] == "done", (call, received)
    else:
        assert response.json()["content"] == DEFAULT_REPLY, call


def test_every_answered_call_is_in_the_ledger_exactly_once_under_load(
    service_factory: Callable[..., Service], upstream: FakeUpstream, database_url: str
) -> None:
    service = service_factory(
        DATABASE_URL=database_url, WEB_CONCURRENCY=str(WORKERS), ACCESS_TOKENS=ACCESS_TOKENS
    )
    calls = load_calls()
    upstream.enqueue(*[answer_by_mark] * len(calls))
    sdks = {
        token: openai.OpenAI(
            base_url=f"{service.url}/v1", api_key=token, max_retries=0, timeout=CLIENT_TIMEOUT
        )
        for token in (ALICE, BOB)
    }
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            list(pool.map(lambda call: run_call(service, sdks, call), calls))
    finally:
        for sdk in sdks.values():
            sdk.close()
    elapsed = time.monotonic() - started

    # Each call reached the upstream once; the ledger then holds one row per call, and no more.
    sent = chat_requests(upstream)
    assert len(sent) == len(calls), f"{len(sent)} upstream requests for {len(calls)} calls"
    rows = wait_for_rows(database_url, len(calls), within=LEDGER_SETTLES_WITHIN)
    time.sleep(0.5)
    rows = ledger_rows(database_url)
    assert len(rows) == len(calls), f"{len(rows)} ledger rows for {len(sent)} answered calls"
    assert len({row.request_id for row in rows}) == len(rows)

    # What the upstream reported is in the ledger as it reported it, call by call.
    by_words = {len(call.text.split()): call for call in calls}
    served = Counter(
        (by_words[served_prompt_tokens(request)].endpoint, served_prompt_tokens(request))
        for request in sent
        if by_words[served_prompt_tokens(request)].reported
    )
    reported_rows = [row for row in rows if not row.estimated]
    assert Counter((row.endpoint, row.prompt_tokens) for row in reported_rows) == served
    assert {row.completion_tokens for row in reported_rows} == {REPLY_WORDS}
    assert not any(row.partial for row in reported_rows)
    # The rest were counted from the text: the cut ones (partial) and the SDK's streams.
    cut = [call for call in calls if call.cut]
    estimated = [row for row in rows if row.estimated]
    assert Counter(row.endpoint for row in estimated) == Counter(
        call.endpoint for call in calls if not call.reported
    )
    assert sum(row.partial for row in rows) == len(cut)
    assert all(row.total_tokens == row.prompt_tokens + row.completion_tokens for row in rows)
    assert all(row.completion_tokens > 0 for row in estimated)

    # /usage says what the table holds, client by client.
    for name, token in (("alice", ALICE), ("bob", BOB)):
        mine = [row for row in rows if row.client == name]
        total = usage(service, token)["total"]
        assert total == {
            "requests": len(mine),
            "prompt_tokens": sum(row.prompt_tokens for row in mine),
            "completion_tokens": sum(row.completion_tokens for row in mine),
            "total_tokens": sum(row.total_tokens for row in mine),
            "cost_usd": pytest.approx(sum(row.cost_usd for row in mine), abs=1e-6),
        }
        assert len(mine) == sum(call.token == token for call in calls)

    # Each stored turn, cut ones included, is one conversation with its question and answer.
    for token in (ALICE, BOB):
        listed = requests.get(
            f"{service.url}/chat/conversations",
            params={"limit": 200},
            headers=headers(token),
            timeout=10,
        ).json()["data"]
        assert len(listed) == sum(call.stored and call.token == token for call in calls)
        assert {c["message_count"] for c in listed} == {2}, listed
    print(f"\n{len(calls)} calls on {database_url.split(':')[0]} in {elapsed:.1f} s")
