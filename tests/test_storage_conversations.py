"""Stored conversations (CONTRACT §3, `/chat` and `/chat/conversations`), on both databases."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
import sqlalchemy as sa

from app import db
from app.errors import ApiError
from app.services.conversations import Conversations, prompt_messages, title_from

pytest_plugins = ["tests.postgres"]

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)


class Clock:
    """A clock that moves only when told to, so that orderings are exact."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float = 1.0) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine, clock) -> Conversations:
    return Conversations(engine, clock=clock)


def _new(store: Conversations, client: str = "alice", title: str = "Hello") -> str:
    return store.create(client, title=title, system="Be brief.", model="gpt-4o-mini")["id"]


def _not_found(call) -> ApiError:
    with pytest.raises(ApiError) as raised:
        call()
    assert (raised.value.status, raised.value.code) == (404, "conversation_not_found")
    return raised.value


def test_a_new_conversation_is_listed_with_the_contracts_summary(store):
    created = store.create("alice", title="Hello", system="Be brief.", model="gpt-4o-mini")
    assert created == {
        "id": created["id"],
        "title": "Hello",
        "model": "gpt-4o-mini",
        "created_at": "2025-03-01T08:00:00.000000Z",
        "updated_at": "2025-03-01T08:00:00.000000Z",
        "message_count": 0,
    }
    assert store.list("alice") == [created]


def test_ids_are_random_and_url_safe(store):
    ids = {_new(store) for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) >= 22 and i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_messages_come_back_in_order_with_the_contracts_fields(store, clock):
    conversation_id = _new(store)
    clock.advance()
    store.add_message("alice", conversation_id, "user", "Hi, 你好")
    clock.advance()
    answer = store.add_message(
        "alice",
        conversation_id,
        "assistant",
        "Hello!",
        model="gpt-4o-mini-2024-07-18",
        usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    )
    assert set(answer) == {"id", "role", "content", "created_at", "partial", "model", "usage"}

    conversation = store.get("alice", conversation_id)
    assert {"id", "title", "system", "model", "messages"} <= set(conversation)
    assert conversation["system"] == "Be brief."
    assert [(m["role"], m["content"], m["partial"]) for m in conversation["messages"]] == [
        ("user", "Hi, 你好", False),
        ("assistant", "Hello!", False),
    ]
    assert conversation["messages"][1] == answer
    assert conversation["messages"][0]["created_at"] == "2025-03-01T08:00:01.000000Z"
    # The model that answered becomes the conversation's, the next turn's default.
    assert conversation["model"] == "gpt-4o-mini-2024-07-18"
    assert conversation["updated_at"] == "2025-03-01T08:00:02.000000Z"
    assert store.list("alice")[0]["message_count"] == 2


def test_a_conversation_can_start_with_its_question(store, clock):
    created = store.create(
        "alice", title="Capitals", system=None, model="gpt-4o-mini", question="Capital of France?"
    )
    assert created["message_count"] == 1
    clock.advance()
    store.add_message("alice", created["id"], "assistant", "Paris.", model="gpt-4o")
    conversation = store.get("alice", created["id"])
    assert [(m["role"], m["content"]) for m in conversation["messages"]] == [
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
    ]
    assert conversation["messages"][0]["created_at"] == created["created_at"]
    assert (conversation["model"], conversation["updated_at"]) == (
        "gpt-4o",
        "2025-03-01T08:00:01.000000Z",
    )


def test_a_refused_question_starts_no_conversation(store):
    with pytest.raises(ApiError):
        store.create("alice", title="Hello", system=None, model="gpt-4o-mini", question=42)
    assert store.list("alice") == []


def test_adding_a_message_moves_the_conversation_to_the_top(store, clock):
    older, newer = _new(store, title="older"), None
    clock.advance()
    newer = _new(store, title="newer")
    assert [c["id"] for c in store.list("alice")] == [newer, older]
    clock.advance()
    store.add_message("alice", older, "user", "back to this one")
    assert [c["id"] for c in store.list("alice")] == [older, newer]


def test_a_partial_answer_is_kept_and_the_next_turn_still_works(store):
    conversation_id = _new(store)
    store.add_message("alice", conversation_id, "user", "Tell me a story")
    store.add_message("alice", conversation_id, "assistant", "Once upon a", partial=True)
    store.add_message("alice", conversation_id, "user", "Go on")
    conversation = store.get("alice", conversation_id)
    assert [m["partial"] for m in conversation["messages"]] == [False, True, False]
    assert prompt_messages(conversation) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Once upon a"},
        {"role": "user", "content": "Go on"},
    ]


def test_another_clients_conversation_is_not_found_everywhere(store):
    conversation_id = _new(store, "alice")
    store.add_message("alice", conversation_id, "user", "private")
    missing = _not_found(lambda: store.get("bob", "no-such-conversation"))

    for call in (
        lambda: store.get("bob", conversation_id),
        lambda: store.rename("bob", conversation_id, "mine now"),
        lambda: store.delete("bob", conversation_id),
        lambda: store.add_message("bob", conversation_id, "user", "hijack"),
    ):
        # The same answer as for an id that does not exist: ids cannot be probed.
        assert _not_found(call).message == missing.message
    assert store.list("bob") == []
    conversation = store.get("alice", conversation_id)
    assert conversation["title"] == "Hello"
    assert [m["content"] for m in conversation["messages"]] == ["private"]


def test_another_clients_id_is_no_cursor(store):
    alice = _new(store, "alice")
    with pytest.raises(ApiError) as raised:
        store.list("bob", before=alice)
    assert raised.value.code == "invalid_value"


