"""Starting the service and configuring it (CONTRACT §1–§2): refusals of unusable values, the
open-relay guard, running without a key, `.env`, and the outbound proxy."""

from __future__ import annotations

import gc
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import REPO, Service, assert_no_secrets, service_env
from tests.fake_upstream import DEFAULT_REPLY, FakeUpstream

RUN_TIMEOUT = 30
# (variable, value, secrets the refusal must not print)
UNUSABLE = [
    ("UPSTREAM_TIMEOUT", "abc", ()),
    ("UPSTREAM_TIMEOUT", "-1", ()),
    ("UPSTREAM_RETRIES", "x", ()),
    ("RATE_LIMIT", "lots", ()),
    ("OPENAI_BASE_URL", "ftp://x", ()),
    ("OPENAI_BASE_URL", "not a url", ()),
    ("ACCESS_TOKENS", "a:", ()),
    ("ACCESS_TOKENS", ":tok-secret-0001", ("tok-secret-0001",)),
    (
        "ACCESS_TOKENS",
        "a:tok-secret-0002,a:tok-secret-0003",
        ("tok-secret-0002", "tok-secret-0003"),
    ),
    ("ACCESS_TOKENS", "a:tok-secret-0004,b:tok-secret-0004", ("tok-secret-0004",)),
    ("LOG_LEVEL", "loud", ()),
    ("LOG_FORMAT", "xml", ()),
    ("MAX_REQUEST_BYTES", "0", ()),
    ("MODEL_PRICES", "/nonexistent.json", ()),
]
UNUSABLE_IDS = [f"{variable}={value}" for variable, value, _ in UNUSABLE]
LAUNCHERS = {
    "gunicorn": lambda service: service.command,
    "flask": lambda service: [sys.executable, "-m", "flask", "--app", "app", "routes"],
}


def run(service: Service, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command that is expected to stop by itself, stdout and stderr kept apart."""
    process = subprocess.Popen(
        command,
        cwd=service.workdir,
        env={**service.env, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {RUN_TIMEOUT} s:\n{stdout}{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def refused_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start printed, after checking that it is the only one."""
    assert result.returncode != 0, f"started anyway: {result.stdout}{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert result.stdout.strip() == "", f"unexpected stdout:\n{result.stdout}"
    return lines[0]


@pytest.fixture(scope="module")
def refusals(
    upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], subprocess.CompletedProcess[str]]:
    """Every unusable value started under gunicorn and under the Flask CLI, all at once."""
    jobs = {}
    for (variable, value, _), case in zip(UNUSABLE, UNUSABLE_IDS, strict=True):
        for launcher, command in LAUNCHERS.items():
            workdir = tmp_path_factory.mktemp("refused")
            service = Service(service_env(upstream_server, workdir, {variable: value}), workdir)
            jobs[(launcher, case)] = (service, command(service))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {job: pool.submit(run, *args) for job, args in jobs.items()}
        return {job: future.result() for job, future in futures.items()}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize(("variable", "value", "secrets"), UNUSABLE, ids=UNUSABLE_IDS)
def test_an_unusable_value_stops_the_start_with_one_line_naming_it(
    refusals, launcher: str, variable: str, value: str, secrets: tuple[str, ...]
) -> None:
    line = refused_line(refusals[(launcher, f"{variable}={value}")])

    assert variable in line
    assert "Traceback" not in line
    assert_no_secrets(line, *secrets)


