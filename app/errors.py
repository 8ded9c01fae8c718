"""One error type for the whole service, and the handlers that render it.

Code anywhere raises `ApiError(code, message)`; the status and type come from the contract's
table (§4). JSON routes answer `{"error": {"message", "type", "code"}}`; the text route
`/callChatGPT` answers one line, `error: <message>`. Werkzeug's HTML error pages never show.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from . import requestlog

log = logging.getLogger("chatproxy")

# code -> (status, type), as in the contract's §4.
ERROR_KINDS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "missing_field": (400, "invalid_request_error"),
    "invalid_value": (400, "invalid_request_error"),
    "model_not_allowed": (400, "invalid_request_error"),
    "invalid_path": (400, "invalid_request_error"),
    "invalid_access_token": (401, "authentication_error"),
    "path_not_allowed": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "conversation_not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "rate_limit_exceeded": (429, "rate_limit_error"),
    "budget_exceeded": (429, "rate_limit_error"),
    "upstream_rate_limited": (429, "rate_limit_error"),
    "internal_error": (500, "server_error"),
    "upstream_unreachable": (502, "upstream_error"),
    "upstream_bad_response": (502, "upstream_error"),
    "upstream_auth_failed": (502, "upstream_error"),
    "upstream_not_configured": (503, "upstream_error"),
    "shutting_down": (503, "server_error"),
    "upstream_timeout": (504, "upstream_error"),
}

# Werkzeug's own exceptions, by status, rendered in the same shape.
_HTTP_CODES = {
    400: "invalid_value",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
TEXT_ROUTES = ("/callChatGPT",)


class ApiError(Exception):
    """A failure the client is told about. `status` and `type` default from `ERROR_KINDS`."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI field is called `type`
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        default_status, default_type = ERROR_KINDS.get(code, (400, "invalid_request_error"))
        self.code = code
        self.message = message
        self.status = status or default_status
        self.type = type or default_type
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def render(error: ApiError) -> Response:
    """The response for `error`, in the shape of the route that failed."""
    requestlog.current().error = error.code
    if request.path in TEXT_ROUTES:
        response = Response(f"error: {error.message}\n", status=error.status, mimetype="text/plain")
    else:
        response = jsonify(error.body())
        response.status_code = error.status
    response.headers.update(error.headers)
    if error.type == "upstream_error" or error.code == "upstream_rate_limited":
        # The proxy made its retries already; an SDK retrying too would multiply them.
        response.headers["x-should-retry"] = "false"
    return response


def _from_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "invalid_value")
    message = {
        404: f"No route for {request.method} {request.path}.",
        405: f"{request.method} is not allowed on {request.path}.",
        413: "The request body is larger than this service accepts.",
    }.get(status, exc.description or exc.name)
    response = render(ApiError(code, message, status=status))
    if status == 405 and exc.response is None:
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response


def _from_unexpected(exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return render(ApiError("internal_error", "The service failed unexpectedly.", status=500))


def init_app(app: Flask) -> None:
    app.register_error_handler(ApiError, render)
    app.register_error_handler(HTTPException, _from_http_exception)
    app.register_error_handler(Exception, _from_unexpected)
