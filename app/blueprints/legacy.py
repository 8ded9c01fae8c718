"""`/callChatGPT`: the tutorial's one-question endpoint, kept compatible with its page and scripts.

The question comes from the query string, a form, or a JSON body; the answer is plain text, and
a failure one line `error: <message>` with the contract's status.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request

from .. import requestlog
from ..auth import client_name
from ..errors import ApiError
from ..jsonbody import parse_form, parse_json_object, read_body
from ..relay import IDLE, client_gone
from ..services.completions import ChatRequest, ChatStream, Delta
from .params import read_flag, read_model, read_options, read_text, with_system

bp = Blueprint("legacy", __name__)


@bp.route("/callChatGPT", methods=["GET", "POST"])
def call_chatgpt():
    """Answers one question (`input`) in plain text; `stream=1` sends it as it is written."""
    values, from_text = _values()
    settings = current_app.config["SETTINGS"]
    question = read_text("input", values.get("input"), required=True)
    system = read_text("system", values.get("system")) or settings.system_prompt
    chat = ChatRequest(
        messages=with_system([{"role": "user", "content": question}], system),
        model=read_model(values.get("model"), settings),
        options=read_options(values, from_text=from_text),
    )
    chat_service = current_app.extensions["chat"]
    if read_flag("stream", values.get("stream"), from_text=from_text):
        stream = chat_service.stream(chat, client_name(), request.path)
        response = Response(
            _text(stream, request.environ),
            mimetype="text/plain",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.call_on_close(stream.close)  # a HEAD request never iterates the body
        return response
    answer = chat_service.complete(chat, client_name(), request.path).content.strip()
    return Response(answer, mimetype="text/plain")


def _values() -> tuple[dict, bool]:
    """Query, then form or JSON body over it; and whether the values are strings to convert."""
    values = request.args.to_dict()
    if request.method != "POST":
        return values, True
    raw = read_body()
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        values.update(parse_form(raw).to_dict())
        return values, True
    if request.is_json or raw.lstrip().startswith(b"{"):
        body = parse_json_object(raw)
        return {**values, **body}, False
    return values, True


def _text(stream: ChatStream, environ: dict) -> Iterator[bytes]:
    """The answer's text as it arrives, with the white space around it stripped.

    Trailing white space is held back until more text follows it, so the end is stripped too.
    A failure after text went out is written as a last line, `error: <message>`.
    """
    started, pending = False, ""
    try:
        for item in stream:
            if item is IDLE:
                if client_gone(environ):
                    return
                continue
            if not isinstance(item, Delta):
                continue
            text = pending + item.content
            if not started:
                text = text.lstrip()
                started = bool(text)
            body = text.rstrip()
            pending = text[len(body) :]
            if body:
                yield body.encode()
    except ApiError as exc:  # the status is sent already: the error becomes the last line
        requestlog.current().error = exc.code
        yield f"\nerror: {exc.message}\n".encode()
    finally:
        stream.stop()  # the ledger row and stored answer: in close(), after the last bytes
