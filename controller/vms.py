"""RemoteVM reconciliation: workers sized to the backlog, health folded into status, pause.

- ``reconcile_vm`` (create/update/resume) and ``tick_vm`` (a timer) size the VM's
  workers with the autoscaler (``scaling``) and apply them through the runtime; the
  timer also sends health probes when due and folds their results (``health``).
- ``wake_for_dispatch``: a command sent to a VM at zero replicas starts a worker at once.
- ``paused``: the command scheduler dispatches nothing to a paused VM; unpausing moves
  the commands waiting for it on at once (``resume_commands``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from vmfleet.api.constants import Phase
from vmfleet.api.models import RemoteVMSpec
from vmfleet.celeryconf import broker_url
from vmfleet.kube import ApiException

from .context import Context
from .health import HealthMonitor
from .runtime import VMRef
from .scaling import Autoscaler, Decision, QueueDepth, running_commands

log = logging.getLogger("controller.vms")

COMMANDS_CACHE_SECONDS = 1.0


def vm_ref(body: dict[str, Any]) -> VMRef:
    meta = body["metadata"]
    try:
        spec = RemoteVMSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        raise kopf.PermanentError(f"RemoteVM spec is invalid: {exc}") from exc
    return VMRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], spec=spec)


def resolve_ref(ctx: Context, body: dict[str, Any]) -> VMRef:
    """``vm_ref`` plus the bastion's Secret name (its workers mount it too)."""
    vm = vm_ref(body)
    if vm.spec.proxy_jump is not None:
        bastion = ctx.kube.get_vm(vm.namespace, vm.spec.proxy_jump.vm)
        secret = ((bastion or {}).get("spec") or {}).get("credentialsSecretRef") or {}
        vm.bastion_secret = secret.get("name") or None
    return vm


@dataclass
class Fleet:
    """What the controller remembers about RemoteVMs between calls (per Context)."""

    autoscaler: Autoscaler
    queue_depth: QueueDepth
    health: HealthMonitor
    lock: threading.Lock = field(default_factory=threading.Lock)
    commands: dict[str, tuple[float, list[dict[str, Any]]]] = field(default_factory=dict)
    refs: dict[str, VMRef] = field(default_factory=dict)
    scale_locks: dict[str, threading.RLock] = field(default_factory=dict)

    def scaling(self, key: str) -> threading.RLock:
        """Held while one VM's replicas are decided and applied: the timer and a wake on
        dispatch never undo each other."""
        with self.lock:
            return self.scale_locks.setdefault(key, threading.RLock())


_fleets: dict[int, Fleet] = {}
_fleets_lock = threading.Lock()


def fleet(ctx: Context) -> Fleet:
    with _fleets_lock:
        found = _fleets.get(id(ctx))
        if found is None:
            def send(task: str, message: dict[str, Any], queue: str, expires: float) -> None:
                # No retries: a probe that cannot be sent now is sent at the next period.
                ctx.dispatcher.app.send_task(task, args=[message], queue=queue, expires=expires,
                                             retry=False)

            found = _fleets[id(ctx)] = Fleet(
                autoscaler=Autoscaler(),
                queue_depth=QueueDepth(broker_url()),
                health=HealthMonitor(ctx.kube, send),
            )
        return found


def _commands(ctx: Context, f: Fleet, namespace: str) -> list[dict[str, Any]]:
    """The namespace's RemoteCommands, listed at most once per second for all its VMs."""
    now = time.monotonic()
    with f.lock:
        cached = f.commands.get(namespace)
        if cached is not None and now - cached[0] < COMMANDS_CACHE_SECONDS:
            return cached[1]
    items = ctx.kube.list_commands(namespace)
    with f.lock:
        f.commands[namespace] = (now, items)
    return items


def decide(ctx: Context, vm: VMRef, current: int) -> Decision:
    """Replicas for the VM's backlog: queue depth (kombu) + commands running on it."""
    f = fleet(ctx)
    workers = vm.spec.workers
    if workers is None or workers.autoscale is None:
        return f.autoscaler.decide(vm.key, workers, 0, 0, current)
    try:
        depth = f.queue_depth(vm.queue)
    except Exception as exc:  # noqa: BLE001 - the broker is down: keep what runs
        log.warning("Could not read the depth of queue %s: %s; keeping %s workers", vm.queue,
                    exc, current)
        return Decision(current, current, 0, 0, 0)
    queued, running = running_commands(_commands(ctx, f, vm.namespace), vm.name)
    # Messages a worker has reserved but not started are in neither count: the API's
    # Queued entries cover them.
    return f.autoscaler.decide(vm.key, workers, max(depth, queued), running, current)


