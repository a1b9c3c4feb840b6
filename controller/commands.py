"""RemoteCommands as the controller holds them: the only writer of their status.

The controller keeps each unfinished command's status in memory (``Tracked``): the
watch brings new commands, the workers' reports (``vmfleet.state``) and the scheduler
(``schedule.plan``) change the copy, and ``Writer`` writes what changed, batched:
everything that arrived for one command within a short window goes out in one patch.
A change says how soon it must be written (``Urgency``): a result at once, a claim or
a dispatch within a few tens of milliseconds (so a short command's claim and result
usually travel in one write), progress every few seconds. Reports are acknowledged
only when the write carrying them has landed.

Finished commands are dropped from memory (a ``ttlSecondsAfterFinished`` keeps a small
expiry record); deleting a command needs no finalizer: the watch's DELETED event cancels
its attempts through Redis, and a controller that was down when it happened cancels
it at start (``vmfleet.state`` keeps the set of live commands).
"""

from __future__ import annotations

import copy
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from vmfleet.api import constants as c
from vmfleet.api.constants import (
    TASK_EXECUTE,
    TASK_TERMINATE,
    TASK_TRANSFER_CLEANUP,
    Phase,
    Reason,
)
from vmfleet.api.envelope import Envelope, Target, now_rfc3339, parse_rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.fold import fold, set_condition
from vmfleet.state import State, attempt_member

from . import schedule
from .reports import FINISHED, PROGRESS, apply_attempt_report
from .targets import describe_target, initial_results, label_selector_string, vm_queue
from .transfers import initial_transfer_results, send_transfer

log = logging.getLogger("controller.commands")


@dataclass(frozen=True)
class Urgency:
    """How soon a change must be written (seconds)."""

    start: float = 0.05  # initial entries: a quick command's claim and result join them
    claimed: float = 0.1
    progress: float = 2.0
    finished: float = 0.0
    per_target: float = 0.002  # a fan-out's results wait this much longer per VM (capped)
    fan_out_cap: float = 0.25


@dataclass
class Tracked:
    """One unfinished RemoteCommand: its status as wanted now and as last written."""

    namespace: str
    name: str
    uid: str
    spec: RemoteCommandSpec
    status: dict[str, Any]
    written: dict[str, Any] | None
    ttl: int | None = None
    due: float | None = None  # monotonic time by which ``status`` must be written
    acks: list[str] = field(default_factory=list)  # reports carried by the next write
    failures: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def finished(self) -> bool:
        return self.status.get("phase") in Phase.TERMINAL

    def want(self, delay: float, now: float | None = None) -> None:
        at = (time.monotonic() if now is None else now) + delay
        self.due = at if self.due is None else min(self.due, at)


# The hooks the command logic needs from the rest of the controller.
Sender = Callable[[str, list[Any], str], None]  # (task, args, queue)
VMLookup = Callable[[str, str], dict[str, Any] | None]
VMLister = Callable[[str, str], list[dict[str, Any]]]  # (namespace, label selector)
TargetOf = Callable[[dict[str, Any]], Target]
Wake = Callable[[str, str], None]  # a dispatch to a VM that may be at zero replicas
Delete = Callable[[str, str, str], None]  # (uid, namespace, name): ttlSecondsAfterFinished
SecretNames = Callable[[str], list[str]]  # namespace -> its RemoteVMs' credentials Secrets
WakeTransfers = Callable[[str], None]  # a transfer sent: the namespace's transfer worker

# How long a command written in an end state is remembered: the watch may still bring the
# events of its earlier writes (a claim's `Running`), which must not start tracking again.
FINISHED_MEMORY_SECONDS = 300.0


