"""Stored conversations over HTTP (CONTRACT §3 `/chat` with `message`, `/chat/conversations…`).

The app runs under gunicorn against the fake upstream; what the upstream received shows the
history the service sent, and the listing shows what it stored. Restarts and the old database
file run on their own services; a restart is tested on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import Service, open_raw_request, read_until, service_env
from tests.fake_upstream import DEFAULT_REPLY, FakeUpstream, stream
from tests.test_upstream_faults import events

pytest_plugins = ["tests.postgres"]

ALICE, BOB, CAROL = "tok-a-1", "tok-b-2", "tok-c-3"
ACCESS_TOKENS = f"alice:{ALICE},bob:{BOB},carol:{CAROL}"
SYSTEM_PROMPT = "You are a terse assistant."
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schema_0001.db"
FIXTURE_CLIENT, FIXTURE_TOKEN = "alice", "tok-fixture-alice"  # the fixture's rows are alice's
FIXTURE_CONVERSATION = "fixtureConversation0001"
CLIENT_TIMEOUT = 20
STORED_WITHIN = 5.0  # seconds for a stream's answer to be stored after it ended
SUMMARY_KEYS = {"id", "title", "model", "created_at", "updated_at", "message_count"}


# --- Fixtures and talking to the service --------------------------------------------------------


@pytest.fixture(scope="module")
def service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service on SQLite for the module, with three clients and a system prompt."""
    workdir = tmp_path_factory.mktemp("service")
    env = {"ACCESS_TOKENS": ACCESS_TOKENS, "SYSTEM_PROMPT": SYSTEM_PROMPT}
    started = Service(service_env(upstream_server, workdir, env), workdir).start()
    yield started
    started.stop()


def headers(token: str) -> dict[str, str]:
    # One connection per request: gunicorn's graceful stop waits for idle keep-alive ones.
    return {"Authorization": f"Bearer {token}", "Connection": "close"}


def call(
    service: Service, method: str, path: str, token: str = ALICE, **kwargs
) -> requests.Response:
    return requests.request(
        method, f"{service.url}{path}", headers=headers(token), timeout=CLIENT_TIMEOUT, **kwargs
    )


def chat(service: Service, token: str = ALICE, **body) -> requests.Response:
    return call(service, "POST", "/chat", token, json=body, stream=bool(body.get("stream")))


def say(service: Service, message: str, token: str = ALICE, **body) -> str:
    """One non-streamed turn that must succeed; the conversation's id."""
    response = chat(service, token, message=message, **body)
    assert response.status_code == 200, response.text
    return response.json()["conversation_id"]


def listing(service: Service, token: str = ALICE, **query) -> list[dict]:
    response = call(service, "GET", "/chat/conversations", token, params=query)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def conversation(service: Service, conversation_id: str, token: str = ALICE) -> dict:
    response = call(service, "GET", f"/chat/conversations/{conversation_id}", token)
    assert response.status_code == 200, response.text
    return response.json()


def stored_answer(service: Service, conversation_id: str, token: str = ALICE) -> dict:
    """The conversation once its assistant message is stored (a stream stores it as it ends)."""
    deadline = time.monotonic() + STORED_WITHIN
    while True:
        found = conversation(service, conversation_id, token)
        if [m["role"] for m in found["messages"]][-1:] == ["assistant"]:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"no assistant message stored within {STORED_WITHIN} s: {found}")
        time.sleep(0.05)


def sent_messages(upstream: FakeUpstream, index: int = -1) -> list[tuple[str, str]]:
    """The (role, content) pairs of a chat request the upstream received."""
    chats = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    return [(m["role"], m["content"]) for m in chats[index].json["messages"]]


def assert_not_found(response: requests.Response) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("not_found_error", "conversation_not_found"), error


def assert_utc_timestamp(value: str) -> dt.datetime:
    assert isinstance(value, str) and value.endswith("Z"), value
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert abs(dt.datetime.now(dt.UTC) - moment) < dt.timedelta(minutes=5), value
    return moment


def open_raw_stream(service: Service, body: dict, token: str = ALICE) -> socket.socket:
    """A raw streaming `/chat` request, so that the test decides when the socket closes."""
    return open_raw_request(service, "POST", "/chat", json.dumps(body).encode(), token)