def test_missing_conversations_are_not_found(store):
    for call in (
        lambda: store.get("alice", "nope"),
        lambda: store.rename("alice", "nope", "title"),
        lambda: store.delete("alice", "nope"),
        lambda: store.add_message("alice", "nope", "user", "hello"),
    ):
        _not_found(call)


def test_renaming_returns_the_summary(store, clock):
    conversation_id = _new(store)
    store.add_message("alice", conversation_id, "user", "hi")
    clock.advance(5)
    summary = store.rename("alice", conversation_id, "  Trip   to 北京  ")
    assert summary["title"] == "Trip to 北京"
    assert summary["message_count"] == 1
    assert summary["updated_at"] == "2025-03-01T08:00:05.000000Z"
    assert store.get("alice", conversation_id)["title"] == "Trip to 北京"


@pytest.mark.parametrize("title", ["", "   ", "x" * 201, None, 42])
def test_an_unusable_title_is_refused(store, title):
    conversation_id = _new(store)
    with pytest.raises(ApiError) as raised:
        store.rename("alice", conversation_id, title)
    assert (raised.value.status, raised.value.code) == (400, "invalid_value")


def test_deleting_removes_the_messages_too(store, engine):
    kept, deleted = _new(store), _new(store)
    for conversation_id in (kept, deleted):
        store.add_message("alice", conversation_id, "user", "hi")
        store.add_message("alice", conversation_id, "assistant", "hello")
    store.delete("alice", deleted)
    _not_found(lambda: store.get("alice", deleted))
    with engine.connect() as connection:
        remaining = connection.execute(
            sa.select(db.messages.c.conversation_id, sa.func.count()).group_by(
                db.messages.c.conversation_id
            )
        ).all()
    assert remaining == [(kept, 2)]


def test_thousands_of_conversations_are_listed_page_by_page(store, clock, engine):
    # 1,000 conversations, written in bulk; some share an updated_at, which the id cursor
    # must still page through exactly once.
    rows = []
    for n in range(1000):
        moment = T0 + dt.timedelta(seconds=n // 3)
        rows.append(
            {
                "id": f"conv{n:05d}",
                "client": "alice",
                "title": f"#{n}",
                "system": None,
                "model": "m",
                "created_at": moment,
                "updated_at": moment,
            }
        )
    rows.append({**rows[0], "id": "bob-only", "client": "bob"})
    with engine.begin() as connection:
        connection.execute(db.conversations.insert(), rows)

    seen, before = [], None
    for page in itertools.count():
        listed = store.list("alice", limit=200, before=before)
        if not listed:
            break
        assert len(listed) <= 200 and page < 10
        seen += listed
        before = listed[-1]["id"]
    expected = sorted(rows[:1000], key=lambda row: (row["updated_at"], row["id"]), reverse=True)
    assert [c["id"] for c in seen] == [row["id"] for row in expected]


def test_an_iso_time_is_a_cursor_too(store, clock):
    first = _new(store, title="first")
    clock.advance(10)
    _new(store, title="second")
    listed = store.list("alice", before="2025-03-01T08:00:05Z")
    assert [c["id"] for c in listed] == [first]
    assert [c["id"] for c in store.list("alice", before="2025-03-01T08:00:05")] == [first]
    assert [c["title"] for c in store.list("alice", limit=1)] == ["second"]


@pytest.mark.parametrize(("limit", "before"), [(0, None), (201, None), (10, "not a cursor")])
def test_an_unusable_listing_request_is_refused(store, limit, before):
    with pytest.raises(ApiError) as raised:
        store.list("alice", limit=limit, before=before)
    assert (raised.value.status, raised.value.code) == (400, "invalid_value")


def test_an_unknown_role_is_refused(store):
    conversation_id = _new(store)
    with pytest.raises(ApiError) as raised:
        store.add_message("alice", conversation_id, "wizard", "abracadabra")
    assert raised.value.code == "invalid_value"


def test_text_either_database_would_refuse_is_stored_readably(store):
    conversation_id = store.create(
        "alice", title="nul\x00 title", system="sys\x00tem", model="gpt-4o"
    )["id"]
    store.add_message("alice", conversation_id, "user", "a\x00b \ud83d lone surrogate")
    conversation = store.get("alice", conversation_id)
    assert conversation["title"] == "nul\ufffd title"
    assert conversation["messages"][0]["content"] == "a\ufffdb ? lone surrogate"


def test_a_long_conversation_keeps_every_message_in_order(store):
    conversation_id = _new(store)
    for n in range(200):
        store.add_message("alice", conversation_id, "user" if n % 2 == 0 else "assistant", str(n))
    contents = [m["content"] for m in store.get("alice", conversation_id)["messages"]]
    assert contents == [str(n) for n in range(200)]


@pytest.mark.parametrize(
    ("message", "title"),
    [
        ("What is the capital of France?", "What is the capital of France?"),
        ("\n\n  first line  \nsecond line", "first line"),
        ("", "New conversation"),
        ("   \n  ", "New conversation"),
        (
            "Please explain how the Flask application factory pattern works in large projects",
            "Please explain how the Flask application factory pattern…",
        ),
        (
            "请帮我写一封给房东的邮件，说明下个月的房租会晚几天交，因为工资发放推迟了，并表示歉意",
            "请帮我写一封给房东的邮件，说明下个月的房租会晚几天交…",
        ),
        (
            "这是一个没有标点符号的非常长的中文句子用来测试标题在没有任何标点的情况下如何被截断",
            "这是一个没有标点符号的非常长的中文句子用来测试标题在没有任…",
        ),
        ("x" * 100, "x" * 59 + "…"),
    ],
)
def test_the_title_is_the_first_line_cut_on_a_word_boundary(message, title):
    assert title_from(message) == title
    assert Conversations.title_from(message) == title
