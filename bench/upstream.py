"""A fake OpenAI upstream fast enough never to be the bottleneck of the benchmark.

A bare asyncio protocol on uvloop, no framework: it parses just enough HTTP/1.1 (request line,
`Content-Length`, keep-alive) and answers from bytes built once at start.

- `POST …/chat/completions` without `"stream": true`: a small `chat.completion` JSON.
- with `"stream": true`: an event stream of `CHUNKS` chunks, the first at once and one every
  `INTERVAL` seconds after it (scheduled on absolute times, so a busy moment does not shift the
  rest), then a usage chunk when `stream_options.include_usage` is asked, then `data: [DONE]`.
- anything else: 404.

Run: `python bench/upstream.py --port 18001` (prints `ready` once listening).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

try:
    import uvloop
except ImportError:  # the benchmark installs it; the module still works without
    uvloop = None

CHUNKS = 40
INTERVAL = 0.050
MODEL = "gpt-4o-mini"
CREATED = 1_700_000_000
EXTRA_HEADERS = (
    b"x-request-id: req_bench0000000000000000000000\r\n"
    b"openai-processing-ms: 1\r\n"
    b"openai-version: 2020-10-01\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\n"
)


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _completion() -> bytes:
    body = _json(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
        }
    )
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + EXTRA_HEADERS
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(data: dict) -> bytes:
    return _chunked(b"data: " + _json(data) + b"\n\n")


def _stream_parts() -> tuple[bytes, list[bytes], bytes, bytes]:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
        + EXTRA_HEADERS
        + b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED}
    chunks = []
    for index in range(CHUNKS):
        delta = {"content": f"tok{index} "}
        if index == 0:
            delta = {"role": "assistant", **delta}
        last = index == CHUNKS - 1
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if last else None}
        chunks.append(_event({**base, "model": MODEL, "choices": [choice]}))
    usage = _event(
        {
            **base,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": CHUNKS, "total_tokens": 9 + CHUNKS},
        }
    )
    done = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return head, chunks, usage, done


COMPLETION = _completion()
STREAM_HEAD, STREAM_CHUNKS, STREAM_USAGE, STREAM_DONE = _stream_parts()
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: requests in order, one at a time (no pipelining needed)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timers: list[asyncio.TimerHandle] = []
        self.streaming = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                value = head[at + 17 : line_end if line_end >= 0 else len(head)]
                try:
                    length = int(value)
                except ValueError:
                    self.transport.write(BAD_REQUEST)
                    self.transport.close()
                    return
            if b"\r\ntransfer-encoding:" in head:
                self.transport.write(BAD_REQUEST)  # never sent by the clients benchmarked here
                self.transport.close()
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            close = b"\r\nconnection: close" in head
            self.answer(head.split(b" ", 2), body, close)

    def answer(self, request_line: list[bytes], body: bytes, close: bool) -> None:
        if len(request_line) < 2 or not request_line[1].split(b"?")[0].endswith(
            b"/chat/completions"
        ):
            self.transport.write(NOT_FOUND)
        elif b'"stream":true' in body or b'"stream": true' in body:
            self.stream(usage=b'"include_usage"' in body, close=close)
            return
        else:
            self.transport.write(COMPLETION)
        if close:
            self.transport.close()

    def stream(self, usage: bool, close: bool) -> None:
        self.streaming = True
        self.transport.write(STREAM_HEAD + STREAM_CHUNKS[0])
        start = self.loop.time()
        for index in range(1, CHUNKS):
            tail = index == CHUNKS - 1
            self.timers.append(
                self.loop.call_at(
                    start + index * INTERVAL, self.send_chunk, index, tail, usage, close
                )
            )

    def send_chunk(self, index: int, tail: bool, usage: bool, close: bool) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if not tail:
            transport.write(STREAM_CHUNKS[index])
            return
        transport.write(STREAM_CHUNKS[index] + (STREAM_USAGE if usage else b"") + STREAM_DONE)
        self.timers.clear()
        self.streaming = False
        if close:
            transport.close()
        elif self.buffer:
            self.data_received(b"")


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        UpstreamProtocol, host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run = uvloop.run if uvloop is not None else asyncio.run
    run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
