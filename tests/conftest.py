"""Fixtures: the fake upstream, the real app under gunicorn, and an OpenAI SDK client.

The app runs as it does in production, in its own gunicorn process, so that tests see real
sockets, real worker processes and real logs; the fake upstream runs inside the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import openai
import pytest
import requests

from tests.fake_upstream import FAKE_KEY, FakeUpstream

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# A secret counts as leaked when this many of its characters in a row show up (a cut key leaks).
LEAK_FRAGMENT = 12


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: needs /usr/bin/chromium")


def base_env(upstream: FakeUpstream) -> dict[str, str]:
    """The configuration every test service starts from: the fake upstream, short timeouts."""
    return {
        "OPENAI_API_KEY": FAKE_KEY,
        "OPENAI_BASE_URL": upstream.base_url,
        "UPSTREAM_RETRIES": "2",
        "UPSTREAM_TIMEOUT": "10",
        "UPSTREAM_CONNECT_TIMEOUT": "2",
        "LOG_LEVEL": "DEBUG",
    }


def service_env(
    upstream: FakeUpstream, workdir: Path, overrides: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """`base_env`, then what keeps tests independent, then `overrides` (None removes one).

    Each service gets its own database, a rate limit that a module's tests sharing one
    service cannot reach (tests of the default limit pass `RATE_LIMIT=None`), and a short
    graceful stop, which otherwise waits on idle keep-alive connections of finished tests.
    """
    env = {
        **base_env(upstream),
        "DATABASE_URL": f"sqlite:///{workdir / 'chatproxy.db'}",
        "RATE_LIMIT": "10000/minute",
        "GUNICORN_GRACEFUL_TIMEOUT": "2",
        **(overrides or {}),
    }
    return {name: value for name, value in env.items() if value is not None}


class Service:
    """The app under gunicorn on a free loopback port, in `workdir` so that no `.env` leaks in."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.env = {**_clean_env(), "HOME": str(workdir), **env}
        self.log_path = workdir / "service.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(REPO / "gunicorn.conf.py"),
            "--pythonpath",
            str(REPO),
            "-b",
            f"127.0.0.1:{self.port}",
            "wsgi:app",
        ]

    def launch(self) -> Service:
        """Start the process without waiting: for tests of a start that must fail."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def start(self) -> Service:
        """Start the process and wait until `/healthz` answers; fail with the log's tail if not."""
        self.launch()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self._process.poll() is None:
            if self._healthy():
                return self
            time.sleep(0.1)
        exit_code = self._process.poll()
        self.stop()
        reason = (
            f"exited with code {exit_code}"
            if exit_code is not None
            else f"was not healthy within {START_TIMEOUT:.0f} s"
        )
        raise RuntimeError(f"service {reason}; log tail:\n{self.log_tail()}")

    def wait_for_exit(self, timeout: float = START_TIMEOUT) -> int:
        """The exit code of a process expected to stop by itself (a refused configuration)."""
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"service still running after {timeout} s; log tail:\n{self.log_tail()}"
            ) from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group if gunicorn lingers."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False


def assert_no_secrets(text: str, *secrets: str) -> None:
    """Fail, showing where, if the upstream key or another secret (an access token) is in `text`."""
    for secret in (FAKE_KEY, *secrets):
        where = _find_fragment(text, secret)
        if where is not None:
            context = text[max(0, where - 80) : where + 80]
            pytest.fail(f"secret {secret[:6]}... found at offset {where}: ...{context!r}...")


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake upstream, clean before and after the test so no queued behaviour leaks on."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture
def service_factory(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Service]]:
    """Start services with `base_env` plus overrides (None removes a variable); all stop after."""
    services: list[Service] = []

    def start(**overrides: str | None) -> Service:
        workdir = tmp_path_factory.mktemp("service")
        service = Service(service_env(upstream, workdir, overrides), workdir)
        services.append(service)
        return service.start()

    yield start
    for service in services:
        service.stop()


@pytest.fixture(scope="module")
def service(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One default service shared by a module's tests that need no special configuration."""
    workdir = tmp_path_factory.mktemp("service")
    started = Service(service_env(upstream_server, workdir), workdir).start()
    yield started
    started.stop()


@pytest.fixture
def sdk(service: Service) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the proxy, without its own retries so tests count attempts."""
    client = openai.OpenAI(
        base_url=f"{service.url}/v1", api_key="unused-client-key", max_retries=0, timeout=20
    )
    yield client
    client.close()


def _clean_env() -> dict[str, str]:
    """Only what a process needs to run, so the developer's own OPENAI_* settings stay out."""
    inherited = {name: os.environ[name] for name in ("PATH", "LANG") if name in os.environ}
    return {**inherited, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find_fragment(text: str, secret: str) -> int | None:
    """Where the first run of `LEAK_FRAGMENT` characters of `secret` occurs in `text`."""
    width = min(len(secret), LEAK_FRAGMENT)
    found = (text.find(secret[i : i + width]) for i in range(len(secret) - width + 1))
    return min((position for position in found if position >= 0), default=None)


def open_raw_request(
    service: Service,
    method: str,
    target: str,
    body: bytes = b"",
    token: str | None = None,
    timeout: float = 5,
) -> socket.socket:
    """A raw HTTP/1.1 request whose answer the test reads, so that it decides exactly when the
    connection closes (a client leaving mid-stream)."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=timeout)
    sock.sendall(head.encode() + body)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What arrived until `marker` did; fails if the connection ends first."""
    received = b""
    while marker not in received:
        piece = sock.recv(4096)
        assert piece, f"the stream ended before {marker!r}: {received!r}"
        received += piece
    return received


def send_chat(passthrough, body: dict, client: str = "alice"):
    """`body` as a client's `POST /v1/chat/completions`, through the passthrough service itself
    (no server in between); the upstream's answer, its body not read yet."""
    return passthrough.send(
        "POST",
        "chat/completions",
        "",
        {"Content-Type": "application/json"},
        json.dumps(body).encode(),
        client,
    )
