"""RemoteVM health as status: send probes, fold what the workers saw into conditions.

Every ``healthCheck.periodSeconds`` the controller sends ``remote_tasks.check_vm_status``
by name to the VM's own queue (it expires after one period, so probes never pile up).
The worker that runs it reports ``lastProbe``, ``facts`` and ``hostKey``; the controller
writes them, and ``fold_conditions`` (pure) turns them into the conditions
``Reachable``, ``HostKeyVerified``, ``DiskPressure``, ``MemoryPressure``,
``WorkersReady`` and ``Ready``, as a Node's are.

A VM scaled to zero has no worker to probe it: it is not woken for health checks (that
would keep it from ever being idle); its conditions say so once the last probe is stale.

A host key that stops matching sets ``HostKeyVerified=False``, pauses the VM
(``spec.paused``, annotated with why: no command is dispatched to it) and posts a
Warning Event. An unreachable VM posts a Warning Event too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from controller.fold import set_condition
from vmfleet import settings
from vmfleet.api import constants as c
from vmfleet.api.constants import Condition, Reason
from vmfleet.api.envelope import Target
from vmfleet.api.models import RemoteVMSpec
from vmfleet.api.times import now_rfc3339, parse_rfc3339
from vmfleet.kube import ApiException, Kube

log = logging.getLogger("controller.health")

PAUSED_BY_ANNOTATION = f"{c.GROUP}/paused-by"
REASON_NOT_PROBED = "NotProbed"
REASON_PROBE_OVERDUE = "ProbeOverdue"
REASON_SCALED_TO_ZERO = "ScaledToZero"

Conditions = list[dict[str, Any]]


@dataclass(frozen=True)
class Thresholds:
    """When a VM is under pressure (the controller's ``VMFLEET_DISK_PRESSURE_RATIO`` and
    ``VMFLEET_MEMORY_PRESSURE_AVAILABLE_RATIO``; defaults here for tests)."""

    disk_used_ratio: float = 0.90  # DiskPressure when the root filesystem is this full
    memory_available_ratio: float = 0.10  # MemoryPressure when less than this is available

    @classmethod
    def from_settings(cls, conf: settings.Settings) -> Thresholds:
        return cls(disk_used_ratio=conf.disk_pressure_ratio,
                   memory_available_ratio=conf.memory_pressure_available_ratio)


# --------------------------------------------------------------------------- pure


def _condition(conditions: Conditions, type_: str) -> dict[str, Any]:
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return {}


def probe_age(status: dict[str, Any], now: datetime) -> float | None:
    probe = status.get("lastProbe") or {}
    if not probe.get("time"):
        return None
    return (now - parse_rfc3339(str(probe["time"]))).total_seconds()


Verdict = tuple[str, str, str]  # a condition's status, reason and message


@dataclass(frozen=True)
class Observed:
    """What a RemoteVM's status says about it, as the conditions read it."""

    probe: dict[str, Any]
    facts: dict[str, Any]
    workers: dict[str, Any]
    host_key: dict[str, Any]
    age: float | None  # seconds since the last probe (None: never probed)
    stale: bool  # the last probe is older than two periods and a timeout

    @property
    def replicas(self) -> int:
        return int(self.workers.get("replicas") or 0)

    @property
    def ready_replicas(self) -> int:
        return int(self.workers.get("readyReplicas") or 0)

    @classmethod
    def of(cls, spec: RemoteVMSpec, status: dict[str, Any], now: str) -> Observed:
        age = probe_age(status, parse_rfc3339(now))
        check = spec.health_check
        return cls(
            probe=status.get("lastProbe") or {}, facts=status.get("facts") or {},
            workers=status.get("workers") or {}, host_key=status.get("hostKey") or {}, age=age,
            stale=age is not None and age > 2 * check.period_seconds + check.timeout_seconds + 5,
        )


def reachable_verdict(seen: Observed, period: int) -> Verdict:
    probe = seen.probe
    if seen.age is None:
        if seen.replicas == 0:
            return ("Unknown", REASON_SCALED_TO_ZERO,
                    "no worker runs while the VM is scaled to zero: not probed")
        return "Unknown", REASON_NOT_PROBED, "waiting for the first health probe"
    if seen.stale:
        if seen.replicas == 0:
            return ("Unknown", REASON_SCALED_TO_ZERO,
                    f"no worker runs while the VM is scaled to zero; last probed {probe.get('time')}")
        return ("Unknown", REASON_PROBE_OVERDUE,
                f"no health probe result since {probe.get('time')} (period {period}s)")
    if probe.get("succeeded"):
        return "True", Reason.COMPLETED, f"answered the health probe in {probe.get('latencySeconds')}s"
    return ("False", str(probe.get("reason") or Reason.TRANSPORT_ERROR),
            str(probe.get("message") or "the health probe failed"))