def sse_data(raw: bytes, name: str) -> dict:
    """The data of the first event `name` in raw response bytes (chunk framing aside)."""
    text = raw.decode(errors="replace")
    after = text.split(f"event: {name}", 1)[1]
    line = next(line for line in after.splitlines() if line.startswith("data:"))
    return json.loads(line.removeprefix("data:"))


# --- Starting and continuing a conversation -----------------------------------------------------


def test_message_starts_a_stored_conversation_listed_with_its_summary(
    service: Service, upstream: FakeUpstream
) -> None:
    response = chat(service, message="What is the capital of France?\nAnswer in one word.")

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["content"] == DEFAULT_REPLY
    assert answer["model"] == "gpt-4o-mini"
    assert isinstance(answer["conversation_id"], str) and answer["conversation_id"]
    assert sent_messages(upstream) == [
        ("system", SYSTEM_PROMPT),
        ("user", "What is the capital of France?\nAnswer in one word."),
    ]
    [summary] = [c for c in listing(service) if c["id"] == answer["conversation_id"]]
    assert set(summary) == SUMMARY_KEYS
    assert summary["title"] == "What is the capital of France?"
    assert summary["model"] == "gpt-4o-mini"
    assert summary["message_count"] == 2
    assert assert_utc_timestamp(summary["created_at"]) <= assert_utc_timestamp(
        summary["updated_at"]
    )


def test_conversation_id_continues_with_the_stored_history(
    service: Service, upstream: FakeUpstream
) -> None:
    conversation_id = say(service, "My name is Ada.")
    upstream.reply_text = "Nice to meet you, Ada."
    response = chat(service, message="What is my name?", conversation_id=conversation_id)

    assert response.status_code == 200, response.text
    assert response.json()["conversation_id"] == conversation_id
    assert sent_messages(upstream) == [
        ("system", SYSTEM_PROMPT),
        ("user", "My name is Ada."),
        ("assistant", DEFAULT_REPLY),
        ("user", "What is my name?"),
    ]
    stored = conversation(service, conversation_id)
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", "My name is Ada."),
        ("assistant", DEFAULT_REPLY),
        ("user", "What is my name?"),
        ("assistant", "Nice to meet you, Ada."),
    ]
    [summary] = [c for c in listing(service) if c["id"] == conversation_id]
    assert summary["message_count"] == 4


def test_a_streamed_message_starts_with_the_conversation_id_and_is_stored(
    service: Service, upstream: FakeUpstream
) -> None:
    received = events(chat(service, message="Stream me a greeting", stream=True))

    names = [item.name for item in received]
    assert names == ["start"] + ["delta"] * (len(names) - 2) + ["done"], names
    start, *deltas, done = (item.json() for item in received)
    assert set(start) == {"conversation_id", "model"} and start["model"] == "gpt-4o-mini"
    assert "".join(d["content"] for d in deltas) == DEFAULT_REPLY
    assert done["finish_reason"] == "stop"
    stored = stored_answer(service, start["conversation_id"])
    assert [(m["role"], m["content"], m["partial"]) for m in stored["messages"]] == [
        ("user", "Stream me a greeting", False),
        ("assistant", DEFAULT_REPLY, False),
    ]
    assert sent_messages(upstream)[0] == ("system", SYSTEM_PROMPT)


LONG_QUESTIONS = {
    # About 1,950 tokens each: 7,800 characters of English, or 1,950 Chinese characters.
    "english": lambda n: f"Question {n}: " + "lorem " * 1300,
    "chinese": lambda n: f"问题{n}：" + "你好世界" * 487,
}


