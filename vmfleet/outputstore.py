"""The output store: every attempt's whole output (up to a cap), kept for a while, in a
Redis of its own (``VMFLEET_OUTPUT_URL``), never the broker.

Why a Redis instance of its own: the broker runs ``maxmemory`` with ``noeviction`` so
that it never drops a queued message, and a full broker refuses writes — dispatch stops.
Output is different: it may be lost under pressure, dispatch may not. The output Redis
has its own ``maxmemory`` and evicts (``volatile-lru``: every output key has a TTL), so a
flood of output costs old output, never a command. Cost: one more Redis (its memory is
the bound: 256 MiB in the local environment, ``outputStore.maxmemory`` in the chart), and
output kept in memory only (no disk; a restart of that Redis loses it).

Layout, under the namespace's key prefix (:func:`vmfleet.tenancy.key_prefix`), so a
namespace's Redis ACL user reaches only its own namespace's output, as on the broker:

- ``vmfleet.<ns>:output:<uid>:<vm>:<attempt>``: a stream per attempt. Each entry is one
  flush of the worker: ``s`` (``o`` stdout, ``e`` stderr, ``c`` the cut notice, ``x``
  the end), ``d`` the bytes, ``t`` when the worker read them (RFC 3339), ``n`` the
  ``seq`` of its first record;
- ``vmfleet.<ns>:output:<uid>``: a hash ``<vm>/<attempt>`` → the stream's key name part,
  the attempts that wrote output (the reader's index);
- ``vmfleet.<ns>:output:used``: the bytes the namespace stored (its quota), expiring a
  retention after the last write.

Every key expires (``EXPIRE``, renewed at each flush): the retention, the shorter of the
command's ``ttlSecondsAfterFinished`` and ``VMFLEET_OUTPUT_RETENTION_SECONDS`` (24 h).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from .api.logs import LogRecord, Stream
from .tenancy import key_prefix

log = logging.getLogger("vmfleet.output")

DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
DEFAULT_RETENTION_SECONDS: Final = 24 * 3600
#: Even ``ttlSecondsAfterFinished: 0`` keeps the output this long: a follower drains it.
MIN_RETENTION_SECONDS: Final = 60
FLUSH_SECONDS: Final = 0.1
FLUSH_BYTES: Final = 64 * 1024

STDOUT: Final = "o"
STDERR: Final = "e"
CUT: Final = "c"
END: Final = "x"
_STREAMS: Final[dict[str, Stream]] = {STDOUT: "stdout", STDERR: "stderr", CUT: "stderr"}


def command_key(namespace: str, uid: str) -> str:
    """The index of one command's attempts with output."""
    return f"{key_prefix(namespace)}output:{uid}"


def attempt_key(namespace: str, uid: str, vm: str, attempt: int) -> str:
    return f"{key_prefix(namespace)}output:{uid}:{vm}:{attempt}"


def quota_key(namespace: str) -> str:
    return f"{key_prefix(namespace)}output:used"


def retention_seconds(ttl_after_finished: int | None, configured: float) -> int:
    """min(ttlSecondsAfterFinished, the configured retention), at least a minute."""
    keep = int(configured)
    if ttl_after_finished is not None:
        keep = min(keep, int(ttl_after_finished))
    return max(keep, MIN_RETENTION_SECONDS)


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utf8_safe_end(data: bytes) -> int:
    """Where ``data`` can be cut without splitting a UTF-8 character (its length when
    it ends on a whole character)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back
        if byte & 0x80 == 0:
            return len(data)
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return len(data) if back >= need else len(data) - back
    return len(data)


def count_records(data: bytes) -> int:
    """How many records a flush's bytes make (lines, and a last partial line)."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") else 1) if data else 0


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    retention: int = DEFAULT_RETENTION_SECONDS
    namespace_quota: int = 0  # 0: none


