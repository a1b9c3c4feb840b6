"""A RemoteCommand's output in the Airflow task log while the task is deferred.

The trigger reads the output through the Kubernetes API server: the aggregated API of
:mod:`vmfleet.api.logs` (``GET …/remotecommands/{name}/log?follow=true&after=CURSOR``),
the same authorised path as ``vmfleet logs``. The triggerer needs ``get`` on the
RemoteCommand (the controller checks it with a SubjectAccessReview) and holds no broker
credentials. :func:`read_records` is one such request, :class:`OutputFollower` keeps
following (it resumes with ``after`` when the stream drops) and hands each line to the
task log::

    [vm1] a line the command printed on stdout
    [vm1 stderr] a line on stderr
    [vm1 attempt 2] a line of the VM's second attempt (spec.retries)
    [vm1] (repeat) a line the task log may already hold (after a triggerer restart)

A piece of a line without its newline yet is joined with its rest when both come within
one batch; otherwise it ends with `` (continues)`` and its rest starts with
``(continued) ``.

Where the read position is kept
-------------------------------
A triggerer re-creates a trigger from its serialized kwargs, so the trigger cannot carry
its position itself. The position lives on the RemoteCommand, in the annotation
``airflow.vmfleet.io/output-position``, as a write-ahead checkpoint::

    {"after": "<cursor>", "upto": {"vm1/1": 42}}

``after`` is the cursor of the last record that is surely in the task log; ``upto`` is,
per ``vm/attempt``, the highest ``seq`` that *may* be in it. Before the follower logs a
batch, it writes a checkpoint whose ``upto`` covers the batch (one merge PATCH); only then
does it log the lines. So the annotation is written at most every ``checkpoint_seconds``
(default 2 s), only while output arrives, never per line. A trigger that starts again
(a triggerer restart, SIGKILL included, or another triggerer taking it over) reads the
annotation, resumes after ``after`` and marks the records up to ``upto`` with
``(repeat)``: no line is lost, and a line shown twice carries the mark the second time
(the mark means "may be a repeat": a line of the last batch that the stopped triggerer
did not get to log is marked too).

What it costs, per deferred task that shows its output: one request held open to the API
server (which holds one to the controller, and a thread there), one GET when the trigger starts, one PATCH per
``checkpoint_seconds`` while lines arrive (each one a watch event for the controller and the
triggerers' shared watch of the namespace). Lines reach the task log within
``checkpoint_seconds`` plus the API round trips. At most ``MAX_PENDING_BYTES`` wait for a
checkpoint; beyond that the follower stops reading until they are logged (the stream is
held back by TCP flow control, the output waits in the server's store). Hence
``stream_output=False`` on the operators for tasks whose output nobody reads live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmfleet.api import constants as c
from vmfleet.api.logs import CONTENT_TYPE, LogRecord, log_path

from .naming import ANNOTATION_OUTPUT_POSITION

__all__ = [
    "CHECKPOINT_SECONDS",
    "as_repeat",
    "AnnotationStore",
    "LineFormatter",
    "OutputFollower",
    "OutputUnavailable",
    "Position",
    "read_records",
]

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 2.0
MAX_PENDING_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
# The last lines the trigger hands to the task with its event (see the trigger's docstring).
RECENT_LINES, RECENT_BYTES = 200, 16 * 1024
_BACKOFF_MAX = 30.0


class OutputUnavailable(RuntimeError):
    """The output cannot be shown for a reason retrying does not cure (forbidden, the
    output API not served, the RemoteCommand gone); the message says which.
    ``not_served``: the cluster has no output API or store (the chart's default), not an
    error of this task."""

    def __init__(self, message: str, not_served: bool = False) -> None:
        super().__init__(message)
        self.not_served = not_served


def record_key(record: LogRecord) -> str:
    """``vm/attempt``: the unit ``seq`` counts in."""
    return f"{record.vm}/{record.attempt}"


@dataclass(frozen=True)
class Position:
    """How far the task log holds the output (see the module's docstring)."""

    after: str | None = None
    upto: Mapping[str, int] = field(default_factory=dict)

    def to_annotation(self) -> str:
        return json.dumps({"after": self.after, "upto": dict(sorted(self.upto.items()))},
                          separators=(",", ":"))

    @classmethod
    def from_annotation(cls, value: str | None) -> Position | None:
        """The position an annotation holds; None without one. ValueError if garbled."""
        if not value:
            return None
        raw = json.loads(value)
        if not isinstance(raw, dict) or not isinstance(raw.get("upto", {}), dict):
            raise ValueError(f"not an output position: {value[:200]!r}")
        after = raw.get("after")
        return cls(after=None if after is None else str(after),
                   upto={str(k): int(v) for k, v in (raw.get("upto") or {}).items()})

    def may_have_shown(self, record: LogRecord) -> bool:
        return record.seq <= self.upto.get(record_key(record), 0)


def as_repeat(line: str) -> str:
    """A task-log line shown again: ``[vm1] text`` -> ``[vm1] (repeat) text``."""
    head, sep, rest = line.partition("] ")
    if not sep or rest.startswith("(repeat) "):
        return line
    return f"{head}] (repeat) {rest}"


def tag(record: LogRecord) -> str:
    """``vm1``, ``vm1 stderr``, ``vm1 attempt 2 stderr``."""
    parts = [record.vm]
    if record.attempt > 1:
        parts.append(f"attempt {record.attempt}")
    if record.stream == "stderr":
        parts.append("stderr")
    return " ".join(parts)


_StreamKey = tuple[str, int, str]


@dataclass(frozen=True)
class _Piece:
    record: LogRecord
    text: str
    repeat: bool
    continued: bool


class LineFormatter:
    """Records to task-log lines: one line per output line, partial lines joined within a
    batch (:meth:`feed` the batch's records, then :meth:`flush`)."""

    def __init__(self) -> None:
        self._held: dict[_StreamKey, _Piece] = {}
        self._open: set[_StreamKey] = set()  # shown with "(continues)", rest not shown yet

    def feed(self, record: LogRecord, repeat: bool) -> list[str]:
        key = (record.vm, record.attempt, record.stream)
        *complete, rest = record.data.split("\n")
        out: list[str] = []
        for text in complete:
            out.extend(self._add(key, record, text, repeat, ends=True))
        if rest:
            out.extend(self._add(key, record, rest, repeat, ends=False))
        return out

    def flush(self, final: bool = False) -> list[str]:
        """The pieces still waiting for their newline; ``final``: the output ended."""
        out = [self._render(piece, continues=not final) for piece in self._held.values()]
        if not final:
            self._open.update(self._held)
        self._held.clear()
        return out

    def _add(self, key: _StreamKey, record: LogRecord, text: str, repeat: bool,
             ends: bool) -> list[str]:
        out: list[str] = []
        held = self._held.pop(key, None)
        if held is not None and held.repeat != repeat:
            out.append(self._render(held, continues=True))
            self._open.add(key)
            held = None
        if held is not None:
            piece = _Piece(record, held.text + text, repeat, held.continued)
        else:
            piece = _Piece(record, text, repeat, key in self._open)
            self._open.discard(key)
        if ends:
            out.append(self._render(piece, continues=False))
        else:
            self._held[key] = piece
        return out

    @staticmethod
    def _render(piece: _Piece, continues: bool) -> str:
        marks = ("(repeat) " if piece.repeat else "") + ("(continued) " if piece.continued else "")
        return f"[{tag(piece.record)}] {marks}{piece.text}{' (continues)' if continues else ''}"


# ---------------------------------------------------------------------------- the API

def _query(after: str | None) -> list[tuple[str, str]]:
    return [("follow", "true"), *((("after", after),) if after else ())]


async def read_records(api_client: Any, namespace: str, name: str,
                       after: str | None = None) -> AsyncIterator[LogRecord]:
    """One follow request: the records after ``after`` as they come, until the server ends
    the response (every attempt ended and its output was read). A dropped stream raises
    (``aiohttp.ClientError``); 429 and 5xx raise ``ApiException``; an answer that retrying
    cannot change raises :class:`OutputUnavailable`."""
    import aiohttp
    from kubernetes_asyncio.client.exceptions import ApiException

    response = await api_client.call_api(
        log_path(namespace, name), "GET", query_params=_query(after),
        header_params={"Accept": CONTENT_TYPE}, auth_settings=["BearerToken"],
        _preload_content=False,
        # No read timeout: the stream is quiet while the command is.
        _request_timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT,
                                               sock_connect=CONNECT_TIMEOUT, sock_read=None),
    )
    try:
        if response.status != 200:
            body = (await response.text(errors="replace"))[:500]
            # A controller without an output store answers 503 for good: not worth retrying.
            if (response.status == 429 or response.status >= 500) and "keeps no output" not in body:
                exc = ApiException(status=response.status, reason=response.reason)
                exc.body = body
                raise exc
            raise OutputUnavailable(_refusal(response.status, namespace, name, body),
                                    not_served=response.status in (404, 503))
        pending = bytearray()
        async for chunk in response.content.iter_any():
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end])
                del pending[:end + 1]
                if line.strip():
                    yield LogRecord.from_json(line)
        if pending.strip():
            yield LogRecord.from_json(bytes(pending))
    finally:
        response.close()


