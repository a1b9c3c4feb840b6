"""RemoteCommand reconciliation: resolve targets, schedule attempts, fold results into status.

One idempotent function, called for every watch event and by a timer while the command
is not finished. The controller writes ``results`` once in full (the initial entries,
with a resourceVersion precondition); after that it changes entries only with JSON
Patches guarded by each entry's phase and attempt (``schedule.plan``), and writes the
folded fields (phase, summary, conditions) with a merge patch that never touches results.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import V1DeleteOptions, V1Preconditions
from pydantic import ValidationError

from vmfleet.api import constants as c
from vmfleet.api.constants import TASK_TERMINATE, Phase, Reason, default_queue
from vmfleet.api.envelope import Envelope, now_rfc3339, parse_rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.kube import ApiException

from . import schedule
from .context import Context
from .vms import wake_for_dispatch
from vmfleet.fold import changed, fold, set_condition
from .targets import describe_target, initial_results, label_selector_string, vm_queue
from .transfers import reconcile_transfer, start_transfer

log = logging.getLogger("controller.commands")

TIMING = schedule.Timing(
    lost_after=float(os.environ.get("VMFLEET_WORKER_LOST_SECONDS", "30")),
    redispatch_after=float(os.environ.get("VMFLEET_REDISPATCH_SECONDS", "300")),
)


def reconcile_command(ctx: Context, body: dict[str, Any], *, deleting: bool = False) -> bool:
    """Move the command on; returns True once every result entry has ended."""
    try:
        return _reconcile(ctx, body, deleting=deleting)
    except ApiException as exc:
        if exc.status != 404:
            raise
        # A watch event can arrive after the object was deleted (e.g. `vmfleet exec`
        # deletes its command as soon as it has the result): nothing is left to do.
        meta = body["metadata"]
        log.debug("RemoteCommand %s/%s is gone", meta.get("namespace"), meta.get("name"))
        return True


def _reconcile(ctx: Context, body: dict[str, Any], *, deleting: bool) -> bool:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status: dict[str, Any] = body.get("status") or {}
    if status.get("phase") in Phase.TERMINAL and not deleting:
        return True
    try:
        spec = RemoteCommandSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        reject(ctx, body, f"the spec is invalid: {exc.errors()[0].get('msg', exc)}")
        return True
    if status.get("results") is None:
        if deleting:
            return True  # nothing was dispatched
        start(ctx, body, spec)
        return False
    if spec.transfer is not None:
        if reconcile_transfer(ctx, body, spec):
            return False  # lost attempts were handled: the next event folds the new entries
    else:
        status = advance(ctx, body, spec, status, deleting=deleting)
    results = status["results"]
    folded = fold(results, status, now_rfc3339())
    if deleting and all(e.get("phase") in Phase.TERMINAL for e in results):
        folded = fold_cancelled(folded, status)
    if changed(status, folded) and not _coalesced(ctx, meta["uid"], status, folded, len(results)):
        ctx.kube.patch_command_status(namespace, name, {"status": folded})
        if folded["phase"] in Phase.TERMINAL:
            log.info("RemoteCommand %s/%s %s (%s)", namespace, name, folded["phase"],
                     folded["completions"])
    return all(e.get("phase") in Phase.TERMINAL for e in results)


# While a fan-out runs, its summary is written at most this often (the phase at once):
# 50 workers finishing together would otherwise cost 50 writes to one object.
FOLD_INTERVAL = float(os.environ.get("VMFLEET_FOLD_INTERVAL_SECONDS", "1"))


def _coalesced(ctx: Context, uid: str, status: dict[str, Any], folded: dict[str, Any],
               targets: int) -> bool:
    """Whether to skip writing a fold now: only counts changed, on a command with several
    VMs, and the last write was under ``FOLD_INTERVAL`` ago (the 5 s timer catches up)."""
    now = time.monotonic()
    if targets > 1 and folded["phase"] == status.get("phase") and folded["phase"] not in Phase.TERMINAL:
        if now - ctx.fold_written.get(uid, 0.0) < FOLD_INTERVAL:
            return True
    if folded["phase"] in Phase.TERMINAL:
        ctx.fold_written.pop(uid, None)
    else:
        ctx.fold_written[uid] = now
    return False


def advance(
    ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec, status: dict[str, Any],
    *, deleting: bool = False,
) -> dict[str, Any]:
    """Apply ``schedule.plan``; returns the status as it is afterwards."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    vms = {vm: ctx.vms.get(namespace, vm) for vm in sorted(schedule.pending_vms(status))}
    queues = {vm: (vm_queue(obj) if obj is not None else None) for vm, obj in vms.items()}
    paused = frozenset(vm for vm, obj in vms.items() if obj and obj["spec"].get("paused"))
    step = schedule.plan(spec, status, datetime.now(UTC), queues=queues, deleting=deleting,
                         timing=TIMING, paused=paused)
    if not step:
        return status
    if step.changes:
        try:
            updated = ctx.kube.patch_command_status(namespace, name, schedule.json_patch(step.changes))
        except ApiException as exc:
            if exc.status in (409, 422):
                return status  # a worker wrote meanwhile: the next event plans again
            raise
        status = updated.get("status") or status
    for vm, pgid, marker in step.terminate:
        ctx.dispatcher.send_task(TASK_TERMINATE, [namespace, vm, pgid, marker],
                                 queues.get(vm) or _queue(ctx, namespace, vm))
        log.info("Asked the workers of %s to terminate process group %s of RemoteCommand %s/%s",
                 vm, pgid, namespace, name)
    for vm, attempt in step.dispatch:
        send(ctx, body, spec, status, vm, attempt, queues[vm] or "")
    return status


