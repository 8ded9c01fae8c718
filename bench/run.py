"""The benchmark behind `make bench`: this service against the upstream directly and nginx.

Core 0 runs the target (nginx, or the service under its shipped `gunicorn.conf.py`); core 1 runs
the fake upstream, the load generators and this script. Scenarios, each run `BENCH_RUNS` times
(3; the targets interleaved within a run so that a noisy moment hits them alike):

1. latency    non-stream `POST /v1/chat/completions`, concurrency 1, wrk, 2,000 requests
2. throughput the same at concurrency 64 for 15 s, wrk: requests/s, errors, target CPU
3. streams    100, 500 and 1,000 concurrent streams of 40 chunks every 50 ms (bench/streams.py)
              through nginx and `/v1`: completed, first chunk, chunk lag, peak memory
4. chat       the same streams through `/chat` with `messages` (stateless) and `message` (stored)

The service is started afresh for each stream run (so that its peak memory is that run's) and
for each latency/throughput run. Summaries go to `bench/results/results.json`, then
`bench/report.py` writes `report.md` and `chart.png` beside it. No per-request data is kept.

`BENCH_QUICK=1`: one run, 1,000 requests, 5 s at concurrency 64, 100 and 1,000 streams.
`BENCH_SCENARIOS=latency,throughput,streams,chat` picks scenarios; `BENCH_OUT=dir` writes
elsewhere; `BENCH_REF=HEAD` (any commit) serves a snapshot of that commit instead of the work
tree, so that edits made during a run cannot change what is measured;
`BENCH_SERVICE_<NAME>=value` sets `<NAME>` for the service (see targets.Service).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report
from targets import (
    BENCH,
    PYTHON,
    REPO,
    MemorySampler,
    Nginx,
    Service,
    Upstream,
    clean_environment,
    pinned,
    snapshot,
    work_tree_commit,
)

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
RUNS = int(os.environ.get("BENCH_RUNS", "1" if QUICK else "3"))
SCENARIOS = os.environ.get("BENCH_SCENARIOS", "latency,throughput,streams,chat").split(",")
OUT = Path(os.environ.get("BENCH_OUT", BENCH / "results"))
REF = os.environ.get("BENCH_REF", "")
LATENCY_REQUESTS = 1000 if QUICK else 2000
WARMUP_REQUESTS = 300
THROUGHPUT_SECONDS = 5 if QUICK else 15
THROUGHPUT_CONNECTIONS = 64
STREAM_SIZES = (100, 1000) if QUICK else (100, 500, 1000)
STREAM_DEADLINE = 60.0  # seconds for one stream run, however slow the target
WRK_GRACE = 30.0  # seconds past its own -d before wrk is killed
PATH = "/v1/chat/completions"
# Stream targets: (name, path, streams.py --kind).
STREAM_TARGETS = [
    ("direct", PATH, "v1"),
    ("nginx", PATH, "v1"),
    ("service /v1", PATH, "v1"),
]
CHAT_TARGETS = [
    ("service /chat messages", "/chat", "chat-messages"),
    ("service /chat message", "/chat", "chat-message"),
]


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cores() -> tuple[int | None, int | None]:
    """(target core, load core): 0 and 1, or no pinning on a one-core machine."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or not shutil.which("taskset"):
        say("warning: fewer than 2 cores (or no taskset): nothing is pinned")
        return None, None
    return available[0], available[1]


TARGET_CORE, LOAD_CORE = cores()


