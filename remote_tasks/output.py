"""Command output: bytes, not text.

The status keeps the tail of each stream (``output.maxBytes``) with exact byte counts; the
worker's log gets every line, prefixed, so ``kubectl logs`` shows the full output.
Non-UTF-8 bytes become replacement characters in the tail, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable


class StreamTail:
    """Counts every byte of a stream, keeps the last ``max_bytes`` and emits whole lines."""

    def __init__(self, max_bytes: int, on_line: Callable[[str], None] | None = None,
                 on_data: Callable[[bytes], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._on_data = on_data  # every byte as read (the output store's writer)
        self.total = 0
        self._tail = bytearray()
        self._partial = bytearray()
        self._on_line = on_line

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        if self._on_data is not None:
            self._on_data(data)
        self._tail += data
        if len(self._tail) > self.max_bytes:
            del self._tail[: len(self._tail) - self.max_bytes]
        if self._on_line is not None:
            self._partial += data
            *lines, rest = self._partial.split(b"\n")
            for line in lines:
                self._on_line(line.decode("utf-8", errors="replace"))
            self._partial = bytearray(rest[-65536:])  # a line without end stays bounded

    def close(self) -> None:
        if self._on_line is not None and self._partial:
            self._on_line(self._partial.decode("utf-8", errors="replace"))
            self._partial = bytearray()

    @property
    def truncated(self) -> bool:
        return self.total > len(self._tail)

    def text(self) -> str:
        """The kept tail as text; a character cut at the start becomes U+FFFD."""
        return bytes(self._tail).decode("utf-8", errors="replace")
