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

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from controller.fold import fold, set_condition
from vmfleet.api import constants as c
from vmfleet.api.constants import (
    TASK_EXECUTE,
    TASK_TERMINATE,
    TASK_TRANSFER,
    TASK_TRANSFER_CLEANUP,
    Phase,
    Reason,
    transfer_queue,
)
from vmfleet.api.envelope import Envelope, Target, terminate_body
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.output import STATUS_OUTPUT_BUDGET, cut_entry, status_limit
from vmfleet.api.reports import AttemptReport, Event, F
from vmfleet.api.times import now_rfc3339
from vmfleet.kube import ApiException
from vmfleet.state import State, attempt_member

from . import rollout, schedule, templates, transfers
from .audit import Pending, RunRecords, layout_of, record_of_entry, record_of_report
from .dryrun import dry_run_status
from .expiry import Delete, Expiries
from .heartbeats import LostAttempts, running_attempts
from .isolate import Recorder
from .reports import apply_attempt_report
from .targets import describe_target, initial_results, label_selector_string, vm_queue
from .tracked import Tracked, Urgency

log = logging.getLogger("controller.commands")


# The hooks the command logic needs from the rest of the controller.
Sender = Callable[[str, dict[str, Any], str, str | None], None]  # (task, body, queue, namespace): signed
VMLookup = Callable[[str, str], dict[str, Any] | None]
VMLister = Callable[[str, str], list[dict[str, Any]]]  # (namespace, label selector)
TargetOf = Callable[[dict[str, Any]], Target]
Wake = Callable[[str, str], None]  # a dispatch to a VM that may be at zero replicas
Refused = Callable[[str, str], str | None]  # (namespace, vm): why the controller refuses it
SecretNames = Callable[[str], list[str]]  # namespace -> its RemoteVMs' credentials Secrets
WakeTransfers = Callable[[str], None]  # a transfer sent: the namespace's transfer worker


def _serves_all(namespace: str, vm: str) -> str | None:
    return None


# How each message is named in the log (e2e tests and operators read these lines).
_SENT = {TASK_EXECUTE: "Dispatched RemoteCommand", TASK_TRANSFER: "Dispatched transfer",
         TASK_TRANSFER_CLEANUP: "Sent cleanup of transfer"}
Batch = Callable[[str], AbstractContextManager[None]]  # sends within go out together

# How long a command written in an end state is remembered: the watch may still bring the
# events of its earlier writes (a claim's `Running`), which must not start tracking again.
FINISHED_MEMORY_SECONDS = 300.0