@pytest.mark.parametrize("language", LONG_QUESTIONS)
def test_history_is_trimmed_from_the_oldest_turns_to_fit_the_context(
    service: Service, upstream: FakeUpstream, language: str
) -> None:
    # gpt-4 has 8,192 tokens: three questions and an answer's reserve fit, four do not.
    long_question = LONG_QUESTIONS[language]

    conversation_id = say(service, long_question(1), model="gpt-4")
    for n in (2, 3, 4):
        say(service, long_question(n), conversation_id=conversation_id)

    chats = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert [len(r.json["messages"]) for r in chats[:3]] == [2, 4, 6]  # all of it, while it fits
    assert chats[-1].json["model"] == "gpt-4"
    last = sent_messages(upstream)
    assert len(last) < 8, [(role, content[:12]) for role, content in last]
    assert last[0] == ("system", SYSTEM_PROMPT)
    assert last[-1] == ("user", long_question(4))
    assert ("user", long_question(1)) not in last  # the oldest turn went first
    assert ("user", long_question(3)) in last  # the newest earlier turn stayed
    # Whole turns are dropped: after the system prompt, a user message starts what remains.
    assert last[1][0] == "user" and [role for role, _ in last[1:]] == ["user", "assistant"] * (
        (len(last) - 2) // 2
    ) + ["user"]
    # Nothing stored was lost: only what was sent was trimmed.
    assert len(conversation(service, conversation_id)["messages"]) == 8


def test_a_stream_the_client_leaves_keeps_its_partial_answer_and_the_next_turn_works(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["Par", "tial ", "answer"], hang_after=1))

    sock = open_raw_stream(service, {"message": "Tell me a long story", "stream": True})
    received = read_until(sock, b"event: delta")
    sock.close()

    assert received.startswith(b"HTTP/1.1 200"), received
    conversation_id = sse_data(received, "start")["conversation_id"]
    [request] = upstream.wait_for_requests(1)
    assert upstream.wait_for_close(request) is not None, "the upstream stream stayed open"
    stored = stored_answer(service, conversation_id)
    assert [(m["role"], m["content"], m["partial"]) for m in stored["messages"]] == [
        ("user", "Tell me a long story", False),
        ("assistant", "Par", True),
    ]

    response = chat(service, message="Go on.", conversation_id=conversation_id)

    assert response.status_code == 200, response.text
    assert sent_messages(upstream) == [
        ("system", SYSTEM_PROMPT),
        ("user", "Tell me a long story"),
        ("assistant", "Par"),
        ("user", "Go on."),
    ]
    assert [m["role"] for m in conversation(service, conversation_id)["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_a_stream_that_fails_midway_keeps_what_was_generated(
    service: Service, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["Hel", "lo", " wor", "ld"], stop_after=2))

    received = events(chat(service, message="Say hello world", stream=True))

    assert [item.name for item in received] == ["start", "delta", "delta", "error"], received
    conversation_id = received[0].json()["conversation_id"]
    stored = stored_answer(service, conversation_id)
    assert [(m["role"], m["content"], m["partial"]) for m in stored["messages"]] == [
        ("user", "Say hello world", False),
        ("assistant", "Hello", True),
    ]
    follow_up = chat(service, message="Again?", conversation_id=conversation_id)
    assert follow_up.status_code == 200, follow_up.text
    assert sent_messages(upstream)[-2:] == [("assistant", "Hello"), ("user", "Again?")]


# --- /chat/conversations ------------------------------------------------------------------------


