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
from typing import Protocol, runtime_checkable

from .errors import ApiError

IDLE = object()
_END = object()


@runtime_checkable
class Receiver(Protocol):
    def receive(self, timeout: float) -> bytes | None:
        """What arrives within `timeout` seconds: None if nothing did, b"" once the body ended."""


def pace(
    chunks: Iterator[bytes],
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
    With `joined`, the chunks already waiting when the caller asks are handed on as one piece:
    a caller that fell behind catches up in one write instead of one per chunk.
    """
    if isinstance(chunks, Receiver):
        yield from _pace_inline(chunks, idle_every, max_seconds, on_stop)
        return
    inbox: queue.Queue = queue.Queue(maxsize=256)
    stopped = threading.Event()

    def read() -> None:
        try:
            for chunk in chunks:
                if stopped.is_set():
                    return
                inbox.put(chunk)
            inbox.put(_END)
        except BaseException as exc:  # handed to the caller's thread, which decides
            inbox.put(exc)

    threading.Thread(target=read, name="upstream-reader", daemon=True).start()
    ends_at = time.monotonic() + max_seconds
    try:
        while True:
            wait = min(idle_every, ends_at - time.monotonic())
            if wait <= 0:
                raise ApiError(
                    "upstream_timeout", f"The answer took longer than {max_seconds:g} s."
                )
            try:
                item = inbox.get(timeout=wait)
            except queue.Empty:
                yield IDLE
                continue
            batch = [item]
            while joined and not inbox.empty():  # one reader, and nothing comes after the end
                batch.append(inbox.get_nowait())
            end = batch.pop() if batch[-1] is _END or isinstance(batch[-1], BaseException) else None
            if batch:
                yield batch[0] if len(batch) == 1 else b"".join(batch)
            if end is _END:
                return
            if end is not None:
                raise end
    finally:
        stopped.set()
        on_stop()
        _drain(inbox)


def _pace_inline(
    body: Receiver, idle_every: float, max_seconds: float, on_stop: Callable[[], None]
) -> Iterator[bytes | object]:
    """`pace` without a reader thread; a receive already hands on all that waits, as one piece."""
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


def _drain(inbox: queue.Queue) -> None:
    """Unblocks a reader waiting to put into a full queue, so that it can see `stopped`."""
    try:
        while True:
            inbox.get_nowait()
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
