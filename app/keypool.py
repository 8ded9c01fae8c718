"""The upstream keys: rotation, and rest for a key the upstream refused.

A key refused with 401/403 rests until restart; a rate-limited key rests for its `Retry-After`.
When every key rests, the one whose rest ends first is used rather than refusing the request.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Collection


def mask_key(key: str) -> str:
    """What a log line may show of a key: its prefix and last four characters."""
    prefix = "sk-" if key.startswith("sk-") else ""
    return f"{prefix}…{key[-4:]}" if len(key) > 8 else "…"


class KeyPool:
    def __init__(self, keys: Collection[str], clock: Callable[[], float] = time.monotonic):
        self._keys = tuple(keys)
        self._rest_until = dict.fromkeys(self._keys, 0.0)
        self._turn = itertools.cycle(range(len(self._keys))) if self._keys else None
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def choose(self, exclude: Collection[str] = ()) -> str:
        """The next key in turn that is neither resting nor excluded; else the soonest rested."""
        if self._turn is None:
            raise LookupError("no upstream key configured")
        with self._lock:
            now = self._clock()
            for _ in range(len(self._keys)):
                key = self._keys[next(self._turn)]
                if key not in exclude and self._rest_until[key] <= now:
                    return key
            return min(self._keys, key=lambda k: (k in exclude, self._rest_until[k]))

    def has_fresh_key(self, exclude: Collection[str]) -> bool:
        with self._lock:
            now = self._clock()
            return any(k not in exclude and self._rest_until[k] <= now for k in self._keys)

    def rest(self, key: str, seconds: float) -> None:
        with self._lock:
            self._rest_until[key] = max(self._rest_until[key], self._clock() + seconds)

    def retire(self, key: str) -> None:
        """Rest a refused key until restart."""
        self.rest(key, math.inf)


def redact(text: str, secrets: Collection[str]) -> str:
    """`text` with every secret in it replaced by its masked form."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, mask_key(secret))
    return text
