"""Graceful shutdown: the upstream answers being relayed, and ending them when time is up.

A stopping worker (`app.worker`) lets the answers in progress run through the grace period,
then calls `end_relays()`. Each answer still being read is aborted with `shutting_down`, which
its relay turns into the ending its surface promises — an `error` event on `/chat`, an
`error:` line on `/callChatGPT`, a cut on `/v1` — and whatever was delivered is written to the
ledger, marked partial, before the worker exits.

An answer registers once when its body starts to be read and leaves when the reading ends:
nothing is added per chunk.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the worker class imports this module in gunicorn's master, which has no Flask
    from .errors import ApiError


class Abortable(Protocol):
    def abort(self, error: ApiError) -> None: ...


_lock = threading.Lock()
_relaying: set[Abortable] = set()


def relaying(answer: Abortable) -> None:
    with _lock:
        _relaying.add(answer)


def relayed(answer: Abortable) -> None:
    with _lock:
        _relaying.discard(answer)


def relays_in_progress() -> int:
    return len(_relaying)


def end_relays() -> int:
    """Aborts every answer still being relayed; returns how many there were."""
    from .errors import ApiError

    with _lock:
        answers = list(_relaying)
    error = ApiError(
        "shutting_down",
        "The service is restarting and could not finish this answer; send the request again.",
    )
    for answer in answers:
        answer.abort(error)
    return len(answers)
