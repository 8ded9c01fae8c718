"""The usage ledger (CONTRACT §3 `/usage`, §2 `DAILY_TOKEN_BUDGET`, §5 exactly once), on both
databases."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading

import pytest
import sqlalchemy as sa

from app import db
from app.errors import ApiError
from app.services.ledger import DEFAULT_PRICES, Ledger, estimate_usage, seconds_until_utc_midnight
from app.settings import ModelPrice

pytest_plugins = ["tests.postgres"]

PROCESSES = 8
ROWS = 50
THREADS = 8
NOON = dt.datetime(2025, 6, 10, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self, now: dt.datetime = NOON) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(engine, clock) -> Ledger:
    return Ledger(engine, clock=clock)


def _record(ledger: Ledger, request_id: str, **fields) -> bool:
    row = {
        "client": "alice",
        "model": "gpt-4o-mini",
        "endpoint": "/chat",
        "prompt_tokens": 100,
        "completion_tokens": 50,
        **fields,
    }
    return ledger.record(request_id=request_id, **row)


def _rows(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as connection:
        return connection.execute(sa.select(db.ledger).order_by(db.ledger.c.id)).all()


def test_a_call_is_recorded_once_however_often_it_is_reported(ledger, engine):
    assert _record(ledger, "req-1") is True
    assert _record(ledger, "req-1", prompt_tokens=999) is False
    [row] = _rows(engine)
    assert (row.request_id, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        "req-1",
        100,
        50,
        150,
    )
    assert (row.client, row.model, row.endpoint) == ("alice", "gpt-4o-mini", "/chat")
    assert row.created_at == NOON and row.day == NOON.date()


def test_estimated_and_partial_rows_are_marked(ledger, engine):
    _record(ledger, "complete")
    _record(ledger, "cut-short", estimated=True, partial=True)
    assert [(row.estimated, row.partial) for row in _rows(engine)] == [
        (False, False),
        (True, True),
    ]


def test_cost_comes_from_the_built_in_prices_by_longest_prefix(engine):
    ledger = Ledger(engine)
    assert ledger.cost("gpt-4o-mini", 1000, 1000) == pytest.approx(0.00015 + 0.0006)
    # A dated snapshot is priced as its family; gpt-4o-mini is not priced as gpt-4o.
    assert ledger.price("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert ledger.price("gpt-4o-2024-08-06") == DEFAULT_PRICES["gpt-4o"]
    assert ledger.price("gpt-4-0613") == DEFAULT_PRICES["gpt-4"]
    assert ledger.price("o3-mini-2025-01-31") == DEFAULT_PRICES["o3-mini"]
    assert ledger.price("GPT-4o") == DEFAULT_PRICES["gpt-4o"]


def test_an_unknown_model_costs_nothing_but_its_tokens_count(ledger, engine):
    _record(ledger, "local", model="llama3.1:8b", prompt_tokens=10, completion_tokens=5)
    [row] = _rows(engine)
    assert (row.cost_usd, row.total_tokens) == (0.0, 15)


def test_model_prices_override_and_extend_the_built_in_table(engine):
    ledger = Ledger(
        engine,
        {"gpt-4o-mini": ModelPrice(1.0, 2.0), "llama3": ModelPrice(0.001, 0.002)},
    )
    assert ledger.cost("gpt-4o-mini-2024-07-18", 1000, 500) == pytest.approx(1.0 + 1.0)
    assert ledger.cost("llama3.1:8b", 2000, 1000) == pytest.approx(0.002 + 0.002)
    assert ledger.cost("gpt-4o", 1000, 0) == pytest.approx(0.0025)  # the rest stays


def test_usage_is_aggregated_per_utc_day_and_model_newest_first(ledger, clock):
    day = dt.timedelta(days=1)
    calls = [
        (NOON, "gpt-4o-mini", 100, 50),
        (NOON, "gpt-4o-mini", 200, 100),
        (NOON, "gpt-4o", 1000, 100),
        (NOON - day, "gpt-4o-mini", 20, 10),
        (NOON - 6 * day, "gpt-4o", 2, 1),  # inside a 7-day window
        (NOON - 7 * day, "gpt-4o", 2, 1),  # outside it
    ]
    for n, (moment, model, prompt, completion) in enumerate(calls):
        clock.now = moment
        _record(ledger, f"req-{n}", model=model, prompt_tokens=prompt, completion_tokens=completion)
    clock.now = NOON
    _record(ledger, "bob-1", client="bob", prompt_tokens=10**6)  # another client's

    usage = ledger.usage("alice", days=7)
    assert usage["data"] == [
        {
            "date": "2025-06-10",
            "model": "gpt-4o",
            "requests": 1,
            "prompt_tokens": 1000,
            "completion_tokens": 100,
            "total_tokens": 1100,
            "cost_usd": 0.0035,
        },
        {
            "date": "2025-06-10",
            "model": "gpt-4o-mini",
            "requests": 2,
            "prompt_tokens": 300,
            "completion_tokens": 150,
            "total_tokens": 450,
            "cost_usd": 0.000135,
        },
        {
            "date": "2025-06-09",
            "model": "gpt-4o-mini",
            "requests": 1,
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "total_tokens": 30,
            "cost_usd": 0.000009,
        },
        {
            "date": "2025-06-04",
            "model": "gpt-4o",
            "requests": 1,
            "prompt_tokens": 2,
            "completion_tokens": 1,
            "total_tokens": 3,
            "cost_usd": 0.000015,
        },
    ]
    assert usage["total"] == {
        "requests": 5,
        "prompt_tokens": 1322,
        "completion_tokens": 261,
        "total_tokens": 1583,
        "cost_usd": 0.003659,
    }
    assert len(ledger.usage("alice", days=8)["data"]) == 5
    assert ledger.usage("alice", days=1)["total"]["requests"] == 3
    assert ledger.usage("carol", days=366) == {
        "data": [],
        "total": {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cost_usd": 0.0,
        },
    }


@pytest.mark.parametrize("days", [0, -1, 367])
def test_usage_days_outside_1_to_366_are_refused(ledger, days):
    with pytest.raises(ApiError) as raised:
        ledger.usage("alice", days=days)
    assert (raised.value.status, raised.value.code) == (400, "invalid_value")


def test_tokens_today_restart_at_utc_midnight(ledger, clock):
    before_midnight = dt.datetime(2025, 6, 10, 23, 59, 59, tzinfo=dt.UTC)
    clock.now = before_midnight
    _record(ledger, "late", prompt_tokens=700, completion_tokens=300)
    assert ledger.tokens_today("alice") == 1000

    clock.now = before_midnight + dt.timedelta(seconds=2)
    assert ledger.tokens_today("alice") == 0
    _record(ledger, "early", prompt_tokens=5, completion_tokens=5)
    assert ledger.tokens_today("alice") == 10
    assert ledger.tokens_today("bob") == 0

    # A clock in another zone still counts UTC days: 07:30 in Shanghai is 23:30 UTC the day before.
    shanghai = dt.timezone(dt.timedelta(hours=8))
    clock.now = dt.datetime(2025, 6, 11, 7, 30, tzinfo=shanghai)
    assert ledger.tokens_today("alice") == 1000


def test_a_spent_budget_is_429_until_utc_midnight(ledger, clock):
    clock.now = dt.datetime(2025, 6, 10, 23, 0, tzinfo=dt.UTC)
    ledger.check_budget("alice", 1000)  # nothing spent yet
    _record(ledger, "big", prompt_tokens=600, completion_tokens=400)
    ledger.check_budget("alice", 0)  # no budget
    ledger.check_budget("alice", 1001)
    with pytest.raises(ApiError) as raised:
        ledger.check_budget("alice", 1000)
    assert (raised.value.status, raised.value.code) == (429, "budget_exceeded")
    assert raised.value.headers == {"Retry-After": "3600"}
    ledger.check_budget("bob", 1000)  # budgets are per client


def test_seconds_until_utc_midnight():
    assert seconds_until_utc_midnight(dt.datetime(2025, 6, 10, 23, 59, 30, tzinfo=dt.UTC)) == 30
    assert seconds_until_utc_midnight(dt.datetime(2025, 6, 10, 0, 0, tzinfo=dt.UTC)) == 86400
    assert seconds_until_utc_midnight(dt.datetime(2025, 6, 10, 23, 59, 59, 999, tzinfo=dt.UTC)) == 1
    assert 1 <= seconds_until_utc_midnight() <= 86400


def test_usage_is_estimated_from_the_text_when_the_upstream_reports_none():
    usage = estimate_usage([{"role": "user", "content": "你好，世界"}], "Hello there, friend!")
    assert usage == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": 5,
        "total_tokens": usage["prompt_tokens"] + 5,
    }
    assert 5 <= usage["prompt_tokens"] <= 15


def test_concurrent_threads_record_each_call_once(ledger, engine):
    barrier = threading.Barrier(THREADS)
    inserted = []

    def report_all() -> None:
        barrier.wait(timeout=10)
        inserted.append(sum(_record(ledger, f"req-{n}") for n in range(ROWS)))

    threads = [threading.Thread(target=report_all) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(inserted) == ROWS
    assert len(_rows(engine)) == ROWS


def _report_from_a_process(database_url: str, barrier, results) -> None:
    """One worker process reporting the same calls as every other."""
    engine = db.create_engine(database_url)
    ledger = Ledger(engine)
    try:
        barrier.wait(timeout=20)
        results.put(sum(_record(ledger, f"req-{n}") for n in range(ROWS)))
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def test_concurrent_processes_record_each_call_once(engine):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    url = engine.url.render_as_string(hide_password=False)
    workers = [
        context.Process(target=_report_from_a_process, args=(url, barrier, results))
        for _ in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    inserted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    assert all(isinstance(count, int) for count in inserted), inserted
    assert sum(inserted) == ROWS
    rows = _rows(engine)
    assert sorted(row.request_id for row in rows) == sorted(f"req-{n}" for n in range(ROWS))
    assert sum(row.total_tokens for row in rows) == ROWS * 150
