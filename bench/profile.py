"""Where the service's time goes: py-spy on the gunicorn worker during scenarios 1 and 3.

Starts the fake upstream (core 1) and the service (core 0) as `run.py` does, attaches
`py-spy record` to the worker (it pauses the worker for each sample: `--nonblocking` lost half
of them here, and biased the rest toward quiet moments) while

- `latency`: wrk sends non-stream `POST /v1/chat/completions` at concurrency 1;
- `streams`: 1,000 concurrent `/v1` streams of 40 chunks every 50 ms;
- `chat`: the same 1,000 streams through `/chat` with `message` (stored conversations),

and summarises the samples: CPU per request or per chunk (from `/proc`), the share of samples
in which each function is on the stack (inclusive) or running itself (self). The summary goes to
`bench/results/profile.md`; the raw stacks (py-spy's collapsed format, which flame graph tools
read) stay in a temporary directory, or in `BENCH_PROFILE_KEEP=dir`, and are never committed.

    .venv/bin/python bench/profile.py [latency streams chat]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from run import LOAD_CORE, REF, TARGET_CORE, say, streams, wrk
from targets import BENCH, PYTHON, REPO, Service, Upstream, pinned, snapshot, work_tree_commit

OUT = Path(os.environ.get("BENCH_OUT", BENCH / "results"))
RATE = 250  # samples a second
LATENCY_SECONDS = 15
STREAMS = 1000
TOP = 25
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(found).exists():
        sys.exit("bench: py-spy is missing: `.venv/bin/pip install -r bench/requirements.txt`")
    return found


def record(pid: int, seconds: float, output: Path, fmt: str) -> subprocess.Popen:
    return subprocess.Popen(
        pinned(
            LOAD_CORE,
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--duration",
                str(int(seconds)),
                "--format",
                fmt,
                "--output",
                str(output),
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def short(frame: str) -> str:
    """`function (path:line)` → `function (package/module.py)`, without the line."""
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.split("/main/", 1)[-1]
    return f"{match['function']} ({path.lstrip('/')})"


# gevent's native threadpool (its DNS resolver runs there) waits on a lock that py-spy does not
# recognise as idle: those samples are dropped, they cost no CPU.
IDLE_LEAVES = ("_Condition.wait (gevent/_threading.py)", "Queue.get (gevent/_threading.py)")


def read_stacks(path: Path) -> Counter:
    stacks: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not (stack and count.isdigit()):
            continue
        frames = tuple(short(frame) for frame in stack.split(";") if frame.strip())
        if any(frame.startswith(IDLE_LEAVES) for frame in frames[-3:]):
            continue
        stacks[frames] += int(count)
    return stacks


# Where a sample's time goes: the deepest frame that matches one of these (substrings of
# `function (path)`) names its part; a sample matching none goes to the first generic part
# whose frames it has, from the leaf up.
PARTS = [
    (
        "upstream call: requests + urllib3 (send, read the status and headers)",
        ["UpstreamClient.send ("],
    ),
    (
        "upstream body: urllib3 + http.client reads",
        ["UpstreamAnswer.iter_bytes", "UpstreamAnswer.read", "EventBody."],
    ),
    ("closing the upstream response", ["UpstreamAnswer.close"]),
    ("ledger: SQLAlchemy + SQLite insert / budget", ["Ledger."]),
    ("conversation storage (/chat message)", ["Conversations.", "(app/services/turns.py)"]),
    ("rate limit: app/limits.py on `limits`", ["(limits/", "(app/limits.py)"]),
    ("auth: client name", ["(app/auth.py)"]),
    (
        "request checks: path, JSON body, parameters",
        [
            "_validated_path",
            "_checked_document",
            "(app/jsonbody.py)",
            "(app/blueprints/params.py)",
            "chat (app/blueprints/chat.py)",
            "_stateless (app/blueprints/chat.py)",
        ],
    ),
    (
        "usage meter + SSE/JSON parsing of chunks",
        [
            "(app/services/meter.py)",
            "EventReader.",
            "_chunk (app/services/completions.py)",
            "(app/services/context.py)",
            "ChatStream._read",
            "ChatStream._delivered",
        ],
    ),
    ("our SSE events (json.dumps per event)", ["event (app/sse.py)"]),
    (
        "relay pacing: pace() (heartbeat timer; reader greenlet + queue for non-event bodies)",
        ["(app/relay.py)"],
    ),
    (
        "response headers: filter, CORS, security",
        [
            "client_headers",
            "_security_headers",
            "(flask_cors/",
            "process_response (flask/",
        ],
    ),
]
GENERIC = [
    ("Flask + Werkzeug request/response plumbing", ["(flask/", "(werkzeug/"]),
    ("gunicorn: HTTP parsing, socket writes, worker loop", ["(gunicorn/"]),
]
HUB = "gevent hub: I/O readiness, timers, greenlet switches"


def part_of(frames: tuple[str, ...]) -> str:
    """The part of the work a sample belongs to (see PARTS)."""
    for rules in (PARTS, GENERIC):
        for frame in reversed(frames):
            for name, needles in rules:
                if any(needle in frame for needle in needles):
                    return name
    return HUB if any("(gevent/" in frame for frame in frames) else "other"


def summary(name: str, stacks: Counter, cpu_s: float, units: int, unit: str) -> list[str]:
    total = sum(stacks.values())
    inclusive: Counter = Counter()
    own: Counter = Counter()
    for frames, count in stacks.items():
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    per_unit = cpu_s / units * 1e6 if units else 0.0
    parts: Counter = Counter()
    for frames, count in stacks.items():
        parts[part_of(frames)] += count
    lines = [
        f"## {name}",
        "",
        f"{units:,} {unit}s, worker CPU {cpu_s:.2f} s = **{per_unit:,.0f} µs per {unit}**; "
        f"{total:,} samples while running (idle waits are not sampled). µs/{unit} below is "
        f"the share of samples × the CPU per {unit}.",
        "",
        f"| part of the work | % | µs/{unit} |",
        "| --- | --- | --- |",
    ]
    for part, count in parts.most_common():
        share = count / total if total else 0
        lines.append(f"| {part} | {share * 100:.1f} | {share * per_unit:,.0f} |")
    lines += [
        "",
        f"| inclusive % | µs/{unit} | function (on the stack) |",
        "| --- | --- | --- |",
    ]
    for frame, count in _interesting(inclusive):
        share = count / total if total else 0
        lines.append(f"| {share * 100:.1f} | {share * per_unit:,.0f} | `{frame}` |")
    lines += ["", f"| self % | µs/{unit} | function (running itself) |", "| --- | --- | --- |"]
    for frame, count in own.most_common(15):
        share = count / total if total else 0
        lines.append(f"| {share * 100:.1f} | {share * per_unit:,.0f} | `{frame}` |")
    return [*lines, ""]


def _interesting(inclusive: Counter) -> list[tuple[str, int]]:
    """The functions worth naming: skip the frames every sample has (gevent, gunicorn loop)."""
    total = max(inclusive.values(), default=0)
    chosen = [
        (frame, count)
        for frame, count in inclusive.most_common()
        if count < 0.97 * total and not frame.startswith(("<module>", "run (gevent"))
    ]
    return chosen[:TOP]


def main() -> None:
    scenarios = sys.argv[1:] or ["latency", "streams", "chat"]
    keep = os.environ.get("BENCH_PROFILE_KEEP")
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {LOAD_CORE})
    with tempfile.TemporaryDirectory(prefix="chatproxy-profile-") as scratch:
        root = Path(keep) if keep else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        if REF:
            tree, commit = snapshot(REF, Path(scratch) / "tree")
        else:
            tree, commit = REPO, work_tree_commit()
        lines = [
            "# Profile of the service's hot path",
            "",
            f"py-spy {RATE} Hz on the gunicorn worker (pinned to core {TARGET_CORE}), commit "
            f"`{commit}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            "Produced by `bench/profile.py`.",
            "",
        ]
        upstream = Upstream(LOAD_CORE)
        try:
            for scenario in scenarios:
                service = Service(upstream.port, TARGET_CORE, root / f"service-{scenario}", tree)
                try:
                    lines += profile(scenario, service, root)
                finally:
                    service.stop()
        finally:
            upstream.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "profile.md").write_text("\n".join(lines))
    say(f"profile summary: {OUT / 'profile.md'}")


def profile(scenario: str, service: Service, root: Path) -> list[str]:
    (worker,) = service.worker_pids()
    tree = service.tree
    wrk(service.port, 4, 10, 200)  # warm-up
    raw = root / f"{scenario}.txt"
    if scenario == "latency":
        seconds = LATENCY_SECONDS
        spy = record(worker, seconds + 1, raw, "raw")
        before = tree.cpu_seconds()
        result = wrk(service.port, 1, seconds)
        cpu = tree.cpu_seconds() - before
        spy.wait(seconds + 30)
        units, unit, name = result["requests"], "request", "Scenario 1: /v1 non-stream, c=1"
    else:
        path, kind = (
            ("/chat", "chat-message") if scenario == "chat" else ("/v1/chat/completions", "v1")
        )
        streams(service.port, path, kind, 5)  # warm-up
        seconds = 12
        spy = record(worker, seconds, raw, "raw")
        before = tree.cpu_seconds()
        result = streams(service.port, path, kind, STREAMS)
        cpu = tree.cpu_seconds() - before
        spy.wait(seconds + 30)
        units, unit = result["chunks"], "chunk"
        name = f"Scenario {'4' if scenario == 'chat' else '3'}: {STREAMS:,} streams via {path}"
        name += " (message, stored)" if scenario == "chat" else ""
    if not raw.exists():
        return [f"## {name}", "", "py-spy wrote nothing (is ptrace allowed here?)", ""]
    say(f"{scenario}: {units:,} {unit}s, {cpu:.2f} s CPU")
    return summary(name, read_stacks(raw), cpu, units, unit)


if __name__ == "__main__":
    main()
