"""RemoteVMs as the controller holds them: workers sized to the backlog, health as status.

``Fleet`` keeps every RemoteVM the watch brought (and the worker Deployments, through
their own watch): no reads per tick. The controller loop calls ``tick`` once a second:

- each worker group (a VM, or the VMs of one ``workerPool``) is sized from its queues'
  depth plus the commands running on its VMs (``scaling``), and applied through the
  runtime only when that changes;
- health probes go out every ``healthCheck.periodSeconds`` to VMs that have a worker;
- conditions are folded (``health.fold_conditions``) and the status is written only
  when something in it changed.

A probe's report (``on_probe``) is written at once, with the conditions it changes. A
dispatch to a VM at zero replicas wakes its group (``wake``).

Each namespace with RemoteVMs has one more group, its transfer worker
(``runtime.transfer_group``): every VM of the namespace, sized from the namespace's
transfer queue and its queued and running transfers, at zero when idle and woken by a
transfer's dispatch (``wake_transfers``).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from controller.fold import set_condition
from vmfleet import metrics
from vmfleet.api import constants as c
from vmfleet.api.constants import Reason
from vmfleet.api.envelope import Target
from vmfleet.api.models import RemoteVMSpec
from vmfleet.api.reports import ProbeReport
from vmfleet.api.times import now_rfc3339
from vmfleet.kube import ApiException, Kube

from . import vmcheck
from .backlog import Counts, QueueDepthReader
from .health import HealthMonitor, conditions_changed, fold_conditions, transitions
from .runtime import TRANSFERS_GROUP, Runtime, VMRef, WorkerGroup, transfer_group, transfer_group_key
from .scaling import Autoscaler, Decision
from .status import checked_vm_fields
from .targets import vm_target

log = logging.getLogger("controller.vms")


def vm_ref(body: dict[str, Any]) -> VMRef | None:
    meta = body["metadata"]
    try:
        spec = RemoteVMSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        log.warning("RemoteVM %s/%s is invalid: %s", meta.get("namespace"), meta.get("name"), exc)
        return None
    return VMRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], spec=spec)


TICK_THREADS = 8  # threads sharing a tick's groups once there are many


class Fleet:
    """Every RemoteVM of the watched namespaces, its workers and its health."""

    def __init__(self, kube: Kube, runtime: Runtime, health: HealthMonitor,
                 queue_depths: QueueDepthReader, counts: Counts,
                 autoscaler: Autoscaler | None = None) -> None:
        self.kube = kube
        self.runtime = runtime
        self.health = health
        self.queue_depths = queue_depths
        self.counts = counts
        self.autoscaler = autoscaler or Autoscaler()
        self._lock = threading.RLock()
        self._vms: dict[tuple[str, str], dict[str, Any]] = {}
        self._applied: dict[str, int] = {}  # group key -> replicas applied
        self._groups_of: dict[str, str] = {}  # vm key -> group key
        self._scale_locks: dict[str, threading.Lock] = {}
        self._changed: set[str] = set()  # groups whose members changed since the last tick
        self._pool: ThreadPoolExecutor | None = None  # the tick's threads (a large fleet)
        # Refused RemoteVMs (``vmcheck``): recomputed when a spec, a VM or a queue changed.
        self._spec_problems: dict[tuple[str, str], str | None] = {}
        self._problems: dict[tuple[str, str], str] | None = None
        # ``group()``'s answers until a VM, a spec or a queue changes (when ``_problems``
        # goes): a fan-out wakes each target's group, which in a pool of N VMs was N
        # RemoteVMSpec validations per target.
        self._groups: dict[str, WorkerGroup | None] = {}

    # ------------------------------------------------------------------ the watch

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RemoteVM as the watch last saw it; one the watch has not brought yet (just
        created) is read from the API."""
        with self._lock:
            found = self._vms.get((namespace, name))
        if found is None:
            found = self.kube.get_vm(namespace, name)
            if found is not None:
                self.seen(found)
        return found

    def cached(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._vms.get((namespace, name))

    def list_vms(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """RemoteVMs of a namespace matching a label selector (through the API: the
        server evaluates selectors exactly as kubectl does)."""
        items = self.kube.list_vms(namespace, selector)
        for item in items:
            self.seen(item, reconcile=False)
        return items

    def seen(self, obj: dict[str, Any], *, reconcile: bool = True) -> None:
        obj = slim(obj)
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            previous = self._vms.get(key)
            self._vms[key] = obj
            if previous is None or previous.get("spec") != obj.get("spec") \
                    or previous["metadata"].get("uid") != meta.get("uid"):
                self._spec_problems[key] = vmcheck.spec_problem(obj)
                self._problems, self._groups = None, {}
        metrics.observe_vm(obj)
        if not reconcile:
            return
        old_gen = (previous or {}).get("metadata", {}).get("generation")
        if previous is None or old_gen != meta.get("generation"):
            self.reconcile(obj, previous)

    def gone(self, obj: dict[str, Any], *, reconcile: bool = True) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        with self._lock:
            self._vms.pop((meta["namespace"], meta["name"]), None)
            self._spec_problems.pop((meta["namespace"], meta["name"]), None)
            self._problems, self._groups = None, {}
            group = self._groups_of.pop(key, None)
        metrics.observe_vm(obj, deleted=True)
        if not reconcile:
            return  # a standby's cache (its group is settled by the leader)
        self.autoscaler.forget(key)
        self.health.forget(meta["namespace"], meta["name"])
        for key in ([group] if group is not None else []) + [transfer_group_key(meta["namespace"])]:
            remaining = self.group(key)
            if remaining is None:
                self.runtime.remove(key)
                with self._lock:
                    self._applied.pop(key, None)
            elif remaining.transfers:
                self.mark_changed(key)  # one key fewer to mount, on the next tick
            else:
                self.scale(remaining, force=True)

    # ------------------------------------------------------------------ targets

    def problem(self, namespace: str, name: str) -> str | None:
        """Why the controller refuses to serve this RemoteVM (``vmcheck``); None: it serves it."""
        return self.problems().get((namespace, name))

    def problems(self) -> dict[tuple[str, str], str]:
        with self._lock:
            if self._problems is None:
                self._problems = vmcheck.problems(self._vms.values(), self._spec_problems)
            return self._problems

    def ref(self, obj: dict[str, Any]) -> VMRef | None:
        """The VM as its workers serve it; None for a refused one (``problem``)."""
        if self.problem(obj["metadata"]["namespace"], obj["metadata"]["name"]) is not None:
            return None
        vm = vm_ref(obj)
        if vm is not None and vm.spec.proxy_jump is not None:
            bastion = self.get(vm.namespace, vm.spec.proxy_jump.vm)
            secret = ((bastion or {}).get("spec") or {}).get("credentialsSecretRef") or {}
            vm.bastion_secret = secret.get("name") or None
        return vm

    def target_of(self, obj: dict[str, Any]) -> Target:
        """How a worker reaches the VM (the envelope's ``Target``), bastion included."""
        jump = ((obj.get("spec") or {}).get("proxyJump") or {}).get("vm")
        bastion = None
        if jump and jump != obj["metadata"]["name"]:
            found = self.get(obj["metadata"]["namespace"], jump)
            bastion = vm_target(found) if found is not None else None
        return vm_target(obj, bastion)

    # ------------------------------------------------------------------ groups

    def group(self, key: str) -> WorkerGroup | None:
        """The worker group ``key`` (a VM key, or ``<namespace>/pool:<name>``); shared with
        the other callers until the fleet changes: not to be modified."""
        with self._lock:
            cache = self._groups
            if key in cache:
                return cache[key]
        found = self._group(key)
        with self._lock:
            cache[key] = found  # a cache replaced meanwhile (a change) is dropped with it
        return found

    def _group(self, key: str) -> WorkerGroup | None:
        namespace, _, rest = key.partition("/")
        with self._lock:
            objs = list(self._vms.values())
        refs = []
        for obj in objs:
            if obj["metadata"]["namespace"] != namespace:
                continue
            ref = self.ref(obj)
            if ref is not None and (ref.group == key or rest == TRANSFERS_GROUP):
                refs.append(ref)
        if not refs:
            return None
        if rest == TRANSFERS_GROUP:
            return transfer_group(namespace, refs)
        refs.sort(key=lambda r: r.name)
        pool = rest[len("pool:"):] if rest.startswith("pool:") else None
        return WorkerGroup(namespace, refs, pool)

    def groups(self) -> list[WorkerGroup]:
        with self._lock:
            objs = list(self._vms.values())
        by_key: dict[str, list[VMRef]] = {}
        for obj in objs:
            try:
                ref = self.ref(obj)
            except Exception as exc:  # noqa: BLE001 - this VM's error stays with it
                metrics.RECONCILE_ERRORS.labels(c.VM_KIND).inc()
                log.warning("Could not read RemoteVM %s/%s: %s", obj["metadata"]["namespace"],
                            obj["metadata"]["name"], exc)
                continue
            if ref is not None:
                by_key.setdefault(ref.group, []).append(ref)
        groups = []
        by_namespace: dict[str, list[VMRef]] = {}
        for _key, refs in sorted(by_key.items()):
            refs.sort(key=lambda r: r.name)
            pool = refs[0].spec.worker_pool
            groups.append(WorkerGroup(refs[0].namespace, refs, pool))
            by_namespace.setdefault(refs[0].namespace, []).extend(refs)
        groups += [transfer_group(ns, refs) for ns, refs in sorted(by_namespace.items())]
        return groups

    def credentials_secrets(self, namespace: str) -> list[str]:
        """The Secrets the namespace's RemoteVMs name as credentials (valid or not): a
        transfer never copies them."""
        with self._lock:
            objs = [o for (ns, _), o in self._vms.items() if ns == namespace]
        names = {((o.get("spec") or {}).get("credentialsSecretRef") or {}).get("name")
                 for o in objs}
        return sorted(n for n in names if isinstance(n, str) and n)

    def _scale_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._scale_locks.setdefault(key, threading.Lock())

    def reconcile(self, obj: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """A new or changed RemoteVM: its group's Deployment (or processes) now."""
        ref = self.ref(obj)
        if ref is None:
            self._leave(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}")
            return
        with self._lock:
            old_group = self._groups_of.get(ref.key)
            self._groups_of[ref.key] = ref.group
        self.mark_changed(transfer_group_key(ref.namespace))  # its keys, on the next tick
        if old_group is not None and old_group != ref.group:
            left = self.group(old_group)
            if left is None:
                self.runtime.remove(old_group)
            else:
                self.mark_changed(left.key)
        if ref.spec.worker_pool:
            # A pool's members often arrive together (200 RemoteVMs applied at once): the
            # loop applies the pool once per tick instead of once per member.
            self.mark_changed(ref.group)
            return
        group = self.group(ref.group)
        if group is not None:
            self.scale(group, force=True)

    def _leave(self, vm_key: str) -> None:
        """A VM refused now: its workers (or its place in a pool) go."""
        with self._lock:
            group = self._groups_of.pop(vm_key, None)
        if group is None:
            return
        left = self.group(group)
        if left is None:
            self.runtime.remove(group)
            with self._lock:
                self._applied.pop(group, None)
        else:
            self.mark_changed(left.key)

    def mark_changed(self, key: str) -> None:
        with self._lock:
            self._changed.add(key)

    def decide(self, group: WorkerGroup, current: int,
               counts: dict[tuple[str, str], tuple[int, int]],
               depths: dict[str, int]) -> Decision:
        workers = group.workers
        if workers is None or workers.autoscale is None:
            return self.autoscaler.decide(group.key, workers, 0, 0, current)
        depth = sum(depths.get(q, 0) for q in group.queues)
        names = [TRANSFERS_GROUP] if group.transfers else [vm.name for vm in group.vms]
        queued = sum(counts.get((group.namespace, name), (0, 0))[0] for name in names)
        running = sum(counts.get((group.namespace, name), (0, 0))[1] for name in names)
        # Messages a worker reserved but has not started are in neither count: the
        # Queued entries cover them.
        return self.autoscaler.decide(group.key, workers, max(depth, queued), running, current)

    def scale(self, group: WorkerGroup, *, force: bool = False,
              counts: dict[tuple[str, str], tuple[int, int]] | None = None,
              depths: dict[str, int] | None = None) -> None:
        with self._scale_lock(group.key):
            current = self.runtime.current_replicas(group)
            if counts is None:
                counts = self.counts()
            if depths is None:
                depths = self._depths(group.queues) if _autoscaled(group) else {}
                if depths is None:
                    return
            decision = self.decide(group, current, counts, depths)
            with self._lock:
                applied = self._applied.get(group.key)
            if force or applied != decision.replicas or current != decision.replicas:
                self.runtime.ensure(group, decision.replicas)
                with self._lock:
                    self._applied[group.key] = decision.replicas
                if decision.replicas != current:
                    log.info("Scaled workers of %s from %s to %s (backlog %s: %s queued, %s "
                             "running)", group.key, current, decision.replicas, decision.backlog,
                             decision.queue_depth, decision.running)
            if group.transfers:  # no RemoteVM's status: its queue's depth is a metric
                metrics.watch_queue(group.namespace, TRANSFERS_GROUP, group.queues[0])
            for vm in group.vms if not group.transfers else []:
                self.write_workers(vm, group, decision)

    def _depths(self, queues: list[str]) -> dict[str, int] | None:
        try:
            return self.queue_depths(queues)
        except Exception as exc:  # noqa: BLE001 - the broker is down: keep what runs
            log.warning("Could not read the depth of queues %s: %s; keeping the workers",
                        ",".join(queues), exc)
            return None

    def probe_now(self, namespace: str, name: str) -> None:
        """A health probe of this VM at the next tick (a rollout's health gate), with a
        worker woken to run it."""
        self.health.forget(namespace, name)
        self.wake(namespace, name)

    def wake(self, namespace: str, name: str) -> None:
        """A command was sent to this VM's queue: if its group has no worker, start one."""
        obj = self.get(namespace, name)
        ref = self.ref(obj) if obj is not None else None
        if ref is not None:
            self._wake(self.group(ref.group))

    def wake_transfers(self, namespace: str) -> None:
        """A transfer was sent to the namespace's queue: start its transfer worker if none runs."""
        self._wake(self.group(transfer_group_key(namespace)))

    def _wake(self, group: WorkerGroup | None) -> None:
        if group is None or not _autoscaled(group):
            return
        try:
            with self._scale_lock(group.key):
                if self.runtime.current_replicas(group) > 0:
                    return
                replicas = self.autoscaler.wake(group.key, group.workers)
                self.runtime.ensure(group, replicas)
                with self._lock:
                    self._applied[group.key] = replicas
            log.info("Woke workers of %s for a dispatch (%s replica)", group.key, replicas)
        except Exception as exc:  # noqa: BLE001 - the loop scales up anyway; never fail a dispatch
            log.warning("Could not wake the workers of %s: %s", group.key, exc)

    # ------------------------------------------------------------------ status

    def write_workers(self, vm: VMRef, group: WorkerGroup, decision: Decision) -> None:
        obj = self.cached(vm.namespace, vm.name)
        if obj is None:
            return
        workers: dict[str, Any] = {
            "runtime": self.runtime.name,
            "queue": vm.queue,
            "replicas": decision.replicas,
            "readyReplicas": getattr(self.runtime, "ready_replicas", self.runtime.current_replicas)(group),
            "queueDepth": decision.queue_depth,
        }
        if self.runtime.name == c.RUNTIME_DEPLOYMENT:
            workers["deployment"] = group.deployment
        if group.pool:
            workers["pool"] = group.pool
        metrics.observe_workers(vm.namespace, vm.name, workers)
        self.write_status(obj, {"workers": workers,
                                "observedGeneration": obj["metadata"].get("generation")})

    def write_status(self, obj: dict[str, Any], fields: dict[str, Any]) -> None:
        """Merge ``fields`` into the VM's status, fold its conditions, and write what changed."""
        meta = obj["metadata"]
        status = dict(obj.get("status") or {})
        fields = self._valid(obj, fields)
        new = {**status, **fields}
        refused = self.problem(meta["namespace"], meta["name"]) is not None
        ref = None if refused else vm_ref(obj)
        if ref is not None:
            new["conditions"] = fold_conditions(ref.spec, new, now_rfc3339(), self.health.thresholds)
        changed = {k: v for k, v in new.items() if status.get(k) != v
                   and not (k == "conditions" and not conditions_changed(status.get(k) or [], v))}
        checked = self._valid(obj, changed)
        if checked != changed:
            changed, new = checked, {**status, **checked}
        if not changed:
            return
        try:
            self.kube.patch_vm_status(meta["namespace"], meta["name"], {"status": changed})
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        with self._lock:
            current = self._vms.get((meta["namespace"], meta["name"]))
            if current is not None and current["metadata"].get("uid") == meta.get("uid"):
                self._vms[(meta["namespace"], meta["name"])] = {**current, "status": new}
        if "conditions" in changed:
            for reason, message in transitions(status.get("conditions") or [], new["conditions"]):
                self.health.post_warning(obj, reason, message)
                if reason == Reason.HOST_KEY_MISMATCH:
                    self.health.pause(obj, reason)

    @staticmethod
    def _valid(obj: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
        """The fields that validate against ``RemoteVMStatus``; the rest (a bug, or a
        worker's bad report) is never written nor kept as written: logged and counted."""
        valid, errors = checked_vm_fields(fields)
        if errors:
            metrics.STATUS_WRITE_ERRORS.labels(c.VM_KIND).inc()
            log.error("Not writing part of the status of RemoteVM %s/%s: %s",
                      obj["metadata"]["namespace"], obj["metadata"]["name"], "; ".join(errors))
        return valid

    def on_probe(self, report: ProbeReport) -> bool:
        """A worker's probe result: written with the conditions it changes."""
        obj = self.cached(report.namespace, report.vm)
        if obj is None or (report.uid and obj["metadata"].get("uid") != report.uid):
            return False
        fields = dict(report.status)
        host_key = fields.get("hostKey") or {}
        recorded = ((obj.get("status") or {}).get("hostKey") or {}).get("publicKey")
        if host_key.get("publicKey"):
            if recorded:  # recorded once: a later first-use probe records nothing
                fields["hostKey"] = {**(obj.get("status") or {}).get("hostKey", {})}
            else:
                log.info("Recorded host key %s of RemoteVM %s/%s (TrustOnFirstUse)",
                         host_key.get("fingerprint"), obj["metadata"]["namespace"],
                         obj["metadata"]["name"])
        elif recorded:
            fields["hostKey"] = {**host_key, "publicKey": recorded,
                                 "recordedTime": (obj.get("status") or {}).get("hostKey", {}).get("recordedTime")}
            fields["hostKey"] = {k: v for k, v in fields["hostKey"].items() if v is not None}
        self.write_status(obj, fields)
        return True

    # ------------------------------------------------------------------ the loop

    def tick(self, *, force: bool = False) -> None:
        """Scale every group (``force``: apply each one's workers, as at start; else only
        what changed), send the probes that are due, fold conditions. The groups
        are shared among a few threads: after a restart each of 1,000 VMs may need a
        status write, and one write at a time is the API server's round trip a thousand
        times over."""
        counts = self.counts()
        groups = self.groups()
        queues = sorted({q for g in groups if _autoscaled(g) for q in g.queues})
        depths = self._depths(queues) if queues else {}
        with self._lock:
            changed, self._changed = self._changed, set()
        if force:
            changed = {group.key for group in groups}

        def work(chunk: list[WorkerGroup]) -> None:
            for group in chunk:
                self._tick_group(group, counts, depths, changed)

        self.refuse()
        if len(groups) < 2 * TICK_THREADS:
            work(groups)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(TICK_THREADS, thread_name_prefix="vmfleet-tick")
        list(self._pool.map(work, [groups[i::TICK_THREADS] for i in range(TICK_THREADS)]))

    def refuse(self) -> None:
        """Every refused RemoteVM says why: ``Ready=False``, reason ``InvalidSpec``, and a
        Warning Event when it turns so (each VM on its own: one failing write stops none)."""
        for (namespace, name), problem in sorted(self.problems().items()):
            obj = self.cached(namespace, name)
            if obj is None:
                continue
            try:
                self._refuse(obj, problem)
            except Exception as exc:  # noqa: BLE001 - written again at the next tick
                metrics.RECONCILE_ERRORS.labels(c.VM_KIND).inc()
                log.warning("Could not write the status of RemoteVM %s/%s: %s", namespace, name, exc)

    def _refuse(self, obj: dict[str, Any], problem: str) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        conditions = list(status.get("conditions") or [])
        ready: dict[str, Any] = next(
            (x for x in conditions if x.get("type") == c.Condition.READY), {})
        if (ready.get("status"), ready.get("reason"), ready.get("message")) == \
                ("False", Reason.INVALID_SPEC, problem):
            return
        conditions = set_condition(conditions, c.Condition.READY, "False", Reason.INVALID_SPEC,
                                   problem, now_rfc3339())
        self.write_status(obj, {"conditions": conditions,
                                "observedGeneration": meta.get("generation")})
        log.warning("Refused RemoteVM %s/%s: %s", meta["namespace"], meta["name"], problem)
        self.health.post_warning(obj, Reason.INVALID_SPEC, problem)

    def _tick_group(self, group: WorkerGroup, counts: dict[tuple[str, str], tuple[int, int]],
                    depths: dict[str, int] | None, changed: set[str]) -> None:
        if depths is None and _autoscaled(group):
            return  # the broker is down: keep what runs
        try:
            self.scale(group, counts=counts, depths=depths or {}, force=group.key in changed)
        except Exception as exc:  # noqa: BLE001 - one group's error must not stop the rest
            metrics.RECONCILE_ERRORS.labels(c.VM_KIND).inc()
            log.warning("Could not scale the workers of %s: %s", group.key, exc)
        for vm in group.vms if not group.transfers else []:
            obj = self.cached(vm.namespace, vm.name)
            if obj is None:
                continue
            try:
                self.health.maybe_probe(obj, vm.spec, vm.queue, self.target_of(obj))
                self.write_status(obj, {})
            except Exception as exc:  # noqa: BLE001 - this VM's error stays with it
                metrics.RECONCILE_ERRORS.labels(c.VM_KIND).inc()
                log.warning("Could not probe or write the status of RemoteVM %s: %s", vm.key, exc)


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what the controller never reads and a cache of 1,000 VMs would
    hold twice over: ``managedFields`` and kubectl's copy of the last applied spec."""
    meta = obj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if "managedFields" not in meta and LAST_APPLIED not in annotations:
        return obj
    meta = {k: v for k, v in meta.items() if k != "managedFields"}
    if LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**obj, "metadata": meta}


def _autoscaled(group: WorkerGroup) -> bool:
    workers = group.workers
    return workers is not None and workers.autoscale is not None


__all__ = ["Fleet", "vm_ref"]
