"""A throwaway Redis server for the rate-limit tests: Debian's `redis-server` on 127.0.0.1.

Test modules load this with `pytest_plugins = ["tests.redis_server"]`. Once per session it
starts `redis-server` on a free loopback port, with nothing saved to disk, and stops it at the
end. `redis_server` hands it to a test running and empty; a test may `stop()` it to play an
outage and `start()` it again on the same port. Without the binary the tests fail: a shared
limit that was never shared is not tested (`make test` installs the `redis-server` package).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

BINARY = "redis-server"
START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """`redis-server` owned by this test session, on one port for its whole life."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.log_path = workdir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> RedisServer:
        """Start it, on the same port as before, and wait until it answers PING."""
        if self.running:
            return self
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        log_text = self.log_path.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log_text[-2000:]}")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL): clients see connection refused from now on."""
        if not self.running:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def flush(self) -> None:
        self.client().flushall()


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    binary = shutil.which(BINARY) or shutil.which(BINARY, path="/usr/bin:/usr/sbin")
    if binary is None:
        pytest.fail(
            "redis-server not found: install Debian's redis-server package "
            "(`make test` does when run as root)",
            pytrace=False,
        )
    with tempfile.TemporaryDirectory(prefix="chatproxy-redis-") as workdir:
        server = RedisServer(binary, Path(workdir)).start()
        yield server
        server.stop()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's Redis, running and empty at the start of the test."""
    redis_session.start()
    redis_session.flush()
    return redis_session