class Commands:
    """Every unfinished command of the watched namespaces, and what to do with them."""

    def __init__(self, state: State, send: Sender, get_vm: VMLookup, list_vms: VMLister,
                 target_of: TargetOf, wake: Wake, delete: Delete, *, timing: schedule.Timing | None = None,
                 urgency: Urgency | None = None,
                 get_template: templates.TemplateLookup = lambda ns, name: None,
                 get_config_map: templates.ConfigMapLookup = lambda ns, name: None,
                 probe: Wake = lambda ns, name: None, clock: Callable[[], float] = time.monotonic,
                 refused: Refused = _serves_all, recorder: Recorder | None = None,
                 output_budget: int = STATUS_OUTPUT_BUDGET,
                 protected_secrets: SecretNames = lambda namespace: [],
                 wake_transfers: WakeTransfers = lambda namespace: None,
                 batch: Batch = lambda namespace: contextlib.nullcontext()) -> None:
        self.state = state
        self.batch = batch  # a fan-out's dispatches leave together (``Dispatcher.batch``)
        self.send = send
        self.get_vm = get_vm
        self.list_vms = list_vms
        self.target_of = target_of
        self.wake = wake
        self.expiries = Expiries(delete)
        self.timing = timing or schedule.Timing()
        self.lost = LostAttempts(state, self.timing, clock)
        self.urgency = urgency or Urgency()
        self.get_template = get_template
        self.get_config_map = get_config_map
        self.probe = probe  # a health probe of a VM now (spec.rollout.healthGate)
        self.refused = refused
        self.recorder = recorder or Recorder()
        self.output_budget = output_budget  # all tails of one status (vmfleet.api.output)
        self.protected_secrets = protected_secrets
        self.wake_transfers = wake_transfers
        self._lock = threading.Lock()
        self._tracked: dict[str, Tracked] = {}
        self._finished: dict[str, float] = {}  # uid -> when forgotten (oldest first)
        self.changed = threading.Condition()
        self.records: RunRecords | None = None  # the Events and audit lines of ended attempts

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
            self.expiries.later(uid, meta["namespace"], meta["name"], spec_body, status)
            return
        try:
            spec = RemoteCommandSpec.model_validate(spec_body)
        except ValidationError as exc:
            self._reject(obj, f"the spec is invalid: {exc.errors()[0].get('msg', exc)}")
            return
        template: dict[str, Any] | None = None
        if spec.template_ref is not None:
            try:
                spec, template = templates.resolve(meta["namespace"], spec, status,
                                                   self.get_template, self.get_config_map)
            except templates.TemplateError as exc:
                self._reject(obj, str(exc))
                return
        tracked = Tracked(meta["namespace"], meta["name"], uid, spec,
                          copy.deepcopy(status), copy.deepcopy(status) if status else None,
                          ttl=spec.ttl_seconds_after_finished, template=template)
        with self._lock:
            if uid in self._tracked:
                return
            self._tracked[uid] = tracked
        with tracked.lock, self.recorder.guard(c.COMMAND_KIND, obj, "start the RemoteCommand"):
            if tracked.status.get("results") is None:
                self.start(tracked)  # a start that failed is tried again by ``tick``
            else:
                self.advance(tracked)
        self._notify()

    def deleted(self, obj: dict[str, Any]) -> list[str]:
        """The command is gone: cancel what runs or waits. Returns reports to acknowledge."""
        uid = obj["metadata"]["uid"]
        with self._lock:
            tracked = self._tracked.pop(uid, None)
            self._finished.pop(uid, None)
        self.expiries.discard(uid)
        if self.records is not None:
            self.records.gone(uid)
        if tracked is None:
            return []
        with tracked.lock:
            acks, tracked.acks = tracked.acks, []
            running = [e["vm"] for e in tracked.status.get("results") or []
                       if e.get("phase") not in Phase.TERMINAL]
        if running:
            self.state.cancel(uid, tracked.namespace)
            log.info("Cancelled RemoteCommand %s on %s: it was deleted", tracked.ref,
                     ", ".join(running))
        else:
            self.state.finished(uid, tracked.namespace)
        return acks

    def cancel(self, uid: str, message: str) -> bool:
        """Stop a command without deleting it (a RemoteCronCommand's Replace): entries not
        started end Cancelled now; running attempts are killed by their workers, whose
        results then report it. False when the command is not held (finished or unknown)."""
        tracked = self.get(uid)
        if tracked is None:
            return False
        with tracked.lock:
            if tracked.finished:
                return False
            now = now_rfc3339()
            running = []
            for entry in tracked.status.get("results") or []:
                if entry.get("phase") in (Phase.PENDING, Phase.QUEUED):
                    entry.update({"phase": Phase.CANCELLED, "reason": Reason.CANCELLED,
                                  "message": message, "completionTime": now})
                    for key in ("retryAfter", "dispatchTime"):
                        entry.pop(key, None)
                elif entry.get("phase") == Phase.RUNNING:
                    running.append(entry["vm"])
            self.state.cancel(uid, tracked.namespace)
            self._refold(tracked)
            tracked.want(0.0)
        log.info("Cancelled RemoteCommand %s%s: %s", tracked.ref,
                 f" on {', '.join(running)}" if running else "", message)
        self._notify()
        return True

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
        self.state.finished(tracked.uid, tracked.namespace)
        if tracked.ttl is not None:
            finished = tracked.status.get(F.COMPLETION_TIME) or now_rfc3339()
            self.expiries.schedule(tracked.uid, tracked.namespace, tracked.name, finished, tracked.ttl)

    # ------------------------------------------------------------------ reports

    def apply(self, report: AttemptReport, report_id: str) -> bool:
        """Fold a worker's report into its command; False when there is nothing to write
        (stale, or the command is gone): acknowledge it at once."""
        tracked = self.get(report.uid)
        if tracked is None:
            if report.event == Event.CLAIMED and report.uid:
                # A claim for a command that no longer exists: make sure it stops.
                self.state.cancel(report.uid, report.namespace)
            return self._record_again(report, report_id, None)
        with tracked.lock:
            results = tracked.status.get("results") or []
            index = next((i for i, e in enumerate(results) if e.get(F.VM) == report.vm), None)
            if index is None:
                return False
            before = results[index]
            new = apply_attempt_report(tracked.spec, before, report, datetime.now(UTC))
            if new is None:
                if report.attempt <= int(before.get(F.ATTEMPT) or 1):
                    return self._record_again(report, report_id, layout_of(tracked.written))
                return False
            if report.event == Event.FINISHED and self.records is not None:
                tracked.records.append(Pending(record_of_report(report, before), [report_id]))
            results[index] = cut_entry(new, status_limit(
                len(results), tracked.spec.output.max_bytes, self.output_budget))
            event = report.event
            if event == Event.FINISHED:
                n = len(results)
                delay = min(self.urgency.finished + self.urgency.per_target * (n - 1),
                            self.urgency.fan_out_cap) if n > 1 else self.urgency.finished
            elif event == Event.PROGRESS:
                delay = self.urgency.progress
            else:
                delay = self.urgency.claimed
            tracked.acks.append(report_id)
            # Capacity freed, a retry to schedule: only a Pending entry can be sent now (the
            # loop's tick resends Queued ones); a fan-out's reports skip the O(VMs) plan.
            if event == Event.FINISHED and any(e.get(F.PHASE) == Phase.PENDING for e in results):
                self.advance(tracked)
            self._refold(tracked)
            tracked.want(delay)
        self._notify()
        return True

    def _record_again(self, report: AttemptReport, report_id: str,
                      layout: tuple[tuple[str, str, int], ...] | None) -> bool:
        """An attempt's end read again (its write landed before a restart or a change of
        leader, but maybe not its Event): recorded again, which writes its Event or finds
        it written (``controller.audit``). True: the report is acknowledged by that."""
        if report.event != Event.FINISHED or self.records is None:
            return False
        self.records.submit(report.uid, layout or None,
                            [Pending(record_of_report(report, {}), [report_id])])
        return True

    # ------------------------------------------------------------------ scheduling

    def resolve(self, tracked: Tracked) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """The target VMs' names (in the order they are started) and those that exist."""
        spec = tracked.spec
        if spec.transfer is not None:
            names = transfers.transfer_vms(spec)
        elif spec.vm is not None or spec.vms is not None:
            names = [spec.vm] if spec.vm is not None else list(spec.vms or [])
        else:
            assert spec.selector is not None
            found = {vm["metadata"]["name"]: vm for vm in
                     self.list_vms(tracked.namespace, label_selector_string(spec.selector))}
            return sorted(found), found
        return names, {name: vm for name in dict.fromkeys(names)
                       if (vm := self.get_vm(tracked.namespace, name)) is not None}

    def start(self, tracked: Tracked) -> None:
        """The initial result entries, and the first attempts sent."""
        spec = tracked.spec
        now = now_rfc3339()
        if spec.dry_run:
            names, found = self.resolve(tracked)
            tracked.status = dry_run_status(spec, names, found, describe_target(spec), now)
            if tracked.template is not None:
                tracked.status["template"] = tracked.template
            tracked.want(0.0)
            log.info("RemoteCommand %s: %s", tracked.ref,
                     tracked.status["conditions"][0]["message"])
            return
        if spec.transfer is not None:
            vms = {name: vm for name in transfers.transfer_vms(spec)
                   if (vm := self.get_vm(tracked.namespace, name)) is not None}
            results = transfers.initial_transfer_results(spec, vms, now, phase=Phase.PENDING)
        else:
            names, found = self.resolve(tracked)
            results = initial_results(names, found, now, phase=Phase.PENDING)
            if spec.rollout is not None:
                wave_of = {vm: i for i, wave in enumerate(rollout.assign_waves(spec.rollout, names, found))
                           for vm in wave}
                for entry in results:
                    entry["wave"] = wave_of.get(entry["vm"], 0)
        tracked.status = {F.START_TIME: now, "results": results, "target": describe_target(spec)}
        if tracked.template is not None:
            tracked.status["template"] = tracked.template
        self.advance(tracked)
        self._refold(tracked)
        tracked.want(self.urgency.start)

    def advance(self, tracked: Tracked, *, lost: frozenset[str] = frozenset()) -> None:
        """Apply ``schedule.plan`` to the copy and send what it dispatches."""
        status = tracked.status
        if status.get("phase") in Phase.TERMINAL:
            return
        vms = {vm: self.get_vm(tracked.namespace, vm) for vm in sorted(schedule.pending_vms(status))}
        queues = {vm: (vm_queue(obj) if obj is not None else None) for vm, obj in vms.items()}
        paused = frozenset(vm for vm, obj in vms.items() if obj and obj["spec"].get("paused"))
        open_wave = self._rollout(tracked) if tracked.spec.rollout is not None else None
        refused = {vm: why for vm, obj in vms.items()
                   if obj is not None and (why := self.refused(tracked.namespace, vm))}
        step = schedule.plan(tracked.spec, status, datetime.now(UTC), queues=queues,
                             timing=self.timing, paused=paused, lost=lost, open_wave=open_wave,
                             refused=refused)
        if not step:
            return
        results = status["results"]
        undo = self._change(tracked, step.changes, lost)
        if tracked.spec.transfer is not None and lost:
            for vm, attempt in transfers.lost_attempts(results, lost):  # their temporary files go
                self._send_transfer(tracked, vm, attempt, TASK_TRANSFER_CLEANUP)
        for vm, pgid, marker in step.terminate:
            self._terminate(tracked, vm, pgid, marker)
        unsent: Exception | None = None

        def not_sent(vm: str) -> None:
            # Not sent: the entry is as it was (Pending, or Queued and due again), so the
            # next tick sends it; left Queued it would wait for the redispatch.
            if vm in undo:
                index, before = undo[vm]
                results[index].clear()
                results[index].update(before)

        batched: list[str] = []
        try:
            with self.batch(tracked.namespace):
                if step.dispatch and tracked.spec.transfer is None:
                    # Live until finished: once per step, not per VM (transfers say it themselves).
                    self.state.sent(tracked.uid, tracked.namespace)
                for vm, attempt in step.dispatch:
                    try:
                        self._dispatch(tracked, vm, attempt, vms.get(vm))
                        batched.append(vm)
                    except Exception as exc:  # noqa: BLE001 - raised below, once the others went
                        not_sent(vm)
                        unsent = unsent or exc
        except Exception as exc:  # noqa: BLE001 - the live set or the batch's flush failed
            for vm in batched or [vm for vm, _ in step.dispatch]:  # none counts as sent
                not_sent(vm)
            unsent = unsent or exc
        if step.changes:
            self._refold(tracked)
            tracked.want(0.0 if not step.dispatch else self.urgency.start)
        if unsent is not None:
            raise unsent

    def _change(self, tracked: Tracked, changes: list[schedule.Change],
                lost: frozenset[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """Apply the plan's changes to the result entries; an attempt declared lost is
        recorded and logged. Returns each dispatch's entry as it was, to put back if its
        message cannot be sent (Redis restarting)."""
        results = tracked.status["results"]
        undo: dict[str, tuple[int, dict[str, Any]]] = {}
        for change in changes:
            before = dict(results[change.index])
            if "dispatchTime" in change.set:
                undo[change.vm] = (change.index, before)
            results[change.index].update(change.set)
            for key in change.remove:
                results[change.index].pop(key, None)
            if change.vm in lost and before.get("phase") == Phase.RUNNING:
                after = results[change.index]
                if self.records is not None:
                    tracked.records.append(Pending(record_of_entry(
                        tracked.namespace, tracked.name, tracked.uid, before, after, now_rfc3339())))
                log.warning("RemoteCommand %s on %s: worker %s lost during attempt %s; %s",
                            tracked.ref, change.vm, before.get("worker", "?"),
                            before.get("attempt", 1),
                            "retrying" if after.get("phase") == Phase.PENDING
                            else f"failed ({after.get('reason')})")
        return undo

    def _terminate(self, tracked: Tracked, vm: str, pgid: int, marker: str | None) -> None:
        """Ask the workers of ``vm`` to kill a process group an attempt left running."""
        obj = self.get_vm(tracked.namespace, vm)
        if obj is None:
            return
        become = tracked.spec.become.user if tracked.spec.become is not None else None
        self.send(TASK_TERMINATE, terminate_body(
            tracked.namespace, self.target_of(obj), pgid, marker, become), vm_queue(obj),
            tracked.namespace)
        log.info("Asked the workers of %s to terminate process group %s of RemoteCommand "
                 "%s", vm, pgid, tracked.ref)

    def _rollout(self, tracked: Tracked) -> int:
        """spec.rollout: the wave that may run now; probes the VMs a health gate waits for,
        and stops the rollout when the gate fails."""
        assert tracked.spec.rollout is not None
        now = datetime.now(UTC)
        step = rollout.step(tracked.spec.rollout, tracked.status, now,
                            lambda vm: self.get_vm(tracked.namespace, vm))
        if step.status != tracked.status.get("rollout"):
            if step.status.get("currentWave") != (tracked.status.get("rollout") or {}).get("currentWave"):
                log.info("RemoteCommand %s: wave %s of %s", tracked.ref, step.status["currentWave"],
                         step.status["waves"])
            tracked.status["rollout"] = step.status
            tracked.want(self.urgency.claimed)
        for vm in step.probe:
            self.probe(tracked.namespace, vm)
        if step.probe:
            log.info("RemoteCommand %s: probing %s before the next wave", tracked.ref,
                     ", ".join(step.probe))
        if step.stop is not None:
            rollout.stop_entries(tracked.status.get("results") or [], step.stop, now)
            self._refold(tracked)
            tracked.want(0.0)
            log.warning("RemoteCommand %s: the rollout stopped: %s", tracked.ref, step.stop)
        return step.open_wave

    def _dispatch(self, tracked: Tracked, vm: str, attempt: int, obj: dict[str, Any] | None) -> None:
        if obj is None:
            return
        if tracked.spec.transfer is not None:
            self._send_transfer(tracked, vm, attempt, TASK_TRANSFER)
            return
        entry = next(e for e in tracked.status["results"] if e.get("vm") == vm)
        self._send(tracked, TASK_EXECUTE, vm, attempt, vm_queue(obj), self.target_of(obj),
                   lost_pgid=entry.get("lostPgid"), lost_marker=entry.get("lostMarker"))

    def _send_transfer(self, tracked: Tracked, vm: str, attempt: int, task: str) -> None:
        """A transfer's attempt to destination ``vm`` (or, ``TASK_TRANSFER_CLEANUP``, the
        removal of a lost attempt's temporary file), with every VM it touches."""
        if transfers.protects_unseen_keys(tracked.spec, task):
            try:  # the namespace's RemoteVMs from the API, not only those the watch brought
                self.list_vms(tracked.namespace, "")
            except ApiException as exc:
                log.warning("Could not list the RemoteVMs of %s (%s): the transfer of %s "
                            "protects the credentials Secrets the watch has seen",
                            tracked.namespace, exc.reason, tracked.ref)
        targets = {name: self.target_of(obj) for name in transfers.attempt_vms(tracked.spec, vm)
                   if (obj := self.get_vm(tracked.namespace, name)) is not None}
        self._send(tracked, task, vm, attempt, transfer_queue(tracked.namespace), targets.get(vm),
                   targets=targets,
                   protected_secrets=tuple(self.protected_secrets(tracked.namespace)))

    def _send(self, tracked: Tracked, task: str, vm: str, attempt: int, queue: str,
              target: Target | None, *, lost_pgid: int | None = None,
              lost_marker: str | None = None, targets: dict[str, Target] | None = None,
              protected_secrets: tuple[str, ...] = ()) -> None:
        """The one way an attempt leaves the controller, command or transfer: its envelope,
        the command marked live in Redis (not for a cleanup), the message signed and sent,
        and the workers that take it woken if they are scaled to zero."""
        envelope = Envelope(
            namespace=tracked.namespace, name=tracked.name, uid=tracked.uid, vm=vm,
            attempt=attempt, dispatch_time=now_rfc3339(), spec=tracked.spec_wire,
            plan=tracked.plan, target=target, command_start=tracked.status.get(F.START_TIME),
            lost_pgid=lost_pgid, lost_marker=lost_marker, targets=targets or {},
            scope=self.state.scope, protected_secrets=protected_secrets,
        )
        if task == TASK_TRANSFER:  # commands say it once per step, in advance
            self.state.sent(tracked.uid, tracked.namespace)
        self.send(task, envelope.to_message(), queue, tracked.namespace)
        if task == TASK_EXECUTE:
            self.wake(tracked.namespace, vm)
        else:
            self.wake_transfers(tracked.namespace)
        log.info("%s %s to %s (attempt %s, queue %s)", _SENT[task], tracked.ref, vm, attempt,
                 queue)

    def _refold(self, tracked: Tracked) -> None:
        results = tracked.status.get("results") or []
        tracked.status.update(fold(results, tracked.status, now_rfc3339()))

    def tick(self) -> None:
        """The controller loop: time-based moves (retries due, deadlines, lost workers,
        resent dispatches) and expired TTLs."""
        stale = self.lost.find(running_attempts(self.tracked()))
        for tracked in self.tracked():
            with tracked.lock, self.recorder.guard(c.COMMAND_KIND, _object_of(tracked),
                                                   "advance the RemoteCommand"):
                if tracked.status.get("results") is None and not tracked.finished:
                    self.start(tracked)  # its first start failed
                    continue
                lost = frozenset(
                    e["vm"] for e in tracked.status.get("results") or []
                    if e.get("phase") == Phase.RUNNING
                    and (tracked.namespace,
                         attempt_member(tracked.uid, e["vm"], int(e.get("attempt") or 1))) in stale)
                self.advance(tracked, lost=lost)
        for namespace, member in stale:
            self.state.forget_heartbeat(namespace, member)  # declared lost now, or its command is gone
        self.expiries.expire()

    def expiring(self) -> int:
        """Finished commands waiting for their ``ttlSecondsAfterFinished``."""
        return self.expiries.count()

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
                           F.COMPLETION_TIME: now, F.START_TIME: previous.get(F.START_TIME) or now},
                          previous or None)
        tracked.want(0.0)
        with self._lock:
            self._tracked.setdefault(meta["uid"], tracked)
        log.warning("RemoteCommand %s/%s failed: %s", meta["namespace"], meta["name"], message)

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


def _object_of(tracked: Tracked) -> dict[str, Any]:
    """What an Event about ``tracked`` names."""
    return {"metadata": {"namespace": tracked.namespace, "name": tracked.name, "uid": tracked.uid}}


__all__ = ["Commands"]