def wrk(port: int, connections: int, seconds: float, max_requests: int | None = None) -> dict:
    """One wrk run against `PATH`; its JSON summary (bench/wrk/post.lua)."""
    env = clean_environment()
    if max_requests:
        env["BENCH_MAX_REQUESTS"] = str(max_requests)
    command = pinned(
        LOAD_CORE,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "wrk" / "post.lua"),
            f"http://127.0.0.1:{port}{PATH}",
        ],
    )
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        if max_requests:
            for line in process.stderr:  # ends at EOF, when wrk ends on its own (-d)
                if line.strip() == "BENCH_LIMIT":
                    process.send_signal(signal.SIGINT)  # wrk prints its summary and exits
                    break
        out, _ = process.communicate(timeout=seconds + WRK_GRACE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            summary = json.loads(line.removeprefix("BENCH_JSON "))
            summary["errors"] = sum(
                summary[k]
                for k in (
                    "connect_errors",
                    "read_errors",
                    "write_errors",
                    "status_errors",
                    "timeouts",
                )
            )
            summary["rps"] = summary["requests"] / max(summary["duration_us"] / 1e6, 1e-9)
            return summary
    raise RuntimeError(f"wrk gave no summary (exit {process.returncode}): {out[-500:]}")


def streams(port: int, path: str, kind: str, count: int) -> dict:
    """One bench/streams.py run; its JSON summary."""
    command = pinned(
        LOAD_CORE,
        [
            PYTHON,
            str(BENCH / "streams.py"),
            "--port",
            str(port),
            "--path",
            path,
            "--kind",
            kind,
            "--streams",
            str(count),
            "--deadline",
            str(STREAM_DEADLINE),
        ],
    )
    done = subprocess.run(
        command,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=STREAM_DEADLINE + WRK_GRACE,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"streams.py failed: {done.stderr[-1000:]}")
    return json.loads(done.stdout)


class Bench:
    def __init__(self, scratch: Path, tree: Path):
        self.scratch = scratch
        self.tree = tree
        self.services = 0
        self.upstream = Upstream(LOAD_CORE)
        self.nginx = Nginx(self.upstream.port, TARGET_CORE, scratch / "nginx")
        self.results: dict = {"latency": {}, "throughput": {}, "streams": {}}

    def close(self) -> None:
        self.nginx.stop()
        self.upstream.stop()

    def service(self) -> Service:
        self.services += 1
        root = self.scratch / f"service-{self.services}"
        return Service(self.upstream.port, TARGET_CORE, root, self.tree)

    def note(self, scenario: str, key: str, target: str, summary: dict) -> None:
        table = self.results[scenario]
        if key:
            table = table.setdefault(key, {})
        table.setdefault(target, []).append(summary)

    # 1 and 2 ----------------------------------------------------------------------------------

    def requests_round(self, run: int) -> None:
        """Scenarios 1 and 2 on each target, the service started afresh."""
        service = self.service()
        try:
            targets = [
                ("direct", self.upstream.port, self.upstream.tree),
                ("nginx", self.nginx.port, self.nginx.tree),
                ("service", service.port, service.tree),
            ]
            for name, port, tree in targets:
                if "latency" in SCENARIOS:
                    wrk(port, 1, 30, WARMUP_REQUESTS)
                    summary = wrk(port, 1, 120, LATENCY_REQUESTS)
                    self.note("latency", "", name, summary)
                    say(
                        f"latency    run {run} {name:8} p50 {summary['p50_us'] / 1000:.3f} ms"
                        f"  p99 {summary['p99_us'] / 1000:.3f} ms  ({summary['requests']} requests)"
                    )
                if "throughput" in SCENARIOS:
                    wrk(port, THROUGHPUT_CONNECTIONS, 2)
                    before = tree.cpu_seconds()
                    summary = wrk(port, THROUGHPUT_CONNECTIONS, THROUGHPUT_SECONDS)
                    summary["cpu_s"] = tree.cpu_seconds() - before
                    self.note("throughput", "", name, summary)
                    say(
                        f"throughput run {run} {name:8} {summary['rps']:.0f} req/s"
                        f"  errors {summary['errors']}  target CPU {summary['cpu_s']:.2f} s"
                    )
        finally:
            service.stop()

    # 3 and 4 ----------------------------------------------------------------------------------

    def streams_round(self, size: int, run: int) -> None:
        targets = STREAM_TARGETS if "streams" in SCENARIOS else STREAM_TARGETS[:1]
        if "chat" in SCENARIOS:
            targets = targets + CHAT_TARGETS
        for name, path, kind in targets:
            service = self.service() if name.startswith("service") else None
            try:
                if service is not None:
                    port, tree = service.port, service.tree
                    wrk(port, 4, 10, 100)  # warm-up: first requests, pool, database
                    streams(port, path, kind, 5)
                elif name == "nginx":
                    port, tree = self.nginx.port, self.nginx.tree
                else:
                    port, tree = self.upstream.port, self.upstream.tree
                before = tree.cpu_seconds()
                with MemorySampler(tree) as memory:
                    summary = streams(port, path, kind, size)
                summary["cpu_s"] = tree.cpu_seconds() - before
                summary["peak_rss_mb"] = memory.peak_rss / 2**20
                summary["peak_pss_mb"] = memory.peak_pss / 2**20
            finally:
                if service is not None:
                    service.stop()
            self.note("streams", str(size), name, summary)
            ttfc, lag = summary["ttfc_ms"], summary["lag_ms"]
            say(
                f"streams {size:5} run {run} {name:22} completed {summary['completed']:4}"
                f"  first chunk p50 {_ms(ttfc['50'])} p99 {_ms(ttfc['99'])}"
                f"  lag p99 {_ms(lag['99'])}  RSS {summary['peak_rss_mb']:.0f} MB"
                f"  CPU {summary['cpu_s']:.2f} s"
            )


def _ms(value: float | None) -> str:
    return "   -   " if value is None else f"{value:7.1f}"


def versions() -> dict:
    def first_line(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0] if lines else ""

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "python": platform.python_version(),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "cpu": cpu,
        "cores": os.cpu_count(),
    }


def check_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if not shutil.which(tool)]
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)}: install Debian's package(s) "
            f"(`apt-get install {' '.join(missing)}`), or run `make bench` as root"
        )


def main() -> None:
    check_tools()
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {LOAD_CORE})  # this script and its sampler stay off the target
    started = time.monotonic()
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": QUICK,
        "runs": RUNS,
        "latency_requests": LATENCY_REQUESTS,
        "throughput_seconds": THROUGHPUT_SECONDS,
        "throughput_connections": THROUGHPUT_CONNECTIONS,
        "stream_sizes": list(STREAM_SIZES),
        "scenarios": SCENARIOS,
        "pinned": {"target": TARGET_CORE, "load": LOAD_CORE},
        "service_overrides": sorted(k for k in os.environ if k.startswith("BENCH_SERVICE_")),
        "load_average_start": os.getloadavg(),
        **versions(),
    }
    say(f"{'quick' if QUICK else 'full'} benchmark, {RUNS} run(s); results in {OUT}")
    with tempfile.TemporaryDirectory(prefix="chatproxy-bench-") as scratch:
        if REF:
            tree, meta["commit"] = snapshot(REF, Path(scratch) / "tree")
        else:
            tree, meta["commit"] = REPO, work_tree_commit()
        bench = Bench(Path(scratch), tree)
        try:
            if {"latency", "throughput"} & set(SCENARIOS):
                for run in range(1, RUNS + 1):
                    bench.requests_round(run)
            if {"streams", "chat"} & set(SCENARIOS):
                for size in STREAM_SIZES:
                    for run in range(1, RUNS + 1):
                        bench.streams_round(size, run)
        finally:
            bench.close()
    meta["load_average_end"] = os.getloadavg()
    meta["seconds"] = round(time.monotonic() - started)
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, **bench.results}
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, OUT)
    say(f"done in {meta['seconds']} s: {OUT / 'report.md'}, {OUT / 'chart.png'}")


if __name__ == "__main__":
    main()
