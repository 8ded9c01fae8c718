"""The service's own API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Written as data, route by route, so that it reads like the contract (§3, §4). The `/v1`
passthrough is described generically: its bodies are the upstream's (the OpenAI API's own
description covers them). A test checks that the paths and methods here are exactly the routes
of the URL map, so that a new route cannot go undescribed.
"""

from __future__ import annotations

import copy
from typing import Any

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str, **extra: Any) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def _text(description: str) -> dict:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _errors(*statuses: int) -> dict:
    """The contract's JSON error responses (§4) by status."""
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


OPEN: list = []  # no access token needed, whatever ACCESS_TOKENS says
UPSTREAM_ERRORS = (429, 502, 503, 504)

USAGE = {
    "type": ["object", "null"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}
GENERATION_OPTIONS: dict[str, Schema] = {
    "model": {"type": "string", "description": "Default: OPENAI_MODEL; must match ALLOWED_MODELS."},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "max_tokens": {"type": "integer", "minimum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "maxItems": 4,
            },
        ]
    },
}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {
                        "type": "string",
                        "enum": [
                            "invalid_request_error",
                            "authentication_error",
                            "permission_error",
                            "not_found_error",
                            "rate_limit_error",
                            "upstream_error",
                            "server_error",
                        ],
                    },
                    "code": {"type": "string", "examples": ["invalid_value", "upstream_timeout"]},
                },
            }
        },
    },
    "Usage": USAGE,
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object"}},
                    {"type": "null"},
                ],
                "description": "A string or content parts; null only for an assistant message.",
            },
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "tool_call_id": {"type": "string"},
        },
    },
    "ChatRequest": {
        "type": "object",
        "additionalProperties": False,
        "description": "Either `message` (stored conversation) or `messages` (stateless).",
        "properties": {
            "message": {"type": "string", "minLength": 1},
            "conversation_id": {"type": "string"},
            "messages": {
                "type": "array",
                "items": _ref("Message"),
                "minItems": 1,
                "maxItems": 2000,
            },
            "system": {"type": "string"},
            **GENERATION_OPTIONS,
            "stream": {"type": "boolean", "default": False},
        },
    },
    "ChatAnswer": {
        "type": "object",
        "required": ["id", "model", "content", "finish_reason", "usage"],
        "properties": {
            "conversation_id": {
                "type": "string",
                "description": "Absent for a stateless call (`messages`).",
            },
            "id": {"type": "string"},
            "model": {"type": "string"},
            "content": {"type": "string"},
            "finish_reason": {"type": ["string", "null"]},
            "usage": _ref("Usage"),
        },
    },
    "StreamStart": {
        "type": "object",
        "required": ["model"],
        "properties": {"conversation_id": {"type": "string"}, "model": {"type": "string"}},
    },
    "StreamDelta": {
        "type": "object",
        "required": ["content"],
        "properties": {"content": {"type": "string"}},
    },
    "StreamDone": {
        "type": "object",
        "required": ["id", "finish_reason", "usage"],
        "properties": {
            "id": {"type": "string"},
            "finish_reason": {"type": ["string", "null"]},
            "usage": _ref("Usage"),
        },
    },
    "LegacyRequest": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": {"type": "string", "minLength": 1},
            "system": {"type": "string"},
            **GENERATION_OPTIONS,
            "stream": {"type": ["boolean", "string"], "description": "`1` or `true` streams."},
        },
    },
    "ConversationSummary": {
        "type": "object",
        "required": ["id", "title", "model", "created_at", "updated_at", "message_count"],
        "properties": {
            "id": {"type": "string"},
            "title": {"type": "string"},
            "model": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "message_count": {"type": "integer"},
        },
    },
    "StoredMessage": {
        "type": "object",
        "required": ["id", "role", "content", "created_at"],
        "properties": {
            "id": {"type": ["string", "integer"]},
            "role": {"type": "string"},
            "content": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "partial": {"type": "boolean", "description": "Cut short (failure or disconnect)."},
            "model": {"type": ["string", "null"]},
            "usage": _ref("Usage"),
        },
    },
    "Conversation": {
        "type": "object",
        "required": ["id", "title", "system", "model", "messages"],
        "properties": {
            "id": {"type": "string"},
            "title": {"type": "string"},
            "system": {"type": ["string", "null"]},
            "model": {"type": ["string", "null"]},
            "messages": {"type": "array", "items": _ref("StoredMessage")},
        },
    },
    "UsageRow": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "format": "date"},
            "model": {"type": "string"},
            "requests": {"type": "integer"},
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
            "cost_usd": {"type": "number"},
        },
    },
    "UsageReport": {
        "type": "object",
        "required": ["data", "total"],
        "properties": {
            "data": {"type": "array", "items": _ref("UsageRow")},
            "total": {
                "type": "object",
                "properties": {
                    "requests": {"type": "integer"},
                    "prompt_tokens": {"type": "integer"},
                    "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                    "cost_usd": {"type": "number"},
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"enum": ["ok", "degraded", "unavailable"]},
            "checks": {
                "type": "object",
                "properties": {
                    "configuration": {"const": "ok"},
                    "database": {"enum": ["ok", "unavailable"]},
                    "rate_limit_storage": {"enum": ["memory", "ok", "unreachable"]},
                    "upstream_key_configured": {"type": "boolean"},
                },
            },
        },
    },
}

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: `invalid_json`, `missing_field`, `invalid_value`, `model_not_allowed`, "
    "`invalid_path`, or the upstream's own code for its 400.",
    401: "`invalid_access_token`: ACCESS_TOKENS is set and no valid bearer token was sent.",
    403: "`path_not_allowed`.",
    404: "`not_found` or `conversation_not_found` (another client's conversation included).",
    413: "`request_too_large`: the body is larger than MAX_REQUEST_BYTES.",
    429: "`rate_limit_exceeded`, `budget_exceeded` or `upstream_rate_limited`, with Retry-After.",
    502: "`upstream_unreachable`, `upstream_bad_response` or `upstream_auth_failed`.",
    503: "`upstream_not_configured` (no OPENAI_API_KEY), or `shutting_down`.",
    504: "`upstream_timeout`.",
}
RESPONSES: dict[str, dict] = {
    f"Error{status}": _json(
        _ref("Error"),
        description,
        **({"headers": {"Retry-After": {"schema": {"type": "integer"}}}} if status == 429 else {}),
    )
    for status, description in _ERROR_DESCRIPTIONS.items()
}
RESPONSES["TextError"] = _text(
    "A failure as one line `error: <message>`, with the status of the contract's error table."
)
TEXT_ERRORS = {
    str(status): {"$ref": "#/components/responses/TextError"}
    for status in (400, 401, 413, 429, 502, 503, 504)
}