def _refusal(status: int, namespace: str, name: str, body: str) -> str:
    what = f"the output of RemoteCommand {namespace}/{name}"
    if status in (401, 403):
        return (f"Not allowed to read {what} ({status}): the triggerer's Kubernetes identity "
                f"needs get on remotecommands in {c.GROUP} and on remotecommands/log in "
                f"logs.{c.GROUP}; {body.strip()}")
    if status == 404:
        return (f"Cannot read {what} (404): the output API (APIService v1alpha1.logs.{c.GROUP}) "
                f"is not served, or the command is gone; {body.strip()}")
    return f"Cannot read {what} ({status}): {body.strip()}"


def transient(exc: BaseException) -> bool:
    """A failure that retrying may cure: the network, a timeout, 408, 429, 5xx."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    with suppress(ImportError):
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    status = getattr(exc, "status", None)
    return isinstance(status, int) and (status in (408, 429) or status >= 500)


class PositionStore(Protocol):
    async def load(self) -> Position | None: ...

    async def save(self, position: Position) -> None: ...


class AnnotationStore:
    """The read position in an annotation of the RemoteCommand itself (see the module's
    docstring): a merge PATCH of ``metadata.annotations``, nothing else."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.name = name

    def _api(self) -> Any:
        from kubernetes_asyncio import client

        return client.CustomObjectsApi(self.api_client)

    async def load(self) -> Position | None:
        obj = await self._call("read", self._api().get_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, self.name))
        value = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_OUTPUT_POSITION)
        try:
            return Position.from_annotation(value)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("RemoteCommand %s/%s has a garbled %s annotation (%s): showing its "
                        "output from the start", self.namespace, self.name,
                        ANNOTATION_OUTPUT_POSITION, exc)
            return None

    async def save(self, position: Position) -> None:
        body = {"metadata": {"annotations": {ANNOTATION_OUTPUT_POSITION: position.to_annotation()}}}
        await self._call("write the read position on", self._api().patch_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, self.name, body,
            _content_type="application/merge-patch+json"))

    async def _call(self, what: str, call: Any) -> Any:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            return await call
        except ApiException as exc:
            if exc.status == 403:
                raise OutputUnavailable(
                    f"Not allowed to {what} RemoteCommand {self.namespace}/{self.name}: the "
                    "triggerer's identity needs get and patch on remotecommands to show the "
                    "output in the task log (or pass stream_output=False)") from exc
            if exc.status == 404:
                raise OutputUnavailable(
                    f"RemoteCommand {self.namespace}/{self.name} is gone") from exc
            raise


