"""`GET /metrics` (CONTRACT §3): the counters move as requests are made, read with
prometheus_client's own parser, in one process and added up over several worker processes.

A request is counted when its response ends, just after the client has its last byte, so the
tests poll the scrape until the expected value shows (or time runs out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Service
from tests.fake_upstream import FakeUpstream, auth_failed, openai_error, stream
from tests.test_upstream_faults import POOL, read_sse

TIMEOUT = 10
SETTLE = 5.0
PROM_TOKEN = "tok-prometheus-0123456789"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(service: Service, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(f"{service.url}/metrics", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= set(series))


def settles(
    check: Callable[[Samples], bool], service: Service, token: str | None = None
) -> Samples:
    """The first scrape for which `check` holds; the last one if none does within SETTLE s."""
    deadline = time.monotonic() + SETTLE
    while True:
        samples = scrape(service, token)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def chat(service: Service, **body) -> requests.Response:
    response = requests.post(
        f"{service.url}/chat",
        json={"message": "two words", **body},
        headers={"Connection": "close"},
        timeout=TIMEOUT,
    )
    return response


def test_requests_are_counted_by_route_method_and_status(service: Service) -> None:
    requests_total = "chatproxy_http_requests_total"
    listed = {"route": "/chat/conversations", "method": "GET", "status": "200"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    deleted = {
        "route": "/chat/conversations/{conversation_id}",
        "method": "DELETE",
        "status": "404",
    }
    wanted = [(listed, 2), (unmatched, 1), (deleted, 1)]
    before = scrape(service)

    for _ in range(2):
        requests.get(f"{service.url}/chat/conversations", timeout=TIMEOUT)
    requests.get(f"{service.url}/no/such/route", timeout=TIMEOUT)
    requests.delete(f"{service.url}/chat/conversations/unknown-id", timeout=TIMEOUT)

    def moved(samples: Samples) -> list[float]:
        return [
            value(samples, requests_total, **labels) - value(before, requests_total, **labels)
            for labels, _ in wanted
        ]

    after = settles(lambda s: moved(s) == [delta for _, delta in wanted], service)
    assert moved(after) == [2, 1, 1]


def test_tokens_and_cost_are_counted_from_the_ledger(service: Service) -> None:
    labels = {"model": "gpt-4o-mini"}
    before = scrape(service)
    answer = chat(service).json()
    usage = answer["usage"]

    after = settles(
        lambda s: (
            value(s, "chatproxy_tokens_total", kind="completion", **labels)
            > value(before, "chatproxy_tokens_total", kind="completion", **labels)
        ),
        service,
    )

    def delta(name: str, **extra: str) -> float:
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    assert delta("chatproxy_tokens_total", kind="prompt") == usage["prompt_tokens"]
    assert delta("chatproxy_tokens_total", kind="completion") == usage["completion_tokens"]
    expected_cost = (usage["prompt_tokens"] * 0.00015 + usage["completion_tokens"] * 0.0006) / 1000
    assert delta("chatproxy_cost_usd_total") == pytest.approx(expected_cost)


def test_a_stream_is_in_progress_until_it_ends_and_its_first_token_is_timed(
    service: Service, upstream: FakeUpstream
) -> None:
    before = scrape(service)
    upstream.enqueue(stream(chunks=["one ", "two ", "three"], interval=0.4))
    response = requests.post(
        f"{service.url}/chat",
        json={"message": "count", "stream": True},
        stream=True,
        timeout=TIMEOUT,
    )
    items = read_sse(response)
    assert next(item for item in items if item.name == "delta").json() == {"content": "one "}

    during = scrape(service)
    [item for item in items]  # the rest of the stream
    after = settles(
        lambda s: value(s, "chatproxy_streams_in_progress", endpoint="/chat") == 0, service
    )

    assert value(during, "chatproxy_streams_in_progress", endpoint="/chat") == 1
    assert value(after, "chatproxy_streams_in_progress", endpoint="/chat") == 0
    first_token = "chatproxy_time_to_first_token_seconds"
    assert value(after, f"{first_token}_count", model="gpt-4o-mini") == (
        value(before, f"{first_token}_count", model="gpt-4o-mini") + 1
    )
    assert value(after, f"{first_token}_bucket", model="gpt-4o-mini", le="0.05") == value(
        before, f"{first_token}_bucket", model="gpt-4o-mini", le="0.05"
    )  # the first piece came after 0.4 s, in no faster bucket


def test_upstream_attempts_and_retries_are_counted(
    service: Service, upstream: FakeUpstream
) -> None:
    before = scrape(service)
    upstream.enqueue(openai_error(500, "boom", type="server_error"))
    assert chat(service).status_code == 200

    after = settles(
        lambda s: (
            value(s, "chatproxy_upstream_latency_seconds_count", status="200")
            > value(before, "chatproxy_upstream_latency_seconds_count", status="200")
        ),
        service,
    )

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("chatproxy_upstream_latency_seconds_count", status="500") == 1
    assert delta("chatproxy_upstream_latency_seconds_count", status="200") == 1
    assert delta("chatproxy_upstream_retries_total", reason="500") == 1


def test_key_failovers_are_counted(service_factory, upstream: FakeUpstream) -> None:
    pooled = service_factory(OPENAI_API_KEY=POOL)
    upstream.enqueue(auth_failed(401))

    assert chat(pooled).status_code == 200
    after = settles(
        lambda s: value(s, "chatproxy_upstream_key_failovers_total", reason="401") == 1, pooled
    )

    assert value(after, "chatproxy_upstream_key_failovers_total", reason="401") == 1
    assert value(after, "chatproxy_upstream_retries_total", reason="401") == 0


def test_rate_limit_and_budget_refusals_are_counted(service_factory) -> None:
    limited = service_factory(RATE_LIMIT="3/minute", DAILY_TOKEN_BUDGET="1")

    statuses = [chat(limited) for _ in range(4)]

    codes = [r.json().get("error", {}).get("code") for r in statuses]
    assert codes == [None, "budget_exceeded", "budget_exceeded", "rate_limit_exceeded"]
    after = settles(
        lambda s: value(s, "chatproxy_rate_limit_refusals_total", code="rate_limit_exceeded") == 1,
        limited,
    )
    assert value(after, "chatproxy_rate_limit_refusals_total", code="budget_exceeded") == 2
    assert value(after, "chatproxy_rate_limit_refusals_total", code="rate_limit_exceeded") == 1


def test_metrics_need_an_access_token_like_every_api_route(service_factory) -> None:
    guarded = service_factory(ACCESS_TOKENS=f"prometheus:{PROM_TOKEN}")
    url = f"{guarded.url}/metrics"

    anonymous = requests.get(url, timeout=TIMEOUT)
    text = requests.get(url, headers={"Authorization": f"Bearer {PROM_TOKEN}"}, timeout=TIMEOUT)
    openmetrics = requests.get(
        url,
        headers={"Authorization": f"Bearer {PROM_TOKEN}", "Accept": "application/openmetrics-text"},
        timeout=TIMEOUT,
    )

    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_access_token"
    assert text.status_code == 200
    assert text.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE chatproxy_http_requests_total counter" in text.text
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert PROM_TOKEN not in text.text and "prometheus" not in text.text  # no client names


# --- Several worker processes ---------------------------------------------------------------


def spread_requests(service: Service, count: int) -> None:
    """`count` requests, each on its own connection, so that the workers share them."""
    for _ in range(count):
        response = requests.get(
            f"{service.url}/usage", headers={"Connection": "close"}, timeout=TIMEOUT
        )
        assert response.status_code == 200


def test_counters_add_up_over_several_worker_processes(service_factory) -> None:
    workers = service_factory(WEB_CONCURRENCY="3")
    # /healthz answers as soon as one worker is up: wait for all three before spreading.
    deadline = time.monotonic() + 20
    while workers.log_text().count("Booting worker") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)

    spread_requests(workers, 30)
    samples = settles(
        lambda s: total(s, "chatproxy_http_requests_total", route="/usage") >= 30, workers
    )

    assert total(samples, "chatproxy_http_requests_total", route="/usage") == 30
    assert (
        value(samples, "chatproxy_http_requests_total", route="/usage", method="GET", status="200")
        == 30
    )
    assert workers.log_text().count("Booting worker") == 3


def test_a_given_multiprocess_directory_is_emptied_at_start_and_shared(
    service_factory, tmp_path: Path, upstream: FakeUpstream
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    stale = MmapedDict(str(directory / "counter_999999.db"))
    labels = ["route", "method", "status"], ["/usage", "GET", "200"]
    key = mmap_key("chatproxy_http_requests", "chatproxy_http_requests_total", *labels, "")
    stale.write_value(key, 1000.0, 0.0)
    stale.close()
    workers = service_factory(WEB_CONCURRENCY="3", PROMETHEUS_MULTIPROC_DIR=str(directory))

    spread_requests(workers, 30)
    upstream.enqueue(stream(chunks=["a ", "b ", "c"], interval=0.4))
    response = requests.post(
        f"{workers.url}/chat", json={"message": "hi", "stream": True}, stream=True, timeout=TIMEOUT
    )
    items = read_sse(response)
    next(item for item in items if item.name == "delta")
    during = scrape(workers)
    [item for item in items]
    samples = settles(
        lambda s: (
            total(s, "chatproxy_http_requests_total", route="/usage") >= 30
            and value(s, "chatproxy_streams_in_progress", endpoint="/chat") == 0
        ),
        workers,
    )

    assert (
        value(samples, "chatproxy_http_requests_total", route="/usage", method="GET", status="200")
        == 30
    )
    assert value(during, "chatproxy_streams_in_progress", endpoint="/chat") == 1
    assert value(samples, "chatproxy_streams_in_progress", endpoint="/chat") == 0
    writers = {path.stem.rsplit("_", 1)[-1] for path in directory.glob("counter_*.db")}
    assert "999999" not in writers
    assert len(writers) >= 2, writers  # the requests were spread over several processes