class Commands:
    """Every unfinished command of the watched namespaces, and what to do with them."""

    def __init__(self, state: State, send: Sender, get_vm: VMLookup, list_vms: VMLister,
                 target_of: TargetOf, wake: Wake, delete: Delete, *, timing: schedule.Timing = schedule.Timing(),
                 urgency: Urgency = Urgency(),
                 protected_secrets: SecretNames = lambda namespace: [],
                 wake_transfers: WakeTransfers = lambda namespace: None) -> None:
        self.state = state
        self.send = send
        self.get_vm = get_vm
        self.list_vms = list_vms
        self.target_of = target_of
        self.wake = wake
        self.delete = delete
        self.protected_secrets = protected_secrets
        self.wake_transfers = wake_transfers
        self.timing = timing
        self.urgency = urgency
        self._lock = threading.Lock()
        self._tracked: dict[str, Tracked] = {}
        self._finished: dict[str, float] = {}  # uid -> when forgotten (oldest first)
        self._expiries: list[tuple[float, str, str, str]] = []  # (wall time, uid, ns, name)
        self._expiring: set[str] = set()
        self.changed = threading.Condition()

    # ------------------------------------------------------------------ the watch

    def observe(self, obj: dict[str, Any]) -> None:
        """A RemoteCommand from the watch (or the start-up list)."""
        meta = obj["metadata"]
        uid = meta["uid"]
        with self._lock:
            if uid in self._tracked:
                return  # ours: the event is the echo of a write (or older than our copy)
            finished = uid in self._finished
        status = obj.get("status") or {}
        spec_body = obj.get("spec") or {}
        if finished and status.get("phase") not in Phase.TERMINAL:
            return  # an earlier write's echo arriving after the last one was done
        if status.get("phase") in Phase.TERMINAL:
            self._expire_later(uid, meta["namespace"], meta["name"], spec_body, status)
            return
        try:
            spec = RemoteCommandSpec.model_validate(spec_body)
        except ValidationError as exc:
            self._reject(obj, f"the spec is invalid: {exc.errors()[0].get('msg', exc)}")
            return
        tracked = Tracked(meta["namespace"], meta["name"], uid, spec,
                          copy.deepcopy(status), copy.deepcopy(status) if status else None,
                          ttl=spec.ttl_seconds_after_finished)
        with self._lock:
            if uid in self._tracked:
                return
            self._tracked[uid] = tracked
        with tracked.lock:
            if tracked.status.get("results") is None:
                self.start(tracked)
            else:
                self.advance(tracked)
        self._notify()

    def deleted(self, obj: dict[str, Any]) -> list[str]:
        """The command is gone: cancel what runs or waits. Returns reports to acknowledge."""
        uid = obj["metadata"]["uid"]
        with self._lock:
            tracked = self._tracked.pop(uid, None)
            self._expiring.discard(uid)
            self._finished.pop(uid, None)
        if tracked is None:
            return []
        with tracked.lock:
            acks, tracked.acks = tracked.acks, []
            running = [e["vm"] for e in tracked.status.get("results") or []
                       if e.get("phase") not in Phase.TERMINAL]
        if running:
            self.state.cancel(uid)
            log.info("Cancelled RemoteCommand %s on %s: it was deleted", tracked.ref,
                     ", ".join(running))
        else:
            self.state.finished(uid)
        return acks

    def get(self, uid: str) -> Tracked | None:
        with self._lock:
            return self._tracked.get(uid)

    def uids(self) -> set[str]:
        with self._lock:
            return set(self._tracked)

    def tracked(self) -> list[Tracked]:
        with self._lock:
            return list(self._tracked.values())

    def forget(self, tracked: Tracked) -> None:
        """Written in an end state: no longer held."""
        now = time.monotonic()
        with self._lock:
            if self._tracked.get(tracked.uid) is tracked:
                del self._tracked[tracked.uid]
            self._finished[tracked.uid] = now
            while self._finished:  # oldest first: drop what is past remembering
                uid, at = next(iter(self._finished.items()))
                if now - at < FINISHED_MEMORY_SECONDS:
                    break
                del self._finished[uid]
        self.state.finished(tracked.uid)
        if tracked.ttl is not None:
            finished = tracked.status.get("completionTime") or now_rfc3339()
            self._schedule_expiry(tracked.uid, tracked.namespace, tracked.name, finished, tracked.ttl)

    # ------------------------------------------------------------------ reports

    def apply(self, report: dict[str, Any], report_id: str) -> bool:
        """Fold a worker's report into its command; False when there is nothing to write
        (stale, or the command is gone): acknowledge it at once."""
        tracked = self.get(str(report.get("uid")))
        if tracked is None:
            if report.get("event") not in (FINISHED, PROGRESS) and report.get("uid"):
                # A claim for a command that no longer exists: make sure it stops.
                self.state.cancel(str(report["uid"]))
            return False
        with tracked.lock:
            results = tracked.status.get("results") or []
            index = next((i for i, e in enumerate(results) if e.get("vm") == report.get("vm")), None)
            if index is None:
                return False
            new = apply_attempt_report(tracked.spec, results[index], report, datetime.now(UTC))
            if new is None:
                return False
            results[index] = new
            event = report.get("event")
            if event == FINISHED:
                n = len(results)
                delay = min(self.urgency.finished + self.urgency.per_target * (n - 1),
                            self.urgency.fan_out_cap) if n > 1 else self.urgency.finished
            elif event == PROGRESS:
                delay = self.urgency.progress
            else:
                delay = self.urgency.claimed
            tracked.acks.append(report_id)
            if event == FINISHED:
                self.advance(tracked, refold=True)  # capacity freed, a retry to schedule
            self._refold(tracked)
            tracked.want(delay)
        self._notify()
        return True

    # ------------------------------------------------------------------ scheduling

    def start(self, tracked: Tracked) -> None:
        """The initial result entries, and the first attempts sent."""
        spec = tracked.spec
        now = now_rfc3339()
        if spec.transfer is not None:
            vms = {name: vm for name in _transfer_vms(spec)
                   if (vm := self.get_vm(tracked.namespace, name)) is not None}
            results = initial_transfer_results(spec, vms, now)
            for entry in results:
                if entry["phase"] == Phase.QUEUED:
                    entry["phase"] = Phase.PENDING
                    entry.pop("dispatchTime", None)
        elif spec.vm is not None:
            found = self.get_vm(tracked.namespace, spec.vm)
            results = initial_results([spec.vm], {spec.vm: found} if found else {}, now,
                                      phase=Phase.PENDING)
        else:
            assert spec.selector is not None
            found_vms = {vm["metadata"]["name"]: vm for vm in
                         self.list_vms(tracked.namespace, label_selector_string(spec.selector))}
            results = initial_results(sorted(found_vms), found_vms, now, phase=Phase.PENDING)
        tracked.status = {"startTime": now, "results": results, "target": describe_target(spec)}
        self.advance(tracked)
        self._refold(tracked)
        tracked.want(self.urgency.start)

    def advance(self, tracked: Tracked, *, lost: frozenset[str] = frozenset(),
                refold: bool = False) -> None:
        """Apply ``schedule.plan`` to the copy and send what it dispatches."""
        status = tracked.status
        if status.get("phase") in Phase.TERMINAL:
            return
        vms = {vm: self.get_vm(tracked.namespace, vm) for vm in sorted(schedule.pending_vms(status))}
        queues = {vm: (vm_queue(obj) if obj is not None else None) for vm, obj in vms.items()}
        paused = frozenset(vm for vm, obj in vms.items() if obj and obj["spec"].get("paused"))
        step = schedule.plan(tracked.spec, status, datetime.now(UTC), queues=queues,
                             timing=self.timing, paused=paused, lost=lost)
        if not step:
            return
        results = status["results"]
        for change in step.changes:
            before = dict(results[change.index])
            results[change.index].update(change.set)
            for key in change.remove:
                results[change.index].pop(key, None)
            if change.vm in lost and before.get("phase") == Phase.RUNNING:
                after = results[change.index]
                log.warning("RemoteCommand %s on %s: worker %s lost during attempt %s; %s",
                            tracked.ref, change.vm, before.get("worker", "?"),
                            before.get("attempt", 1),
                            "retrying" if after.get("phase") == Phase.PENDING
                            else f"failed ({after.get('reason')})")
        if tracked.spec.transfer is not None and lost:
            for entry in results:  # the lost attempts' temporary files go
                if entry["vm"] in lost:
                    attempt = int(entry.get("attempt") or 1)
                    lost_attempt = attempt - 1 if entry.get("phase") == Phase.PENDING else attempt
                    send_transfer(self, tracked, entry, lost_attempt, task=TASK_TRANSFER_CLEANUP)
        for vm, pgid, marker in step.terminate:
            obj = self.get_vm(tracked.namespace, vm)
            if obj is not None:
                become = tracked.spec.become.user if tracked.spec.become is not None else None
                self.send(TASK_TERMINATE,
                          [self.target_of(obj).to_message(), pgid, marker, become],
                          vm_queue(obj))
                log.info("Asked the workers of %s to terminate process group %s of RemoteCommand "
                         "%s", vm, pgid, tracked.ref)
        for vm, attempt in step.dispatch:
            self._dispatch(tracked, vm, attempt, vms.get(vm))
        if step.changes:
            self._refold(tracked)
            tracked.want(0.0 if not step.dispatch else self.urgency.start)

    def _dispatch(self, tracked: Tracked, vm: str, attempt: int, obj: dict[str, Any] | None) -> None:
        if obj is None:
            return
        entry = next(e for e in tracked.status["results"] if e.get("vm") == vm)
        if tracked.spec.transfer is not None:
            send_transfer(self, tracked, entry, attempt)
            return
        envelope = Envelope(
            namespace=tracked.namespace, name=tracked.name, uid=tracked.uid, vm=vm,
            attempt=attempt, dispatch_time=now_rfc3339(), spec=tracked.spec.wire(),
            target=self.target_of(obj), command_start=tracked.status.get("startTime"),
            lost_pgid=entry.get("lostPgid"), lost_marker=entry.get("lostMarker"),
            scope=self.state.scope,
        )
        self.state.sent(tracked.uid)
        self.send(TASK_EXECUTE, [envelope.to_message()], vm_queue(obj))
        self.wake(tracked.namespace, vm)  # a VM scaled to zero gets a worker now
        log.info("Dispatched RemoteCommand %s to %s (attempt %s, queue %s)", tracked.ref, vm,
                 attempt, vm_queue(obj))

    def _refold(self, tracked: Tracked) -> None:
        results = tracked.status.get("results") or []
        tracked.status.update(fold(results, tracked.status, now_rfc3339()))

    def tick(self) -> None:
        """The controller loop: time-based moves (retries due, deadlines, lost workers,
        resent dispatches) and expired TTLs."""
        stale = self._stale_heartbeats()
        for tracked in self.tracked():
            with tracked.lock:
                lost = frozenset(
                    e["vm"] for e in tracked.status.get("results") or []
                    if e.get("phase") == Phase.RUNNING
                    and attempt_member(tracked.uid, e["vm"], int(e.get("attempt") or 1)) in stale)
                self.advance(tracked, lost=lost)
        for member in stale:
            self.state.forget_heartbeat(member)  # declared lost now, or its command is gone
        self._expire()

    def _stale_heartbeats(self) -> set[str]:
        try:
            return self.state.stale_heartbeats(self.timing.lost_after)
        except Exception as exc:  # noqa: BLE001 - Redis restarting: nobody is declared lost
            log.warning("Could not read heartbeats: %s", exc)
            return set()

    # ------------------------------------------------------------------ TTL

    def _expire_later(self, uid: str, namespace: str, name: str, spec: dict[str, Any],
                      status: dict[str, Any]) -> None:
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        finished = status.get("completionTime") or now_rfc3339()
        self._schedule_expiry(uid, namespace, name, finished, int(ttl))

    def _schedule_expiry(self, uid: str, namespace: str, name: str, finished: str, ttl: int) -> None:
        at = parse_rfc3339(finished).timestamp() + ttl
        with self._lock:
            if uid in self._expiring:
                return
            self._expiring.add(uid)
            heapq.heappush(self._expiries, (at, uid, namespace, name))

    def expiring(self) -> int:
        with self._lock:
            return len(self._expiries)

    def _expire(self) -> None:
        now = time.time()
        due: list[tuple[float, str, str, str]] = []
        with self._lock:
            while self._expiries and self._expiries[0][0] <= now:
                item = heapq.heappop(self._expiries)
                self._expiring.discard(item[1])
                due.append(item)
        for _, uid, namespace, name in due:
            self.delete(uid, namespace, name)

    # ------------------------------------------------------------------ misc

    def _reject(self, obj: dict[str, Any], message: str) -> None:
        """A command that can never run: tracked in its end state, written once."""
        meta = obj["metadata"]
        now = now_rfc3339()
        previous = obj.get("status") or {}
        conditions = set_condition(list(previous.get("conditions") or []), "Failed", "True",
                                   Reason.INVALID_SPEC, message, now)
        conditions = set_condition(conditions, "Finished", "True", Phase.FAILED, message, now)
        spec = RemoteCommandSpec.model_construct()
        tracked = Tracked(meta["namespace"], meta["name"], meta["uid"], spec,
                          {**previous, "phase": Phase.FAILED, "conditions": conditions,
                           "completionTime": now, "startTime": previous.get("startTime") or now},
                          previous or None)
        tracked.want(0.0)
        with self._lock:
            self._tracked.setdefault(meta["uid"], tracked)
        log.warning("RemoteCommand %s/%s failed: %s", meta["namespace"], meta["name"], message)

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def _transfer_vms(spec: RemoteCommandSpec) -> list[str]:
    assert spec.transfer is not None
    names = [loc.vm for loc in spec.transfer.to]
    if spec.transfer.from_.vm:
        names.append(spec.transfer.from_.vm)
    return names


__all__ = ["Commands", "Tracked", "Urgency"]