def test_get_conversation_has_the_contracts_shape(service: Service, upstream: FakeUpstream) -> None:
    conversation_id = say(service, "Shape check", system="Answer in French.")

    found = conversation(service, conversation_id)

    assert set(found) == {"id", "title", "system", "model", "messages"}
    assert (found["id"], found["title"], found["system"], found["model"]) == (
        conversation_id,
        "Shape check",
        "Answer in French.",
        "gpt-4o-mini",
    )
    assert sent_messages(upstream)[0] == ("system", "Answer in French.")
    user, assistant = found["messages"]
    for message in (user, assistant):
        assert {"id", "role", "content", "created_at"} <= set(message), message
        assert isinstance(message["id"], str) and message["id"]
        assert_utc_timestamp(message["created_at"])
    assert user["id"] != assistant["id"]
    assert (user["role"], user["content"]) == ("user", "Shape check")
    assert (assistant["role"], assistant["content"]) == ("assistant", DEFAULT_REPLY)
    assert user["created_at"] <= assistant["created_at"]
    # An answer keeps the model that wrote it and the usage the upstream reported for it.
    served = upstream.requests[-1].json
    assert assistant["model"] == "gpt-4o-mini"
    assert assistant["usage"]["completion_tokens"] == len(DEFAULT_REPLY.split())
    assert assistant["usage"]["total_tokens"] == sum(
        assistant["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )
    assert served["messages"][-1]["content"] == "Shape check"
    assert user["usage"] is None


def test_patch_with_a_title_renames_and_answers_the_summary(service: Service) -> None:
    conversation_id = say(service, "Rename me")

    response = call(
        service, "PATCH", f"/chat/conversations/{conversation_id}", json={"title": "Renamed"}
    )

    assert response.status_code == 200, response.text
    summary = response.json()
    assert set(summary) == SUMMARY_KEYS
    assert (summary["id"], summary["title"], summary["message_count"]) == (
        conversation_id,
        "Renamed",
        2,
    )
    [listed] = [c for c in listing(service) if c["id"] == conversation_id]
    assert listed["title"] == "Renamed"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o"},
        {"title": "New", "system": "Be evil."},
        {"title": "New", "messages": []},
        {"id": "another-id"},
        {},
        {"title": ""},
        {"title": 5},
    ],
    ids=["model", "title-and-system", "title-and-messages", "id", "empty", "blank", "number"],
)
def test_patch_with_any_other_field_is_400(service: Service, body: dict) -> None:
    conversation_id = say(service, "Do not change me")

    response = call(service, "PATCH", f"/chat/conversations/{conversation_id}", json=body)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    found = conversation(service, conversation_id)
    assert (found["title"], found["system"], found["model"]) == (
        "Do not change me",
        SYSTEM_PROMPT,
        "gpt-4o-mini",
    )


def test_delete_answers_204_then_the_conversation_is_gone(service: Service) -> None:
    conversation_id = say(service, "Delete me")
    path = f"/chat/conversations/{conversation_id}"

    response = call(service, "DELETE", path)

    assert response.status_code == 204, response.text
    assert response.content == b""
    assert_not_found(call(service, "GET", path))
    assert_not_found(call(service, "DELETE", path))
    assert_not_found(call(service, "PATCH", path, json={"title": "Back?"}))
    assert_not_found(chat(service, message="Still there?", conversation_id=conversation_id))
    assert conversation_id not in {c["id"] for c in listing(service)}


def test_listing_pages_newest_first_with_limit_and_before(service: Service) -> None:
    created = [say(service, f"Conversation number {n}", token=CAROL) for n in range(5)]
    newest_first = created[::-1]

    pages, before = [], None
    for _ in range(5):  # bounded: three pages and an empty one are expected
        query = {"limit": 2, **({"before": before} if before else {})}
        page = listing(service, CAROL, **query)
        pages.append([c["id"] for c in page])
        if not page:
            break
        before = page[-1]["id"]

    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5], []]
    whole = listing(service, CAROL)
    assert [c["id"] for c in whole] == newest_first
    assert [c["updated_at"] for c in whole] == sorted(
        (c["updated_at"] for c in whole), reverse=True
    )


@pytest.mark.parametrize(
    "query", [{"limit": 0}, {"limit": 201}, {"limit": "two"}, {"before": "not-a-cursor"}]
)
def test_listing_with_a_bad_limit_or_cursor_is_400(service: Service, query: dict) -> None:
    response = call(service, "GET", "/chat/conversations", params=query)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"


# --- Clients are kept apart ---------------------------------------------------------------------


