"""Server-sent events: reading the upstream's, writing ours. Every stream frames through here."""

from __future__ import annotations

import json
from dataclasses import dataclass

HEARTBEAT = b": ping\n\n"
_LINE_ENDS = (b"\n", b"\r")
# One encoder for every event: `json.dumps` with options builds a new one per call (~1.5 µs).
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# How `_COMPACT` writes a string (ensure_ascii=False), in C: a JSON string without the encoder.
_STRING = json.encoder.encode_basestring


def event(name: str, data: object) -> bytes:
    """One SSE event whose data is compact JSON (one line, so no data continuation is needed)."""
    return f"event: {name}\ndata: {_COMPACT.encode(data)}\n\n".encode()


def text_event(name: str, field: str, text: str) -> bytes:
    """`event(name, {field: text})`, byte for byte, for an event sent once per chunk: writing
    the one string directly skips the dict and `encode`'s per-call C encoder (1.8 -> 0.1 µs)."""
    return f"event: {name}\ndata: {{{_STRING(field)}:{_STRING(text)}}}\n\n".encode()


@dataclass(frozen=True)
class Event:
    name: str  # "message" when the stream gave none
    data: str


class EventReader:
    """Incremental parser: feed it bytes as they arrive, get whole events back.

    Tracks whether everything fed so far ended on an event boundary, which is where a
    heartbeat comment may be inserted into a stream that is being relayed byte for byte.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._skip_lf = False  # the last piece ended in CR: an LF starting the next is its pair
        self._name = ""
        self._data: list[str] = []

    @property
    def at_boundary(self) -> bool:
        return not self._buffer and not self._data and not self._name

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that `chunk` completes. Lines end in LF, CRLF or CR, which is exactly
        what `bytes.splitlines` splits on; one C call per chunk instead of a search per line."""
        if not chunk:
            return []
        if self._skip_lf:
            chunk = chunk.removeprefix(b"\n")
            self._skip_lf = False
        lines = (self._buffer + chunk).splitlines(keepends=True)
        self._buffer = lines.pop() if lines and not lines[-1].endswith(_LINE_ENDS) else b""
        if not lines:
            return []
        self._skip_lf = not self._buffer and lines[-1].endswith(b"\r")
        events = []
        for line in lines:
            ready = self._line(line.rstrip(b"\r\n").decode("utf-8", errors="replace"))
            if ready is not None:
                events.append(ready)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data and not self._name:
                return None
            ready = Event(self._name or "message", "\n".join(self._data))
            self._name, self._data = "", []
            return ready
        field, _, value = line.partition(":")
        if not field:  # a comment
            return None
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value
        return None
