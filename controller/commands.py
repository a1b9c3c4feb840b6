"""RemoteCommand reconciliation: resolve targets, dispatch, fold results into status.

One idempotent function, called for every watch event and by a timer while the command
is not finished. The controller writes ``results`` only once (the initial entries, with a
resourceVersion precondition); afterwards workers own their entries and the controller
writes only the folded fields.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, now_rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.kube import ApiException

from .context import Context
from .fold import changed, fold, set_condition
from .targets import describe_target, initial_results, label_selector_string, vm_queue
from .transfers import reconcile_transfer, start_transfer

log = logging.getLogger("controller.commands")


def reconcile_command(ctx: Context, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status: dict[str, Any] = body.get("status") or {}
    if status.get("phase") in Phase.TERMINAL:
        return
    try:
        spec = RemoteCommandSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        reject(ctx, body, f"the spec is invalid: {exc.errors()[0].get('msg', exc)}")
        return
    if status.get("results") is None:
        start(ctx, body, spec)
        return
    if spec.transfer is not None and reconcile_transfer(ctx, body, spec):
        return  # lost attempts were handled: the next event folds the new entries
    folded = fold(status["results"], status, now_rfc3339())
    if changed(status, folded):
        ctx.kube.patch_command_status(namespace, name, {"status": folded})
        if folded["phase"] in Phase.TERMINAL:
            log.info("RemoteCommand %s/%s %s (%s)", namespace, name, folded["phase"],
                     folded["completions"])


def start(ctx: Context, body: dict[str, Any], spec: RemoteCommandSpec) -> None:
    """Write the initial result entries, then send each target's first attempt."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if spec.transfer is not None:
        start_transfer(ctx, body, spec)
        return
    now = now_rfc3339()
    if spec.vm is not None:
        vm = ctx.kube.get_vm(namespace, spec.vm)
        vms = {spec.vm: vm} if vm is not None else {}
        names = [spec.vm]
    else:
        assert spec.selector is not None
        found = ctx.kube.list_vms(namespace, label_selector_string(spec.selector))
        vms = {item["metadata"]["name"]: item for item in found}
        names = sorted(vms)
    results = initial_results(names, vms, now)
    status = {
        "target": describe_target(spec),
        "startTime": now,
        "results": results,
        "observedGeneration": meta.get("generation"),
        **fold(results, body.get("status"), now),
    }
    try:
        ctx.kube.patch_command_status(
            namespace, name, {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        )
    except ApiException as exc:
        if exc.status == 409:
            return  # changed meanwhile: the next event brings the newer object
        raise
    for entry in results:
        if entry["phase"] != Phase.QUEUED:
            continue
        vm = vms[entry["vm"]]
        envelope = Envelope(
            namespace=namespace, name=name, uid=meta["uid"], vm=entry["vm"],
            attempt=entry["attempt"], dispatch_time=now, spec=spec.wire(),
        )
        queue = vm_queue(vm)
        ctx.dispatcher.send(envelope, queue)
        log.info("Dispatched RemoteCommand %s/%s to %s (queue %s)", namespace, name, entry["vm"],
                 queue)


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
