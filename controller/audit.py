"""A record of every run: one Event per attempt on the RemoteCommand, one JSON audit line.

When an attempt ends (a worker's ``finished`` report, or the controller ending it as
``WorkerLost``) the controller makes an :class:`AttemptRecord`: VM, host, host-key
fingerprint, start and end, phase and reason, exit code or signal, the bytes and SHA-256
of stdout and of stderr (the worker hashes the whole streams as it reads them), and the
worker pod that ran it. Records travel with the status write that carries the attempt's
end; only once that write landed are they handed to :class:`RunRecords`, which writes the
Events on a thread of its own (batched each ``period``, never in the status writer's
way).

Events:

- a command over at most :data:`AGGREGATE_ABOVE` VMs: one Event per attempt, named
  ``<command>.<vm>.<attempt>.<hash>``;
- a larger fan-out: one Event per block of 50 VMs (by result index) and attempt number,
  named ``<command>.a<attempt>-b<block>.<hash>``, written once every VM of the block is
  past that attempt; the records are in its ``vmfleet.io/attempts`` annotation (JSON).

Written once, even across a change of leader: Event names are deterministic and Events
are only ever created, never updated, so a second controller writing the same record
gets 409 (AlreadyExists). The audit line of an attempt is logged by the controller whose
create succeeded, right after it (and by one that gave up writing the Event after
:data:`TRIES` API errors, so the log still has it). The worker reports carrying an
attempt's end are acknowledged only after its Event was written (or given up): a leader
that stops before that leaves them pending; the next leader reads them again, finds them
already applied to the status, and records them (:meth:`RunRecords.submit` with no
layout), which its create either does or finds done (409).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from vmfleet import metrics
from vmfleet.api import constants as c
from vmfleet.api.constants import Phase
from vmfleet.api.reports import AttemptReport, F
from vmfleet.api.times import now_rfc3339
from vmfleet.kube import ApiException

log = logging.getLogger("controller.audit")

AUDIT_LOGGER: Final = "vmfleet.audit"
AGGREGATE_ABOVE: Final = 50  # a fan-out over this many VMs: one Event per this many attempts
ANNOTATION_ATTEMPT: Final = f"{c.GROUP}/attempt"  # one record (JSON)
ANNOTATION_ATTEMPTS: Final = f"{c.GROUP}/attempts"  # a block's records (JSON list)
REASON_SUCCEEDED: Final = "AttemptSucceeded"
REASON_FAILED: Final = "AttemptFailed"
REASON_CANCELLED: Final = "AttemptCancelled"
REASON_BLOCK: Final = "AttemptsEnded"
RECORD_KIND: Final = "RemoteCommandAttempt"  # the audit line's "kind"
COMPONENT: Final = "vmfleet-controller"
TRIES: Final = 3  # API errors writing one Event before it is given up

# (vm, phase, attempt) of each result entry, in order: what naming and blocks need.
Layout = tuple[tuple[str, str, int], ...]


def layout_of(status: dict[str, Any] | None) -> Layout:
    return tuple((str(e.get(F.VM)), str(e.get(F.PHASE) or Phase.PENDING), int(e.get(F.ATTEMPT) or 1))
                 for e in (status or {}).get("results") or [])


@dataclass(frozen=True)
class AttemptRecord:
    """One ended attempt, as its Event and audit line give it (wire names: ``fields()``)."""

    namespace: str
    name: str
    uid: str
    vm: str
    attempt: int
    phase: str
    reason: str | None = None
    host: str | None = None
    host_key_fingerprint: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    stdout_bytes: int | None = None
    stdout_sha256: str | None = None
    stderr_bytes: int | None = None
    stderr_sha256: str | None = None
    worker: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.uid, self.vm, self.attempt)

    def fields(self) -> dict[str, Any]:
        """The attempt's fields, wire-named as in ``status.results[]``."""
        return {F.VM: self.vm, F.HOST: self.host, "hostKeyFingerprint": self.host_key_fingerprint,
                F.ATTEMPT: self.attempt, F.PHASE: self.phase, F.REASON: self.reason,
                F.EXIT_CODE: self.exit_code, F.SIGNAL: self.signal,
                F.START_TIME: self.start_time, F.COMPLETION_TIME: self.completion_time,
                F.STDOUT_BYTES: self.stdout_bytes, "stdoutSha256": self.stdout_sha256,
                F.STDERR_BYTES: self.stderr_bytes, "stderrSha256": self.stderr_sha256,
                F.WORKER: self.worker}


