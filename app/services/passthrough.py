"""The `/v1` passthrough: which headers cross, and relaying the upstream's answer as it arrives.

The upstream's status, type and body come back unchanged, with three edits: headers that belong
to one hop or to the upstream account are dropped, event streams get `: ping` heartbeats between
events, and a body that breaks midway cuts the client's connection instead of ending cleanly.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import metrics, requestlog, sse
from ..errors import ApiError
from ..relay import IDLE, client_gone, cut_connection, pace
from ..settings import Settings
from ..upstream import UpstreamAnswer, UpstreamClient
from .ledger import Ledger
from .meter import Meter

# RFC 9110 §7.6.1 and older hop-by-hop headers.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# Never sent upstream: the client's credentials and cookies, the account selectors of our key,
# headers that describe the client's own connection, what requests sets itself, and the request
# ID (the upstream client sends the checked one).
REQUEST_DROP = HOP_BY_HOP | {
    "host", "cookie", "authorization", "x-api-key", "api-key", "openai-organization",
    "openai-project", "content-length", "accept-encoding", "forwarded", "x-forwarded-for",
    "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "origin",
    "referer", "x-request-id",
}  # fmt: skip
# Never passed back: cookies and the identity of the upstream account. An encoded body is relayed
# decoded, so its encoding and length go too; an unencoded one keeps its length, which spares the
# chunked framing and lets the client tell a cut body from a whole one.
RESPONSE_DROP = HOP_BY_HOP | {
    "set-cookie", "openai-organization", "openai-project", "content-encoding", "server", "date",
}  # fmt: skip
FINAL = ("x-should-retry", "false")
IDLE_EVERY = 0.5


@dataclass(frozen=True)
class Metered:
    """Who is charged for a relayed answer, and what they asked (to estimate missing usage)."""

    client: str
    endpoint: str
    request_json: Any


def upstream_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that may reach the upstream."""
    named = {
        token.strip().lower() for value in _all(headers, "connection") for token in value.split(",")
    }
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in REQUEST_DROP and name.lower() not in named
    }


def _all(headers, name: str) -> list[str]:
    getlist = getattr(headers, "getlist", None)
    return getlist(name) if getlist else [headers.get(name, "")]


