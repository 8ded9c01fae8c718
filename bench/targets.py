"""The processes under test and their bookkeeping: the fake upstream, nginx, the service.

Each is started on 127.0.0.1 with a free port, pinned with `taskset`, and stopped by the pid this
module started (never by name). `ProcessTree` reads a process and its descendants from `/proc`:
resident memory (RSS, and PSS, which counts pages shared after gunicorn's fork once) and CPU.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# The environment of every child: no outbound proxy may sit between loopback processes.
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def snapshot(ref: str, into: Path) -> tuple[Path, str]:
    """The files of commit `ref` (read with `git archive`, the work tree untouched) in `into`,
    and the commit's short hash."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return into, commit


def work_tree_commit() -> str:
    """HEAD's short hash, marked when the work tree has uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "app", "gunicorn.conf.py")
    return f"{head} + uncommitted changes" if dirty else head


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}


def pinned(core: int | None, command: list[str]) -> list[str]:
    return command if core is None else ["taskset", "-c", str(core), *command]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout:g} s")


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Signals the process we started, SIGKILLs it (and its children) if it lingers."""
    if process is None or process.poll() is not None:
        return
    children = ProcessTree(process.pid).descendants()
    process.send_signal(sig)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)
    for pid in children:  # a worker left behind by a killed master
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ProcessTree:
    """A process and its descendants, read from /proc."""

    def __init__(self, pid: int):
        self.pid = pid

    def descendants(self) -> list[int]:
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.pid]
        while todo:
            for child in parents.get(todo.pop(), ()):
                found.append(child)
                todo.append(child)
        return found

    def pids(self) -> list[int]:
        return [self.pid, *self.descendants()]

    def rss_bytes(self, pids: list[int]) -> int:
        total = 0
        for pid in pids:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
            except (OSError, IndexError):
                pass
        return total

    def pss_bytes(self, pids: list[int]) -> int:
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            except OSError:
                pass
        return total

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError):
                pass
        return total / CLOCK_TICKS


class MemorySampler:
    """Peak RSS and PSS of a process tree, sampled every `every` seconds while running."""

    def __init__(self, tree: ProcessTree, every: float = 0.1, pss_every: int = 5):
        self.tree = tree
        self.every = every
        self.pss_every = pss_every  # PSS is dearer to read: every n-th sample
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        count = 0
        while True:
            pids = self.tree.pids()
            self.peak_rss = max(self.peak_rss, self.tree.rss_bytes(pids))
            if count % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, self.tree.pss_bytes(pids))
            count += 1
            if self._stop.wait(self.every):
                pids = self.tree.pids()
                self.peak_rss = max(self.peak_rss, self.tree.rss_bytes(pids))
                self.peak_pss = max(self.peak_pss, self.tree.pss_bytes(pids))
                return


class Upstream:
    """bench/upstream.py on `core`."""

    def __init__(self, core: int | None):
        self.port = free_port()
        self.process = subprocess.Popen(
            pinned(core, [PYTHON, str(BENCH / "upstream.py"), "--port", str(self.port)]),
            env=clean_environment(),
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.process.stdout.readline().strip() != "ready":
            stop(self.process)
            raise RuntimeError("the fake upstream did not start")
        self.tree = ProcessTree(self.process.pid)

    def stop(self) -> None:
        stop(self.process)


NGINX_CONFIG = """\
{user}
worker_processes 1;
worker_rlimit_nofile 16384;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream fake_openai {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake_openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx as a plain `proxy_pass` to the upstream (proxy_buffering off), on `core`."""

    def __init__(self, upstream_port: int, core: int | None, root: Path):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = root / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        config.write_text(
            NGINX_CONFIG.format(user=user, root=root, upstream_port=upstream_port, port=self.port)
        )
        self.process = subprocess.Popen(
            pinned(core, [nginx, "-p", str(root), "-c", str(config), "-g", "daemon off;"]),
            env=clean_environment(),
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)
        self.tree = ProcessTree(self.process.pid)

    def stop(self) -> None:
        stop(self.process)


class Service:
    """This service: `gunicorn -c gunicorn.conf.py wsgi:app` from `tree` (the work tree, or a
    snapshot of a commit), on `core`.

    Everything it reads is set here (a developer's `.env` cannot change the run): the fake
    upstream, a throwaway SQLite database, `LOG_LEVEL=WARNING`, a rate limit no run reaches.
    `BENCH_SERVICE_<NAME>=value` in the environment passes `<NAME>=value` on, to compare
    settings (e.g. `BENCH_SERVICE_GUNICORN_WORKER_CLASS=gthread`).
    """

    def __init__(self, upstream_port: int, core: int | None, root: Path, tree: Path = REPO):
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.root = root
        env = {
            k: v
            for k, v in clean_environment().items()
            if not k.startswith(("GUNICORN_", "UPSTREAM_")) and k != "WEB_CONCURRENCY"
        }
        env.update(
            BIND=f"127.0.0.1:{self.port}",
            OPENAI_API_KEY="sk-bench-not-a-real-key-0000",
            OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
            OPENAI_MODEL="gpt-4o-mini",
            ALLOWED_MODELS="",
            SYSTEM_PROMPT="",
            ACCESS_TOKENS="",
            ALLOW_OPEN_ACCESS="0",
            CORS_ORIGINS="*",
            TRUST_PROXY_HEADERS="0",
            RATE_LIMIT="1000000/minute",
            DAILY_TOKEN_BUDGET="0",
            RATELIMIT_STORAGE_URI="memory://",
            DATABASE_URL=f"sqlite:///{root}/bench.db",
            V1_ALLOWED_PATHS="",
            MODEL_PRICES="",
            LOG_LEVEL="WARNING",
            LOG_FORMAT="text",
            PYTHONPATH=str(tree),  # this tree's `app`, whatever the venv has installed
        )
        env.update(
            {
                key.removeprefix("BENCH_SERVICE_"): value
                for key, value in os.environ.items()
                if key.startswith("BENCH_SERVICE_")
            }
        )
        self.log = open(root / "service.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            pinned(
                core, [str(Path(PYTHON).parent / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]
            ),
            cwd=tree,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.tree = ProcessTree(self.process.pid)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        url = f"http://127.0.0.1:{self.port}/healthz"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited at start: see {self.root}/service.log")
            try:
                with opener.open(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the service did not answer /healthz within {START_TIMEOUT:g} s")

    def worker_pids(self) -> list[int]:
        return self.tree.descendants()

    def stop(self) -> None:
        stop(self.process, signal.SIGINT)  # gunicorn's quick shutdown: no graceful wait
        self.log.close()
