"""`/chat` and `/chat/conversations`: the conversation endpoint for the bundled page, curl and
scripts.

The body is read as JSON whatever its Content-Type says (`curl -d` sends a form type). A stream
is our own SSE: `start`, `delta`…, then `done`, or an `error` event once the stream has begun.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from .. import requestlog, sse
from ..auth import client_name
from ..errors import ApiError
from ..jsonbody import parse_json_object, read_body
from ..relay import IDLE, client_gone
from ..services.completions import ChatRequest, ChatStream, Completion, Delta, Finish
from ..services.turns import Turn
from .params import (
    NUMERIC_OPTIONS,
    read_flag,
    read_messages,
    read_model,
    read_options,
    read_text,
    with_system,
)

bp = Blueprint("chat", __name__)

FIELDS = frozenset(
    {
        "message",
        "conversation_id",
        "messages",
        "system",
        "model",
        "stop",
        "stream",
        *NUMERIC_OPTIONS,
    }
)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ENDPOINT = "/chat"


@bp.post("/chat")
def chat():
    """One turn: `message` starts or continues a stored conversation; `messages` is stateless."""
    body = parse_json_object(read_body())
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError("invalid_value", f"Unknown field '{unknown[0]}'.")
    wants_stream = read_flag("stream", body.get("stream")) or (
        "stream" not in body and request.accept_mimetypes.best == "text/event-stream"
    )
    if body.get("messages") is not None:
        return _stateless(body, wants_stream)
    turn = Turn(
        message=read_text("message", body.get("message"), required=True),
        conversation_id=read_text("conversation_id", body.get("conversation_id")),
        system=read_text("system", body.get("system")),
        model=_optional_model(body.get("model")),
        options=read_options(body),
    )
    turns = current_app.extensions["turns"]
    if wants_stream:
        conversation_id, stream = turns.reply_stream(client_name(), turn)
        return _event_stream(stream, conversation_id)
    conversation_id, completion = turns.reply(client_name(), turn)
    return jsonify(conversation_id=conversation_id, **_answer(completion))


def _stateless(body: dict, wants_stream: bool):
    if body.get("message") is not None or body.get("conversation_id") is not None:
        raise ApiError("invalid_value", "Send either 'messages' or 'message', not both.")
    settings = current_app.config["SETTINGS"]
    system = read_text("system", body.get("system")) or settings.system_prompt
    chat_request = ChatRequest(
        messages=with_system(read_messages(body["messages"]), system),
        model=read_model(body.get("model"), settings),
        options=read_options(body),
    )
    chat_service = current_app.extensions["chat"]
    if wants_stream:
        return _event_stream(chat_service.stream(chat_request, client_name(), ENDPOINT))
    return jsonify(_answer(chat_service.complete(chat_request, client_name(), ENDPOINT)))


def _optional_model(value) -> str | None:
    """A named model must be allowed; none means the conversation's own or the default."""
    if read_text("model", value) is None:
        return None
    return read_model(value, current_app.config["SETTINGS"])


def _answer(completion: Completion) -> dict:
    return {
        "id": completion.id,
        "model": completion.model,
        "content": completion.content,
        "finish_reason": completion.finish_reason,
        "usage": completion.usage,
    }


def _event_stream(stream: ChatStream, conversation_id: str | None = None) -> Response:
    response = Response(
        _events(stream, conversation_id, request.environ),
        mimetype="text/event-stream",
        headers=STREAM_HEADERS,
    )
    response.call_on_close(stream.close)  # also when the body is never iterated
    return response


def _events(stream: ChatStream, conversation_id: str | None, environ: dict) -> Iterator[bytes]:
    """Our SSE for one answer; a heartbeat while the upstream is silent, so a gone client shows.

    The events of one upstream read go out as one write (`start` with the first), as `/v1`
    relays them: a server that fell behind catches up in one socket write, not one per delta.
    """
    start = {"model": stream.model}  # the model asked for, before a chunk names another
    if conversation_id:
        start = {"conversation_id": conversation_id, **start}
    pending = [sse.event("start", start)]
    try:
        for batch in stream.batches():
            if batch is IDLE:
                if client_gone(environ):
                    return
                pending.append(sse.HEARTBEAT)
            else:
                pending.extend(_event(item) for item in batch)
            if pending:
                yield b"".join(pending)
                pending = []
    except ApiError as exc:
        requestlog.current().error = exc.code
        pending.append(sse.event("error", exc.body()))
        yield b"".join(pending)
    finally:
        stream.stop()  # the ledger row and stored answer: in close(), after the last bytes


def _event(item: Delta | Finish) -> bytes:
    if isinstance(item, Delta):
        return sse.text_event("delta", "content", item.content)
    done = {"id": item.id, "finish_reason": item.finish_reason, "usage": item.usage}
    return sse.event("done", done)


@bp.get("/chat/conversations")
def list_conversations():
    """The calling client's conversations, newest first; `?limit=&before=<id>` pages through."""
    limit = _integer("limit", request.args.get("limit"), default=50)
    before = request.args.get("before") or None
    conversations = current_app.extensions["conversations"]
    return jsonify(data=conversations.list(client_name(), limit=limit, before=before))


@bp.get("/chat/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    """One conversation with its messages, oldest first."""
    conversation = current_app.extensions["conversations"].get(client_name(), conversation_id)
    return jsonify(
        {key: conversation[key] for key in ("id", "title", "system", "model", "messages")}
    )


@bp.patch("/chat/conversations/<conversation_id>")
def rename_conversation(conversation_id: str):
    """Renames a conversation (`{"title": "…"}`); no other field can be changed."""
    body = parse_json_object(read_body())
    if set(body) != {"title"}:
        raise ApiError("invalid_value", "Only 'title' can be changed.")
    title = read_text("title", body["title"], required=True)
    conversations = current_app.extensions["conversations"]
    return jsonify(conversations.rename(client_name(), conversation_id, title))


@bp.delete("/chat/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    """Deletes a conversation and its messages."""
    current_app.extensions["conversations"].delete(client_name(), conversation_id)
    return Response(status=204)


def _integer(name: str, value: str | None, *, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError("invalid_value", f"'{name}' must be a whole number.") from None
