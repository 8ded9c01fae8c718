"""Stopping and starting as a container does: SIGTERM while streams are in progress, idle
keep-alive connections, and the image's own start command and health check.

On SIGTERM the service stops accepting, lets streams run through the grace period
(`GUNICORN_GRACEFUL_TIMEOUT` less a margin), then ends the rest — an `error` event on `/chat`,
an `error:` line on `/callChatGPT`, a cut on `/v1` — and the ledger holds every answer, whole or
partial, once the process has exited.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
import yaml

from app import db
from tests.conftest import REPO, Service, _clean_env, _free_port
from tests.fake_upstream import FAKE_KEY, FakeUpstream, stream
from tests.test_upstream_faults import Received, read_sse

pytest_plugins = ["tests.postgres", "tests.redis_server"]

CLIENT_TIMEOUT = 30
SLOW_WORDS = [f"w{n} " for n in range(8)]  # 8 pieces, 0.25 s apart: about 2 s
ENDLESS_WORDS = [f"w{n} " for n in range(60)]  # 60 pieces, 0.25 s apart: 15 s
INTERVAL = 0.25
TOKEN = "tok-container-0123456789"


def start_stream(service: Service, path: str, body: dict) -> requests.Response:
    return requests.post(
        f"{service.url}{path}",
        json=body,
        headers={"Connection": "close"},
        stream=True,
        timeout=CLIENT_TIMEOUT,
    )


def first_event(items, name: str) -> Received:
    for item in items:
        if item.name == name:
            return item
    raise AssertionError(f"no {name!r} event")


def ledger_rows(service: Service) -> list[dict]:
    engine = sa.create_engine(service.env["DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.select(db.ledger).order_by(db.ledger.c.id)).all()
        return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def refuses_connections(service: Service, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", service.port), timeout=0.5).close()
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_lets_a_stream_in_progress_finish(service_factory, upstream: FakeUpstream) -> None:
    service = service_factory(GUNICORN_GRACEFUL_TIMEOUT="10")  # a grace period of 8 s
    upstream.enqueue(stream(chunks=SLOW_WORDS, interval=INTERVAL))
    response = start_stream(service, "/chat", {"message": "tell me", "stream": True})
    items = read_sse(response)
    first_event(items, "start")

    stopped_at = time.monotonic()
    os.kill(service.pid, signal.SIGTERM)
    rest = [item for item in items if item.name != ":"]

    assert refuses_connections(service, within=3), "still accepting after SIGTERM"
    assert [item.name for item in rest] == ["delta"] * len(SLOW_WORDS) + ["done"]
    assert "".join(item.json()["content"] for item in rest[:-1]) == "".join(SLOW_WORDS)
    assert service.wait_for_exit(timeout=10) == 0
    assert time.monotonic() - stopped_at < 6  # left as soon as the stream was done
    [row] = ledger_rows(service)
    assert (row["endpoint"], row["partial"], row["estimated"]) == ("/chat", False, False)
    assert row["completion_tokens"] == len(SLOW_WORDS)


def test_streams_past_the_grace_period_end_as_their_surface_promises(
    service_factory, upstream: FakeUpstream
) -> None:
    service = service_factory(GUNICORN_GRACEFUL_TIMEOUT="3")  # a grace period of 1.5 s
    for _ in range(3):
        upstream.enqueue(stream(chunks=ENDLESS_WORDS, interval=INTERVAL))
    chat = start_stream(service, "/chat", {"message": "go on", "stream": True})
    legacy = start_stream(service, "/callChatGPT", {"input": "go on", "stream": True})
    v1 = start_stream(
        service,
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "go on"}],
            "stream": True,
        },
    )
    upstream.wait_for_requests(3)
    time.sleep(3 * INTERVAL)  # a few pieces of each went out

    os.kill(service.pid, signal.SIGTERM)
    with ThreadPoolExecutor(3) as pool:
        chat_items = pool.submit(lambda: [i for i in read_sse(chat) if i.name != ":"])
        legacy_text = pool.submit(lambda: legacy.text)
        v1_outcome = pool.submit(_read_until_cut, v1)
    chat_items, legacy_text, (v1_body, v1_cut) = (
        chat_items.result(),
        legacy_text.result(),
        v1_outcome.result(),
    )

    assert chat_items[-1].name == "error", chat_items
    assert chat_items[-1].json()["error"]["code"] == "shutting_down"
    assert [item.name for item in chat_items[:-1]].count("delta") >= 2
    assert legacy_text.startswith("w0 w1"), legacy_text
    assert legacy_text.endswith("\n") and "\nerror: The service is restarting" in legacy_text
    assert v1_cut, "a /v1 stream ended by the stop must be cut, not closed as if complete"
    assert b'"code":"shutting_down"' in v1_body and b"[DONE]" not in v1_body
    assert service.wait_for_exit(timeout=10) == 0
    rows = ledger_rows(service)
    assert sorted(row["endpoint"] for row in rows) == [
        "/callChatGPT",
        "/chat",
        "/v1/chat/completions",
    ]
    assert all(row["partial"] and row["completion_tokens"] > 0 for row in rows), rows
    assert "grace period over: ended 3 answer(s)" in service.log_text()
    assert "Error handling request" not in service.log_text()


def _read_until_cut(response: requests.Response) -> tuple[bytes, bool]:
    body = b""
    try:
        for piece in response.iter_content(chunk_size=None):
            body += piece
    except requests.exceptions.ChunkedEncodingError:
        return body, True
    return body, False


def test_idle_keep_alive_connections_do_not_hold_the_stop(service_factory) -> None:
    service = service_factory(GUNICORN_GRACEFUL_TIMEOUT="30", GUNICORN_KEEPALIVE="75")
    with requests.Session() as session:  # keeps its connection open between requests
        assert session.get(f"{service.url}/healthz", timeout=5).status_code == 200
        assert session.get(f"{service.url}/usage", timeout=5).status_code == 200
        stopped_at = time.monotonic()
        os.kill(service.pid, signal.SIGTERM)
        assert service.wait_for_exit(timeout=10) == 0
    assert time.monotonic() - stopped_at < 3
    assert "Socket error" not in service.log_text()  # a clean end, not a failed read


# --- The container's start command, outside Docker ------------------------------------------


def dockerfile_runtime() -> dict:
    """What the runtime stage of the Dockerfile copies, sets and runs."""
    text = (REPO / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime") :]
    instructions = re.sub(r"\\\n\s*", " ", runtime).splitlines()
    env, copied, cmd, health = {}, [], None, None
    for line in instructions:
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
        elif word == "COPY" and "--from" not in rest:
            copied.extend(rest.split()[:-1])
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word == "HEALTHCHECK":
            health = json.loads(rest[rest.index("CMD") + 3 :])
    return {"env": env, "copied": copied, "cmd": cmd, "health": health}


@pytest.fixture
def image_layout(tmp_path: Path) -> Path:
    """The files the image holds in its WORKDIR, copied as the Dockerfile copies them."""
    for name in dockerfile_runtime()["copied"]:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    (tmp_path / "instance").mkdir()
    page = tmp_path / "templates" / "index.html"
    marked = "{% block body %}\n<!-- from the image layout -->"  # inside the page's own block
    page.write_text(page.read_text().replace("{% block body %}", marked))
    return tmp_path


class ImageProcess:
    """The image's start command run in `layout`, with `environment` over the image's own."""

    def __init__(self, layout: Path, environment: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = layout / "service.log"
        self.env = {
            **_clean_env(),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the image's venv
            "HOME": str(layout),
            "PYTHONPATH": str(layout),  # as the image's /srv/chatgpt-proxy
            "GUNICORN_GRACEFUL_TIMEOUT": "2",
            **environment,
            "BIND": f"127.0.0.1:{self.port}",
        }
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                dockerfile_runtime()["cmd"],
                cwd=layout,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"not healthy; log:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


def test_the_container_start_command_serves_from_the_image_layout(
    image_layout: Path, upstream: FakeUpstream
) -> None:
    runtime = dockerfile_runtime()
    assert runtime["cmd"] == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert runtime["env"]["BIND"] == "0.0.0.0:8000"
    assert runtime["env"]["PYTHONPATH"] == "/srv/chatgpt-proxy"
    image = ImageProcess(
        image_layout,
        {
            "ACCESS_TOKENS": f"ops:{TOKEN}",
            "OPENAI_API_KEY": FAKE_KEY,
            "OPENAI_BASE_URL": upstream.base_url,
        },
    )
    try:
        image.wait_healthy()
        page = requests.get(f"{image.url}/", timeout=5)
        guarded = requests.get(f"{image.url}/chat/conversations", timeout=5)
        allowed = requests.get(
            f"{image.url}/chat/conversations",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        health = runtime["health"]
        health_check = subprocess.run(
            [sys.executable, *health[1:]], env=image.env, timeout=10, capture_output=True
        )
    finally:
        exit_code = image.stop()

    assert page.status_code == 200 and "from the image layout" in page.text
    assert guarded.status_code == 401
    assert allowed.status_code == 200
    assert health[0] == "python" and health_check.returncode == 0, health_check.stderr
    assert exit_code == 0
    assert (image_layout / "instance" / "chatproxy.db").exists()  # where the volume goes


def compose_environment(values: dict[str, str]) -> dict[str, str]:
    """The app's environment in docker-compose.yml, `${VAR:-default}` filled from `values`."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    app = compose["services"]["app"]
    assert set(compose["services"]) == {"app", "redis", "postgres"}
    assert {"redis", "postgres"} <= set(app["depends_on"])

    def fill(text: str) -> str:
        return re.sub(
            r"\$\{(\w+)(?::([-?])([^}]*))?\}",
            lambda m: values.get(m[1]) or (m[3] if m[2] == "-" else _missing(m[1])),
            str(text),
        )

    return {name: fill(value) for name, value in app["environment"].items()}


