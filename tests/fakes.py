"""Hand fakes for the controller's seams, shared by unit tests (no servers).

- ``FakeState``: the controller's side of ``vmfleet.state.State`` (Redis).
- ``FakeKube``: the Kubernetes calls ``Fleet``, ``HealthMonitor`` and the start-up make,
  recording writes and Events; list answers come from ``vms`` and ``commands``.
- ``FakeRuntime``: a worker runtime that records what it was asked to run.
- ``controller_parts``: a ``Commands`` and a ``Fleet`` wired to each other as
  ``controller.context`` wires them, on these fakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.backlog import entry_counts
from controller.commands import Commands
from controller.health import HealthMonitor
from controller.runtime import WorkerGroup
from controller.targets import vm_target
from controller.vms import Fleet


class FakeState:
    """The controller's side of vmfleet.state.State."""

    def __init__(self, scope: str = "default") -> None:
        self.scope = scope
        self.live_uids: set[tuple[str, str]] = set()  # (namespace, uid)
        self.cancelled: list[str] = []
        self.acked: list[str] = []
        self.served: set[str] = set()

    def serve(self, namespace: str) -> None:
        self.served.add(namespace)

    def sent(self, uid: str, namespace: str) -> None:
        self.live_uids.add((namespace, uid))

    def finished(self, uid: str, namespace: str) -> None:
        self.live_uids.discard((namespace, uid))

    def cancel(self, uid: str, namespace: str) -> None:
        self.cancelled.append(uid)
        self.live_uids.discard((namespace, uid))

    def live(self) -> set[tuple[str, str]]:
        return set(self.live_uids)

    def ack(self, ids: list[str]) -> None:
        self.acked.extend(ids)

    def stale_heartbeats(self, older_than_seconds: float) -> set[tuple[str, str]]:
        return set()

    def absent_heartbeats(self, members: list[tuple[str, str]]) -> set[tuple[str, str]]:
        return set()

    def forget_heartbeat(self, namespace: str, member: str) -> None:
        pass


class _Core:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> None:
        self.events.append(body)


class _Custom:
    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                      plural: str, **_: Any) -> dict[str, Any]:
        return {"items": [o for o in self.kube.items(plural)
                          if o["metadata"]["namespace"] == namespace]}

    def list_cluster_custom_object(self, group: str, version: str, plural: str,
                                   **_: Any) -> dict[str, Any]:
        return {"items": self.kube.items(plural)}

    def patch_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.kube.object_patches.append(args)
        return {}


@dataclass
class FakeKube:
    """What the controller reads and writes through ``vmfleet.kube.Kube``."""

    vms: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    vm_patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    command_patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    object_patches: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.core = _Core(self.events)
        self.custom = _Custom(self)

    def items(self, plural: str) -> list[dict[str, Any]]:
        return list(self.vms if plural == "remotevms" else self.commands)

    def patch_vm_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.vm_patches.append((name, patch))
        return {}

    def patch_command_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.command_patches.append((name, patch))
        return {}

    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next((v for v in self.vms if (v["metadata"]["namespace"], v["metadata"]["name"])
                     == (namespace, name)), None)

    def list_vms(self, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        return [v for v in self.vms if v["metadata"]["namespace"] == namespace]

    def conditions(self, name: str) -> dict[str, dict[str, Any]]:
        """The last conditions written for RemoteVM ``name``, by type."""
        for vm, patch in reversed(self.vm_patches):
            found = (patch.get("status") or {}).get("conditions")
            if vm == name and found:
                return {x["type"]: x for x in found}
        return {}


class FakeRuntime:
    """Workers as a list of (group key, replicas) applied."""

    name = "Process"

    def __init__(self) -> None:
        self.applied: dict[str, int] = {}
        self.removed: list[str] = []

    def ensure(self, group: WorkerGroup, replicas: int) -> dict[str, Any]:
        self.applied[group.key] = replicas
        return {}

    def current_replicas(self, group: WorkerGroup) -> int:
        return self.applied.get(group.key, 0)

    def remove(self, group_key: str) -> None:
        self.removed.append(group_key)
        self.applied.pop(group_key, None)

    def shutdown(self) -> None:
        pass


@dataclass
class Parts:
    kube: FakeKube
    state: FakeState
    runtime: FakeRuntime
    commands: Commands
    fleet: Fleet
    sent: list[tuple[str, list[Any], str]]


def controller_parts(kube: FakeKube | None = None) -> Parts:
    """``Commands`` and ``Fleet`` wired as ``controller.context`` wires them."""
    kube = kube or FakeKube()
    state, runtime = FakeState(), FakeRuntime()
    sent: list[tuple[str, list[Any], str]] = []
    box: list[Fleet] = []

    def send(task: str, body: dict[str, Any], queue: str, namespace: str | None) -> None:
        sent.append((task, body, queue))

    commands = Commands(
        state, send,  # type: ignore[arg-type]
        get_vm=lambda ns, name: box[0].get(ns, name),
        list_vms=lambda ns, selector: box[0].list_vms(ns, selector),
        target_of=lambda obj: vm_target(obj),
        wake=lambda ns, name: box[0].wake(ns, name),
        delete=lambda uid, ns, name: None,
        refused=lambda ns, name: box[0].problem(ns, name),
    )
    health = HealthMonitor(kube, lambda *a: None)  # type: ignore[arg-type]
    fleet = Fleet(kube, runtime, health, lambda queues: {q: 0 for q in queues},  # type: ignore[arg-type]
                  counts=lambda: entry_counts(commands.tracked()))
    box.append(fleet)
    return Parts(kube, state, runtime, commands, fleet, sent)


def vm_object(name: str, namespace: str = "ns", created: str = "2026-12-06T10:00:00Z",
              **spec: Any) -> dict[str, Any]:
    """A RemoteVM as the API server returns it."""
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM",
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}",
                         "generation": 1, "creationTimestamp": created},
            "spec": {"host": "127.0.0.1", "user": "u", "hostKeyPolicy": "TrustOnFirstUse",
                     "credentialsSecretRef": {"name": f"{name}-ssh"}, **spec}}


def command_object(name: str = "c", namespace: str = "ns", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteCommand",
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{namespace}-{name}",
                         "generation": 1, "creationTimestamp": "2026-12-06T10:00:00Z"},
            "spec": {"command": "true", **spec}}
