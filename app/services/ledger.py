"""The usage ledger: one row per upstream call that was answered, wholly or in part.

Exactly once, whatever the number of greenlets, workers or machines: the caller names each
upstream call with a request id, the ledger's UNIQUE key, and `record` inserts with
`ON CONFLICT DO NOTHING`, so that a repeated record of the same call changes nothing. A row whose
token counts the upstream did not report is `estimated`; a stream cut short is `partial`.

Days are UTC dates: `/usage` groups by them and `DAILY_TOKEN_BUDGET` resets at UTC midnight.

A row, once inserted, is also what the metrics count as tokens and cost and what the request's
log line reports: counted where it is written, it is counted once.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from .. import metrics, requestlog
from ..db import autocommit, clean_text, ledger, utc_now
from ..errors import ApiError
from ..settings import ModelPrice
from .context import estimate_prompt_tokens, estimate_tokens

MAX_USAGE_DAYS = 366

# USD per 1,000 tokens as OpenAI lists them (standard tier, mid-2025), matched by the longest
# prefix of the model name; `MODEL_PRICES` overrides or extends them. A model matching no entry
# costs 0.0: the ledger still counts its tokens.
DEFAULT_PRICES: Mapping[str, ModelPrice] = MappingProxyType(
    {
        "gpt-5": ModelPrice(0.00125, 0.01),
        "gpt-5-mini": ModelPrice(0.00025, 0.002),
        "gpt-5-nano": ModelPrice(0.00005, 0.0004),
        "gpt-4.1": ModelPrice(0.002, 0.008),
        "gpt-4.1-mini": ModelPrice(0.0004, 0.0016),
        "gpt-4.1-nano": ModelPrice(0.0001, 0.0004),
        "gpt-4.5": ModelPrice(0.075, 0.15),
        "gpt-4o": ModelPrice(0.0025, 0.01),
        "gpt-4o-2024-05-13": ModelPrice(0.005, 0.015),
        "gpt-4o-mini": ModelPrice(0.00015, 0.0006),
        "chatgpt-4o": ModelPrice(0.005, 0.015),
        "gpt-4-turbo": ModelPrice(0.01, 0.03),
        "gpt-4-1106": ModelPrice(0.01, 0.03),
        "gpt-4-0125": ModelPrice(0.01, 0.03),
        "gpt-4-32k": ModelPrice(0.06, 0.12),
        "gpt-4": ModelPrice(0.03, 0.06),
        "gpt-3.5-turbo": ModelPrice(0.0005, 0.0015),
        "o1": ModelPrice(0.015, 0.06),
        "o1-mini": ModelPrice(0.0011, 0.0044),
        "o1-pro": ModelPrice(0.15, 0.6),
        "o3": ModelPrice(0.002, 0.008),
        "o3-mini": ModelPrice(0.0011, 0.0044),
        "o3-pro": ModelPrice(0.02, 0.08),
        "o4-mini": ModelPrice(0.0011, 0.0044),
        "text-embedding-3-small": ModelPrice(0.00002, 0.0),
        "text-embedding-3-large": ModelPrice(0.00013, 0.0),
        "text-embedding-ada-002": ModelPrice(0.0001, 0.0),
    }
)


def seconds_until_utc_midnight(now: dt.datetime | None = None) -> int:
    """Whole seconds until the next UTC day, at least 1: the `Retry-After` of `budget_exceeded`."""
    now = (now or utc_now()).astimezone(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


def estimate_usage(
    prompt_messages: Iterable[Mapping[str, Any]], completion_text: str
) -> dict[str, int]:
    """Usage counted from the text, for an answer whose upstream reported none."""
    prompt_tokens = estimate_prompt_tokens(prompt_messages)
    completion_tokens = estimate_tokens(completion_text)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Ledger:
    """Usage rows in `engine`'s database, priced with `prices` over `DEFAULT_PRICES`."""

    def __init__(
        self,
        engine: Engine,
        prices: Mapping[str, ModelPrice] | None = None,
        *,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self.engine = engine
        self.prices = {
            name.lower(): price for name, price in {**DEFAULT_PRICES, **(prices or {})}.items()
        }
        self.clock = clock
        # The insert and the budget's sum are one statement each, atomic by themselves.
        self._autocommit = autocommit(engine)
        # Built once and run with each row as parameters: SQLAlchemy then compiles it once and
        # finds it in its cache, instead of building and keying a new statement per call.
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = (
            dialect.insert(ledger)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(ledger.c.id)  # a row only when inserted (rowcount is unreliable here)
        )

    def price(self, model: str) -> ModelPrice | None:
        """The price of `model`: its own entry, else the longest prefix that names it."""
        name = model.strip().lower()
        if name in self.prices:
            return self.prices[name]
        matches = [prefix for prefix in self.prices if name.startswith(prefix)]
        return self.prices[max(matches, key=len)] if matches else None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a call's tokens; 0.0 for a model without a price."""
        price = self.price(model)
        if price is None:
            return 0.0
        return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1000

    def record(
        self,
        *,
        request_id: str,
        client: str,
        model: str,
        endpoint: str,
        prompt_tokens: int,
        completion_tokens: int,
        estimated: bool = False,
        partial: bool = False,
    ) -> bool:
        """Records one upstream call; False when `request_id` is in the ledger already."""
        prompt_tokens = max(int(prompt_tokens), 0)
        completion_tokens = max(int(completion_tokens), 0)
        now = self.clock().astimezone(dt.UTC)
        row = {
            "request_id": clean_text(request_id),
            "client": client,
            "model": clean_text(model),
            "endpoint": clean_text(endpoint),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "cost_usd": self.cost(model, prompt_tokens, completion_tokens),
            "estimated": bool(estimated),
            "partial": bool(partial),
            "created_at": now,
            "day": now.date(),
        }
        with self._autocommit.begin() as connection:  # commits on SQLite
            inserted = connection.execute(self._insert, row).first() is not None
        if inserted:
            _count(row)
        return inserted

    def usage(self, client: str, days: int = 30) -> dict:
        """The client's usage of the last `days` UTC days (today included), per day and model,
        newest day first, with totals; the body of `GET /usage`."""
        if not 1 <= days <= MAX_USAGE_DAYS:
            raise ApiError("invalid_value", f"days must be between 1 and {MAX_USAGE_DAYS}.")
        first_day = self._today() - dt.timedelta(days=days - 1)
        query = (
            sa.select(
                ledger.c.day,
                ledger.c.model,
                sa.func.count().label("requests"),
                sa.func.sum(ledger.c.prompt_tokens).label("prompt_tokens"),
                sa.func.sum(ledger.c.completion_tokens).label("completion_tokens"),
                sa.func.sum(ledger.c.total_tokens).label("total_tokens"),
                sa.func.sum(ledger.c.cost_usd).label("cost_usd"),
            )
            .where(ledger.c.client == client, ledger.c.day >= first_day)
            .group_by(ledger.c.day, ledger.c.model)
            .order_by(ledger.c.day.desc(), ledger.c.model)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        data = [
            {
                "date": row.day.isoformat(),
                "model": row.model,
                "requests": int(row.requests),
                "prompt_tokens": int(row.prompt_tokens),
                "completion_tokens": int(row.completion_tokens),
                "total_tokens": int(row.total_tokens),
                "cost_usd": round(float(row.cost_usd), 6),
            }
            for row in rows
        ]
        total = {
            field: sum(entry[field] for entry in data)
            for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
        }
        total["cost_usd"] = round(sum(float(row.cost_usd) for row in rows), 6)
        return {"data": data, "total": total}

    def tokens_today(self, client: str) -> int:
        """Tokens the client spent in the current UTC day."""
        parameters = {"client": client, "day": self._today()}
        with self._autocommit.connect() as connection:
            return int(connection.execute(_TOKENS_TODAY, parameters).scalar_one())

    def check_budget(self, client: str, daily_token_budget: int) -> None:
        """Raises `budget_exceeded` (429, `Retry-After` until UTC midnight) once the client's
        tokens today reach `daily_token_budget`; 0 means no budget."""
        if daily_token_budget <= 0 or self.tokens_today(client) < daily_token_budget:
            return
        raise ApiError(
            "budget_exceeded",
            "The daily token budget of this client is spent; it renews at midnight UTC.",
            headers={"Retry-After": str(seconds_until_utc_midnight(self.clock()))},
        )

    def _today(self) -> dt.date:
        return self.clock().astimezone(dt.UTC).date()


# Built once, like the insert: `check_budget` runs before every call when a budget is set.
_TOKENS_TODAY = sa.select(sa.func.coalesce(sa.func.sum(ledger.c.total_tokens), 0)).where(
    ledger.c.client == sa.bindparam("client"), ledger.c.day == sa.bindparam("day")
)


def _count(row: Mapping[str, Any]) -> None:
    record = requestlog.current()
    record.prompt_tokens += row["prompt_tokens"]
    record.completion_tokens += row["completion_tokens"]
    model = row["model"]
    metrics.labelled(metrics.TOKENS, model, "prompt").inc(row["prompt_tokens"])
    metrics.labelled(metrics.TOKENS, model, "completion").inc(row["completion_tokens"])
    metrics.labelled(metrics.COST, model).inc(row["cost_usd"])