def record_of_report(report: AttemptReport, entry: dict[str, Any]) -> AttemptRecord:
    """The record of a worker's ``finished`` report; ``entry`` is the result entry as it
    was before (it holds the claim's start time, host and worker)."""
    f = report.fields
    return AttemptRecord(
        namespace=report.namespace, name=report.name, uid=report.uid, vm=report.vm,
        attempt=report.attempt, phase=f.phase or Phase.FAILED, reason=f.reason,
        host=f.host or entry.get(F.HOST), host_key_fingerprint=f.host_key_fingerprint,
        start_time=f.start_time or entry.get(F.START_TIME),
        completion_time=f.completion_time or report.time, exit_code=f.exit_code, signal=f.signal,
        stdout_bytes=f.stdout_bytes, stdout_sha256=f.stdout_sha256,
        stderr_bytes=f.stderr_bytes, stderr_sha256=f.stderr_sha256,
        worker=f.worker or report.worker or entry.get(F.WORKER))


def record_of_entry(namespace: str, name: str, uid: str, before: dict[str, Any],
                    after: dict[str, Any], now: str) -> AttemptRecord:
    """The record of an attempt the controller ended itself (its worker was lost):
    ``before`` is the running entry, ``after`` the entry once it ended or was retried."""
    return AttemptRecord(
        namespace=namespace, name=name, uid=uid, vm=str(before[F.VM]),
        attempt=int(before.get(F.ATTEMPT) or 1), phase=Phase.FAILED,
        reason=str(after.get(F.REASON) or c.Reason.WORKER_LOST), host=before.get(F.HOST),
        start_time=before.get(F.START_TIME), completion_time=now, worker=before.get(F.WORKER))


# ---------------------------------------------------------------------- Events (pure)

def _segment(text: str, limit: int) -> str:
    return text[:limit].strip(".-") or "x"


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:10]


def event_name(record: AttemptRecord, layout: Layout) -> str:
    """The Event that holds ``record``: deterministic, so that two controllers writing
    the same record name the same Event (the second create is a 409)."""
    block = block_of(record, layout)
    if block is None:
        return (f"{_segment(record.name, 120)}.{_segment(record.vm, 80)}.{record.attempt}."
                f"{_digest(record.uid, record.vm, record.attempt)}")
    return f"{_segment(record.name, 150)}.a{record.attempt}-b{block}.{_digest(record.uid, block, record.attempt)}"


def block_of(record: AttemptRecord, layout: Layout) -> int | None:
    """The record's block of 50 VMs on a fan-out over 50 (None: an Event of its own)."""
    if len(layout) <= AGGREGATE_ABOVE:
        return None
    for index, (vm, _, _) in enumerate(layout):
        if vm == record.vm:
            return index // AGGREGATE_ABOVE
    return None  # not one of its VMs (the command is gone): on its own


def block_ended(block: int, attempt: int, layout: Layout) -> bool:
    """Every VM of the block is past ``attempt``: ended, or on a later attempt."""
    members = layout[block * AGGREGATE_ABOVE:(block + 1) * AGGREGATE_ABOVE]
    return all(phase in Phase.TERMINAL or number > attempt for _, phase, number in members)


def _outcome(record: AttemptRecord) -> str:
    if record.signal:
        return f"signal {record.signal}"
    if record.exit_code is not None:
        return f"exit code {record.exit_code}"
    return record.reason or record.phase