def reconcile_vm(ctx: Context, body: dict[str, Any], *, unpaused: bool = False) -> dict[str, Any]:
    """Ensure the workers; return the ``status.workers`` block. ``unpaused``: the spec
    just changed from paused, so the commands waiting for the VM move on now."""
    vm = resolve_ref(ctx, body)
    with fleet(ctx).scaling(vm.key):
        decision = decide(ctx, vm, ctx.runtime.current_replicas(vm))
        workers = ctx.runtime.ensure(vm, decision.replicas)
    workers["queueDepth"] = decision.queue_depth
    fleet(ctx).refs[vm.key] = vm
    if unpaused and not vm.spec.paused:
        # Only then: listing every command of the namespace for each of 1,000 VMs when
        # the controller starts cost a gigabyte (their own timers move them on anyway).
        resume_commands(ctx, vm)
    return workers


def tick_vm(ctx: Context, body: dict[str, Any]) -> None:
    """The RemoteVM timer: scale to the backlog, send a probe when due, fold conditions."""
    vm = resolve_ref(ctx, body)
    f = fleet(ctx)
    status = body.get("status") or {}
    previous = dict(status.get("workers") or {})
    with f.scaling(vm.key):
        current = ctx.runtime.current_replicas(vm)
        decision = decide(ctx, vm, current)
        if decision.replicas != current or previous.get("replicas") != decision.replicas:
            workers = ctx.runtime.ensure(vm, decision.replicas)
            if decision.replicas != current:
                log.info("Scaled workers of RemoteVM %s from %s to %s (backlog %s: %s queued, "
                         "%s running)", vm.key, current, decision.replicas, decision.backlog,
                         decision.queue_depth, decision.running)
        else:
            workers = {**previous, "replicas": decision.replicas}
            if ctx.runtime.name == "Process":
                workers["readyReplicas"] = current
    workers["queueDepth"] = decision.queue_depth
    if workers != previous:
        ctx.kube.patch_vm_status(vm.namespace, vm.name, {"status": {"workers": workers}})
        status = {**status, "workers": workers}
    body = {**body, "status": status}
    f.health.maybe_probe(body, vm.spec, vm.queue)
    f.health.apply(body, vm.spec)


def observe_vm(ctx: Context, body: dict[str, Any]) -> None:
    """A watch event: fold a new probe result into conditions at once."""
    try:
        vm = vm_ref(body)
    except kopf.PermanentError:
        return
    fleet(ctx).health.apply(body, vm.spec)


def forget_vm(ctx: Context, namespace: str, name: str) -> None:
    f = fleet(ctx)
    f.autoscaler.forget(f"{namespace}/{name}")
    f.refs.pop(f"{namespace}/{name}", None)
    f.health.forget(namespace, name)


def wake_for_dispatch(ctx: Context, namespace: str, name: str) -> None:
    """A command was sent to this VM's queue: if it has no worker, start one now."""
    f = fleet(ctx)
    key = f"{namespace}/{name}"
    try:
        known = f.refs.get(key)
        if known is not None and (
            known.spec.workers is None or known.spec.workers.autoscale is None
            or f.autoscaler.last(key) != 0
        ):
            return  # workers run (or the VM is not autoscaled): nothing to wake
        body = ctx.kube.get_vm(namespace, name)
        if body is None:
            return
        vm = resolve_ref(ctx, body)
        f.refs[key] = vm
        if vm.spec.workers is None or vm.spec.workers.autoscale is None:
            return
        with f.scaling(key):
            if ctx.runtime.current_replicas(vm) > 0:
                return
            replicas = f.autoscaler.wake(key, vm.spec.workers)
            workers = ctx.runtime.ensure(vm, replicas)
        ctx.kube.patch_vm_status(namespace, name, {"status": {"workers": workers}})
        log.info("Woke workers of RemoteVM %s for a dispatch (%s replica)", key, replicas)
    except Exception as exc:  # noqa: BLE001 - the timer scales up anyway; never fail a dispatch
        log.warning("Could not wake the workers of RemoteVM %s: %s", key, exc)


def resume_commands(ctx: Context, vm: VMRef) -> None:
    """The VM is not paused (maybe just unpaused): move on the commands waiting for it now,
    rather than at their next timer."""
    from .commands import reconcile_command  # commands imports this module

    try:
        commands = ctx.kube.list_commands(vm.namespace)
    except ApiException as exc:
        log.warning("Could not list RemoteCommands of %s: %s", vm.namespace, exc.reason)
        return
    for obj in commands:
        results = (obj.get("status") or {}).get("results") or []
        if any(e.get("vm") == vm.name and e.get("phase") == Phase.PENDING for e in results):
            reconcile_command(ctx, obj)
