"""Stored conversations: what a client asked in `/chat`, and what the model answered.

A conversation belongs to the client that started it (its access-token name, else its
address). Every method takes that client and answers another client's conversation exactly as
a missing one, `conversation_not_found`, so that ids cannot be probed. Timestamps are UTC and
leave as ISO 8601 with microseconds (`2025-01-31T09:30:00.123456Z`), precise enough to serve as
a listing cursor.
"""

from __future__ import annotations

import datetime as dt
import secrets
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..db import autocommit, clean_text, conversations, messages, utc_now
from ..errors import ApiError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 200
MAX_TITLE_LENGTH = 200
TITLE_WIDTH = 60  # columns; a Chinese, Japanese or Korean character takes two
DEFAULT_TITLE = "New conversation"
_TITLE_TRAILING = " \t,.;:!?-–—，。；：！？、"
_CJK_PAUSES = "，。；：！？、"


def title_from(first_message: str, width: int = TITLE_WIDTH) -> str:
    """A title from a conversation's first message: its first line, cut to about `width`
    columns on a word boundary (any character boundary in scripts written without spaces)."""
    line = next((line for line in first_message.splitlines() if line.strip()), "")
    line = " ".join(line.split())
    if not line:
        return DEFAULT_TITLE
    if len(line) <= width and _columns(line) <= width:  # a longer line has more columns
        return line
    cut = used = 0
    while used + _columns(line[cut]) < width:  # one column stays for the ellipsis
        used += _columns(line[cut])
        cut += 1
    head = line[:cut]
    if _is_wide(line[cut]) or _is_wide(head[-1]):
        boundary = max(head.rfind(mark) for mark in _CJK_PAUSES)  # a clause, if there is one
    elif line[cut].isalnum() and head[-1].isalnum():
        boundary = head.rfind(" ")  # inside a word: back to its start
    else:
        boundary = -1
    if boundary >= len(head) // 2:
        head = head[:boundary]
    return head.rstrip(_TITLE_TRAILING) + "…"


def _is_wide(char: str) -> bool:
    return unicodedata.east_asian_width(char) in ("W", "F")


def _columns(text: str) -> int:
    return sum(2 if _is_wide(char) else 1 for char in text)


def new_id() -> str:
    """A random, URL-safe id (128 bits): unguessable, so ids reveal nothing of other clients."""
    return secrets.token_urlsafe(16)


def iso(moment: dt.datetime) -> str:
    """`moment` in ISO 8601, UTC, with microseconds and a `Z`."""
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def prompt_messages(conversation: Mapping[str, Any]) -> list[dict[str, str]]:
    """A conversation as returned by `Conversations.get`, as upstream chat messages: its system
    prompt first, then every stored message (a partial answer too, as it was shown)."""
    prompt = (
        [{"role": "system", "content": conversation["system"]}] if conversation["system"] else []
    )
    prompt += [{"role": m["role"], "content": m["content"]} for m in conversation["messages"]]
    return prompt


