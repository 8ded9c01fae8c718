"""The service behind Debian's nginx, configured as `docs/deploy.md` says (issue 5): streams pass
unbuffered, `/callChatGPT` and the OpenAI SDK work, and with `TRUST_PROXY_HEADERS=1` the client's
own address reaches the limiter of two instances that share Redis.

nginx runs the first ```nginx block of the deploy guide, with the test's loopback ports for itself
and the two instances and without TLS: what the guide tells people to run is what is tested.
Clients are told apart by their source address (any 127.x.y.z reaches 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from tests.conftest import REPO, Service
from tests.fake_upstream import DEFAULT_REPLY, FakeUpstream, stream
from tests.test_rate_limits import Services, client_from

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

DEPLOY_GUIDE = REPO / "docs" / "deploy.md"
DOCUMENTED_INSTANCES = ("127.0.0.1:8000", "127.0.0.1:8001")
START_TIMEOUT = 10.0
FIRST_EVENT_TIMEOUT = 5.0
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
MAIN_CONFIG = """\
{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/site.conf;
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def site_config(guide: str, instance_ports: tuple[int, int], port: int) -> str:
    """The guide's nginx block on loopback ports, without TLS (nothing else is changed)."""
    found = re.search(r"```nginx\n(.*?)```", guide, re.S)
    assert found, f"no ```nginx block in {DEPLOY_GUIDE}"
    lines = []
    for line in found.group(1).splitlines():
        directive = line.strip()
        if directive.startswith(("listen [::]", "ssl_")):
            continue
        if directive.startswith("listen 443"):
            line = f"    listen 127.0.0.1:{port};"
        elif directive.startswith("listen 80"):
            line = f"    listen 127.0.0.1:{_free_port()};"
        lines.append(line)
    config = "\n".join(lines) + "\n"
    for documented, instance_port in zip(DOCUMENTED_INSTANCES, instance_ports, strict=True):
        assert f"server {documented};" in config, f"the guide's upstream lost {documented}"
        config = config.replace(f"server {documented};", f"server 127.0.0.1:{instance_port};")
    return config


class Nginx:
    """Debian's nginx in the foreground, with its files in `root`."""

    def __init__(self, binary: str, root: Path, site: str, port: int) -> None:
        self.binary = binary
        self.root = root
        self.port = port
        # As root, nginx's workers would run as `nobody`, who cannot enter pytest's directories.
        user = "user root;" if os.geteuid() == 0 else ""
        (root / "site.conf").write_text(site)
        (root / "nginx.conf").write_text(MAIN_CONFIG.format(user=user, root=root))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        return [self.binary, "-p", f"{self.root}/", "-c", str(self.root / "nginx.conf")]

    def start(self) -> Nginx:
        checked = subprocess.run(
            [*self.command, "-e", str(self.root / "error.log"), "-t"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, (
            f"nginx refuses the guide's configuration:\n{checked.stderr}"
        )
        self._process = subprocess.Popen(
            [*self.command, "-e", str(self.root / "error.log"), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{self.error_log()}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)  # fast shutdown: open streams are cut
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def instances(
    upstream_server: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    redis_session: RedisServer,
) -> Iterator[tuple[Service, Service]]:
    """Two instances behind one proxy, sharing Redis; three requests a minute per client."""
    started = Services(upstream_server, tmp_path_factory)
    yield started.start_pair(
        TRUST_PROXY_HEADERS="1", RATE_LIMIT="3/minute", RATELIMIT_STORAGE_URI=redis_session.url
    )
    started.stop_all()


@pytest.fixture(scope="module")
def nginx(instances: tuple[Service, Service]) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if binary is None:
        pytest.fail(
            "nginx not found: install Debian's nginx package (`make test` does when run as root)",
            pytrace=False,
        )
    port = _free_port()
    guide = DEPLOY_GUIDE.read_text(encoding="utf-8")
    site = site_config(guide, (instances[0].port, instances[1].port), port)
    with tempfile.TemporaryDirectory(prefix="chatproxy-nginx-") as root:
        front = Nginx(binary, Path(root), site, port).start()
        yield front
        front.stop()


@pytest.fixture(autouse=True)
def fresh_limits(redis_server: RedisServer) -> None:
    """Every test starts with the shared counters empty."""


def test_a_chat_stream_through_nginx_delivers_its_first_event_before_the_upstream_finishes(
    nginx: Nginx, upstream: FakeUpstream
) -> None:
    upstream.enqueue(stream(chunks=["first", " second"], hang_after=1))  # then silence
    events: list[tuple[str, dict]] = []
    started = time.monotonic()
    with client_from("127.0.0.11") as client:
        response = client.post(
            f"{nginx.url}/chat", json={**CHAT, "stream": True}, stream=True, timeout=10
        )
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "delta":
                    break
            assert time.monotonic() - started < FIRST_EVENT_TIMEOUT, events
        arrived = time.monotonic() - started
        upstream_request = upstream.requests[-1]
        still_streaming = upstream_request.closed_at is None
        response.close()

    assert [name for name, _ in events] == ["start", "delta"]
    assert events[-1][1] == {"content": "first"}
    assert arrived < FIRST_EVENT_TIMEOUT
    assert still_streaming, "the upstream had finished: the event may have been held back"
    # Leaving reaches the upstream through nginx and the service.
    assert upstream.wait_for_close(upstream_request, timeout=5) is not None


def test_call_chatgpt_works_through_nginx(nginx: Nginx) -> None:
    with client_from("127.0.0.12") as client:
        asked = client.get(f"{nginx.url}/callChatGPT", params={"input": "hi"}, timeout=10)
        posted = client.post(f"{nginx.url}/callChatGPT", data={"input": "hi"}, timeout=10)

    for response in (asked, posted):
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/plain")
        assert response.text == DEFAULT_REPLY


def test_the_openai_sdk_works_through_nginx(nginx: Nginx) -> None:
    client = openai.OpenAI(
        base_url=f"{nginx.url}/v1", api_key="unused-client-key", max_retries=0, timeout=20
    )
    try:
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
        pieces = client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT["messages"], stream=True
        )
        streamed = "".join(
            chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices
        )
    finally:
        client.close()

    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert streamed == DEFAULT_REPLY


def test_the_client_address_reaches_the_limiter_through_nginx(
    nginx: Nginx, instances: tuple[Service, Service]
) -> None:
    url = f"{nginx.url}/v1/models"
    with client_from("127.0.0.21") as client, client_from("127.0.0.22") as other_client:
        spent = [client.get(url, timeout=10) for _ in range(6)]
        # Claiming to be the other client changes nothing: nginx appends the real address.
        forged = client.get(url, headers={"X-Forwarded-For": "127.0.0.22"}, timeout=10)
        other = other_client.get(url, timeout=10)

    assert [response.status_code for response in spent] == [200] * 3 + [429] * 3
    assert spent[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert int(spent[-1].headers["Retry-After"]) >= 1
    assert forged.status_code == 429
    assert other.status_code == 200
    assert other.headers["X-RateLimit-Remaining"] == "2"
    for instance in instances:  # nginx spread the requests over both: one limit held
        assert '"GET /v1/models' in instance.log_text(), instance.log_tail()