# /callChatGPT's query string: the same fields as its body, as text.
LEGACY_QUERY = [
    {"name": name, "in": "query", "schema": {"type": "string"}, "required": False}
    for name in ("input", "system", *GENERATION_OPTIONS, "stream")
]

CONVERSATION_ID = {
    "name": "conversation_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}
V1_PATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "The rest of the upstream path, `/` included (`chat/completions`, `models/gpt-4o`).",
    "schema": {"type": "string"},
}
PASSTHROUGH_RESPONSES = {
    "default": {
        "description": "The upstream's status, Content-Type and body as they are, streamed as they "
        "arrive; a stream that fails midway is cut (after an `error` event when it is an event "
        "stream). Exceptions: an upstream 401/403 is `502 upstream_auth_failed`, a redirect "
        "`502 upstream_bad_response`, no answer `502 upstream_unreachable` / `504 upstream_timeout`.",
        "content": {"*/*": {"schema": {}}},
    },
    **_errors(400, 401, 403, 413, 429, 502, 503, 504),
}


def _passthrough(method: str) -> dict:
    body = (
        {
            "requestBody": {
                "required": False,
                "description": "Passed on untouched; a JSON `model` must match ALLOWED_MODELS.",
                "content": {"*/*": {"schema": {}}},
            }
        }
        if method in ("post", "put", "patch")
        else {}
    )
    return {
        "tags": ["passthrough"],
        "operationId": f"passthrough_{method}",
        "summary": f"{method.upper()} OPENAI_BASE_URL/{{path}}",
        "description": "The OpenAI-compatible passthrough for the official SDKs "
        "(`base_url = http://host:8000/v1`, the access token as API key). Only the paths of "
        "V1_ALLOWED_PATHS pass (by default the stateless inference paths); others are "
        "`403 path_not_allowed`. HEAD is relayed like GET, without a body.",
        "parameters": [V1_PATH],
        **body,
        "responses": PASSTHROUGH_RESPONSES,
    }