def test_an_unusable_value_in_dotenv_stops_the_start(
    upstream_server: FakeUpstream, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("LOG_FORMAT=xml\n")
    service = Service(service_env(upstream_server, tmp_path), tmp_path)

    line = refused_line(run(service, service.command))

    assert "LOG_FORMAT" in line


# --- the open-relay guard and BIND ---------------------------------------------------------------


class EnvBoundService(Service):
    """Bound by `BIND` alone: no `-b` on the command line. Reached through 127.0.0.1 only."""

    def __init__(self, env, workdir: Path, host: str = "0.0.0.0") -> None:
        super().__init__(env, workdir)
        self.env["BIND"] = f"{host}:{self.port}"

    @property
    def command(self) -> list[str]:
        command = super().command
        at = command.index("-b")
        return command[:at] + command[at + 2 :]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.10"])
def test_a_public_bind_without_access_tokens_is_refused(
    upstream_server: FakeUpstream, tmp_path: Path, host: str
) -> None:
    env = service_env(upstream_server, tmp_path, {"ALLOW_OPEN_ACCESS": "0", "LOG_LEVEL": "INFO"})
    service = EnvBoundService(env, tmp_path, host)

    result = run(service, service.command)

    assert result.returncode != 0
    output = result.stdout + result.stderr
    refusal = [line for line in output.splitlines() if "ACCESS_TOKENS" in line]
    assert len(refusal) == 1, output
    assert "ALLOW_OPEN_ACCESS" in refusal[0]
    assert "Traceback" not in output
    assert not listening(service.port)


@pytest.mark.parametrize(
    "overrides",
    [{"ALLOW_OPEN_ACCESS": "1"}, {"ACCESS_TOKENS": "ops:tok-ops-0123456789"}],
    ids=["ALLOW_OPEN_ACCESS=1", "ACCESS_TOKENS"],
)
def test_a_public_bind_starts_with_tokens_or_open_access_allowed(
    upstream_server: FakeUpstream, tmp_path: Path, overrides: dict[str, str]
) -> None:
    service = EnvBoundService(service_env(upstream_server, tmp_path, overrides), tmp_path)
    try:
        service.start()
        assert requests.get(f"{service.url}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        stop(service)
    assert_no_secrets(service.log_text(), "tok-ops-0123456789")


def test_b_on_the_command_line_wins_over_bind(
    upstream_server: FakeUpstream, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        bind_port = sock.getsockname()[1]
    env = service_env(upstream_server, tmp_path, {"BIND": f"0.0.0.0:{bind_port}"})
    service = Service(env, tmp_path)  # `-b 127.0.0.1:<port>` on its command line
    try:
        service.start()  # a public BIND with no ACCESS_TOKENS would have been refused
        assert requests.get(f"{service.url}/healthz", timeout=5).status_code == 200
        assert not listening(bind_port)
    finally:
        stop(service)


# --- no OPENAI_API_KEY ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyless(upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("keyless")
    env = service_env(upstream_server, workdir, {"OPENAI_API_KEY": None, "WEB_CONCURRENCY": "2"})
    service = Service(env, workdir).start()
    yield service
    stop(service)


def stop(service: Service) -> None:
    """Stop a service once no response object keeps a connection to it alive (gunicorn waits
    for open keep-alive connections before it exits)."""
    gc.collect()
    service.stop()


def upstream_key_flag(document: object) -> bool | None:
    """The boolean that says whether an upstream key is set, wherever `/readyz` puts it."""
    if isinstance(document, dict):
        for name, value in document.items():
            if "key" in name.lower() and isinstance(value, bool):
                return value
            found = upstream_key_flag(value)
            if found is not None:
                return found
    return None


def test_without_a_key_the_service_logs_one_warning(keyless: Service) -> None:
    requests.get(f"{keyless.url}/healthz", timeout=5)  # both workers have booted by now

    lines = [line for line in keyless.log_text().splitlines() if "OPENAI_API_KEY" in line]

    assert len(lines) == 1, keyless.log_tail()
    assert "WARNING" in lines[0].upper(), f"not logged as a warning: {lines[0]!r}"


@pytest.mark.parametrize("path", ["/", "/qa"])
def test_without_a_key_the_pages_are_served(keyless: Service, path: str) -> None:
    response = requests.get(f"{keyless.url}{path}", timeout=5)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")


def test_without_a_key_the_probes_answer_and_readyz_says_no_key(keyless: Service) -> None:
    assert requests.get(f"{keyless.url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{keyless.url}/readyz", timeout=5)

    assert ready.status_code == 200
    assert upstream_key_flag(ready.json()) is False, ready.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/chat", {"message": "hi"}),
        ("POST", "/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": []}),
        ("GET", "/v1/models", None),
    ],
)
def test_without_a_key_json_endpoints_answer_503_upstream_not_configured(
    keyless: Service, upstream: FakeUpstream, method: str, path: str, body: dict | None
) -> None:
    response = requests.request(method, f"{keyless.url}{path}", json=body, timeout=5)

    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("upstream_not_configured", "upstream_error")
    assert upstream.requests == []


@pytest.mark.parametrize("stream", ["0", "1"])
def test_without_a_key_callchatgpt_answers_503_in_text(
    keyless: Service, upstream: FakeUpstream, stream: str
) -> None:
    response = requests.get(
        f"{keyless.url}/callChatGPT", params={"input": "hi", "stream": stream}, timeout=5
    )

    assert response.status_code == 503
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text.startswith("error: ")
    assert "\n" not in response.text.rstrip("\n")
    assert upstream.requests == []


