"""Event streams read straight from the upstream socket, over real sockets: the chunked framing
in every shape it may arrive in, malformed framing, silence and shutdown, and the connection
going back to the pool after the last chunk so that the next stream skips the handshake.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from app.errors import ApiError
from app.relay import IDLE, pace
from app.settings import load_settings
from app.upstream import EventBody, UpstreamAnswer, UpstreamClient
from tests.fake_upstream import FAKE_KEY

EVENTS = b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
EACH_EVENT = [event + b"\n\n" for event in EVENTS.split(b"\n\n")[:-1]]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


def chunked(*parts: bytes, ending: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + ending


class ScriptedUpstream:
    """Answers each request with the next script: the pieces to write, a float to pause that
    many seconds, None to close the connection. Counts the connections it accepted."""

    def __init__(self, *scripts: list) -> None:
        self.scripts = list(scripts)
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as requests:
            while requests.readline() and self.scripts:
                while requests.readline() not in (b"\r\n", b""):
                    pass
                for step in self.scripts.pop(0):
                    if step is None:
                        return
                    if isinstance(step, float):
                        time.sleep(step)
                    else:
                        connection.sendall(step)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[list[ScriptedUpstream]]:
    started: list[ScriptedUpstream] = []
    yield started
    for server in started:
        server.close()


def client(server: ScriptedUpstream, timeout: float = 10.0) -> UpstreamClient:
    settings = load_settings(
        {
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": server.base_url,
            "UPSTREAM_TIMEOUT": str(timeout),
            "UPSTREAM_RETRIES": "0",
        }
    )
    return UpstreamClient(settings)


def serve(scripted: list[ScriptedUpstream], *scripts: list, timeout: float = 10.0):
    server = ScriptedUpstream(*scripts)
    scripted.append(server)
    return server, client(server, timeout)


def relay(answer: UpstreamAnswer) -> bytes:
    paced = pace(
        answer.iter_bytes(), idle_every=0.05, max_seconds=30, on_stop=answer.close, joined=True
    )
    return b"".join(piece for piece in paced if piece is not IDLE)


def get(upstream: UpstreamClient) -> UpstreamAnswer:
    return upstream.send("GET", "stream")


@pytest.mark.parametrize(
    "script",
    [
        [CHUNKED + chunked(EVENTS)],
        [CHUNKED, chunked(*EACH_EVENT)],
        [CHUNKED, *(bytes([byte]) for byte in chunked(*EACH_EVENT))],
        [CHUNKED, b"%x;name=value\r\n%s\r\n" % (len(EVENTS), EVENTS), b"0\r\nX-Trailer: 1\r\n\r\n"],
        [CHUNKED, b"%X\n%s\n0\n\n" % (len(EVENTS), EVENTS)],
    ],
    ids=["one-write", "chunk-per-event", "byte-by-byte", "extension-and-trailer", "bare-newlines"],
)
def test_a_chunked_event_stream_is_relayed_whole_and_its_connection_reused(
    scripted: list[ScriptedUpstream], script: list
) -> None:
    server, upstream = serve(scripted, script, [CHUNKED + chunked(EVENTS)])
    answer = get(upstream)
    assert isinstance(answer.iter_bytes(), EventBody)

    first = relay(answer)
    second = relay(get(upstream))

    assert first == EVENTS
    assert second == EVENTS
    assert server.connections == 1, "the stream's connection was not reused"


def test_pieces_that_waited_come_as_one(scripted: list[ScriptedUpstream]) -> None:
    _, upstream = serve(scripted, [CHUNKED, 0.2, chunked(*EACH_EVENT)])
    answer = get(upstream)
    body = answer.iter_bytes()
    time.sleep(0.4)

    assert body.receive(5.0) == EVENTS
    assert body.receive(5.0) == b""
    answer.close()


def test_a_stream_read_until_close_ends_cleanly(scripted: list[ScriptedUpstream]) -> None:
    server, upstream = serve(scripted, [HEAD + b"\r\n", EVENTS, None], [CHUNKED + chunked(EVENTS)])
    answer = get(upstream)
    assert isinstance(answer.iter_bytes(), EventBody)

    assert relay(answer) == EVENTS
    assert relay(get(upstream)) == EVENTS
    assert server.connections == 2


def test_bytes_after_the_last_chunk_keep_the_connection_out_of_the_pool(
    scripted: list[ScriptedUpstream],
) -> None:
    server, upstream = serve(
        scripted, [CHUNKED + chunked(EVENTS) + b"junk"], [CHUNKED + chunked(EVENTS)]
    )
    assert relay(get(upstream)) == EVENTS
    assert relay(get(upstream)) == EVENTS
    assert server.connections == 2


@pytest.mark.parametrize(
    "rest",
    [
        [b"zz\r\n", EVENTS],
        [b"-5\r\n", EVENTS],
        [b"5\r\nabcdeXY0\r\n\r\n"],
        [b"%x\r\n%s" % (len(EVENTS), EVENTS), None],
        [b"%x\r\n" % len(EVENTS), EVENTS[:9], None],
        [b"9" * (70 * 1024)],
    ],
    ids=["size-not-hex", "negative-size", "no-line-end", "no-final-chunk", "cut-in-data", "huge"],
)
def test_malformed_or_cut_framing_is_upstream_unreachable(
    scripted: list[ScriptedUpstream], rest: list
) -> None:
    _, upstream = serve(scripted, [CHUNKED, *rest, 5.0])
    answer = get(upstream)

    with pytest.raises(ApiError) as raised:
        relay(answer)
    assert raised.value.code == "upstream_unreachable"


def test_silence_yields_idle_then_the_chunk(scripted: list[ScriptedUpstream]) -> None:
    _, upstream = serve(scripted, [CHUNKED, 0.4, chunked(EVENTS)])
    answer = get(upstream)
    paced = pace(
        answer.iter_bytes(), idle_every=0.05, max_seconds=30, on_stop=answer.close, joined=True
    )
    pieces = list(paced)

    assert pieces[0] is IDLE
    assert b"".join(piece for piece in pieces if piece is not IDLE) == EVENTS


def test_silence_longer_than_the_read_timeout_is_upstream_timeout(
    scripted: list[ScriptedUpstream],
) -> None:
    _, upstream = serve(scripted, [CHUNKED, chunked(b"data: 1\n\n", ending=b""), 5.0], timeout=0.3)
    answer = get(upstream)
    pieces = []

    with pytest.raises(ApiError) as raised:
        for piece in pace(
            answer.iter_bytes(), idle_every=0.05, max_seconds=30, on_stop=answer.close
        ):
            pieces.append(piece)
    assert raised.value.code == "upstream_timeout"
    assert pieces[0] == b"data: 1\n\n" and IDLE in pieces


def test_abort_ends_a_relay_in_progress(scripted: list[ScriptedUpstream]) -> None:
    _, upstream = serve(scripted, [CHUNKED, chunked(b"data: 1\n\n", ending=b""), 5.0])
    answer = get(upstream)
    error = ApiError("shutting_down", "restarting")
    pieces = []

    with pytest.raises(ApiError) as raised:
        for piece in pace(
            answer.iter_bytes(), idle_every=0.05, max_seconds=30, on_stop=answer.close
        ):
            pieces.append(piece)
            if len(pieces) == 1:
                threading.Timer(0.2, answer.abort, (error,)).start()
    assert raised.value is error
    assert pieces[0] == b"data: 1\n\n"


def test_other_bodies_keep_urllib3s_reader(scripted: list[ScriptedUpstream]) -> None:
    json_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    gzip_head = CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
    _, upstream = serve(scripted, [json_head + b"{}"], [gzip_head + chunked(b"x")])

    assert not isinstance(get(upstream).iter_bytes(), EventBody)
    assert not isinstance(get(upstream).iter_bytes(), EventBody)
