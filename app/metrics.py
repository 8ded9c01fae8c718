"""Prometheus metrics: what the service counts, and the text `GET /metrics` serves.

One process keeps its samples in prometheus_client's default registry. Several gunicorn workers
each write theirs to files in `PROMETHEUS_MULTIPROC_DIR` (gunicorn.conf.py makes a fresh one at
start when `WEB_CONCURRENCY` is above 1), and `/metrics`, whichever worker answers it, adds up
the files of every process. prometheus_client chooses between the two when it is imported, from
that variable, so it is read here once, the same way.

Labels stay few and bounded: routes are URL rules (`/v1/{path}`), never raw paths; no label
names a client.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

disable_created_metrics()  # `_created` series exist in one process only: the same text in both
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
# Seconds: from a cached answer on a nearby model to a long generation on a slow one.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HTTP_REQUESTS = Counter(
    "chatproxy_http_requests",
    "Requests answered, counted when the response (a stream included) ends.",
    ["route", "method", "status"],
)
UPSTREAM_LATENCY = Histogram(
    "chatproxy_upstream_latency_seconds",
    "Upstream attempts: seconds from sending the request to the upstream's status line "
    "(status is the upstream's HTTP status, or 'error' when it gave none); _count counts attempts.",
    ["status"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "chatproxy_time_to_first_token_seconds",
    "Streams: seconds from the first upstream attempt to the first piece of the answer relayed.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_RETRIES = Counter(
    "chatproxy_upstream_retries",
    "Upstream attempts made again after a failure (reason: the status, or connect_error).",
    ["reason"],
)
KEY_FAILOVERS = Counter(
    "chatproxy_upstream_key_failovers",
    "Moves to another key of the pool after the upstream refused one (reason: its status, or "
    "insufficient_quota).",
    ["reason"],
)
TOKENS = Counter(
    "chatproxy_tokens",
    "Tokens written to the usage ledger, by model and kind (prompt or completion).",
    ["model", "kind"],
)
COST = Counter(
    "chatproxy_cost_usd",
    "US dollars written to the usage ledger, by model (MODEL_PRICES or the built-in prices).",
    ["model"],
)
STREAMS_IN_PROGRESS = Gauge(
    "chatproxy_streams_in_progress",
    "Answers being streamed to clients now, by endpoint (/chat, /callChatGPT, /v1).",
    ["endpoint"],
    multiprocess_mode="livesum",
)
RATE_LIMIT_REFUSALS = Counter(
    "chatproxy_rate_limit_refusals",
    "Requests refused before reaching the upstream, by the error code they got "
    "(rate_limit_exceeded or budget_exceeded).",
    ["code"],
)


@functools.cache
def labelled(metric: MetricWrapperBase, *values: str) -> MetricWrapperBase:
    """`metric.labels(*values)`, looked up once per set of values: `labels()` checks the values
    and takes a lock on every call (~2 µs measured)."""
    return metric.labels(*values)


def _registry() -> CollectorRegistry:
    if MULTIPROCESS_DIR is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    return registry


_EXPOSED = _registry()


def exposition(accept: str | None) -> tuple[bytes, str]:
    """Every metric in the format the scraper asks for (Prometheus text, or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_EXPOSED), content_type


def mark_process_dead(pid: int) -> None:
    """Drops a dead worker's live gauges (its counters stay: the totals must not go back)."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)
