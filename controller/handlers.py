"""kopf handlers: thin, each parses the object and calls one reconcile function."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from vmfleet import metrics
from vmfleet.api import constants as c
from vmfleet.api.constants import Phase
from vmfleet.celeryconf import broker_url

from .commands import expire_command, reconcile_command, request_termination
from .context import Context
from .vms import forget_vm, observe_vm, reconcile_vm, tick_vm

COMMANDS = (c.GROUP, c.VERSION, c.COMMAND_PLURAL)
VMS = (c.GROUP, c.VERSION, c.VM_PLURAL)


class LastHandledConfiguration(kopf.AnnotationsDiffBaseStorage):
    """kopf's record of the last handled spec (an annotation), except on RemoteCommands.

    A RemoteCommand's spec is immutable (a CEL rule), so there is never a change to detect
    and no handler that needs the record: not writing it saves an API write per command.
    """

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        if body.get("kind") != c.COMMAND_KIND:
            super().store(body=body, patch=patch, essence=essence)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our CRDs have structural schemas: kopf keeps its bookkeeping in annotations.
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = LastHandledConfiguration(
        prefix=c.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 32
    settings.watching.server_timeout = 270
    memo.ctx = Context.from_environment()
    ensure_transfer_worker = getattr(memo.ctx.runtime, "ensure_transfer_worker", None)
    if ensure_transfer_worker is not None:
        ensure_transfer_worker()  # Process runtime: the shared worker of vmfleet.transfers
    metrics.start_controller_metrics(broker_url(), extra_queues=[c.TRANSFER_QUEUE])


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_: Any) -> None:
    ctx: Context | None = getattr(memo, "ctx", None)
    if ctx is not None:
        ctx.runtime.shutdown()
        ctx.dispatcher.close()


# --------------------------------------------------------------------------- RemoteVM


@kopf.on.resume(*VMS)
@kopf.on.create(*VMS)
@kopf.on.update(*VMS, field="spec")
@metrics.counts_errors(c.VM_KIND)
def vm_changed(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, old: Any = None,
               **_: Any) -> None:
    # On a spec update, ``old`` is the previous spec (None on create and resume).
    unpaused = bool(isinstance(old, dict) and old.get("paused"))
    patch.status["workers"] = reconcile_vm(memo.ctx, dict(body), unpaused=unpaused)
    metrics.observe_workers(body.metadata["namespace"], body.metadata["name"], patch.status["workers"])
    patch.status["observedGeneration"] = body.metadata.get("generation")


@kopf.on.event(*VMS)
def vm_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    metrics.observe_vm(event["object"], deleted=event["type"] == "DELETED")
    if event["type"] != "DELETED" and event.get("object"):
        memo.ctx.vms.seen(dict(event["object"]))
    # No finalizer: Deployments are garbage collected with their RemoteVM, and local
    # worker processes end with the controller, so a deletion missed while it was down
    # leaves nothing behind.
    if event["type"] == "DELETED":
        meta = event["object"]["metadata"]
        memo.ctx.vms.gone(meta["namespace"], meta["name"])
        memo.ctx.runtime.remove(meta["namespace"], meta["name"])
        forget_vm(memo.ctx, meta["namespace"], meta["name"])


# Scaling and health: one tick per RemoteVM (probes go out every healthCheck.periodSeconds).
VM_TICK_SECONDS = float(os.environ.get("VMFLEET_VM_TICK_SECONDS", "2"))


@kopf.timer(*VMS, interval=VM_TICK_SECONDS, initial_delay=1, sharp=False)
@metrics.counts_errors(c.VM_KIND)
def vm_tick(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    tick_vm(memo.ctx, dict(body))


@kopf.on.event(*VMS)
@metrics.counts_errors(c.VM_KIND)
def vm_observed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A probe result written by a worker: fold it into conditions now, not at the next tick."""
    if event["type"] != "DELETED" and event.get("object"):
        observe_vm(memo.ctx, dict(event["object"]))


# --------------------------------------------------------------------------- RemoteCommand


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in Phase.TERMINAL


@kopf.on.event(*COMMANDS)
@metrics.counts_errors(c.COMMAND_KIND)
def command_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    obj = event["object"]
    meta = obj.get("metadata", {})
    if event["type"] == "DELETED" or meta.get("deletionTimestamp"):
        return  # deletion is command_deleted's
    if c.FINALIZER not in (meta.get("finalizers") or ()):
        # kopf adds the finalizer at the end of this cycle, with a resourceVersion test:
        # writing the status now would make that patch fail (and be retried, two wasted
        # writes). The finalizer's own event starts the command.
        return
    reconcile_command(memo.ctx, dict(obj))


@kopf.timer(*COMMANDS, interval=5, initial_delay=5, when=_unfinished)
@metrics.counts_errors(c.COMMAND_KIND)
def command_timer(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if not body.metadata.get("deletionTimestamp") and c.FINALIZER in body.metadata.get("finalizers", ()):
        reconcile_command(memo.ctx, dict(body))


@kopf.on.delete(*COMMANDS)
def command_deleted(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """Cancel: what has not started never runs; running attempts are terminated (the
    workers see the deletion in their heartbeat; lost ones are terminated by the
    controller), and the object goes once every entry has ended."""
    if retry == 0:
        request_termination(memo.ctx, dict(body))
    if not reconcile_command(memo.ctx, dict(body), deleting=True):
        raise kopf.TemporaryError("waiting for running attempts to be terminated", delay=2)


def _finished_with_ttl(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    return spec.get("ttlSecondsAfterFinished") is not None and status.get("phase") in Phase.TERMINAL


@kopf.timer(*COMMANDS, interval=2, when=_finished_with_ttl)
def command_ttl(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    expire_command(memo.ctx, dict(body))