class Conversations:
    """Conversations and their messages, as stored in `engine`'s database."""

    title_from = staticmethod(title_from)

    def __init__(self, engine: Engine, *, clock: Callable[[], dt.datetime] = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        self._reads = autocommit(engine)  # reads need no transaction of their own

    def create(
        self,
        client: str,
        *,
        title: str,
        system: str | None,
        model: str,
        question: str | None = None,
    ) -> dict:
        """Starts a conversation, empty or with `question` as its first user message (in the
        same transaction: a turn's storage before its first chunk); returns its summary."""
        now = self.clock()
        row = {
            "id": new_id(),
            "client": client,
            "title": _valid_title(title),
            "system": clean_text(system) if system else None,
            "model": clean_text(model),
            "created_at": now,
            "updated_at": now,
        }
        first = None if question is None else _message_row(row["id"], "user", question, now=now)
        with self.engine.begin() as connection:
            connection.execute(_INSERT_CONVERSATION, row)
            if first is not None:
                connection.execute(_INSERT_MESSAGE, first)
        return _summary({**row, "message_count": 0 if first is None else 1})

    def get(self, client: str, conversation_id: str) -> dict:
        """The conversation with its messages, oldest first."""
        with self._reads.connect() as connection:
            row = connection.execute(_SELECT_OWNED, _owner(client, conversation_id)).first()
            if row is None:
                raise _not_found()
            stored = connection.execute(
                _SELECT_MESSAGES, {"conversation_id": conversation_id}
            ).all()
        return {
            "id": row.id,
            "title": row.title,
            "system": row.system,
            "model": row.model,
            "created_at": iso(row.created_at),
            "updated_at": iso(row.updated_at),
            "messages": [_message(message) for message in stored],
        }

    def list(
        self, client: str, *, limit: int = DEFAULT_LIST_LIMIT, before: str | None = None
    ) -> list[dict]:
        """Summaries of the client's conversations, most recently updated first.

        `before` continues a listing: the id of the last conversation of the previous page (exact
        even when several share a timestamp), or an ISO 8601 time (those updated before it).
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ApiError("invalid_value", f"limit must be between 1 and {MAX_LIST_LIMIT}.")
        query = (
            sa.select(*_SUMMARY_COLUMNS)
            .where(conversations.c.client == client)
            .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
            .limit(limit)
        )
        with self._reads.connect() as connection:
            if before:
                query = query.where(self._before(connection, client, before))
            rows = connection.execute(query).all()
        return [_summary(row._mapping) for row in rows]

    @staticmethod
    def _before(connection: sa.Connection, client: str, cursor: str) -> sa.ColumnElement[bool]:
        updated_at = connection.execute(
            sa.select(conversations.c.updated_at).where(_OWNED), _owner(client, cursor)
        ).scalar()
        if updated_at is not None:
            return sa.or_(
                conversations.c.updated_at < updated_at,
                sa.and_(conversations.c.updated_at == updated_at, conversations.c.id < cursor),
            )
        try:
            moment = dt.datetime.fromisoformat(cursor)
        except ValueError:
            raise ApiError(
                "invalid_value", "before must be a conversation id or an ISO 8601 time."
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return conversations.c.updated_at < moment

    def rename(self, client: str, conversation_id: str, title: str) -> dict:
        """Gives the conversation a new title; returns its summary."""
        title = _valid_title(title)
        with self.engine.begin() as connection:
            renamed = connection.execute(
                _UPDATE_OWNED,
                {**_owner(client, conversation_id), "title": title, "updated_at": self.clock()},
            )
            if renamed.rowcount == 0:
                raise _not_found()
            row = connection.execute(
                sa.select(*_SUMMARY_COLUMNS).where(conversations.c.id == conversation_id)
            ).one()
        return _summary(row._mapping)

    def delete(self, client: str, conversation_id: str) -> None:
        """Removes the conversation and its messages."""
        with self.engine.begin() as connection:
            deleted = connection.execute(_DELETE_OWNED, _owner(client, conversation_id))
            if deleted.rowcount == 0:
                raise _not_found()

    def add_message(
        self,
        client: str,
        conversation_id: str,
        role: str,
        content: str,
        *,
        partial: bool = False,
        model: str | None = None,
        usage: Mapping[str, Any] | None = None,
    ) -> dict:
        """Appends a message and marks the conversation updated. An assistant message names the
        model that wrote it, which becomes the conversation's model (the next turn's default);
        `partial` marks an answer cut short by a failure or a client that left."""
        now = self.clock()
        row = _message_row(
            conversation_id, role, content, now=now, partial=partial, model=model, usage=usage
        )
        changes: dict[str, Any] = {"updated_at": now}
        if role == "assistant" and row["model"]:
            changes["model"] = row["model"]
        with self.engine.begin() as connection:
            # Writing first takes SQLite's write lock at once, and checks ownership in one step.
            touched = connection.execute(
                _UPDATE_OWNED, {**_owner(client, conversation_id), **changes}
            )
            if touched.rowcount == 0:
                raise _not_found()
            connection.execute(_INSERT_MESSAGE, row)
        return _message(row)


_MESSAGE_COUNT = (
    sa.select(sa.func.count())
    .where(messages.c.conversation_id == conversations.c.id)
    .scalar_subquery()
    .label("message_count")
)
_SUMMARY_COLUMNS = (
    conversations.c.id,
    conversations.c.title,
    conversations.c.model,
    conversations.c.created_at,
    conversations.c.updated_at,
    _MESSAGE_COUNT,
)


# The statements of the hot path (a turn's storage), built once and run with parameters, so that
# SQLAlchemy compiles each once and then finds it in its cache. An UPDATE sets the columns its
# parameters name.
_OWNED = sa.and_(
    conversations.c.id == sa.bindparam("owned_id"), conversations.c.client == sa.bindparam("owner")
)
_INSERT_CONVERSATION = conversations.insert()
_INSERT_MESSAGE = messages.insert()
_UPDATE_OWNED = conversations.update().where(_OWNED)
_DELETE_OWNED = conversations.delete().where(_OWNED)
_SELECT_OWNED = sa.select(conversations).where(_OWNED)
_SELECT_MESSAGES = (
    sa.select(messages)
    .where(messages.c.conversation_id == sa.bindparam("conversation_id"))
    .order_by(messages.c.seq)
)


def _owner(client: str, conversation_id: str) -> dict[str, str]:
    """The parameters of `_OWNED`: the conversation, if it belongs to `client`."""
    return {"owned_id": conversation_id, "owner": client}


def _message_row(
    conversation_id: str,
    role: str,
    content: str,
    *,
    now: dt.datetime,
    partial: bool = False,
    model: str | None = None,
    usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A message's row, checked: what `add_message` and `create(question=…)` both store."""
    if role not in ROLES:
        raise ApiError("invalid_value", f"role must be one of {', '.join(sorted(ROLES))}.")
    if not isinstance(content, str):
        raise ApiError("invalid_value", "content must be a string.")
    return {
        "id": new_id(),
        "conversation_id": conversation_id,
        "role": role,
        "content": clean_text(content),
        "partial": bool(partial),
        "model": clean_text(model) if model else None,
        "prompt_tokens": _count((usage or {}).get("prompt_tokens")),
        "completion_tokens": _count((usage or {}).get("completion_tokens")),
        "created_at": now,
    }


