"""Hand fakes and builders shared by unit tests (no servers); test modules import them
from here, never from each other (tests/unit/test_house.py checks that).

The controller:
- ``FakeState``: the controller's side of ``vmfleet.state.State`` (Redis).
- ``FakeKube``: the Kubernetes calls ``Fleet``, ``HealthMonitor``, the status ``Writer`` and
  the start-up make, recording writes and Events; list answers come from ``vms`` and
  ``commands``, status writes can be scripted to fail.
- ``FakeRuntime``: a worker runtime that records what it was asked to run.
- ``controller_parts``: a ``Commands`` and a ``Fleet`` wired to each other as
  ``controller.context`` wires them, on these fakes; ``vm_object``/``command_object`` as the
  API server returns them.
- ``Fleet`` (a hand fake, not ``controller.vms.Fleet``): a ``Commands`` whose sends are
  recorded and whose VMs come from a dict; ``command``, ``report``, ``finished`` build its
  inputs; ``writer_parts`` puts a status ``Writer`` on top.
- ``NOW``, ``spec``, ``entries``, ``status``, ``queues``: inputs of ``controller.schedule``.

The worker: ``AttemptState`` (``vmfleet.state.State`` as one attempt sees it) and ``ENVELOPE``.

The CLI: ``ExecKube`` (the Kubernetes calls ``vmfleet exec`` makes, watch events scripted),
``options``, ``result``, ``obj_with`` and ``run``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.backlog import entry_counts
from controller.commands import Commands
from controller.health import HealthMonitor
from controller.loop import Writer
from controller.runtime import WorkerGroup
from controller.targets import vm_target
from controller.tracked import Tracked
from controller.vms import Fleet as VMFleet
from vmfleet import exec as ex
from vmfleet.api.constants import TASK_EXECUTE
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import AttemptReport
from vmfleet.cli import build_parser
from vmfleet.kube import ApiException
from vmfleet.state import CLAIMED


class FakeState:
    """The controller's side of vmfleet.state.State (Redis).

    ``live()`` answers the (namespace, uid) sent and not finished or cancelled; ``cancelled``,
    ``acked`` and ``served`` record those calls and ``namespaces`` where each call went.
    Heartbeats are scripted by member, in namespace ``ns`` (every hand-wired test command
    is there): ``stale`` members have a stale heartbeat, ``absent`` ones none at all;
    ``forgotten`` records ``forget_heartbeat``.
    """

    def __init__(self, scope: str = "default") -> None:
        self.scope = scope
        self.live_uids: set[tuple[str, str]] = set()  # (namespace, uid)
        self.cancelled: list[str] = []
        self.acked: list[str] = []
        self.served: set[str] = set()
        self.stale: set[str] = set()
        self.absent: set[str] = set()  # running attempts without any heartbeat
        self.forgotten: list[str] = []
        self.namespaces: set[str] = set()

    def serve(self, namespace: str) -> None:
        self.served.add(namespace)

    def sent(self, uid: str, namespace: str) -> None:
        self.namespaces.add(namespace)
        self.live_uids.add((namespace, uid))

    def finished(self, uid: str, namespace: str) -> None:
        self.namespaces.add(namespace)
        self.live_uids.discard((namespace, uid))

    def cancel(self, uid: str, namespace: str) -> None:
        self.namespaces.add(namespace)
        self.cancelled.append(uid)
        self.live_uids.discard((namespace, uid))

    def live(self) -> set[tuple[str, str]]:
        return set(self.live_uids)

    def ack(self, ids: list[str]) -> None:
        self.acked.extend(ids)

    def stale_heartbeats(self, older_than_seconds: float) -> set[tuple[str, str]]:
        return {("ns", member) for member in self.stale}

    def absent_heartbeats(self, members: list[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(namespace, member) for namespace, member in members if member in self.absent}

    def forget_heartbeat(self, namespace: str, member: str) -> None:
        self.namespaces.add(namespace)
        self.forgotten.append(member)
        self.stale.discard(member)


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


class FakeKube:
    """What the controller reads and writes through ``vmfleet.kube.Kube``.

    ``FakeKube(*answers, vms=..., commands=...)``: ``patch_command_status`` answers from the
    script ``answers`` (an exception to raise, or ``None`` for success; success once it is
    used up) and records each write that landed in ``patches`` as (namespace, name, patch);
    RemoteVM status writes go to ``vm_patches`` as (name, patch), Events to ``events``.
    """

    def __init__(self, *answers: Exception | None, vms: list[dict[str, Any]] | None = None,
                 commands: list[dict[str, Any]] | None = None) -> None:
        self.answers = list(answers)
        self.vms: list[dict[str, Any]] = vms if vms is not None else []
        self.commands: list[dict[str, Any]] = commands if commands is not None else []
        self.patches: list[tuple[str, str, Any]] = []
        self.vm_patches: list[tuple[str, dict[str, Any]]] = []
        self.object_patches: list[Any] = []
        self.events: list[dict[str, Any]] = []
        self.raw = _Core(self.events)
        self.custom = _Custom(self)

    def items(self, plural: str) -> list[dict[str, Any]]:
        return list(self.vms if plural == "remotevms" else self.commands)

    def patch_vm_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.vm_patches.append((name, patch))
        return {}

    def patch_command_status(self, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        self.patches.append((namespace, name, patch))
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
    fleet: VMFleet
    sent: list[tuple[str, list[Any], str]]


def controller_parts(kube: FakeKube | None = None) -> Parts:
    """``Commands`` and ``Fleet`` wired as ``controller.context`` wires them."""
    kube = kube or FakeKube()
    state, runtime = FakeState(), FakeRuntime()
    sent: list[tuple[str, list[Any], str]] = []
    box: list[VMFleet] = []

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
    fleet = VMFleet(kube, runtime, health, lambda queues: {q: 0 for q in queues},  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------- Commands by hand
# A ``Commands`` on a hand ``Fleet`` (no HealthMonitor, no runtime): every command is
# ``ns/c``, its VMs ``vm1``, ``vm2``... with their own addresses.


def vm(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}"},
            "spec": {"host": f"10.0.0.{name[-1]}", "user": "u",
                     "credentialsSecretRef": {"name": f"{name}-ssh"}, **spec}}


class Fleet:
    """Records what the commands send, and answers VM lookups from a dict."""

    def __init__(self, *names: str) -> None:
        self.vms = {name: vm(name) for name in names}
        self.sent: list[tuple[str, dict[str, Any], str]] = []
        self.woken: list[str] = []
        self.deleted: list[tuple[str, str, str]] = []

    def commands(self, state: FakeState) -> Commands:
        return Commands(
            state, self.send,  # type: ignore[arg-type]
            get_vm=lambda ns, name: self.vms.get(name),
            list_vms=lambda ns, selector: [self.vms[n] for n in sorted(self.vms)],
            target_of=lambda obj: Target(obj["metadata"]["name"], obj["spec"]["host"], 22, "u",
                                         obj["spec"]["credentialsSecretRef"]["name"]),
            wake=lambda ns, name: self.woken.append(name),
            delete=lambda uid, ns, name: self.deleted.append((uid, ns, name)),
        )

    def send(self, task: str, body: dict[str, Any], queue: str, namespace: str | None) -> None:
        assert namespace == "ns" or task.endswith(("transfer_file", "clean_transfer"))
        self.sent.append((task, body, queue))

    def envelopes(self) -> list[Envelope]:
        return [Envelope.from_message(body) for task, body, _ in self.sent if task == TASK_EXECUTE]


def command(uid: str = "c-uid", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "c", "uid": uid},
            "spec": {"command": "true", **spec}}


def report(event: str, vm: str, attempt: int = 1, uid: str = "c-uid", **fields: Any) -> AttemptReport:
    return AttemptReport.from_message({
        "kind": "attempt", "event": event, "namespace": "ns", "name": "c", "uid": uid,
        "vm": vm, "attempt": attempt, "worker": "w1", "fields": fields})


def finished(vm: str, attempt: int = 1, **fields: Any) -> AttemptReport:
    values = {"phase": "Succeeded", "reason": "Completed", "exitCode": 0,
              "completionTime": "2026-11-23T12:00:05.000Z", **fields}
    return report("finished", vm, attempt, **values)


def writer_parts(kube: FakeKube) -> tuple[FakeState, Commands, Writer, Tracked]:
    """A ``Writer`` on ``kube`` for command ``c`` on vm1 and vm2, its entries queued."""
    state = FakeState()
    commands = Fleet("vm1", "vm2").commands(state)
    commands.observe(command(selector={}))
    tracked = commands.get("c-uid")
    assert tracked is not None
    return state, commands, Writer(kube, state, commands, threads=1), tracked  # type: ignore[arg-type]


# --------------------------------------------------------------------------- schedule inputs

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def spec(**fields):
    return RemoteCommandSpec.model_validate({"selector": {}, "command": "true", **fields})


def entries(*phases, **extra):
    return [{"vm": f"vm{i}", "phase": p, "attempt": 1, **extra} for i, p in enumerate(phases)]


def status(results, started=0):
    return {"startTime": ts(started), "results": results}


def queues(n):
    return {f"vm{i}": f"q{i}" for i in range(n)}


# --------------------------------------------------------------------------- the worker's side


class AttemptState:
    """vmfleet.state.State as one attempt sees it: a scripted claim answer, collected reports."""

    def __init__(self, claim: str = CLAIMED, cancelled_at_beat: bool = False) -> None:
        self.answer = claim
        self.cancelled_at_beat = cancelled_at_beat
        self.claims: list[tuple[str, str, int, str]] = []
        self.reports: list[dict[str, Any]] = []
        self.beats = 0
        self.released: list[tuple[str, str, int]] = []
        self.scopes: set[str] = set()  # where the worker wrote (the sending controller's)
        self.namespaces: set[str | None] = set()  # ...and in which namespace's keys

    def claim(self, uid: str, vm: str, attempt: int, worker: str, scope: str = "default", *,
              namespace: str, delivery: str = "") -> str:
        self.scopes.add(scope)
        self.namespaces.add(namespace)
        self.claims.append((uid, vm, attempt, worker))
        return self.answer

    def heartbeat(self, uid: str, vm: str, attempt: int, scope: str = "default", *,
                  namespace: str) -> bool:
        self.scopes.add(scope)
        self.namespaces.add(namespace)
        self.beats += 1
        return self.cancelled_at_beat

    def report(self, body: dict[str, Any], scope: str = "default",
               namespace: str | None = None) -> str:
        self.scopes.add(scope)
        self.namespaces.add(namespace or body.get("namespace"))
        self.reports.append(body)
        return f"{len(self.reports)}-0"

    def release(self, uid: str, vm: str, attempt: int, scope: str = "default", *,
                namespace: str) -> None:
        self.scopes.add(scope)
        self.namespaces.add(namespace)
        self.released.append((uid, vm, attempt))


ENVELOPE = Envelope("ns", "c", "uid-1", "vm1", 2, "", {"command": "true"},
                    target=Target("vm1", "h", 22, "u", "vm1-ssh"), scope="release-a")


# --------------------------------------------------------------------------- vmfleet exec


def options(*argv: str) -> ex.ExecOptions:
    return ex.options_from_args(build_parser().parse_args(["exec", *argv]))


def result(vm: str = "vm1", phase: str = "Failed", **fields: Any) -> dict[str, Any]:
    return {"vm": vm, "phase": phase, **fields}


class ExecKube:
    """The Kube calls exec makes, recorded; watch events scripted."""

    def __init__(self, events: list[list[tuple[str, dict[str, Any]]]], vms: int = 1) -> None:
        self.events = events  # one list per watch request
        self.vms = vms
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.watched_from: list[str | None] = []
        self.gone = False

    def list_vms(self, namespace: str, selector: str | None) -> list[dict[str, Any]]:
        return [{"metadata": {"name": f"vm{i}"}} for i in range(1, self.vms + 1)]

    def create_command(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body)
        return {"metadata": {"name": "exec-vm1-abcde", "resourceVersion": "10"}}

    def watch_command(self, namespace: str, name: str, rv: str | None, timeout: int):  # type: ignore[no-untyped-def]
        self.watched_from.append(rv)
        batch = self.events.pop(0)
        for kind, obj in batch:
            if kind == "ERROR410":
                raise ApiException(status=410, reason="Expired")
            yield kind, obj

    def get_command(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None if self.gone else obj_with(11, [result(phase="Running")])

    def delete_command(self, namespace: str, name: str) -> bool:
        self.deleted.append(name)
        self.gone = True
        return True


def obj_with(rv: int, results: list[dict[str, Any]] | None, **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "exec-vm1-abcde", "resourceVersion": str(rv)},
                            "status": dict(status)}
    if results is not None:
        body["status"]["results"] = results
    return body


def run(kube: ExecKube, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ex.run(options(*argv), kube=kube, out=out, err=err, progress=False)
    return code, out.getvalue(), err.getvalue()