def host_key_verdict(seen: Observed, policy: str, known: bool) -> Verdict | None:
    """Only a probe that got as far as the key exchange says anything (None: keep the
    condition as it is, once there is one)."""
    probe = seen.probe
    if probe.get("reason") == Reason.HOST_KEY_MISMATCH:
        return ("False", Reason.HOST_KEY_MISMATCH,
                str(probe.get("message") or "the VM's host key does not match"))
    if probe.get("succeeded") or probe.get("reason") == Reason.AUTH_FAILED:
        how = "recorded on first use" if policy == c.HOST_KEY_TOFU else "pinned"
        return ("True", "HostKeyMatched",
                f"host key {seen.host_key.get('fingerprint', '?')} matches the {how} key")
    if not known:
        return "Unknown", REASON_NOT_PROBED, "not verified yet"
    return None


def disk_pressure_verdict(facts: dict[str, Any], reachable: bool, limit: float) -> Verdict:
    """From the facts of a fresh successful probe."""
    total, used = facts.get("rootDiskTotalBytes"), facts.get("rootDiskUsedBytes")
    if not (reachable and total):
        return "Unknown", REASON_NOT_PROBED, "no fresh disk usage"
    ratio = float(used or 0) / float(total)
    if ratio >= limit:
        return "True", "RootDiskFull", f"root filesystem {ratio:.0%} used (threshold {limit:.0%})"
    return "False", "RootDiskHasSpace", f"root filesystem {ratio:.0%} used"


def memory_pressure_verdict(facts: dict[str, Any], reachable: bool, limit: float) -> Verdict:
    """From the facts of a fresh successful probe."""
    total, available = facts.get("memoryTotalBytes"), facts.get("memoryAvailableBytes")
    if not (reachable and total):
        return "Unknown", REASON_NOT_PROBED, "no fresh memory usage"
    ratio = float(available or 0) / float(total)
    if ratio < limit:
        return "True", "MemoryLow", f"{ratio:.0%} of memory available (threshold {limit:.0%})"
    return "False", "MemoryAvailable", f"{ratio:.0%} of memory available"


def workers_ready_verdict(seen: Observed) -> Verdict | None:
    """None while the VM has no workers status yet."""
    if not seen.workers:
        return None
    replicas, ready = seen.replicas, seen.ready_replicas
    if replicas == 0:
        return ("True", REASON_SCALED_TO_ZERO,
                "no workers needed: the queue is idle (a dispatch wakes one)")
    if ready >= replicas:
        return "True", "WorkersRunning", f"{ready}/{replicas} workers ready"
    return "False", "WorkersStarting", f"{ready}/{replicas} workers ready"


READY_NEEDS = ((Condition.REACHABLE, "True"), (Condition.HOST_KEY_VERIFIED, "True"),
               (Condition.DISK_PRESSURE, "False"), (Condition.MEMORY_PRESSURE, "False"))


def ready_verdict(conditions: Conditions) -> Verdict:
    """Reachable, the right host, no pressure; else the first condition that is not."""
    blocking = [cond for type_, good in READY_NEEDS
                if (cond := _condition(conditions, type_)).get("status") != good]
    if not blocking:
        return "True", "VMReady", "reachable, host key verified, no pressure"
    first = blocking[0]
    value = "Unknown" if first.get("status") == "Unknown" else "False"
    return value, str(first.get("reason") or "NotReady"), f"{first.get('type')}: {first.get('message')}"


def fold_conditions(
    spec: RemoteVMSpec, status: dict[str, Any], now: str, thresholds: Thresholds = Thresholds()
) -> Conditions:
    """The RemoteVM's conditions from its last probe, facts and workers (pure)."""
    seen = Observed.of(spec, status, now)
    conditions: Conditions = list(status.get("conditions") or [])

    def put(type_: str, verdict: Verdict | None) -> None:
        nonlocal conditions
        if verdict is not None:
            conditions = set_condition(conditions, type_, *verdict, now)

    put(Condition.REACHABLE, reachable_verdict(seen, spec.health_check.period_seconds))
    put(Condition.HOST_KEY_VERIFIED, host_key_verdict(
        seen, spec.host_key_policy, known=bool(_condition(conditions, Condition.HOST_KEY_VERIFIED))))
    reachable = _condition(conditions, Condition.REACHABLE).get("status") == "True"
    put(Condition.DISK_PRESSURE,
        disk_pressure_verdict(seen.facts, reachable, thresholds.disk_used_ratio))
    put(Condition.MEMORY_PRESSURE,
        memory_pressure_verdict(seen.facts, reachable, thresholds.memory_available_ratio))
    put(Condition.WORKERS_READY, workers_ready_verdict(seen))
    put(Condition.READY, ready_verdict(conditions))
    return conditions


