"""RemoteCommands with a ``transfer`` action: one result entry per destination VM.

``start_transfer`` writes the initial entries (with a resourceVersion precondition, as
commands do) and sends each destination's attempt as ``remote_tasks.transfer_file`` to the
shared queue ``vmfleet.transfers``. A worker claims the entries and copies the file.

``reconcile_transfer`` runs on every event and timer tick of an unfinished transfer: an
entry whose worker stopped reporting progress (killed, node lost) for
``VMFLEET_TRANSFER_LOST_SECONDS`` is retried as the next attempt when ``retries.limit``
allows (the new attempt removes the lost attempt's temporary file first), else it ends
``WorkerLost`` and a cleanup task removes the temporary file. (Transport errors seen by a
live worker are retried by the worker itself, within the same limit.)
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from vmfleet import settings
from vmfleet.api.constants import (
    TASK_TRANSFER,
    TASK_TRANSFER_CLEANUP,
    TRANSFER_QUEUE,
    Phase,
    Reason,
)
from vmfleet.api.envelope import Envelope, now_rfc3339, parse_rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.kube import ApiException

from .context import Context
from vmfleet.fold import fold
from .targets import describe_target, initial_results

log = logging.getLogger("controller.transfers")

LOST_SECONDS_ENV = settings.env_of("transfer_lost_seconds")


def lost_after() -> float:
    return settings.current().transfer_lost_seconds


def initial_transfer_results(
    spec: RemoteCommandSpec, vms: dict[str, dict[str, Any]], now: str
) -> list[dict[str, Any]]:
    """One entry per destination VM (pure). A missing source VM fails every destination."""
    transfer = spec.transfer
    assert transfer is not None
    names = [loc.vm for loc in transfer.to]
    results = initial_results(names, vms, now)
    source = transfer.from_.describe()
    paths = {loc.vm: loc.path for loc in transfer.to}
    missing_source = transfer.from_.vm is not None and transfer.from_.vm not in vms
    for entry in results:
        entry["transfer"] = {"source": source, "path": paths[entry["vm"]]}
        if missing_source and entry["phase"] == Phase.QUEUED:
            entry.update(phase=Phase.FAILED, reason=Reason.VM_NOT_FOUND, completionTime=now,
                         message=f"source RemoteVM {transfer.from_.vm} does not exist in this "
                         "namespace")
            entry.pop("dispatchTime", None)
    return results


def start_transfer(ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    transfer = spec.transfer
    assert transfer is not None
    now = now_rfc3339()
    wanted = {loc.vm for loc in transfer.to}
    if transfer.from_.vm is not None:
        wanted.add(transfer.from_.vm)
    vms = {vm: obj for vm in sorted(wanted) if (obj := ctx.kube.get_vm(namespace, vm)) is not None}
    results = initial_transfer_results(spec, vms, now)
    status = {
        "target": describe_target(spec),
        "startTime": now,
        "results": results,
        "observedGeneration": meta.get("generation"),
        **fold(results, body.get("status"), now),
    }
    try:
        ctx.kube.patch_command_status(
            namespace, name,
            {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status},
        )
    except ApiException as exc:
        if exc.status == 409:
            return  # changed meanwhile: the next event brings the newer object
        raise
    ensure_worker(ctx)
    for entry in results:
        if entry["phase"] == Phase.QUEUED:
            send(ctx, body, spec, entry["vm"], entry["attempt"], now)


def send(ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec, vm: str, attempt: int,
         now: str, task: str = TASK_TRANSFER, countdown: float | None = None) -> None:
    meta = body["metadata"]
    envelope = Envelope(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], vm=vm,
                        attempt=attempt, dispatch_time=now, spec=spec.wire())
    ctx.dispatcher.app.send_task(task, args=[envelope.to_message()], queue=TRANSFER_QUEUE,
                                 countdown=countdown)
    verb = "Dispatched transfer" if task == TASK_TRANSFER else "Sent cleanup of transfer"
    log.info("%s %s/%s to %s (attempt %s, queue %s)", verb, meta["namespace"], meta["name"], vm,
             attempt, TRANSFER_QUEUE)


def ensure_worker(ctx: Context) -> None:
    ensure = getattr(ctx.runtime, "ensure_transfer_worker", None)
    if ensure is not None:
        ensure()


def stale(entry: dict[str, Any], now: datetime, limit: float) -> bool:
    """A running entry whose worker has not reported for ``limit`` seconds (pure)."""
    if entry.get("phase") != Phase.RUNNING:
        return False
    seen = (entry.get("transfer") or {}).get("updateTime") or entry.get("startTime")
    if not seen:
        return False
    return (now - parse_rfc3339(seen)).total_seconds() > limit


def lost_patch(index: int, entry: dict[str, Any], retry: bool, now: str) -> list[dict[str, Any]]:
    """End or retry a lost attempt, only if the entry is still that attempt (pure)."""
    base = f"/status/results/{index}"
    worker = entry.get("worker", "unknown")
    patch: list[dict[str, Any]] = [
        {"op": "test", "path": f"{base}/vm", "value": entry["vm"]},
        {"op": "test", "path": f"{base}/phase", "value": Phase.RUNNING},
        {"op": "test", "path": f"{base}/attempt", "value": entry["attempt"]},
        {"op": "add", "path": f"{base}/reason", "value": Reason.WORKER_LOST},
    ]
    if retry:
        patch += [
            {"op": "replace", "path": f"{base}/phase", "value": Phase.QUEUED},
            {"op": "replace", "path": f"{base}/attempt", "value": entry["attempt"] + 1},
            {"op": "add", "path": f"{base}/dispatchTime", "value": now},
            {"op": "add", "path": f"{base}/message", "value":
                f"worker {worker} stopped reporting during attempt {entry['attempt']}; retrying"},
        ]
    else:
        patch += [
            {"op": "replace", "path": f"{base}/phase", "value": Phase.FAILED},
            {"op": "add", "path": f"{base}/completionTime", "value": now},
            {"op": "add", "path": f"{base}/message", "value":
                f"worker {worker} stopped reporting during the copy; its temporary file is "
                "removed and the destination was left as it was"},
        ]
    return patch


def reconcile_transfer(ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec) -> bool:
    """Handle lost attempts. True when the status was changed (the next event folds it)."""
    status = body.get("status") or {}
    results = status.get("results") or []
    ensure_worker(ctx)
    now_text = now_rfc3339()
    now = parse_rfc3339(now_text)
    limit = lost_after()
    meta = body["metadata"]
    changed = False
    for index, entry in enumerate(results):
        if not stale(entry, now, limit):
            continue
        retry = entry.get("attempt", 1) <= spec.retries.limit
        try:
            ctx.kube.patch_command_status(meta["namespace"], meta["name"],
                                          lost_patch(index, entry, retry, now_text))
        except ApiException as exc:
            if exc.status in (409, 422):
                continue  # the worker wrote meanwhile: not lost
            raise
        changed = True
        log.warning("Transfer %s/%s to %s: worker %s lost during attempt %s; %s",
                    meta["namespace"], meta["name"], entry["vm"], entry.get("worker"),
                    entry["attempt"], "retrying" if retry else "failed (WorkerLost)")
        if retry:
            send(ctx, body, spec, entry["vm"], entry["attempt"] + 1, now_text,
                 countdown=spec.retries.backoff_seconds or None)
        else:
            send(ctx, body, spec, entry["vm"], entry["attempt"], now_text,
                 task=TASK_TRANSFER_CLEANUP)
    return changed


__all__ = ["initial_transfer_results", "lost_patch", "reconcile_transfer", "stale",
           "start_transfer"]
