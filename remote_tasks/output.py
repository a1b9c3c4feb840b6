"""Command output: bytes, not text.

The status keeps the tail of each stream (``output.maxBytes``) with exact byte counts; the
worker's log gets every line, prefixed, so ``kubectl logs`` shows the full output.
Non-UTF-8 bytes become replacement characters in the tail, never an exception. Each
stream is hashed as it is read (SHA-256, incrementally: no copy of the whole output is
kept), so the attempt's record names the exact output with ``total`` and ``sha256``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

#: A command may print this many seconds' worth of the read rate at once without being
#: held back (the bucket's size): a short command that prints a few MB in one go runs at
#: full speed; only one that keeps printing faster than the rate is slowed.
READ_BURST_SECONDS = 1.0


class StreamTail:
    """Counts every byte of a stream, keeps the last ``max_bytes`` and emits whole lines."""

    def __init__(self, max_bytes: int, on_line: Callable[[str], None] | None = None,
                 on_data: Callable[[bytes], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._on_data = on_data  # every byte as read (the output store's writer)
        self.total = 0
        self._hash = hashlib.sha256()
        self._tail = bytearray()
        self._partial = bytearray()
        self._on_line = on_line

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        self._hash.update(data)
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
    def sha256(self) -> str:
        """SHA-256 (hex) of every byte fed so far."""
        return self._hash.hexdigest()

    @property
    def truncated(self) -> bool:
        return self.total > len(self._tail)

    def text(self) -> str:
        """The kept tail as text; a character cut at the start becomes U+FFFD."""
        return bytes(self._tail).decode("utf-8", errors="replace")


class ReadBudget:
    """How much of a command's output may be read now: a token bucket.

    ``rate`` bytes/s (or a function giving it now; 0: no limit) refill it, up to
    ``burst_seconds`` of the rate. It starts full, so a command that prints less than
    that in one go is never held back, whatever the pieces its output arrives in; one that
    keeps printing faster than the rate is read at the rate (SSH flow control then holds
    it back). A quiet spell refills the bucket, never beyond its size.
    """

    def __init__(self, rate: float | Callable[[], float],
                 burst_seconds: float = READ_BURST_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self.burst_seconds = burst_seconds
        self.clock = clock
        self._tokens: float | None = None  # None: full (and with no limit, always)
        self._at = clock()

    def rate(self) -> float:
        return float(self._rate() if callable(self._rate) else self._rate)

    def _refill(self) -> tuple[float, float]:
        """The rate now and the bytes that may be read now (negative: in debt)."""
        rate, now = self.rate(), self.clock()
        size = rate * self.burst_seconds
        if not rate or self._tokens is None:
            tokens = size
        else:
            tokens = min(size, self._tokens + (now - self._at) * rate)
        self._tokens = tokens if rate else None  # no limit: no debt carried over
        self._at = now
        return rate, tokens

    def available(self) -> bool:
        """Whether more may be read now."""
        rate, tokens = self._refill()
        return not rate or tokens > 0

    def spend(self, size: int) -> None:
        _, tokens = self._refill()
        if self._tokens is not None:
            self._tokens = tokens - size

    def delay(self, quantum: int) -> float:
        """Seconds to wait before ``quantum`` bytes (at most the bucket's size) may be
        read; 0 while something may be read now."""
        rate, tokens = self._refill()
        if not rate or tokens > 0:
            return 0.0
        return (min(quantum, rate * self.burst_seconds) - tokens) / rate
