"""What a `/v1` answer spent, read from the bytes as they are relayed.

The upstream's own figures win: `usage` in a JSON answer, in a chat stream's last chunk, or in
a Responses stream's `response.completed` event. An answer without them (a stream the client
did not ask usage for, one cut short, audio) is counted from the text and marked estimated.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..sse import Event
from .context import estimate_prompt_tokens, estimate_tokens

BODY_LIMIT = 4 * 1024 * 1024  # a larger JSON answer is relayed but not read for its usage
# Events are kept unread up to this many characters; beyond it they are read, to bound memory.
KEEP_LIMIT = 8 * 1024
# An event that may carry usage (a key `usage` whose value is an object, not the `null` of the
# chunks before the last): the only events read as they pass (json.loads of each: ~3 µs/chunk).
_USAGE = re.compile(r'"usage"\s*:\s*\{')


class Meter:
    def __init__(self, request_json: Any):
        self.request = request_json if isinstance(request_json, dict) else {}
        self.model = str(self.request.get("model") or "")
        self.usage: dict[str, Any] | None = None
        self._text: list[str] = []
        self._unread: list[str] = []  # events kept unread: their text is needed only to estimate
        self._unread_size = 0
        self._usage_model: str | None = None  # the model named by the event carrying usage
        self._body = bytearray()
        self.whole = False  # set once the answer was relayed to its end

    def body(self, chunk: bytes) -> None:
        """A piece of a JSON answer."""
        if len(self._body) <= BODY_LIMIT:
            self._body += chunk

    def event(self, event: Event) -> None:
        """One event of a stream."""
        data = event.data
        if not data.startswith("{"):
            return
        if _USAGE.search(data):
            read = self._read_event(data)
            self._usage_model = str(read.get("model") or "") or self._usage_model
            return
        self._unread.append(data)
        self._unread_size += len(data)
        if self._unread_size > KEEP_LIMIT:
            self._read_unread()

    def _read_event(self, text: str) -> dict:
        """Reads one event; returns the object it describes (a Responses event's `response`)."""
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        if not isinstance(data, dict):
            return {}
        answer = data.get("response") if isinstance(data.get("response"), dict) else data
        self._read(answer)
        delta = data.get("delta")
        if isinstance(delta, str):  # Responses API text deltas
            self._text.append(delta)
        return answer

    def _read_unread(self) -> None:
        for text in self._unread:
            self._read_event(text)
        self._unread, self._unread_size = [], 0

    def tokens(self) -> tuple[int, int, bool]:
        """(prompt tokens, completion tokens, estimated)."""
        if self._body:
            try:
                answer = json.loads(self._body)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self._read(answer)
        reported = self._reported()
        if reported is None or self._usage_model is None:
            self._read_unread()  # the text to estimate from, or the model the events named
            reported = self._reported()
        # The event with usage comes last: the model it names is the answer's.
        self.model = self._usage_model or self.model
        if reported is not None:
            return *reported, False
        return self._estimated_prompt(), estimate_tokens("".join(self._text)), True

    def _reported(self) -> tuple[int, int] | None:
        usage = self.usage or {}
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
        if isinstance(prompt, int) and isinstance(completion, int):
            return prompt, completion
        return None

    def _read(self, data: dict) -> None:
        self.model = str(data.get("model") or self.model)
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            part = (choice.get("delta") or choice.get("message") or {}).get("content")
            part = part if isinstance(part, str) else choice.get("text")
            if isinstance(part, str):
                self._text.append(part)

    def _estimated_prompt(self) -> int:
        messages = self.request.get("messages")
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            return estimate_prompt_tokens(messages)
        prompt = self.request.get("input", self.request.get("prompt", ""))
        return estimate_tokens(prompt if isinstance(prompt, str) else json.dumps(prompt))
