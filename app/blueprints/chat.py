"""`/chat`: the conversation endpoint for the bundled page, curl and scripts.

The body is read as JSON whatever its Content-Type says (`curl -d` sends a form type). A stream
is our own SSE: `start`, `delta`…, then `done`, or an `error` event once the stream has begun.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from .. import sse
from ..errors import ApiError
from ..jsonbody import parse_json_object, read_body
from ..relay import IDLE, client_gone
from ..services.completions import ChatRequest, ChatStream, Delta, Finish
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


@bp.post("/chat")
def chat():
    """One turn of a conversation: `message` (a new turn) or `messages` (stateless)."""
    body = parse_json_object(read_body())
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError("invalid_value", f"Unknown field '{unknown[0]}'.")
    settings = current_app.config["SETTINGS"]
    chat_request = ChatRequest(
        messages=_messages(body, settings.system_prompt),
        model=read_model(body.get("model"), settings),
        options=read_options(body),
    )
    chat_service = current_app.extensions["chat"]
    wants_stream = read_flag("stream", body.get("stream")) or (
        "stream" not in body and request.accept_mimetypes.best == "text/event-stream"
    )
    if wants_stream:
        stream = chat_service.stream(chat_request)
        return Response(
            _events(stream, request.environ), mimetype="text/event-stream", headers=STREAM_HEADERS
        )
    completion = chat_service.complete(chat_request)
    return jsonify(
        id=completion.id,
        model=completion.model,
        content=completion.content,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
    )


def _messages(body: dict, default_system: str) -> list[dict]:
    system = read_text("system", body.get("system")) or default_system
    if body.get("messages") is not None:
        if body.get("message") is not None or body.get("conversation_id") is not None:
            raise ApiError("invalid_value", "Send either 'messages' or 'message', not both.")
        return with_system(read_messages(body["messages"]), system)
    if body.get("conversation_id") is not None:
        read_text("conversation_id", body["conversation_id"], required=True)
        raise ApiError("conversation_not_found", "No such conversation.")
    message = read_text("message", body.get("message"), required=True)
    return with_system([{"role": "user", "content": message}], system)


def _events(stream: ChatStream, environ: dict) -> Iterator[bytes]:
    """Our SSE for one answer; a heartbeat while the upstream is silent, so a gone client shows."""
    yield sse.event("start", {"model": stream.model})
    try:
        for item in stream:
            if item is IDLE:
                if client_gone(environ):
                    return
                yield sse.HEARTBEAT
            elif isinstance(item, Delta):
                yield sse.event("delta", {"content": item.content})
            elif isinstance(item, Finish):
                done = {"id": item.id, "finish_reason": item.finish_reason, "usage": item.usage}
                yield sse.event("done", done)
    except ApiError as exc:
        yield sse.event("error", exc.body())
    finally:
        stream.close()
