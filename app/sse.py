"""Server-sent events: reading the upstream's, writing ours. Every stream frames through here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

HEARTBEAT = b": ping\n\n"


def event(name: str, data: object) -> bytes:
    """One SSE event whose data is compact JSON (one line, so no data continuation is needed)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


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

    def feed(self, chunk: bytes) -> Iterator[Event]:
        if chunk and self._skip_lf:
            chunk = chunk.removeprefix(b"\n")
            self._skip_lf = False
        self._buffer += chunk
        while True:
            line, separator, rest = _split_line(self._buffer)
            if not separator:
                return
            self._buffer = rest
            self._skip_lf = separator == b"\r" and not rest
            ready = self._line(line.decode("utf-8", errors="replace"))
            if ready is not None:
                yield ready

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data and not self._name:
                return None
            ready = Event(self._name or "message", "\n".join(self._data))
            self._name, self._data = "", []
            return ready
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value
        return None


def _split_line(buffer: bytes) -> tuple[bytes, bytes, bytes]:
    """Splits off the first line ending in LF, CRLF or CR."""
    lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        if lf == -1:
            return buffer, b"", b""
        return buffer[:lf], b"\n", buffer[lf + 1 :]
    skip = 2 if buffer[cr + 1 : cr + 2] == b"\n" else 1
    return buffer[:cr], b"\r", buffer[cr + skip :]