class AttemptOutput:
    """The writer of one attempt's output: batches what the worker reads from the SSH
    channel and appends it to the attempt's stream at most every ``FLUSH_SECONDS`` (a
    flusher thread, so a partial line shows too) or at once when ``FLUSH_BYTES`` wait.

    Memory is bounded: at most ``FLUSH_BYTES`` per stream wait; beyond, the feeding
    thread (the one reading the channel) writes them itself, which holds the remote
    command back through SSH flow control while Redis is slower than the command. Past
    ``max_bytes`` (or the namespace's quota) nothing more is stored and the cut is
    marked once. A Redis that fails is given up for this attempt (logged once): the
    store never stops a command."""

    def __init__(self, client: Any, namespace: str, uid: str, vm: str, attempt: int,
                 limits: Limits, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.namespace = namespace
        self.key = attempt_key(namespace, uid, vm, attempt)
        self.index = command_key(namespace, uid)
        self.field = f"{vm}/{attempt}"
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()  # buffers and counters
        self._write = threading.Lock()  # one writer to Redis at a time, in order
        self._pending: dict[str, bytearray] = {STDOUT: bytearray(), STDERR: bytearray()}
        self._since: float | None = None  # when the oldest pending byte was read
        self._seq = 1
        self.stored = 0
        self.cut: str | None = None
        self.failed = False
        self._indexed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- feeding (the channel reader's thread) --------------------------------------

    def stdout(self, data: bytes) -> None:
        self._feed(STDOUT, data)

    def stderr(self, data: bytes) -> None:
        self._feed(STDERR, data)

    def _feed(self, stream: str, data: bytes) -> None:
        if not data or self.cut is not None or self.failed:
            return
        with self._lock:
            buffer = self._pending[stream]
            buffer += data
            if self._since is None:
                self._since = self.clock()
            full = len(buffer) >= FLUSH_BYTES
        if self._thread is None:
            self._thread = threading.Thread(target=self._flusher, name="vmfleet-output",
                                            daemon=True)
            self._thread.start()
        if full:
            self.flush()

    def _flusher(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS / 2):
            with self._lock:
                due = self._since is not None and self.clock() - self._since >= FLUSH_SECONDS
            if due:
                self.flush()

    # -- writing -----------------------------------------------------------------------

    def _take(self, final: bool) -> tuple[list[tuple[str, bytes]], float]:
        with self._lock:
            taken: list[tuple[str, bytes]] = []
            for stream in (STDOUT, STDERR):
                buffer = self._pending[stream]
                end = len(buffer) if final else utf8_safe_end(bytes(buffer[-4:])) + max(0, len(buffer) - 4)
                if end:
                    taken.append((stream, bytes(buffer[:end])))
                    del buffer[:end]
            since = self._since if self._since is not None else self.clock()
            left = any(self._pending.values())
            self._since = self.clock() if left else None
            return taken, since

    def flush(self, final: bool = False, mark_end: bool = True) -> None:
        """Append what waits (``final``: also a partial UTF-8 character, and the end
        unless ``mark_end`` is False)."""
        with self._write:
            taken, since = self._take(final)
            if self.failed:
                return
            entries: list[dict[str, Any]] = []
            stamp = rfc3339(since)
            for stream, data in taken:
                if self.cut is not None:
                    break
                room = self.limits.max_bytes - self.stored
                if len(data) > room:
                    data = data[:max(room, 0)]
                    self.cut = (f"[vmfleet] output cut at {self.limits.max_bytes} bytes "
                                "(VMFLEET_OUTPUT_MAX_BYTES); the status keeps the tails\n")
                if data:
                    entries.append({"s": stream, "d": data, "t": stamp, "n": self._seq})
                    self._seq += count_records(data)
                    self.stored += len(data)
                if self.cut is not None:
                    entries.append({"s": CUT, "d": self.cut.encode(), "t": stamp, "n": self._seq})
                    self._seq += 1
            if final and mark_end:
                entries.append({"s": END, "d": b"", "t": rfc3339(self.clock()), "n": self._seq})
            if entries:
                self._append(entries)

    def _append(self, entries: list[dict[str, Any]]) -> None:
        ttl = self.limits.retention
        pipe = self.client.pipeline(transaction=False)
        if not self._indexed:
            pipe.hset(self.index, self.field, self.key)
        for entry in entries:
            pipe.xadd(self.key, entry)
        size = sum(len(e["d"]) for e in entries)
        if self.limits.namespace_quota:
            pipe.incrby(quota_key(self.namespace), size)
            pipe.expire(quota_key(self.namespace), ttl)
        pipe.expire(self.key, ttl)
        pipe.expire(self.index, ttl)
        try:
            results = pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the store never stops a command
            self.failed = True
            log.warning("Stopped keeping the output of %s: the output store failed: %s",
                        self.key, exc)
            return
        self._indexed = True
        if self.limits.namespace_quota and self.cut is None:
            used = int(results[-4])  # INCRBY's, before the three EXPIREs
            if used > self.limits.namespace_quota:
                self.cut = (f"[vmfleet] output cut: namespace {self.namespace} reached its "
                            f"output quota ({self.limits.namespace_quota} bytes, "
                            "VMFLEET_OUTPUT_NAMESPACE_QUOTA_BYTES)\n")
                try:
                    self.client.xadd(self.key, {"s": CUT, "d": self.cut.encode(),
                                                "t": rfc3339(self.clock()), "n": self._seq})
                    self._seq += 1
                except Exception:  # noqa: BLE001 - as above
                    self.failed = True

    def close(self, mark_end: bool = True) -> None:
        """The attempt ended: write the rest and the end mark, stop the flusher.
        ``mark_end`` False: this delivery did not run the attempt (another one claimed
        it), so it marks nothing in that attempt's stream."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush(final=True, mark_end=mark_end)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Entry:
    id: str
    kind: str
    data: bytes
    time: str
    seq: int

    @classmethod
    def parse(cls, entry_id: Any, fields: dict[Any, Any]) -> Entry:
        def get(name: str) -> Any:
            return fields.get(name.encode(), fields.get(name))

        raw_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        kind = get("s")
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        data = get("d") or b""
        if isinstance(data, str):
            data = data.encode()
        stamp = get("t") or b""
        stamp = stamp.decode() if isinstance(stamp, bytes) else str(stamp)
        return cls(raw_id, kind, bytes(data), stamp, int(get("n") or 0))

    def pieces(self) -> list[str]:
        """The records' data: each line with its newline, a last partial line without."""
        if not self.data:
            return []
        text = self.data.decode("utf-8", errors="replace")
        parts = text.split("\n")
        out = [p + "\n" for p in parts[:-1]]
        if parts[-1]:
            out.append(parts[-1])
        return out


@dataclass(frozen=True)
class StreamRef:
    vm: str
    attempt: int
    key: str

    @property
    def field(self) -> str:
        return f"{self.vm}/{self.attempt}"


def attempts_of(client: Any, namespace: str, uid: str) -> list[StreamRef]:
    """The attempts of a command that wrote output, by VM then attempt."""
    raw: dict[Any, Any] = client.hgetall(command_key(namespace, uid))
    refs = []
    for field, key in raw.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        vm, _, attempt = name.rpartition("/")
        if not vm or not attempt.isdigit():
            continue
        refs.append(StreamRef(vm, int(attempt), key.decode() if isinstance(key, bytes) else str(key)))
    return sorted(refs, key=lambda r: (r.vm, r.attempt))


# A cursor: for each attempt read, the last entry read and how many of its records.
Position = tuple[str, int]


def encode_cursor(positions: dict[str, Position]) -> str:
    raw = json.dumps({k: f"{i}/{n}" for k, (i, n) in sorted(positions.items())},
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Position]:
    """The positions of a cursor; ValueError for one this server did not make."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        out: dict[str, Position] = {}
        for key, value in raw.items():
            entry, _, done = str(value).rpartition("/")
            out[str(key)] = (entry, int(done))
        return out
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"the cursor {cursor[:40]!r} is not one this server made") from exc


def to_records(ref: StreamRef, entry: Entry, positions: dict[str, Position],
               skip: int = 0) -> list[LogRecord]:
    """The records of one entry (its first ``skip`` already read), each with the cursor
    after it; ``positions`` is updated to after the entry."""
    stream = _STREAMS.get(entry.kind)
    if stream is None:
        positions[ref.field] = (entry.id, 0)
        return []
    pieces = entry.pieces()
    out = []
    for index, data in enumerate(pieces):
        if index < skip:
            continue
        positions[ref.field] = (entry.id, index + 1)
        out.append(LogRecord(vm=ref.vm, attempt=ref.attempt, stream=stream,
                             seq=entry.seq + index, time=entry.time, data=data,
                             cursor=encode_cursor(positions)))
    positions[ref.field] = (entry.id, len(pieces))
    return out


__all__ = ["AttemptOutput", "Entry", "Limits", "StreamRef", "attempt_key", "attempts_of",
           "command_key", "decode_cursor", "encode_cursor", "retention_seconds", "to_records"]