def test_another_client_cannot_see_continue_rename_or_delete_a_conversation(
    service: Service, upstream: FakeUpstream
) -> None:
    conversation_id = say(service, "Alice's secret plan")
    path = f"/chat/conversations/{conversation_id}"
    asked = len(upstream.requests)

    assert_not_found(call(service, "GET", path, BOB))
    assert_not_found(chat(service, BOB, message="Tell me", conversation_id=conversation_id))
    streamed = chat(service, BOB, message="Tell me", conversation_id=conversation_id, stream=True)
    assert_not_found(streamed)
    assert_not_found(call(service, "PATCH", path, BOB, json={"title": "Bob's now"}))
    assert_not_found(call(service, "DELETE", path, BOB))

    assert len(upstream.requests) == asked  # nothing of Alice's reached the upstream for Bob
    assert conversation_id not in {c["id"] for c in listing(service, BOB)}
    bob_usage = call(service, "GET", "/usage", BOB)
    assert bob_usage.status_code == 200, bob_usage.text
    assert bob_usage.json()["data"] == [] and bob_usage.json()["total"]["requests"] == 0
    alice_usage = call(service, "GET", "/usage", ALICE).json()
    assert alice_usage["total"]["requests"] >= 1
    found = conversation(service, conversation_id)
    assert found["title"] == "Alice's secret plan" and len(found["messages"]) == 2


# --- Nothing is lost across restarts and versions ------------------------------------------------


@pytest.fixture
def start(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Service]]:
    """Services started by one test, each in a new working directory, all stopped after it."""
    services: list[Service] = []

    def start_one(**overrides: str) -> Service:
        workdir = tmp_path_factory.mktemp("service")
        started = Service(service_env(upstream, workdir, overrides), workdir)
        services.append(started)
        return started.start()

    yield start_one
    for started in services:
        started.stop()


def test_a_restart_loses_no_conversation(
    start: Callable[..., Service], upstream: FakeUpstream, database_url: str
) -> None:
    env = {"DATABASE_URL": database_url, "ACCESS_TOKENS": ACCESS_TOKENS}
    first = start(**env)
    kept = say(first, "Remember the milk")
    say(first, "And the eggs", conversation_id=kept)
    streamed = events(chat(first, message="Streamed before the restart", stream=True))
    streamed_id = streamed[0].json()["conversation_id"]
    stored_answer(first, streamed_id)
    bobs = say(first, "Bob's own", token=BOB)
    before = {token: listing(first, token) for token in (ALICE, BOB)}
    kept_before = conversation(first, kept)
    first.stop()

    second = start(**env)

    assert {token: listing(second, token) for token in (ALICE, BOB)} == before
    assert [c["id"] for c in before[ALICE]] == [streamed_id, kept]
    assert [c["id"] for c in before[BOB]] == [bobs]
    assert conversation(second, kept) == kept_before
    assert len(kept_before["messages"]) == 4
    response = chat(second, message="What did I ask?", conversation_id=kept)
    assert response.status_code == 200, response.text
    assert [role for role, _ in sent_messages(upstream)] == ["user", "assistant"] * 2 + ["user"]


def test_a_database_of_the_first_schema_opens_migrates_and_lists_its_conversation(
    start: Callable[..., Service], upstream: FakeUpstream, tmp_path: Path
) -> None:
    copy = tmp_path / "old.db"
    shutil.copy(FIXTURE, copy)
    service = start(
        DATABASE_URL=f"sqlite:///{copy}",
        ACCESS_TOKENS=f"{FIXTURE_CLIENT}:{FIXTURE_TOKEN},bob:{BOB}",
    )

    [summary] = listing(service, FIXTURE_TOKEN)

    assert summary == {
        "id": FIXTURE_CONVERSATION,
        "title": "Fixture: 你好",
        "model": "gpt-4o-mini",
        "created_at": "2025-01-15T10:00:00.000000Z",
        "updated_at": "2025-01-15T10:00:05.000000Z",
        "message_count": 2,
    }
    found = conversation(service, FIXTURE_CONVERSATION, FIXTURE_TOKEN)
    assert found["system"] == "Be brief."
    assert [(m["role"], m["content"]) for m in found["messages"]] == [
        ("user", "Hello, 世界"),
        ("assistant", "Hi! 你好"),
    ]
    assert listing(service, BOB) == []
    response = chat(
        service, FIXTURE_TOKEN, message="Still there?", conversation_id=FIXTURE_CONVERSATION
    )
    assert response.status_code == 200, response.text
    assert sent_messages(upstream) == [
        ("system", "Be brief."),
        ("user", "Hello, 世界"),
        ("assistant", "Hi! 你好"),
        ("user", "Still there?"),
    ]
    assert listing(service, FIXTURE_TOKEN)[0]["message_count"] == 4