def transitions(old: Conditions, new: Conditions) -> list[tuple[str, str]]:
    """Warning Events ``(reason, message)`` for conditions that just turned bad."""
    events = []
    for type_, bad in ((Condition.HOST_KEY_VERIFIED, "False"), (Condition.REACHABLE, "False")):
        before, after = _condition(old, type_), _condition(new, type_)
        if after.get("status") == bad and before.get("status") != bad:
            reason = Reason.HOST_KEY_MISMATCH if type_ == Condition.HOST_KEY_VERIFIED \
                else "Unreachable"
            events.append((reason, str(after.get("message") or "")))
    return events


def conditions_changed(old: Conditions, new: Conditions) -> bool:
    return sorted(map(repr, old)) != sorted(map(repr, new))


def probe_message(namespace: str, name: str, uid: str, spec: RemoteVMSpec,
                  target: Target | None = None, scope: str = "default") -> dict[str, Any]:
    return {"namespace": namespace, "vm": name, "uid": uid,
            "timeoutSeconds": spec.health_check.timeout_seconds, "sentTime": now_rfc3339(),
            "target": target.to_message() if target is not None else None, "scope": scope}


# --------------------------------------------------------------------------- effects


Sender = Callable[[str, dict[str, Any], str, float], None]  # (task, message, queue, expires)


class HealthMonitor:
    """Sends probes when due, posts Events, pauses a VM on a host key mismatch."""

    def __init__(self, kube: Kube, send: Sender, thresholds: Thresholds | None = None,
                 clock: Callable[[], float] = time.monotonic, scope: str = "default") -> None:
        self.kube = kube
        self.scope = scope
        self.send = send
        self.thresholds = thresholds or Thresholds()
        self.clock = clock
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}

    def maybe_probe(self, body: dict[str, Any], spec: RemoteVMSpec, queue: str,
                    target: Target | None = None) -> bool:
        """Send a probe if one is due and a worker is there to run it."""
        meta = body["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        workers = (body.get("status") or {}).get("workers") or {}
        if not int(workers.get("replicas") or 0):
            return False
        now = self.clock()
        period = float(spec.health_check.period_seconds)
        with self._lock:
            last = self._sent.get(key)
            if last is not None and now - last < period:
                return False
            self._sent[key] = now
        message = probe_message(meta["namespace"], meta["name"], meta["uid"], spec, target,
                                self.scope)
        try:
            self.send(c.TASK_CHECK_VM, message, queue, period)
        except Exception as exc:  # noqa: BLE001 - the broker is down: conditions go stale
            log.warning("Could not send a health probe for RemoteVM %s to queue %s: %s", key,
                        queue, exc)
            return False
        return True

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._sent.pop(f"{namespace}/{name}", None)

    def pause(self, vm: dict[str, Any], reason: str) -> None:
        meta = vm["metadata"]
        if (vm.get("spec") or {}).get("paused"):
            return
        self.kube.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, meta["namespace"], c.VM_PLURAL, meta["name"],
            {"metadata": {"annotations": {PAUSED_BY_ANNOTATION: reason}}, "spec": {"paused": True}},
            _content_type="application/merge-patch+json",
        )
        log.warning("Paused RemoteVM %s/%s: %s (set spec.paused=false to resume once the host "
                    "key is trusted again)", meta["namespace"], meta["name"], reason)

    def post_warning(self, vm: dict[str, Any], reason: str, message: str) -> None:
        meta = vm["metadata"]
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": c.API_VERSION, "kind": c.VM_KIND,
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta["uid"]},
            "type": "Warning",
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "vmfleet-controller"},
            "reportingComponent": "vmfleet-controller",
        }
        try:
            self.kube.raw.create_namespaced_event(meta["namespace"], cast(Any, event))
        except ApiException as exc:
            log.warning("Could not post Event %s for RemoteVM %s/%s: %s", reason,
                        meta["namespace"], meta["name"], exc.reason)
        log.warning("RemoteVM %s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)


__all__ = ["HealthMonitor", "Thresholds", "conditions_changed", "fold_conditions",
           "probe_message", "transitions"]