def _queue(ctx: Context, namespace: str, vm: str) -> str:
    obj = ctx.vms.get(namespace, vm)
    return vm_queue(obj) if obj is not None else default_queue(namespace, vm)


def send(ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec, status: dict[str, Any],
         vm: str, attempt: int, queue: str) -> None:
    """Send one attempt; ``status`` is the command's status as written (the dispatch recorded)."""
    meta = body["metadata"]
    results = status.get("results") or []
    index = next(i for i, entry in enumerate(results) if entry.get("vm") == vm)
    entry = results[index]
    envelope = Envelope(
        namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], vm=vm,
        attempt=attempt, dispatch_time=now_rfc3339(), spec=spec.wire(),
        index=index, targets=len(results), command_start=status.get("startTime"),
        lost_pgid=entry.get("lostPgid"), lost_marker=entry.get("lostMarker"),
        entry_keys=tuple(sorted(key for key, value in entry.items() if value is not None)),
    )
    ctx.dispatcher.send(envelope, queue)
    wake_for_dispatch(ctx, meta["namespace"], vm)  # a VM scaled to zero gets a worker now
    log.info("Dispatched RemoteCommand %s/%s to %s (attempt %s, queue %s)", meta["namespace"],
             meta["name"], vm, attempt, queue)


def start(ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec) -> None:
    """Write the initial result entries, then send the first attempts."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if spec.transfer is not None:
        start_transfer(ctx, body, spec)
        return
    now = now_rfc3339()
    if spec.vm is not None:
        found_vm = ctx.vms.get(namespace, spec.vm)
        vms = {spec.vm: found_vm} if found_vm is not None else {}
        names = [spec.vm]
    else:
        assert spec.selector is not None
        found = ctx.kube.list_vms(namespace, label_selector_string(spec.selector))
        vms = {item["metadata"]["name"]: item for item in found}
        names = sorted(vms)
    status: dict[str, Any] = {
        "startTime": now, "results": initial_results(names, vms, now, phase=Phase.PENDING)
    }
    queues: dict[str, str | None] = {
        vm: vm_queue(obj) for vm, obj in vms.items() if obj is not None
    }
    paused = frozenset(vm for vm, obj in vms.items() if obj and obj["spec"].get("paused"))
    step = schedule.plan(spec, status, datetime.now(UTC), queues=queues, timing=TIMING, paused=paused)
    results = status["results"]
    for change in step.changes:
        results[change.index].update(change.set)
        for key in change.remove:
            results[change.index].pop(key, None)
    status.update(
        target=describe_target(spec),
        observedGeneration=meta.get("generation"),
        **fold(results, body.get("status"), now),
    )
    try:
        ctx.kube.patch_command_status(
            namespace, name, {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        )
    except ApiException as exc:
        if exc.status == 409:
            return  # changed meanwhile: the next event brings the newer object
        raise
    for target, attempt in step.dispatch:
        send(ctx, body, spec, status, target, attempt, queues[target] or "")


def fold_cancelled(folded: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """A deleted command ends Cancelled, whatever its entries ended as."""
    now = now_rfc3339()
    conditions = [c for c in folded["conditions"] if c["type"] not in ("Complete", "Failed", "Finished")]
    message = "the RemoteCommand was deleted; running attempts were terminated"
    conditions = set_condition(conditions, "Finished", "True", Phase.CANCELLED, message, now)
    return {**folded, "phase": Phase.CANCELLED, "conditions": conditions,
            "completionTime": previous.get("completionTime") or now}


def reject(ctx: Context, body: dict[str, Any], message: str) -> None:
    """End a command that can never run, saying why."""
    meta = body["metadata"]
    now = now_rfc3339()
    previous = body.get("status") or {}
    conditions = set_condition(list(previous.get("conditions") or []), "Failed", "True",
                               Reason.INVALID_SPEC, message, now)
    conditions = set_condition(conditions, "Finished", "True", Phase.FAILED, message, now)
    ctx.kube.patch_command_status(meta["namespace"], meta["name"], {"status": {
        "phase": Phase.FAILED, "conditions": conditions, "completionTime": now,
        "startTime": previous.get("startTime") or now,
    }})
    log.warning("RemoteCommand %s/%s failed: %s", meta["namespace"], meta["name"], message)


def request_termination(ctx: Context, body: dict[str, Any]) -> None:
    """Ask the VMs' workers to end the running attempts now (they also notice the deletion
    at their next heartbeat; the marker check makes a late request harmless)."""
    meta = body["metadata"]
    for entry in (body.get("status") or {}).get("results") or []:
        if entry.get("phase") == Phase.RUNNING and entry.get("pgid"):
            ctx.dispatcher.send_task(
                TASK_TERMINATE,
                [meta["namespace"], entry["vm"], int(entry["pgid"]), entry.get("processMarker")],
                _queue(ctx, meta["namespace"], entry["vm"]),
            )


def expire_command(ctx: Context, body: dict[str, Any]) -> None:
    """Delete a finished command ``ttlSecondsAfterFinished`` after its completion."""
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    ttl, finished = spec.get("ttlSecondsAfterFinished"), status.get("completionTime")
    if ttl is None or not finished or meta.get("deletionTimestamp"):
        return
    if (datetime.now(UTC) - parse_rfc3339(finished)).total_seconds() < ttl:
        return
    try:
        ctx.kube.custom.delete_namespaced_custom_object(
            c.GROUP, c.VERSION, meta["namespace"], c.COMMAND_PLURAL, meta["name"],
            body=V1DeleteOptions(preconditions=V1Preconditions(uid=meta["uid"])),
        )
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise
        return
    log.info("Deleted RemoteCommand %s/%s: ttlSecondsAfterFinished (%ss) passed", meta["namespace"],
             meta["name"], ttl)
