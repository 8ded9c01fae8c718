"""Relaying a body that arrives slowly: wake up while the upstream is silent.

A generator that blocks on the upstream socket cannot notice that its own client left, nor write
a heartbeat. `pace` yields `IDLE` whenever nothing arrived for a while, so the caller can send
`: ping` — whose write fails once the client is gone — or check the client's socket directly.
A body that can be waited on with a timeout (`Receiver`, an upstream event stream) is read in
the caller's own thread; any other iterator is read in a background thread (a greenlet under
gevent).
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from .errors import ApiError

IDLE = object()
_END = object()


class Receiver(Protocol):
    def receive(self, timeout: float) -> bytes | None:
        """What arrives within `timeout` seconds: None if nothing did, b"" once the body ended."""


def pace(
    chunks: Iterator[bytes] | Receiver,
    *,
    idle_every: float,
    max_seconds: float,
    on_stop: Callable[[], None],
    joined: bool = False,
) -> Iterator[bytes | object]:
    """Yields each chunk as it arrives, and `IDLE` after every `idle_every` seconds of silence.

    Raises `ApiError("upstream_timeout")` once the whole relay has lasted `max_seconds`, and
    re-raises in the caller's thread what reading the upstream raised. `on_stop` (which must
    wake a blocked reader, e.g. by closing the upstream connection) runs when the caller stops.
    With `joined`, the chunks of a plain iterator already waiting when the caller asks are handed
    on as one piece (a `Receiver` hands on all that waits anyway): a caller that fell behind
    catches up in one write instead of one per chunk.
    """
    reader = None if hasattr(chunks, "receive") else _ReaderThread(chunks, joined)
    body = reader or chunks
    ends_at = time.monotonic() + max_seconds
    try:
        while True:
            wait = min(idle_every, ends_at - time.monotonic())
            if wait <= 0:
                raise ApiError(
                    "upstream_timeout", f"The answer took longer than {max_seconds:g} s."
                )
            piece = body.receive(wait)
            if piece is None:
                yield IDLE
            elif piece:
                yield piece
            else:
                return
    finally:
        on_stop()
        if reader is not None:
            reader.stop()


class _ReaderThread:
    """A plain iterator as a `Receiver`: read in a background thread (a greenlet under gevent)
    and handed over through a queue."""

    def __init__(self, chunks: Iterator[bytes], joined: bool):
        self._inbox: queue.Queue = queue.Queue(maxsize=256)
        self._stopped = threading.Event()
        self._joined = joined
        self._end: object = None  # `_END` or the exception behind the pieces handed on
        threading.Thread(
            target=self._read, args=(chunks,), name="upstream-reader", daemon=True
        ).start()

    def _read(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if self._stopped.is_set():
                    return
                if chunk:
                    self._inbox.put(chunk)
            self._inbox.put(_END)
        except BaseException as exc:  # handed to the caller's thread, which decides
            self._inbox.put(exc)

    def receive(self, timeout: float) -> bytes | None:
        if self._end is None:
            try:
                batch = [self._inbox.get(timeout=timeout)]
            except queue.Empty:
                return None
            while self._joined and not self._inbox.empty():  # one reader: nothing after the end
                batch.append(self._inbox.get_nowait())
            if batch[-1] is _END or isinstance(batch[-1], BaseException):
                self._end = batch.pop()
            if batch:
                return b"".join(batch)
        if self._end is _END:
            return b""
        raise self._end

    def stop(self) -> None:
        """Lets the reader see that nobody reads any more, also when it waits on a full queue."""
        self._stopped.set()
        try:
            while True:
                self._inbox.get_nowait()
        except queue.Empty:
            pass


def client_gone(environ: dict) -> bool:
    """True when the client closed its connection (seen without reading its data).

    Works under gunicorn, which puts the client socket in the WSGI environment; elsewhere it
    answers False and the next write is what notices.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        # poll, not select: select() refuses descriptors past 1,023, which a worker holding
        # hundreds of streams (a client and an upstream socket each) soon reaches.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def cut_connection(environ: dict) -> None:
    """Ends the response without its closing bytes, so the client sees a broken body, not a
    complete one. Under gunicorn the socket is shut; elsewhere raising is what cuts it."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        raise ConnectionAbortedError("response cut short after an upstream failure")
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
