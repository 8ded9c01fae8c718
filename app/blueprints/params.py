"""Validation of the generation parameters that `/chat` and `/callChatGPT` share.

`/chat` takes typed JSON; `/callChatGPT` takes strings from a query or a form, so its values are
converted first (`from_text=True`). Either way a bad value is a 400 that names the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ApiError
from ..settings import Settings

# name -> (type, minimum, maximum)
NUMERIC_OPTIONS: dict[str, tuple[type, float, float | None]] = {
    "temperature": (float, 0, 2),
    "top_p": (float, 0, 1),
    "max_tokens": (int, 1, None),
    "presence_penalty": (float, -2, 2),
    "frequency_penalty": (float, -2, 2),
}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
MAX_MESSAGES = 2000
MAX_STOP = 4
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


def invalid(field: str, expectation: str) -> ApiError:
    return ApiError("invalid_value", f"'{field}' must be {expectation}.")


def read_options(values: Mapping[str, Any], *, from_text: bool = False) -> dict[str, Any]:
    """The generation options present in `values`, checked and typed."""
    options: dict[str, Any] = {}
    for name, (kind, low, high) in NUMERIC_OPTIONS.items():
        value = values.get(name)
        if value is None or (from_text and value == ""):
            continue
        options[name] = _number(name, value, kind, low, high, from_text)
    stop = values.get("stop")
    if stop is not None and not (from_text and stop == ""):
        options["stop"] = _stop(stop)
    return options


def _number(name: str, value: Any, kind: type, low: float, high: float | None, from_text: bool):
    span = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
    noun = "a whole number" if kind is int else "a number"
    if from_text and isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise invalid(name, f"{noun} {span}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"{noun} {span}")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise invalid(name, f"{noun} {span}")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise invalid(name, f"{noun} {span}")
    return kind(value)


def _stop(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and 0 < len(value) <= MAX_STOP
        and all(isinstance(item, str) and item for item in value)
    ):
        return value
    raise invalid("stop", f"a string or a list of 1 to {MAX_STOP} non-empty strings")


def read_flag(name: str, value: Any, *, from_text: bool = False) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise invalid(name, "true or false")


def read_text(name: str, value: Any, *, required: bool = False) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ApiError("missing_field", f"'{name}' is required and must not be empty.")
        return None
    if not isinstance(value, str):
        raise invalid(name, "a string")
    return value


def read_model(value: Any, settings: Settings) -> str:
    model = read_text("model", value) or settings.default_model
    if not settings.model_allowed(model):
        raise ApiError("model_not_allowed", f"The model '{model}' is not allowed on this server.")
    return model


def read_messages(value: Any) -> list[dict[str, Any]]:
    """A conversation sent by the client: a non-empty list of `{role, content}` objects."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise invalid("messages", f"a list of at most {MAX_MESSAGES} messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(where, "an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise invalid(f"{where}.role", "one of " + ", ".join(sorted(ROLES)))
        content = message.get("content")
        if not (
            isinstance(content, str | list) or (content is None and message["role"] == "assistant")
        ):
            raise invalid(f"{where}.content", "a string or a list of content parts")
        if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
            raise invalid(f"{where}.content", "a list of content-part objects")
        messages.append({key: message[key] for key in MESSAGE_FIELDS if key in message})
    return messages


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """`messages` led by the system prompt, unless they already bring one."""
    if not system or any(m["role"] in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]