def _message(record: AttemptRecord) -> str:
    def stream(n: int | None, digest: str | None, what: str) -> str:
        return f"{what} {n if n is not None else '?'} bytes sha256 {digest or '-'}"
    text = (f"Attempt {record.attempt} on {record.vm} ({record.host or '?'}, host key "
            f"{record.host_key_fingerprint or '-'}) {record.phase}"
            f"{f' ({record.reason})' if record.reason else ''}: {_outcome(record)}; "
            f"{stream(record.stdout_bytes, record.stdout_sha256, 'stdout')}, "
            f"{stream(record.stderr_bytes, record.stderr_sha256, 'stderr')}; worker "
            f"{record.worker or '?'}; {record.start_time or '?'} - {record.completion_time or '?'}")
    return text[:1024]


def _reason(phase: str) -> tuple[str, str]:
    if phase == Phase.SUCCEEDED:
        return "Normal", REASON_SUCCEEDED
    if phase == Phase.CANCELLED:
        return "Normal", REASON_CANCELLED
    return "Warning", REASON_FAILED


def event_body(name: str, records: list[AttemptRecord], controller: str, now: str,
               block: int | None = None) -> dict[str, Any]:
    """The Event of one record, or (``block``) of a block's records, sorted by VM."""
    first = records[0]
    starts = [r.start_time for r in records if r.start_time]
    ends = [r.completion_time for r in records if r.completion_time]
    meta: dict[str, Any] = {"name": name, "namespace": first.namespace,
                            "labels": {c.LABEL_MANAGED_BY: c.MANAGED_BY}}
    if block is None:
        type_, reason = _reason(first.phase)
        message = _message(first)
        meta["annotations"] = {ANNOTATION_ATTEMPT: json.dumps(first.fields(), sort_keys=True)}
    else:
        phases: dict[str, int] = {}
        for r in records:
            label = r.phase if not r.reason or r.phase == Phase.SUCCEEDED else f"{r.phase} ({r.reason})"
            phases[label] = phases.get(label, 0) + 1
        type_ = "Normal" if all(r.phase == Phase.SUCCEEDED for r in records) else "Warning"
        reason = REASON_BLOCK
        vms = sorted(r.vm for r in records)
        total = sum((r.stdout_bytes or 0) + (r.stderr_bytes or 0) for r in records)
        message = (f"Attempt {first.attempt} on {len(records)} VMs ({vms[0]} .. {vms[-1]}): "
                   + ", ".join(f"{n} {label}" for label, n in sorted(phases.items()))
                   + f"; {total} bytes of output; each attempt (host key, times, exit code, "
                   f"bytes, sha256, worker) is in annotation {ANNOTATION_ATTEMPTS}")[:1024]
        meta["annotations"] = {ANNOTATION_ATTEMPTS: json.dumps(
            [r.fields() for r in sorted(records, key=lambda r: r.vm)], sort_keys=True)}
    return {
        "apiVersion": "v1", "kind": "Event", "metadata": meta,
        "involvedObject": {"apiVersion": c.API_VERSION, "kind": c.COMMAND_KIND,
                           "name": first.name, "namespace": first.namespace, "uid": first.uid},
        "type": type_, "reason": reason, "message": message,
        "firstTimestamp": min(starts) if starts else now,
        "lastTimestamp": max(ends) if ends else now,
        "count": len(records),
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT, "reportingInstance": controller[:128],
    }


