"""The controller side of probes and worker credentials: Fleet.on_probe writes what a
worker reported (once per change), ProcessRuntime writes Secrets as a pod would mount
them, and the Deployment runtime writes nothing the watch shows as wanted already."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from controller.budgets import Budgets
from controller.deployment_runtime import (
    DeploymentCache,
    DeploymentRuntime,
    DeploymentSettings,
    worker_deployment,
)
from controller.health import HealthMonitor
from controller.process_runtime import ProcessRuntime
from controller.runtime import VMRef, WorkerGroup
from controller.vms import Fleet
from vmfleet.api.models import RemoteVMSpec
from vmfleet.api.reports import ProbeReport
from vmfleet.api.times import now_rfc3339

SPEC = {"host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
        "hostKeyPolicy": "TrustOnFirstUse"}


class FakeKube:
    def __init__(self) -> None:
        self.vm_patches: list[tuple[str, dict[str, Any]]] = []

    def patch_vm_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.vm_patches.append((name, patch))
        return {}

    def get_vm(self, namespace: str, name: str) -> None:
        return None


class NoRuntime:
    name = "Process"

    def current_replicas(self, group: WorkerGroup) -> int:
        return 0


def fleet(kube: FakeKube) -> Fleet:
    health = HealthMonitor(kube, lambda *a: None)  # type: ignore[arg-type]
    return Fleet(kube, NoRuntime(), health, lambda queues: {}, dict)  # type: ignore[arg-type]


def probe(uid: str = "u1", **status: Any) -> ProbeReport:
    last = {"time": now_rfc3339(), "succeeded": True, "reason": "Completed",
            "message": "the VM answered every check", "latencySeconds": 0.1, "worker": "w1"}
    return ProbeReport.from_message({"kind": "probe", "namespace": "ops", "vm": "vm1", "uid": uid,
                                     "status": {"lastProbe": last, **status}})


def vm_object() -> dict[str, Any]:
    return {"metadata": {"namespace": "ops", "name": "vm1", "uid": "u1", "generation": 1},
            "spec": SPEC, "status": {"workers": {"replicas": 1, "readyReplicas": 1}}}


def test_a_probe_is_written_with_its_conditions_and_a_replaced_vms_probe_is_dropped() -> None:
    kube = FakeKube()
    f = fleet(kube)
    f.seen(vm_object(), reconcile=False)
    assert f.on_probe(probe(uid="an-older-vm1")) is False
    assert kube.vm_patches == []
    report = probe()
    assert f.on_probe(report) is True
    ((name, patch),) = kube.vm_patches
    assert name == "vm1" and patch["status"]["lastProbe"]["worker"] == "w1"
    reachable = [c for c in patch["status"]["conditions"] if c["type"] == "Reachable"]
    assert reachable and reachable[0]["status"] == "True"
    assert f.on_probe(report) is True  # redelivered after a controller restart
    assert len(kube.vm_patches) == 1  # the same status again: nothing written


def test_trust_on_first_use_records_the_first_key_only() -> None:
    kube = FakeKube()
    f = fleet(kube)
    f.seen(vm_object(), reconcile=False)
    first = {"fingerprint": "SHA256:one", "keyType": "ssh-ed25519",
             "publicKey": "ssh-ed25519 ONE", "recordedTime": "t1"}
    f.on_probe(probe(hostKey=first))
    assert kube.vm_patches[-1][1]["status"]["hostKey"] == first
    later = {"fingerprint": "SHA256:two", "keyType": "ssh-ed25519",
             "publicKey": "ssh-ed25519 TWO", "recordedTime": "t2"}
    f.on_probe(probe(hostKey=later))
    cached = f.cached("ops", "vm1")
    assert cached is not None and cached["status"]["hostKey"]["publicKey"] == "ssh-ed25519 ONE"
    assert f.target_of(cached).host_keys == ("ssh-ed25519 ONE",)  # what workers pin now


def test_a_vm_status_that_fails_validation_is_not_written_and_is_counted() -> None:
    """RemoteVM status goes through RemoteVMStatus as RemoteCommand status does."""
    kube = FakeKube()
    f = fleet(kube)
    f.seen(vm_object(), reconcile=False)
    errors = REGISTRY.get_sample_value("vmfleet_status_write_errors_total",
                                       {"kind": "RemoteVM"}) or 0
    bad_facts = {"memoryTotalBytes": "lots"}
    assert f.on_probe(probe(facts=bad_facts, bogus={"x": 1})) is True
    ((_, patch),) = kube.vm_patches
    assert "facts" not in patch["status"] and "bogus" not in patch["status"]
    assert patch["status"]["lastProbe"]["worker"] == "w1"  # the valid part is written
    assert REGISTRY.get_sample_value("vmfleet_status_write_errors_total",
                                     {"kind": "RemoteVM"}) == errors + 1
    cached = f.cached("ops", "vm1")
    assert cached is not None and "facts" not in cached["status"]  # not kept as written


def group(*names: str) -> WorkerGroup:
    refs = [VMRef("ops", n, f"u-{n}", RemoteVMSpec.model_validate(
        {**SPEC, "credentialsSecretRef": {"name": f"{n}-ssh"}, "workerPool": "p"})) for n in names]
    return WorkerGroup("ops", refs, pool="p")


def test_local_workers_read_their_keys_from_files_only_the_owner_can_read(tmp_path: Path) -> None:
    secrets = {"vm1-ssh": {"ssh-privatekey": "KEY1", "passphrase": "pw", "../escape": "x"},
               "vm2-ssh": {"ssh-privatekey": "KEY2"}}
    runtime = ProcessRuntime("redis://b", tmp_path / "logs",
                             read_secret=lambda ns, name: secrets[name],
                             credentials_dir=tmp_path / "credentials")
    runtime.write_credentials("ops", group("vm1", "vm2").secrets)
    root = tmp_path / "credentials" / "ops"
    assert (root / "vm1-ssh" / "ssh-privatekey").read_text() == "KEY1"
    assert (root / "vm1-ssh" / "passphrase").read_text() == "pw"
    assert (root / "vm2-ssh" / "ssh-privatekey").read_text() == "KEY2"
    assert sorted(p.name for p in (root / "vm1-ssh").iterdir()) == ["passphrase", "ssh-privatekey"]
    assert stat.S_IMODE((root / "vm1-ssh" / "ssh-privatekey").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "vm1-ssh").stat().st_mode) == 0o700
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    env = runtime._env(group("vm1"), runtime.worker_urls("ops"))
    assert env["VMFLEET_CREDENTIALS_DIR"] == str(root)
    assert "KUBECONFIG" not in env  # a worker holds no Kubernetes credentials


def test_local_workers_get_the_public_key_and_their_served_vms_never_the_private_key(
        tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("VMFLEET_SIGNING_KEY_FILE", str(tmp_path / "signing.key"))
    runtime = ProcessRuntime("redis://b", tmp_path / "logs", verify_key="PUBLIC PEM")
    workers = group("vm1", "vm2")
    env = runtime._env(workers, runtime.worker_urls(workers.namespace))
    assert env["VMFLEET_VERIFY_KEY"] == "PUBLIC PEM"
    assert json.loads(env["VMFLEET_SERVED_VMS"]) == {"ops/vm1": "vm1-ssh", "ops/vm2": "vm2-ssh"}
    assert "VMFLEET_SIGNING_KEY_FILE" not in env


def test_local_workers_each_get_a_metrics_port_unless_the_controller_s_metrics_are_off(
        tmp_path: Path) -> None:
    ports = []
    for metrics in (True, False):
        runtime = ProcessRuntime("redis://b", tmp_path / "logs", metrics=metrics)
        ports.append(runtime._env(group("vm1"), runtime.worker_urls("ops"))["VMFLEET_METRICS_PORT"])
    assert int(ports[0]) > 0 and ports[1] == "0"  # a free port of its own; off with ours


def test_local_workers_get_their_namespace_s_broker_urls_never_the_controller_s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.tenants import WorkerURLs

    # The controller's own URLs are in its environment: no worker inherits them.
    monkeypatch.setenv("VMFLEET_STATE_URL", "redis://vmfleet-controller:secret@s:6379/0")
    monkeypatch.setenv("VMFLEET_SLOTS_URL", "redis://vmfleet-controller:secret@s:6379/0")
    asked: list[str] = []

    def urls(namespace: str) -> WorkerURLs:
        asked.append(namespace)
        return WorkerURLs(f"amqp://b/{namespace}", f"redis://vmfleet-ns-{namespace}:pw@s:6379/0")

    runtime = ProcessRuntime("amqp://b", tmp_path / "logs", worker_urls=urls)
    workers = group("vm1")
    env = runtime._env(workers, runtime.worker_urls(workers.namespace))
    assert asked == [workers.namespace]
    assert env["VMFLEET_BROKER_URL"] == f"amqp://b/{workers.namespace}"
    assert env["VMFLEET_STATE_URL"] == f"redis://vmfleet-ns-{workers.namespace}:pw@s:6379/0"
    assert env["VMFLEET_NAMESPACE"] == workers.namespace
    assert "VMFLEET_SLOTS_URL" not in env
    assert not any("secret" in value for value in env.values())


class FakeApps:
    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self.budgets: list[dict[str, Any]] = []
        self.api_client = self

    def patch_namespaced_pod_disruption_budget(self, name: str, namespace: str,
                                               body: dict[str, Any], **_: Any) -> None:
        self.budgets.append(body)

    def apply_deployment(self, namespace: str, name: str, body: dict[str, Any],
                         **_: Any) -> dict[str, Any]:
        self.applied.append(body)
        return body


def test_the_deployment_runtime_applies_only_what_the_watch_does_not_show(tmp_path: Path) -> None:
    settings = DeploymentSettings("img:1", "redis://b")
    cache = DeploymentCache()
    apps = FakeApps()
    runtime = DeploymentRuntime(apps, settings, cache, Budgets(policy=apps))  # type: ignore[arg-type]
    pool = group("vm1", "vm2")
    cache.seen(worker_deployment(pool, settings, 2))  # a restarted controller's start-up list
    runtime.ensure(pool, 2)
    assert apps.applied == []
    runtime.ensure(pool, 3)
    assert [d["spec"]["replicas"] for d in apps.applied] == [3]
    runtime.ensure(group("vm1", "vm2", "vm3"), 3)  # a VM joined the pool: its Secret mounts
    assert len(apps.applied) == 2
    assert runtime.current_replicas(pool) == 3
    # A pool's workers get one PodDisruptionBudget, applied once per content.
    assert [(b["metadata"]["name"], b["spec"]["maxUnavailable"]) for b in apps.budgets] == [
        (pool.deployment, 1), (pool.deployment, 1)]  # the owners changed with vm3


class RecordingRuntime:
    """Replicas per group, as a runtime would run them."""

    name = "Process"

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}
        self.groups: dict[str, WorkerGroup] = {}

    def current_replicas(self, group: WorkerGroup) -> int:
        return self.replicas.get(group.key, 0)

    ready_replicas = current_replicas

    def ensure(self, group: WorkerGroup, replicas: int) -> dict[str, Any]:
        self.replicas[group.key], self.groups[group.key] = replicas, group
        return {}

    def remove(self, key: str) -> None:
        self.replicas.pop(key, None)


def test_each_namespace_gets_a_transfer_worker_at_zero_until_a_transfer_wakes_it() -> None:
    kube, runtime = FakeKube(), RecordingRuntime()
    health = HealthMonitor(kube, lambda *a: None)  # type: ignore[arg-type]
    f = Fleet(kube, runtime, health, lambda queues: {q: 0 for q in queues},  # type: ignore[arg-type]
              dict)
    for ns, name in (("ops", "vm1"), ("ops", "vm2"), ("dev", "vm1")):
        body = vm_object()
        body["metadata"].update(namespace=ns, name=name, uid=f"{ns}-{name}")
        body["spec"] = {**SPEC, "hostKeyPolicy": "Pinned", "hostKeys": ["k"],
                        "credentialsSecretRef": {"name": f"{name}-ssh"}}
        f.seen(body)
    broken = {"metadata": {"namespace": "ops", "name": "bad", "uid": "b", "generation": 1},
              "spec": {"credentialsSecretRef": {"name": "bad-ssh"}}}  # invalid: no host
    f.seen(broken)
    f.tick(force=True)
    transfers = {g.key: g for g in f.groups() if g.transfers}
    assert sorted(transfers) == ["dev/:transfers", "ops/:transfers"]
    assert transfers["ops/:transfers"].secrets == ["vm1-ssh", "vm2-ssh"]
    assert runtime.replicas["ops/:transfers"] == 0 and runtime.replicas["dev/:transfers"] == 0
    assert runtime.replicas["ops/vm1"] == 1  # the VMs' own workers are untouched
    assert f.credentials_secrets("ops") == ["bad-ssh", "vm1-ssh", "vm2-ssh"]  # even invalid VMs'
    f.wake_transfers("ops")
    assert runtime.replicas["ops/:transfers"] == 1 and runtime.replicas["dev/:transfers"] == 0
    assert runtime.groups["ops/:transfers"].queues == ["vmfleet.ops:transfers"]
    f.gone({"metadata": {"namespace": "dev", "name": "vm1", "uid": "dev-vm1"}})
    assert "dev/:transfers" not in runtime.replicas  # the namespace's last VM is gone


def test_a_local_transfer_worker_gets_only_its_namespaces_narrow_kubeconfig(
        tmp_path: Path, monkeypatch: Any) -> None:
    from controller.runtime import transfer_group
    from controller.transfer_access import RULES, kubeconfig, objects

    monkeypatch.setenv("KUBECONFIG", "/the/admin/kubeconfig")
    asked: list[str] = []

    def narrow(namespace: str) -> Path:
        asked.append(namespace)
        return tmp_path / f"{namespace}.kubeconfig"

    runtime = ProcessRuntime("redis://b", tmp_path / "logs", transfer_kubeconfig=narrow)
    ref = VMRef("ops", "vm1", "u1", RemoteVMSpec.model_validate(
        {**SPEC, "hostKeyPolicy": "Pinned", "hostKeys": ["k"]}))
    urls = runtime.worker_urls("ops")
    assert runtime._env(transfer_group("ops", [ref]), urls)["KUBECONFIG"] == str(tmp_path / "ops.kubeconfig")
    assert "KUBECONFIG" not in runtime._env(WorkerGroup("ops", [ref]), urls)  # command workers: none
    assert asked == ["ops"]
    kinds = {kind: body for kind, body in objects("ops")}
    assert kinds["Role"]["rules"] == RULES == [
        {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get"]}]
    assert kinds["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "vmfleet-transfer-worker", "namespace": "ops"}]
    conf = kubeconfig("https://127.0.0.1:6443", b"CA", "tok", "ops")
    assert conf["users"] == [{"name": "vmfleet-transfer-worker", "user": {"token": "tok"}}]
    assert kubeconfig("https://x", None, None, "ops")["users"][0]["user"] == {}  # fails closed


def test_a_pools_group_is_read_once_until_a_member_changes_and_a_dispatch_wakes_it() -> None:
    """A fan-out wakes the group of each VM it dispatches to: the pool's group is made
    once, not once per member (each a validation of every member's spec); a member
    joining, changing or leaving makes it anew, and an autoscaled pool at zero wakes."""
    kube, runtime = FakeKube(), RecordingRuntime()
    health = HealthMonitor(kube, lambda *a: None)  # type: ignore[arg-type]
    f = Fleet(kube, runtime, health, lambda queues: {q: 0 for q in queues},  # type: ignore[arg-type]
              dict)

    def member(name: str, **spec: Any) -> dict[str, Any]:
        body = vm_object()
        body["metadata"].update(name=name, uid=f"u-{name}")
        body["spec"] = {**SPEC, "hostKeyPolicy": "Pinned", "hostKeys": ["k"], "workerPool": "p",
                        "credentialsSecretRef": {"name": f"{name}-ssh"},
                        "workers": {"autoscale": {"minReplicas": 0, "maxReplicas": 2}}, **spec}
        return body

    for name in ("vm1", "vm2", "vm3"):
        f.seen(member(name), reconcile=False)
    first = f.group("ops/pool:p")
    assert first is not None and [vm.name for vm in first.vms] == ["vm1", "vm2", "vm3"]
    assert f.group("ops/pool:p") is first  # from the cache: no member changed
    for name in ("vm1", "vm2", "vm3"):
        f.wake("ops", name)
    assert runtime.replicas["ops/pool:p"] == 1 and runtime.groups["ops/pool:p"] is first
    f.seen(member("vm2"), reconcile=False)  # the watch again, nothing changed
    assert f.group("ops/pool:p") is first
    f.seen(member("vm4"), reconcile=False)
    joined = f.group("ops/pool:p")
    assert joined is not None and [vm.name for vm in joined.vms] == ["vm1", "vm2", "vm3", "vm4"]
    f.seen(member("vm4", port=2222), reconcile=False)
    changed = f.group("ops/pool:p")
    assert changed is not joined and changed is not None and changed.vms[3].spec.port == 2222
    f.gone({"metadata": {"namespace": "ops", "name": "vm4", "uid": "u-vm4"}}, reconcile=False)
    left = f.group("ops/pool:p")
    assert left is not None and [vm.name for vm in left.vms] == ["vm1", "vm2", "vm3"]