class Passthrough:
    def __init__(self, settings: Settings, upstream: UpstreamClient, ledger: Ledger):
        self.settings = settings
        self.upstream = upstream
        self.ledger = ledger
        # A budget must see each row from the next request on, at any instance: rows first.
        self._record_early = settings.daily_token_budget > 0

    def send(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes | None,
        client: str,
    ) -> UpstreamAnswer:
        if method == "POST":
            self.ledger.check_budget(client, self.settings.daily_token_budget)
        return self.upstream.send(
            method, path, query=query, headers=upstream_headers(headers), body=body
        )

    def client_headers(self, answer: UpstreamAnswer) -> list[tuple[str, str]]:
        """The upstream's headers that may reach the client.

        With a daily budget the ledger row is written before the body's last bytes (see
        `relay`), which a client only waits for when the body goes chunked: no Content-Length.
        """
        named = {t.strip().lower() for t in answer.headers.get("connection", "").split(",")}
        if "content-encoding" in answer.headers or self._record_early:
            named.add("content-length")
        headers = [
            (name, value)
            for name, value in answer.headers.items()
            if name.lower() not in RESPONSE_DROP and name.lower() not in named
        ]
        if answer.status == 429 or answer.status >= 500:
            headers.append(FINAL)
        return headers

    def allowed_models_body(self, answer: UpstreamAnswer) -> bytes:
        """`GET models` with only the models this server allows."""
        try:
            listing = answer.json()
        finally:
            answer.close()
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise ApiError("upstream_bad_response", "The upstream's model list is malformed.")
        listing["data"] = [
            model
            for model in listing["data"]
            if isinstance(model, dict) and self.settings.model_allowed(str(model.get("id", "")))
        ]
        return json.dumps(listing).encode()

    def relay(
        self, answer: UpstreamAnswer, environ: dict, metered: Metered | None = None
    ) -> Iterable[bytes]:
        """The upstream's body as it arrives; heartbeats between the events of an event stream.

        With `metered`, what a successful answer spent goes to the ledger once the relay ends,
        however it ends: only an answer relayed to its end is whole, anything else is partial.
        The row is written once the response is closed, after its last bytes, so the client
        does not wait for the database; with a daily budget, before them instead, so that the
        client's next request, to any instance, meets its budget spent (the body then goes
        chunked: see `client_headers`).
        """
        meter = Meter(metered.request_json if metered else None)
        if "text/event-stream" in answer.content_type:
            relayed = self._relay_events(answer, environ, meter)
        else:
            relayed = self._relay_bytes(answer, environ, meter)
        if metered is None or not 200 <= answer.status < 300:
            return relayed
        record = functools.partial(self._record, meter, metered)
        return MeteredBody(relayed, answer, record, early=self._record_early)

    def _record(self, meter: Meter, metered: Metered) -> None:
        prompt, completion, estimated = meter.tokens()
        self.ledger.record(
            request_id=uuid.uuid4().hex,
            client=metered.client,
            model=meter.model or "unknown",
            endpoint=metered.endpoint,
            prompt_tokens=prompt,
            completion_tokens=completion,
            estimated=estimated,
            partial=not meter.whole,
        )

    def _relay_bytes(self, answer: UpstreamAnswer, environ: dict, meter: Meter) -> Iterator[bytes]:
        try:
            for piece in answer.iter_bytes():
                meter.body(piece)
                yield piece
            meter.whole = True
        except ApiError as exc:
            requestlog.current().error = exc.code
            cut_connection(environ)
        finally:
            answer.close()

    def _relay_events(self, answer: UpstreamAnswer, environ: dict, meter: Meter) -> Iterator[bytes]:
        reader = sse.EventReader()
        paced = pace(
            answer.iter_bytes(),
            idle_every=IDLE_EVERY,
            max_seconds=self.settings.max_stream_seconds,
            on_stop=answer.close,
            joined=True,
        )
        in_progress = metrics.labelled(metrics.STREAMS_IN_PROGRESS, "/v1")
        in_progress.inc()
        first = True
        try:
            for piece in paced:
                if piece is IDLE:
                    if client_gone(environ):
                        return
                    if reader.at_boundary:
                        yield sse.HEARTBEAT
                    continue
                for event in reader.feed(piece):
                    meter.event(event)
                if first:
                    first = False
                    metrics.labelled(metrics.TIME_TO_FIRST_TOKEN, meter.model or "unknown").observe(
                        time.monotonic() - answer.started
                    )
                yield piece
            if reader.at_boundary:
                meter.whole = True
            else:
                cut_connection(environ)  # the last event was never finished
        except ApiError as exc:
            requestlog.current().error = exc.code
            if reader.at_boundary:  # the official SDKs raise on an `error` event
                yield sse.event("error", exc.body())
            cut_connection(environ)
        finally:
            paced.close()
            in_progress.dec()


class MeteredBody:
    """A relayed answer as a WSGI iterable whose `close()` writes its ledger row, once.

    The server calls `close()` after the response's last bytes went out (PEP 3333), also when
    the client left midway or the body was never read: the client does not wait for the
    database, and the row is written exactly once however the relay ended. With `early`, a
    body relayed to its end writes the row before the server sends those last bytes.
    """

    def __init__(
        self,
        relayed: Iterator[bytes],
        answer: UpstreamAnswer,
        record: Callable[[], None],
        *,
        early: bool = False,
    ):
        self._relayed = relayed
        self._answer = answer
        self._record = record
        self._early = early
        self._recorded = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._relayed
        if self._early:
            self._record_once()

    def close(self) -> None:
        try:
            self._relayed.close()
            self._answer.close()  # a body never read was never opened by the relay
        finally:
            self._record_once()

    def _record_once(self) -> None:
        if not self._recorded:
            self._recorded = True
            self._record()