# --- .env ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dotenv_service(upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory):
    """`.env` names a model and a system prompt; the real environment names another model."""
    workdir = tmp_path_factory.mktemp("dotenv")
    (workdir / ".env").write_text(
        "# written by the test\n"
        "OPENAI_MODEL=model-from-dotenv\n"
        'SYSTEM_PROMPT="Prompt from dotenv."\n'
        "ALLOWED_MODELS=model-from-*\n"
    )
    env = service_env(upstream_server, workdir, {"ALLOWED_MODELS": "model-from-dotenv,gpt-4o"})
    service = Service(env, workdir).start()
    yield service
    stop(service)


def test_dotenv_in_the_working_directory_is_loaded(
    dotenv_service: Service, upstream: FakeUpstream
) -> None:
    response = requests.post(f"{dotenv_service.url}/chat", json={"message": "hi"}, timeout=10)

    assert response.status_code == 200, response.text
    [received] = upstream.requests
    assert received.json["model"] == "model-from-dotenv"
    assert received.json["messages"][0] == {"role": "system", "content": "Prompt from dotenv."}


def test_the_real_environment_wins_over_dotenv(
    dotenv_service: Service, upstream: FakeUpstream
) -> None:
    refused = requests.post(
        f"{dotenv_service.url}/chat",
        json={"message": "hi", "model": "model-from-elsewhere"},
        timeout=10,
    )
    allowed = requests.post(
        f"{dotenv_service.url}/chat", json={"message": "hi", "model": "gpt-4o"}, timeout=10
    )

    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert allowed.status_code == 200, allowed.text


def test_the_real_environment_wins_over_dotenv_for_the_default_model(
    upstream_server: FakeUpstream, upstream: FakeUpstream, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("OPENAI_MODEL=model-from-dotenv\n")
    env = service_env(upstream_server, tmp_path, {"OPENAI_MODEL": "model-from-env"})
    service = Service(env, tmp_path).start()
    try:
        status = requests.get(
            f"{service.url}/callChatGPT", params={"input": "hi"}, timeout=10
        ).status_code
    finally:
        stop(service)

    assert status == 200
    [received] = upstream.requests
    assert received.json["model"] == "model-from-env"


# --- the outbound proxy ------------------------------------------------------------------------------

HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
    "te", "trailer", "transfer-encoding", "upgrade",
}  # fmt: skip


class ForwardProxy:
    """A plain-HTTP forward proxy on 127.0.0.1 that records each request and forwards it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ForwardProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.proxy.requests.append((self.command, self.path))
        target = urlsplit(self.path)  # a proxy receives the absolute form
        if target.scheme != "http" or target.hostname != "127.0.0.1":
            self.send_error(502, "this test proxy forwards only to http://127.0.0.1")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=15)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            upstream.request(self.command, path, body=body or None, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def started(service_factory):
    """`service_factory`, with the test's responses collected before its services stop."""
    yield service_factory
    gc.collect()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy().start()
    yield proxy
    proxy.stop()


def test_http_proxy_carries_the_upstream_calls(
    started, upstream: FakeUpstream, forward_proxy: ForwardProxy
) -> None:
    service = started(HTTP_PROXY=forward_proxy.url)

    text = requests.get(f"{service.url}/callChatGPT", params={"input": "hi"}, timeout=10)
    chat = requests.post(f"{service.url}/chat", json={"message": "hi"}, timeout=10)

    assert (text.status_code, text.text) == (200, DEFAULT_REPLY)
    assert chat.status_code == 200, chat.text
    expected = f"{upstream.base_url}/chat/completions"
    assert forward_proxy.requests == [("POST", expected), ("POST", expected)]
    assert len(upstream.requests) == 2


def test_no_proxy_bypasses_the_proxy(
    started, upstream: FakeUpstream, forward_proxy: ForwardProxy
) -> None:
    service = started(HTTP_PROXY=forward_proxy.url, NO_PROXY="127.0.0.1")

    response = requests.get(f"{service.url}/callChatGPT", params={"input": "hi"}, timeout=10)

    assert (response.status_code, response.text) == (200, DEFAULT_REPLY)
    assert forward_proxy.requests == []
    assert len(upstream.requests) == 1
