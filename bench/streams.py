"""Stream load: N concurrent event streams, opened at once, each on its own connection.

A bare asyncio protocol on uvloop (HTTP/1.1, chunked bodies decoded by hand) so that the client
costs little per chunk. For each stream it notes when the request started and when each content
event arrived, and prints one JSON summary: streams completed, time to first chunk, inter-chunk
lag (the gap between two content events beyond the upstream's 50 ms), and stream durations.
No per-request data is written anywhere.

    python bench/streams.py --port 18000 --path /v1/chat/completions --kind v1 --streams 100

`--kind v1` counts OpenAI chunks (`data: {…"content"…}`, ended by `data: [DONE]`); `--kind chat`
counts the service's own `event: delta` events (ended by `event: done`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from stats import percentile

try:
    import uvloop
except ImportError:
    uvloop = None

MAX_STREAMS = 5000
INTERVAL_MS = 50.0
BODIES = {
    "v1": {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
    },
    "chat-messages": {"messages": [{"role": "user", "content": "Say hello."}], "stream": True},
    "chat-message": {"message": "Say hello.", "stream": True},
}


class ChunkedDecoder:
    """Incremental `Transfer-Encoding: chunked` decoder."""

    def __init__(self) -> None:
        self.buffer = b""
        self.remaining = 0
        self.state = "size"
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out = []
        while True:
            if self.state == "size":
                at = self.buffer.find(b"\r\n")
                if at < 0:
                    break
                size = int(self.buffer[:at].split(b";")[0], 16)
                self.buffer = self.buffer[at + 2 :]
                if size == 0:
                    self.ended = True
                    self.state = "end"
                    break
                self.remaining, self.state = size, "data"
            if self.state == "data":
                piece = self.buffer[: self.remaining]
                out.append(piece)
                self.buffer = self.buffer[len(piece) :]
                self.remaining -= len(piece)
                if self.remaining:
                    break
                self.state = "crlf"
            if self.state == "crlf":
                if len(self.buffer) < 2:
                    break
                self.buffer = self.buffer[2:]
                self.state = "size"
            if self.state == "end":
                break
        return b"".join(out)


class StreamClient(asyncio.Protocol):
    def __init__(self, request: bytes, kind: str, finished: asyncio.Future) -> None:
        self.request = request
        self.chat = kind.startswith("chat")
        self.finished = finished
        self.transport = None
        self.head = b""
        self.status = 0
        self.decoder: ChunkedDecoder | None = None
        self.events = b""
        self.arrivals: list[float] = []
        self.done_event = False
        self.error = None
        self.sent = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sent = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.status = int(head.split(b" ", 2)[1])
            if b"\r\ntransfer-encoding: chunked" in head.lower():
                self.decoder = ChunkedDecoder()
        body = self.decoder.feed(data) if self.decoder else data
        self.events += body
        while (at := self.events.find(b"\n\n")) >= 0:
            event, self.events = self.events[:at], self.events[at + 2 :]
            self.on_event(event, now)
        if self.decoder and self.decoder.ended:
            self.end()

    def on_event(self, event: bytes, now: float) -> None:
        if self.chat:
            if event.startswith(b"event: delta"):
                self.arrivals.append(now)
            elif event.startswith(b"event: done"):
                self.done_event = True
            elif event.startswith(b"event: error"):
                self.error = "error_event"
        elif event.startswith(b"data: [DONE]"):
            self.done_event = True
        elif event.startswith(b"data: ") and b'"content"' in event:
            self.arrivals.append(now)

    def end(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)

    def connection_lost(self, exc) -> None:
        close_delimited = self.decoder is None and self.status
        if self.error is None and not close_delimited and not (self.decoder and self.decoder.ended):
            self.error = "cut"  # a chunked body must end with its last chunk
        if not self.finished.done():
            self.finished.set_result(None)


async def one_stream(host: str, port: int, request: bytes, kind: str, expect: int) -> dict:
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    started = time.perf_counter()
    try:
        transport, client = await loop.create_connection(
            lambda: StreamClient(request, kind, finished), host, port
        )
    except OSError as exc:
        return {"error": f"connect:{exc.errno}"}
    try:
        await finished
    except asyncio.CancelledError:
        transport.close()
        client.error = client.error or "deadline"
    arrivals = client.arrivals
    error = client.error
    if error is None and client.status != 200:
        error = f"status:{client.status}"
    if error is None and (len(arrivals) != expect or not client.done_event):
        error = "incomplete"
    return {
        "error": error,
        "connect": (client.sent - started) * 1000,
        "ttfc": (arrivals[0] - client.sent) * 1000 if arrivals else None,
        "gaps": [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "duration": (arrivals[-1] - client.sent) * 1000 if arrivals else None,
    }


async def run(args: argparse.Namespace) -> dict:
    body = json.dumps(BODIES[args.kind]).encode()
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    tasks = [
        asyncio.ensure_future(one_stream(args.host, args.port, request, args.kind, args.chunks))
        for _ in range(args.streams)
    ]
    started = time.perf_counter()
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for task in pending:
        task.cancel()
    results = [await task for task in tasks if not task.cancelled()]
    results += [{"error": "deadline"} for task in tasks if task.cancelled()]
    wall = time.perf_counter() - started
    errors: dict[str, int] = {}
    for result in results:
        if result["error"]:
            errors[result["error"]] = errors.get(result["error"], 0) + 1
    connects = [r["connect"] for r in results if r.get("connect") is not None]
    ttfc = [r["ttfc"] for r in results if r.get("ttfc") is not None]
    gaps = [gap for r in results for gap in r.get("gaps", ())]
    lags = [max(gap - INTERVAL_MS, 0.0) for gap in gaps]
    durations = [r["duration"] for r in results if not r["error"]]
    return {
        "streams": args.streams,
        "completed": sum(1 for r in results if not r["error"]),
        "errors": errors,
        "chunks": len(gaps) + len(ttfc),
        "wall_s": round(wall, 3),
        "connect_ms": {q: percentile(connects, q) for q in (50, 99)},
        "ttfc_ms": {q: percentile(ttfc, q) for q in (50, 90, 99)}
        | {"max": max(ttfc, default=None)},
        "lag_ms": {q: percentile(lags, q) for q in (50, 90, 99)} | {"max": max(lags, default=None)},
        "duration_ms": {q: percentile(durations, q) for q in (50, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--kind", choices=sorted(BODIES), default="v1")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=40, help="content events in a whole stream")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds for the whole run")
    args = parser.parse_args()
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be between 1 and {MAX_STREAMS}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the benchmark only targets loopback addresses")
    runner = uvloop.run if uvloop is not None else asyncio.run
    print(json.dumps(runner(run(args))), flush=True)


if __name__ == "__main__":
    main()