PATHS: dict[str, dict] = {
    "/": {
        "get": {
            "tags": ["pages"],
            "operationId": "chat_page",
            "summary": "The chat page",
            "security": OPEN,
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        }
    },
    "/qa": {
        "get": {
            "tags": ["pages"],
            "operationId": "qa_page",
            "summary": "The question-and-answer page that calls /callChatGPT",
            "security": OPEN,
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        }
    },
    "/healthz": {
        "get": {
            "tags": ["operations"],
            "operationId": "healthz",
            "summary": "Liveness: the process answers",
            "security": OPEN,
            "responses": {"200": _json(_ref("Health"), "Alive.")},
        }
    },
    "/readyz": {
        "get": {
            "tags": ["operations"],
            "operationId": "readyz",
            "summary": "Readiness: configuration usable and database answering",
            "description": "`degraded` (still 200) while Redis, used for rate limits, is "
            "unreachable. Says whether an upstream key is set, never which.",
            "security": OPEN,
            "responses": {
                "200": _json(_ref("Readiness"), "Ready (`ok` or `degraded`)."),
                "503": _json(_ref("Readiness"), "Not ready: the database does not answer."),
            },
        }
    },
    "/metrics": {
        "get": {
            "tags": ["operations"],
            "operationId": "metrics",
            "summary": "Prometheus metrics of every worker process",
            "description": "Prometheus text format, or OpenMetrics when the Accept header asks "
            "for it. docs/operations.md lists the metrics.",
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                **_errors(401),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "tags": ["operations"],
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": _json({"type": "object"}, "OpenAPI 3.1."),
                **_errors(401),
            },
        }
    },
    "/usage": {
        "get": {
            "tags": ["operations"],
            "operationId": "usage",
            "summary": "The calling client's usage ledger per UTC day and model",
            "parameters": [
                {
                    "name": "days",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 366, "default": 30},
                }
            ],
            "responses": {
                "200": _json(_ref("UsageReport"), "Newest day first, with totals."),
                **_errors(400, 401),
            },
        }
    },
    "/callChatGPT": {
        method: {
            "tags": ["chat"],
            "operationId": f"call_chatgpt_{method}",
            "summary": "Answer one question in plain text",
            "description": "The original one-question endpoint. `input` and the options come "
            "from the query string"
            + (", a form, or a JSON body (the body wins)." if method == "post" else ".")
            + " `stream=1` sends the text as it is generated; a failure after that is a last "
            "line `error: <message>`.",
            "parameters": LEGACY_QUERY,
            **(
                {
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": _ref("LegacyRequest")},
                            "application/x-www-form-urlencoded": {"schema": _ref("LegacyRequest")},
                        }
                    }
                }
                if method == "post"
                else {}
            ),
            "responses": {
                "200": {
                    "description": "The answer, white space around it stripped.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **TEXT_ERRORS,
            },
        }
        for method in ("get", "post")
    },
    "/chat": {
        "post": {
            "tags": ["chat"],
            "operationId": "chat",
            "summary": "One turn of a conversation, stored or stateless",
            "description": "The body is read as JSON whatever its Content-Type. `message` starts "
            "or continues (`conversation_id`) a stored conversation; `messages` is stateless. "
            "`stream: true` (or `Accept: text/event-stream`) answers with server-sent events: "
            "`start` (StreamStart), `delta` (StreamDelta)…, then `done` (StreamDone); a failure "
            "after the stream began is an `error` event whose data is the Error body, and the "
            "stream ends. `: ping` comments keep a silent stream alive.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ChatRequest")}},
            },
            "responses": {
                "200": {
                    "description": "The answer, or its event stream.",
                    "content": {
                        "application/json": {"schema": _ref("ChatAnswer")},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors(400, 401, 404, 413, *UPSTREAM_ERRORS),
            },
        }
    },
    "/chat/conversations": {
        "get": {
            "tags": ["conversations"],
            "operationId": "list_conversations",
            "summary": "The calling client's conversations, newest first",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                },
                {
                    "name": "before",
                    "in": "query",
                    "description": "The last id of the previous page, or an ISO 8601 time.",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "data": {"type": "array", "items": _ref("ConversationSummary")}
                        },
                    },
                    "One page of summaries.",
                ),
                **_errors(400, 401),
            },
        }
    },
    "/chat/conversations/{conversation_id}": {
        "parameters": [CONVERSATION_ID],
        "get": {
            "tags": ["conversations"],
            "operationId": "get_conversation",
            "summary": "A conversation with its messages, oldest first",
            "responses": {
                "200": _json(_ref("Conversation"), "The conversation."),
                **_errors(401, 404),
            },
        },
        "patch": {
            "tags": ["conversations"],
            "operationId": "rename_conversation",
            "summary": "Rename a conversation (no other field can change)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["title"],
                            "additionalProperties": False,
                            "properties": {
                                "title": {"type": "string", "minLength": 1, "maxLength": 200}
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(_ref("ConversationSummary"), "The renamed conversation's summary."),
                **_errors(400, 401, 404),
            },
        },
        "delete": {
            "tags": ["conversations"],
            "operationId": "delete_conversation",
            "summary": "Delete a conversation and its messages",
            "responses": {"204": {"description": "Deleted."}, **_errors(401, 404)},
        },
    },
    "/v1/{path}": {
        method: _passthrough(method) for method in ("get", "post", "put", "patch", "delete")
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "chatgpt-proxy",
        "version": "0.1.0",
        "summary": "A self-hosted, OpenAI-compatible gateway that keeps the API key on the server.",
        "description": "Every operation accepts an `X-Request-ID` header (printable ASCII, at most "
        "128 characters; another is made otherwise) and answers with it.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": RESPONSES,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An access token of ACCESS_TOKENS; needed only when the server "
                "sets ACCESS_TOKENS.",
            }
        },
    },
    "security": [{"bearer": []}],
    "tags": [
        {"name": "chat", "description": "Answers from the upstream model."},
        {"name": "conversations", "description": "Stored conversations of the calling client."},
        {"name": "passthrough", "description": "The OpenAI-compatible `/v1` passthrough."},
        {"name": "operations", "description": "Probes, metrics, usage and this description."},
        {"name": "pages", "description": "The bundled web pages."},
    ],
}


def document(script_root: str = "") -> dict[str, Any]:
    """The document, with the server at the prefix the app is mounted under."""
    described = copy.deepcopy(DOCUMENT)
    described["servers"] = [{"url": script_root or "/"}]
    return described
