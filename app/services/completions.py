"""Chat completions for our own surfaces (`/chat`, `/callChatGPT`).

Builds the upstream request, translates the upstream's failures into the contract's errors (§4:
its 5xx become 502/504, its 429 stays a 429, its 400 keeps its code), and turns the upstream's
chunk stream into `Delta` and `Finish` items. What a caller does with them — JSON, SSE, plain
text, storage — is the caller's business.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..errors import ApiError
from ..keypool import redact
from ..relay import IDLE, pace
from ..settings import Settings
from ..sse import EventReader
from ..upstream import UpstreamAnswer, UpstreamClient
from .ledger import Ledger, estimate_usage

IDLE_EVERY = 0.5  # seconds of upstream silence between two heartbeats / client checks
# Built once: `json.dumps` with an option builds a new encoder per call.
_JSON = json.JSONEncoder(ensure_ascii=False)


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    model: str
    options: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, …

    def payload(self, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages, **self.options}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return _JSON.encode(body).encode()


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    content: str
    finish_reason: str | None
    usage: dict[str, int] | None


@dataclass(frozen=True)
class Delta:
    content: str


@dataclass(frozen=True)
class Finish:
    id: str
    model: str
    finish_reason: str | None
    usage: dict[str, int] | None


class ChatService:
    """Chat completions for one client, each answered call written to the ledger once."""

    def __init__(self, settings: Settings, upstream: UpstreamClient, ledger: Ledger):
        self.settings = settings
        self.upstream = upstream
        self.ledger = ledger

    def complete(self, chat: ChatRequest, client: str, endpoint: str) -> Completion:
        self.ledger.check_budget(client, self.settings.daily_token_budget)
        answer = self._send(chat, stream=False)
        try:
            completion = _completion(_json_body(answer), chat.model)
        finally:
            answer.close()
        self._record(chat, client, endpoint, completion.model, completion.content, completion.usage)
        return completion

    def stream(self, chat: ChatRequest, client: str, endpoint: str) -> ChatStream:
        """Opens the stream; failures before the first byte raise here, as plain errors.

        Whatever the stream delivers — all of it, or the part before a failure or before the
        client left — is written to the ledger when the stream is closed.
        """
        self.ledger.check_budget(client, self.settings.daily_token_budget)
        answer = self._send(chat, stream=True)
        if "json" in answer.content_type:  # an upstream that ignored "stream": true
            completion = _completion(_json_body(answer), chat.model)
            stream = ChatStream(answer, chat.model, endpoint, 0, completion)
        elif "text/event-stream" in answer.content_type:
            stream = ChatStream(answer, chat.model, endpoint, self.settings.max_stream_seconds)
        else:
            answer.close()
            raise ApiError("upstream_bad_response", "The upstream did not answer with a stream.")
        stream.on_close(
            lambda ended: self._record(
                chat,
                client,
                endpoint,
                ended.model,
                ended.text,
                ended.usage,
                partial=not ended.finished,
            )
        )
        return stream

    def _record(
        self,
        chat: ChatRequest,
        client: str,
        endpoint: str,
        model: str,
        text: str,
        usage: dict | None,
        partial: bool = False,
    ) -> None:
        estimated = not usage or "prompt_tokens" not in usage
        if estimated:
            usage = estimate_usage(chat.messages, text)
        self.ledger.record(
            request_id=uuid.uuid4().hex,
            client=client,
            model=model,
            endpoint=endpoint,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            estimated=estimated,
            partial=partial,
        )

    def _send(self, chat: ChatRequest, stream: bool) -> UpstreamAnswer:
        accept = "text/event-stream" if stream else "application/json"
        answer = self.upstream.send(
            "POST",
            "chat/completions",
            headers={"Content-Type": "application/json", "Accept": accept},
            body=chat.payload(stream),
        )
        if answer.status != 200:
            try:
                raise self._failure(answer)
            finally:
                answer.close()
        return answer

    def _failure(self, answer: UpstreamAnswer) -> ApiError:
        """The contract's error for a final upstream status other than 200."""
        status = answer.status
        if status == 429:
            retry_after = answer.headers.get("Retry-After") or "1"
            return ApiError(
                "upstream_rate_limited",
                "The upstream provider is rate-limiting this server; retry later.",
                headers={"Retry-After": retry_after},
            )
        if status == 504:
            return ApiError("upstream_timeout", "The upstream timed out.")
        if status >= 500 or status < 400:
            message = f"The upstream failed with status {status}."
            return ApiError("upstream_bad_response", message)
        error = _upstream_error(answer)
        message = redact(
            str(error.get("message") or f"The upstream refused the request ({status})."),
            self.settings.secrets,
        )
        code = error.get("code") if isinstance(error.get("code"), str) else "invalid_value"
        return ApiError(
            code,
            message,
            status=400,
            type="invalid_request_error",
            headers={"x-should-retry": "false"},  # the upstream's own verdict: final
        )