# ---------------------------------------------------------------------------- following

Source = Callable[[str | None], AsyncIterator[LogRecord]]


class OutputFollower:
    """Follows one RemoteCommand's output into the task log (see the module's docstring).

    :param source: opens one follow request resuming after a cursor (:func:`read_records`).
    :param store: where the read position is kept (:class:`AnnotationStore`).
    :param emit: shows one task-log line.
    :param finished: tells whether the command has finished: a stream that ends before
        it has is followed again from its cursor. None: the server's end is the end.
    """

    def __init__(self, source: Source, store: PositionStore, emit: Callable[[str], None], *,
                 describe: str, checkpoint_seconds: float = CHECKPOINT_SECONDS,
                 max_pending_bytes: int = MAX_PENDING_BYTES,
                 finished: Callable[[], bool] | None = None,
                 backoff: float = 1.0, logger: logging.Logger | None = None) -> None:
        self._source = source
        self._store = store
        self._emit = emit
        self._describe = describe
        self._checkpoint_seconds = checkpoint_seconds
        self._max_pending_bytes = max_pending_bytes
        self._finished = finished
        self._backoff_start = backoff
        self.log = logger or log
        self._lines = LineFormatter()
        self._pending: list[LogRecord] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._ended = False
        self.complete = False  # the server ended the stream after the command finished
        self._recent: deque[tuple[float, str]] = deque(maxlen=RECENT_LINES)
        self.shown = 0  # records logged by this follower
        self.repeats = 0  # of which marked as repeats
        self.checkpoints = 0  # position writes
        self._next_write = 0.0
        self._shown_before = Position()
        self._position = Position()
        self._logged: str | None = None  # cursor of the last record logged
        self._cursor: str | None = None  # cursor of the last record received
        self._logged_seq: dict[str, int] = {}

    async def run(self) -> bool:
        """Show the output until it ended (True) — or raise :class:`OutputUnavailable`."""
        loaded = await self._retrying("read the output position of", self._store.load)
        self._shown_before = self._position = loaded or Position()
        self._logged = self._cursor = self._position.after
        if loaded is not None:
            self.log.info("Resuming the output of RemoteCommand %s in the task log where an earlier "
                          "trigger left it%s", self._describe,
                          "; lines it may have shown are marked (repeat)" if loaded.upto else "")
        reader = asyncio.ensure_future(self._read())
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                delay = self._next_write - time.monotonic()
                if delay > 0 and not self._ended:
                    await asyncio.sleep(delay)
                batch, self._pending, self._pending_bytes = self._pending, [], 0
                self._room.set()
                if batch:
                    await self._show(batch, final=self._ended and self.complete)
                if self._ended and not self._pending:
                    break
            reader.result()  # the reader's error, if it ended with one
            return self.complete
        except asyncio.CancelledError:
            await self._leave()
            raise
        finally:
            if not reader.done():
                reader.cancel()
                with suppress(asyncio.CancelledError):
                    await reader

    async def _leave(self) -> None:
        """Cancelled (a triggerer that stops gracefully, a trigger moved): record exactly how
        far the task log got, so that the next trigger repeats nothing. Best effort: after a
        SIGKILL the last checkpoint stands, and its batch is shown again, marked."""
        position = Position(after=self._logged, upto={
            k: s for k, s in self._position.upto.items() if s > self._logged_seq.get(k, 0)})
        if self.checkpoints == 0 or position == self._position:
            return
        try:
            await asyncio.wait_for(self._store.save(position), 2.0)
        except Exception as exc:  # noqa: BLE001 - the last checkpoint still holds: repeats are marked
            self.log.info("Could not record the final output position of RemoteCommand %s (%s): "
                          "the next trigger marks its last lines as repeats", self._describe, exc)

    async def _read(self) -> None:
        backoff = self._backoff_start
        try:
            while True:
                stream = self._source(self._cursor)
                try:
                    async for record in stream:
                        while self._pending_bytes >= self._max_pending_bytes:
                            self._room.clear()
                            await self._room.wait()
                        self._pending.append(record)
                        self._pending_bytes += len(record.data) + 64
                        self._cursor = record.cursor
                        self._wake.set()
                        backoff = self._backoff_start
                    if self._finished is None or self._finished():
                        self.complete = True
                        return
                    reason = "ended before the command finished"
                except Exception as exc:
                    if not transient(exc):
                        raise
                    reason = f"dropped ({type(exc).__name__}: {exc})"
                finally:
                    close = getattr(stream, "aclose", None)
                    if close is not None:
                        await close()  # the request's connection, now rather than at GC
                self.log.warning("The output stream of RemoteCommand %s %s; resuming in %.0f s",
                                 self._describe, reason, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            self._ended = True
            self._wake.set()

    async def _show(self, batch: Sequence[LogRecord], final: bool) -> None:
        """Write the checkpoint that covers ``batch``, then log it."""
        upto = {k: s for k, s in self._position.upto.items() if s > self._logged_seq.get(k, 0)}
        for record in batch:
            key = record_key(record)
            upto[key] = max(upto.get(key, 0), record.seq)
        position = Position(after=self._logged, upto=upto)
        started = time.monotonic()  # one write per interval, start to start
        await self._retrying("write the output position of", lambda: self._store.save(position))
        self.checkpoints += 1
        self._next_write = started + self._checkpoint_seconds
        self._position = position
        for record in batch:
            repeat = self._shown_before.may_have_shown(record)
            for line in self._lines.feed(record, repeat):
                self._show_line(line)
            self._logged_seq[record_key(record)] = record.seq
            self.shown += 1
            self.repeats += repeat
        for line in self._lines.flush(final=final):
            self._show_line(line)
        self._logged = batch[-1].cursor

    def _show_line(self, line: str) -> None:
        self._emit(line)
        self._recent.append((time.monotonic(), line))

    def recent(self, seconds: float, max_bytes: int = RECENT_BYTES) -> list[str]:
        """The lines shown in the last ``seconds`` (the newest, at most ``max_bytes``)."""
        since = time.monotonic() - seconds
        out: list[str] = []
        size = 0
        for at, line in reversed(self._recent):
            size += len(line) + 1
            if at < since or size > max_bytes:
                break
            out.append(line)
        return out[::-1]

    async def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        backoff = self._backoff_start
        while True:
            try:
                return await call()
            except Exception as exc:
                if not transient(exc):
                    raise
                self.log.warning("Could not %s RemoteCommand %s (%s: %s); retrying in %.0f s",
                                 what, self._describe, type(exc).__name__, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
