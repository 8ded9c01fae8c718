"""`/v1/<path>`: the OpenAI-compatible passthrough the official SDKs point at.

Validates what the proxy must decide itself — the path (from the raw request line, so that an
encoded `..` cannot hide), whether it is open, and the model a body names — then hands the
request to the passthrough service and relays its answer untouched.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

from flask import Blueprint, Response, current_app, request
from werkzeug.routing import BaseConverter

from ..auth import client_name
from ..errors import ApiError
from ..jsonbody import parse_form, parse_json, read_body
from ..services.passthrough import Metered

bp = Blueprint("passthrough", __name__)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_FORBIDDEN_CHARACTER = re.compile(r"[\\\x00-\x1f\x7f]")  # a backslash or a control character
_MOVING_SEGMENTS = frozenset({"", ".", ".."})


class AnyPathConverter(BaseConverter):
    """Matches every rest of the path, empty segments included, so that they reach validation."""

    regex = r"[\s\S]*"  # newlines too: an encoded CR/LF must reach validation, not 404
    part_isolating = False


@bp.record_once
def _register_converter(state) -> None:
    state.app.url_map.converters["anypath"] = AnyPathConverter


@bp.route("/v1/<anypath:path>", methods=METHODS)
def relay(path: str):
    """Sends the request on to `OPENAI_BASE_URL/<path>` and relays the answer as it arrives."""
    settings = current_app.config["SETTINGS"]
    raw_path, path = _validated_path()  # from the raw request line, not the decoded match
    if not settings.v1_path_allowed(request.method, path):
        raise ApiError(
            "path_not_allowed", f"{request.method} /v1/{path} is not open on this server."
        )
    if path.startswith("models/") and not settings.model_allowed(path.removeprefix("models/")):
        raise ApiError("not_found", f"The model '{path.removeprefix('models/')}' does not exist.")
    body = read_body() if request.method not in ("GET", "HEAD") else None
    document = _checked_document(body) if body else None
    passthrough = current_app.extensions["passthrough"]
    query = request.query_string.decode("latin-1")
    answer = passthrough.send(request.method, raw_path, query, request.headers, body, client_name())
    headers = passthrough.client_headers(answer)
    if path == "models" and settings.allowed_models and answer.status == 200:
        return Response(passthrough.allowed_models_body(answer), 200, headers)
    if request.method == "HEAD":
        answer.close()
        return Response(b"", answer.status, headers)
    metered = Metered(client_name(), f"/v1/{path}", document) if request.method == "POST" else None
    return Response(passthrough.relay(answer, request.environ, metered), answer.status, headers)


def _validated_path() -> tuple[str, str]:
    """The path after `/v1/` as sent (to forward) and decoded once (to match the allowlist).

    Refuses `..` and `.` segments, empty segments, backslashes, control characters and schemes,
    raw or percent-encoded once or twice: none may change where the request lands.
    """
    environ = request.environ
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"]
    raw_path = target.split("?", 1)[0]
    if "://" in raw_path and not raw_path.startswith("/"):
        raw_path = urlsplit(raw_path).path  # absolute-form request target
    prefix = quote(request.script_root) + "/v1/"  # an app mounted below a path prefix
    if not raw_path.startswith(prefix):
        raise _invalid_path()
    raw_path = raw_path.removeprefix(prefix)
    once = unquote(raw_path)
    # Without a `%` the three forms are one: checked once.
    for form in dict.fromkeys((raw_path, once, unquote(once))):
        if (
            not _MOVING_SEGMENTS.isdisjoint(form.split("/"))
            or _FORBIDDEN_CHARACTER.search(form)
            or _SCHEME.match(form)
        ):
            raise _invalid_path()
    return raw_path, once


def _invalid_path() -> ApiError:
    return ApiError(
        "invalid_path", "The path has an empty, '.' or '..' segment, or a forbidden character."
    )


def _checked_document(body: bytes) -> object:
    """The JSON document of a JSON body (None for other bodies), after refusing a model this
    server does not allow, or a body that names two models."""
    settings = current_app.config["SETTINGS"]
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        if not settings.allowed_models:
            return None
        models = parse_form(body).getlist("model")
        if len(models) > 1:
            raise ApiError("invalid_value", "The form names more than one 'model'.")
        model, document = (models[0] if models else None), None
    elif mimetype in ("", "application/json") or mimetype.endswith("+json"):
        document = parse_json(body)  # also refuses duplicate keys, NaN and invalid UTF-8
        model = document.get("model") if isinstance(document, dict) else None
    else:
        return None
    if model is None or not settings.allowed_models:
        return document
    if not isinstance(model, str):
        raise ApiError("invalid_value", "'model' must be a string.")
    if not settings.model_allowed(model):
        raise ApiError("model_not_allowed", f"The model '{model}' is not allowed on this server.")
    return document