def _not_found() -> ApiError:
    return ApiError("conversation_not_found", "No such conversation.")


def _valid_title(title: str) -> str:
    if not isinstance(title, str) or not title.strip():
        raise ApiError("invalid_value", "title must be a non-empty string.")
    title = " ".join(clean_text(title).split())
    if len(title) > MAX_TITLE_LENGTH:
        raise ApiError("invalid_value", f"title must be at most {MAX_TITLE_LENGTH} characters.")
    return title


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _summary(row: Mapping[str, Any]) -> dict:
    return {
        "id": row["id"],
        "title": row["title"],
        "model": row["model"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "message_count": row["message_count"],
    }


def _message(row: Any) -> dict:
    row = row if isinstance(row, Mapping) else row._mapping
    return {
        "id": row["id"],
        "role": row["role"],
        "content": row["content"],
        "created_at": iso(row["created_at"]),
        "partial": row["partial"],
        "model": row["model"],
        "usage": _usage(row["prompt_tokens"], row["completion_tokens"]),
    }


def _usage(prompt_tokens: int | None, completion_tokens: int | None) -> dict | None:
    """A stored answer's token counts, as the upstream reported them (None when it did not)."""
    if prompt_tokens is None and completion_tokens is None:
        return None
    prompt, completion = prompt_tokens or 0, completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