def _missing(name: str) -> str:
    raise AssertionError(f"docker-compose.yml requires {name}")


def test_the_compose_stack_runs_with_redis_and_postgresql(
    image_layout: Path, upstream: FakeUpstream, redis_server, postgres
) -> None:
    with pytest.raises(AssertionError, match="requires ACCESS_TOKENS"):
        compose_environment({})
    with pytest.raises(AssertionError, match="requires POSTGRES_PASSWORD"):
        compose_environment({"ACCESS_TOKENS": f"ops:{TOKEN}"})
    environment = compose_environment(
        {"ACCESS_TOKENS": f"ops:{TOKEN}", "OPENAI_API_KEY": FAKE_KEY, "POSTGRES_PASSWORD": "pw"}
    )
    assert environment["RATELIMIT_STORAGE_URI"] == "redis://redis:6379/0"
    assert environment["DATABASE_URL"] == "postgresql://chatproxy:pw@postgres:5432/chatproxy"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grace = compose["services"]["app"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) > int(environment["GUNICORN_GRACEFUL_TIMEOUT"])
    # The same settings, with this machine's Redis and PostgreSQL in place of the containers'.
    environment.update(
        RATELIMIT_STORAGE_URI=redis_server.url,
        DATABASE_URL=postgres.new_database(),
        OPENAI_BASE_URL=upstream.base_url,
        GUNICORN_GRACEFUL_TIMEOUT="2",
    )
    image = ImageProcess(image_layout, environment)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        image.wait_healthy()
        ready = requests.get(f"{image.url}/readyz", timeout=5).json()
        answer = requests.post(
            f"{image.url}/chat", json={"message": "hi"}, headers=auth, timeout=10
        )
        usage = requests.get(f"{image.url}/usage", headers=auth, timeout=5).json()
        metrics = requests.get(f"{image.url}/metrics", headers=auth, timeout=5)
    finally:
        exit_code = image.stop()

    assert ready["status"] == "ok", ready
    assert ready["checks"]["rate_limit_storage"] == "ok"
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-RateLimit-Limit"] == "60"
    assert usage["total"]["requests"] == 1
    assert "chatproxy_http_requests_total" in metrics.text
    assert exit_code == 0
    lines = image.log.read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)  # LOG_FORMAT=json in compose
    assert image.log.read_text().count("Booting worker") == 2  # WEB_CONCURRENCY=2