class ChatStream:
    """The upstream's chunks as `Delta`s, a final `Finish`, and `IDLE` while it is silent.

    `batches()` gives them grouped by upstream read, so that chunks that arrived together can
    go out in one write; iterating the stream gives them one by one.

    Counted in the streams in progress from its creation until it is closed.
    """

    def __init__(
        self,
        answer: UpstreamAnswer,
        model: str,
        endpoint: str,
        max_seconds: float,
        completion: Completion | None = None,  # an upstream that answered whole, not streamed
    ):
        self.model = completion.model if completion else model
        self.finish: Finish | None = None
        self._parts: list[str] = []
        self._answer = answer
        self._batches = self._delivered(
            self._replay(completion) if completion else self._read(max_seconds)
        )
        self._on_close: list[Callable[[ChatStream], None]] = []
        self._stopped = self._closed = False
        self._in_progress = metrics.labelled(metrics.STREAMS_IN_PROGRESS, endpoint)
        self._in_progress.inc()

    @property
    def text(self) -> str:
        """What the stream delivered so far."""
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def usage(self) -> dict[str, int] | None:
        return self.finish.usage if self.finish else None

    def on_close(self, callback: Callable[[ChatStream], None]) -> None:
        """Runs `callback(self)` once, when the stream is closed, however it ended."""
        self._on_close.append(callback)

    def _delivered(self, batches: Iterator[list[Delta | Finish] | object]) -> Iterator:
        for batch in batches:
            if batch is not IDLE:
                for item in batch:
                    if isinstance(item, Delta):
                        if not self._parts:
                            metrics.labelled(metrics.TIME_TO_FIRST_TOKEN, self.model).observe(
                                time.monotonic() - self._answer.started
                            )
                        self._parts.append(item.content)
                    else:
                        self.finish = item
            yield batch

    def batches(self) -> Iterator[list[Delta | Finish] | object]:
        """Lists of the items one upstream read brought, and `IDLE` while it is silent."""
        return self._batches

    def __iter__(self) -> Iterator[Delta | Finish | object]:
        for batch in self._batches:
            if batch is IDLE:
                yield IDLE
            else:
                yield from batch

    def stop(self) -> None:
        """Stops reading the upstream. The callbacks wait for `close()`, which the server calls
        once the response's last bytes went out: the client does not wait for the database."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._batches.close()
        finally:
            self._answer.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            try:
                for callback in self._on_close:
                    callback(self)
            finally:
                self._in_progress.dec()

    @staticmethod
    def _replay(completion: Completion) -> Iterator[list[Delta | Finish]]:
        finish = Finish(completion.id, completion.model, completion.finish_reason, completion.usage)
        yield [Delta(completion.content), finish] if completion.content else [finish]

    def _read(self, max_seconds: float) -> Iterator[list[Delta | Finish] | object]:
        reader = EventReader()
        chunk_id, finish_reason, usage, done = "", None, None, False
        batch: list[Delta | Finish] = []
        paced = pace(
            self._answer.iter_bytes(),
            idle_every=IDLE_EVERY,
            max_seconds=max_seconds,
            on_stop=self._answer.close,
            joined=True,
        )
        try:
            for piece in paced:
                if piece is IDLE:
                    yield IDLE
                    continue
                try:
                    for event in reader.feed(piece):
                        if event.data.strip() == "[DONE]":
                            done = True
                            break
                        chunk = _chunk(event.data)
                        chunk_id = chunk.get("id") or chunk_id
                        self.model = chunk.get("model") or self.model
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or ():
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                batch.append(Delta(content))
                            finish_reason = choice.get("finish_reason") or finish_reason
                except ApiError:
                    if batch:  # what came before the bad event still goes out
                        yield batch
                    raise
                if done:
                    break  # the last deltas go out with the `Finish`, in one write
                yield batch  # even empty: the caller learns that the upstream answered
                batch = []
        finally:
            paced.close()
        if not done and finish_reason is None:
            raise ApiError(
                "upstream_unreachable", "The upstream stream ended before the answer did."
            )
        yield [*batch, Finish(chunk_id, self.model, finish_reason, usage)]


def _json_body(answer: UpstreamAnswer) -> dict[str, Any]:
    if "html" in answer.content_type:
        answer.close()
        raise ApiError("upstream_bad_response", "The upstream answered with an HTML page.")
    body = answer.json()
    if not isinstance(body, dict):
        raise ApiError("upstream_bad_response", "The upstream answered with unexpected JSON.")
    return body


def _completion(body: dict[str, Any], requested_model: str) -> Completion:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ApiError("upstream_bad_response", "The upstream's answer has no choices.")
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    return Completion(
        id=str(body.get("id") or ""),
        model=str(body.get("model") or requested_model),
        content=content if isinstance(content, str) else "",
        finish_reason=choices[0].get("finish_reason"),
        usage=usage,
    )


def _chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ApiError(
            "upstream_bad_response", "The upstream sent a malformed stream event."
        ) from None
    if not isinstance(chunk, dict):
        raise ApiError("upstream_bad_response", "The upstream sent a malformed stream event.")
    if isinstance(chunk.get("error"), dict):
        raise ApiError("upstream_bad_response", "The upstream reported an error mid-answer.")
    return chunk


def _upstream_error(answer: UpstreamAnswer) -> dict[str, Any]:
    try:
        body = json.loads(answer.read())
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}