def audit_line(record: AttemptRecord, event: str | None, controller: str, now: str) -> str:
    """The attempt's JSON line for a cluster's log pipeline (one line, sorted keys)."""
    body = {"kind": RECORD_KIND, "time": now, "namespace": record.namespace,
            "name": record.name, "uid": record.uid, **record.fields(),
            "event": event, "controller": controller}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def audit_logger() -> logging.Logger:
    """``vmfleet.audit``: bare JSON lines on stderr, whatever the controller's log format."""
    logger = logging.getLogger(AUDIT_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


# ---------------------------------------------------------------------- the writer

class EventSink(Protocol):
    def create_namespaced_event(self, namespace: str, body: Any) -> Any: ...


Lookup = Callable[[str, str, str], Layout | None]  # (namespace, name, uid): the command's layout


@dataclass
class Pending:
    """A record waiting for its Event, and the reports acknowledged once it is written."""

    record: AttemptRecord
    report_ids: list[str] = field(default_factory=list)


@dataclass
class _Group:
    """The records of one Event."""

    name: str
    namespace: str
    attempt: int
    block: int | None
    items: dict[tuple[str, str, int], Pending] = field(default_factory=dict)
    tries: int = 0
    not_before: float = 0.0


class RunRecords:
    """Writes the Events and audit lines of ended attempts (thread-safe; see the module)."""

    def __init__(self, events: EventSink | None, ack: Callable[[list[str]], None],
                 controller: str, *, lookup: Lookup = lambda ns, name, uid: None,
                 period: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.events = events
        self.ack = ack
        self.controller = controller
        self.lookup = lookup
        self.period = period
        self.clock = clock
        self.audit = logger or audit_logger()
        self._lock = threading.Lock()
        self._groups: dict[str, _Group] = {}
        self._layouts: dict[str, Layout] = {}  # uid -> as last written
        self._unplaced: list[Pending] = []  # records of commands whose layout is looked up
        self._wake = threading.Event()

    def submit(self, uid: str, layout: Layout | None, pending: Iterable[Pending]) -> None:
        """Records whose end is written (and the command's layout as written now); None:
        not known here (a report read again after a restart): looked up first."""
        items = list(pending)
        with self._lock:
            if layout is not None and (items or uid in self._layouts):
                self._layouts[uid] = layout
            for item in items:
                if layout is None and item.record.uid not in self._layouts:
                    self._unplaced.append(item)
                else:
                    self._place(item)
        if items:
            self._wake.set()

    def gone(self, uid: str) -> None:
        """The command was deleted: its blocks wait for no more attempts."""
        with self._lock:
            layout = self._layouts.get(uid)
            if layout is not None:
                self._layouts[uid] = tuple((vm, Phase.CANCELLED, n) for vm, _, n in layout)
        self._wake.set()

    def _place(self, item: Pending) -> None:
        record = item.record
        layout = self._layouts.get(record.uid, ())
        name = event_name(record, layout)
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group(name, record.namespace, record.attempt,
                                                block_of(record, layout))
        known = group.items.get(record.key)
        if known is not None:  # the same end again (a report read twice): one record
            known.report_ids.extend(item.report_ids)
        else:
            group.items[record.key] = item

    def _ready(self, now: float) -> list[_Group]:
        ready = []
        for name, group in list(self._groups.items()):
            if group.not_before > now:
                continue
            if group.block is not None:
                uid = next(iter(group.items))[0]
                if not block_ended(group.block, group.attempt, self._layouts.get(uid, ())):
                    continue
            ready.append(self._groups.pop(name))
        return ready

    def flush(self, *, leading: bool = True) -> int:
        """Write the Events that are ready (one create each); returns how many were
        tried. Not leading: drop what is held, unacknowledged (the next leader reads
        those reports again)."""
        if not leading:
            with self._lock:
                self._groups.clear()
                self._unplaced.clear()
                self._layouts.clear()
            return 0
        with self._lock:
            unplaced, self._unplaced = self._unplaced, []
        for item in unplaced:  # an API read per command, outside the lock
            r = item.record
            with self._lock:
                known = r.uid in self._layouts
            if not known:
                layout = self._lookup(r)
                with self._lock:
                    self._layouts.setdefault(r.uid, layout)
            with self._lock:
                self._place(item)
        with self._lock:
            ready = self._ready(self.clock())
            live = {next(iter(g.items))[0] for g in self._groups.values()}
            for uid in list(self._layouts):
                if uid not in live:
                    del self._layouts[uid]
        for group in ready:
            self._write(group)
        return len(ready)

    def _lookup(self, record: AttemptRecord) -> Layout:
        try:
            return self.lookup(record.namespace, record.name, record.uid) or ()
        except Exception as exc:  # noqa: BLE001 - then it is recorded on its own
            log.warning("Could not read RemoteCommand %s/%s to place its attempt record: %s",
                        record.namespace, record.name, exc)
            return ()

    def _write(self, group: _Group) -> None:
        records = [item.record for item in group.items.values()]
        ids = [rid for item in group.items.values() for rid in item.report_ids]
        now = now_rfc3339()
        if self.events is None:
            self._logged(records, None, now, ids)
            return
        body = event_body(group.name, records, self.controller, now, group.block)
        try:
            self.events.create_namespaced_event(group.namespace, cast(Any, body))
        except ApiException as exc:
            if exc.status == 409:  # written before: by another leader, or by us before a restart
                metrics.RUN_EVENTS.labels("Exists").inc()
                log.info("Event %s/%s exists already: its attempts were recorded before",
                         group.namespace, group.name)
                self._acknowledge(ids)
                return
            self._failed(group, records, ids, f"{exc.status} {exc.reason}", now)
            return
        except Exception as exc:  # noqa: BLE001 - the API server away: tried again, then given up
            self._failed(group, records, ids, str(exc), now)
            return
        metrics.RUN_EVENTS.labels("Created").inc()
        self._logged(records, group.name, now, ids)

    def _failed(self, group: _Group, records: list[AttemptRecord], ids: list[str], why: str,
                now: str) -> None:
        group.tries += 1
        if group.tries >= TRIES:
            metrics.RUN_EVENTS.labels("GaveUp").inc()
            log.error("Gave up writing Event %s/%s after %s tries (%s); its %s attempt records "
                      "are in the audit log only", group.namespace, group.name, group.tries, why,
                      len(records))
            self._logged(records, None, now, ids)
            return
        metrics.RUN_EVENTS.labels("Failed").inc()
        delay = min(2.0 * 2 ** group.tries, 30.0)
        log.warning("Writing Event %s/%s failed (%s); trying again in %.0fs", group.namespace,
                    group.name, why, delay)
        group.not_before = self.clock() + delay
        with self._lock:
            self._groups.setdefault(group.name, group)

    def _logged(self, records: list[AttemptRecord], event: str | None, now: str,
                ids: list[str]) -> None:
        for record in sorted(records, key=lambda r: (r.vm, r.attempt)):
            self.audit.info(audit_line(record, event, self.controller, now))
        self._acknowledge(ids)

    def _acknowledge(self, ids: list[str]) -> None:
        try:
            self.ack(ids)
        except Exception as exc:  # noqa: BLE001 - read again later: its create is a 409
            log.warning("Could not acknowledge %s reports: %s", len(ids), exc)

    def held(self) -> int:
        """Records waiting (for their block, a retry or a lookup)."""
        with self._lock:
            return sum(len(g.items) for g in self._groups.values()) + len(self._unplaced)

    def run(self, stop: threading.Event, gate: Callable[[], bool] = lambda: True) -> None:
        """Flush every ``period`` (sooner when records arrive) until ``stop``."""
        while not stop.is_set():
            self._wake.wait(self.period)
            self._wake.clear()
            stop.wait(min(self.period, 0.2))  # records arriving together go out together
            try:
                self.flush(leading=gate())
            except Exception:  # noqa: BLE001
                log.exception("Writing attempt records failed")


__all__ = ["AGGREGATE_ABOVE", "AUDIT_LOGGER", "AttemptRecord", "Layout", "Pending", "RunRecords",
           "audit_line", "audit_logger", "block_ended", "block_of", "event_body", "event_name",
           "layout_of", "record_of_entry", "record_of_report"]
