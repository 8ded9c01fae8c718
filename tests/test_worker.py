"""The gevent worker's own parts: the client socket's writes, and a master that does not load
the app.

gunicorn's master imports `app` (for the settings) and `app.worker` (the worker class); the app
itself is built in the worker, so the master must not import Flask, SQLAlchemy and the rest.
"""

from __future__ import annotations

import subprocess
import sys

import gevent
import gevent.socket
import pytest

from app.worker import ClientSocket
from tests.conftest import REPO

MASTER_IMPORTS = "import app, app.logs, app.metrics, app.worker"
APP_PACKAGES = ("alembic", "flask", "flask_cors", "requests", "sqlalchemy", "werkzeug")


def client_and_peer() -> tuple[ClientSocket, gevent.socket.socket]:
    """A connected TCP pair on loopback: our client socket, and the peer reading it."""
    with gevent.socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = ClientSocket()
        client.connect(listener.getsockname())
        peer, _ = listener.accept()
    return client, peer


def read_all(peer: gevent.socket.socket, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        piece = peer.recv(65536)
        if not piece:
            break
        received += piece
    return bytes(received)


def test_the_master_imports_neither_flask_nor_sqlalchemy() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys; {MASTER_IMPORTS}; print(' '.join(sys.modules))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not [name for name in loaded if name.split(".")[0] in APP_PACKAGES]


def test_a_write_larger_than_the_socket_buffers_arrives_whole() -> None:
    client, peer = client_and_peer()
    data = bytes(range(256)) * 32768  # 8 MiB: the kernel takes it in many pieces
    with client, peer:
        reader = gevent.spawn(read_all, peer, len(data))
        gevent.sleep(0.05)  # let the buffers fill before the reader drains them
        client.sendall(data)
        assert reader.get(timeout=30) == data


def test_small_writes_arrive_in_order() -> None:
    client, peer = client_and_peer()
    pieces = [b"%X\r\n%s\r\n" % (n, b"x" * n) for n in range(200)]
    with client, peer:
        for piece in pieces:
            client.sendall(piece)
        client.sendall(memoryview(b"end"))
        assert read_all(peer, sum(map(len, pieces)) + 3) == b"".join(pieces) + b"end"


def test_writing_to_a_client_that_left_raises_as_sendall_does() -> None:
    client, peer = client_and_peer()
    with client:
        peer.close()
        with pytest.raises(OSError):  # EPIPE or ECONNRESET, whichever the kernel reports first
            for _ in range(100):
                client.sendall(b"x" * 65536)
                gevent.sleep(0.01)
