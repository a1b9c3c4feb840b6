"""The worker Deployment of the Deployment runtime: one per VM or one per pool, the
VMs' credentials Secrets mounted and no Kubernetes credentials; replica sizing."""

from __future__ import annotations

from typing import Any

import pytest

from controller.deployment_runtime import DeploymentSettings, check_mounts, worker_deployment
from controller.runtime import (
    VMRef,
    WorkerGroup,
    desired_replicas,
    label_value,
    single,
    transfer_group,
)
from vmfleet.api.models import RemoteVMSpec, WorkersSpec

SETTINGS = DeploymentSettings(
    "img:1", "redis://b", verify_key="-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n")
MOUNT = "/var/run/secrets/vmfleet.io/ssh"


def vm(name: str = "vm1", bastion_secret: str | None = None, **spec: Any) -> VMRef:
    body = {"host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": f"{name}-ssh"},
            "hostKeys": ["ssh-ed25519 AAAA"], **spec}
    return VMRef("ops", name, f"uid-{name}", RemoteVMSpec.model_validate(body), bastion_secret)


def pod_of(dep: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    return pod


def mounts(dep: dict[str, Any]) -> dict[str, str]:
    """Secret name -> where the worker container sees it."""
    pod = pod_of(dep)
    secret_of = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    (container,) = pod["containers"]
    return {secret_of[m["name"]]: m["mountPath"] for m in container["volumeMounts"]
            if m["name"] in secret_of}


def test_deployment_runs_the_vm_queue_with_its_secret_and_no_token() -> None:
    dep = worker_deployment(single(vm(maxConcurrentCommands=4)), SETTINGS, 1)
    assert dep["metadata"]["name"] == "vmfleet-worker-vm1"
    assert dep["metadata"]["ownerReferences"] == [{
        "apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM", "name": "vm1", "uid": "uid-vm1",
        "controller": True, "blockOwnerDeletion": False}]
    pod = pod_of(dep)
    (container,) = pod["containers"]
    assert container["args"] == [
        "python", "-m", "remote_tasks.worker", "-Q", "vmfleet.ops.vm1", "--pool", "threads",
        "--concurrency", "4", "-n", "vmfleet-worker-vm1@%h", "--without-gossip",
        "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert mounts(dep) == {"vm1-ssh": f"{MOUNT}/vm1-ssh"}
    assert all(m["readOnly"] is True for m in container["volumeMounts"] if m["name"] != "probes")
    probes = next(v for v in pod["volumes"] if v["name"] == "probes")  # the probe files only
    assert probes == {"name": "probes", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    # group-readable: fsGroup is the image's user
    assert [v["secret"]["defaultMode"] for v in pod["volumes"] if "secret" in v] == [0o440]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The broker URL from the namespace's Secret (no literal URL), the public key (not a
    # secret) and what this worker serves: its VM with its Secret.
    assert env == {"VMFLEET_BROKER_URL": None, "VMFLEET_NAMESPACE": "ops",
                   "VMFLEET_CREDENTIALS_DIR": MOUNT, "VMFLEET_VERIFY_KEY": SETTINGS.verify_key,
                   "VMFLEET_SERVED_VMS": '{"ops/vm1":"vm1-ssh"}', "VMFLEET_PROBE_DIR": "/run/vmfleet",
                   "VMFLEET_POD_NAME": None}
    # The pod's own name, from the downward API: results, Events and audit lines name it.
    assert {"name": "VMFLEET_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} \
        in container["env"]
    # Ready (the broker answers) and alive (not wedged) are two probes, both without Python.
    assert container["readinessProbe"]["exec"]["command"] == ["test", "-e", "/run/vmfleet/ready"]
    assert container["livenessProbe"]["exec"]["command"][:2] == ["sh", "-c"]
    assert container["resources"]["limits"].keys() == {"memory", "ephemeral-storage"}
    assert container["resources"]["requests"]["ephemeral-storage"] == "64Mi"
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    assert dep["metadata"]["labels"]["vmfleet.io/vm"] == "vm1"


def test_a_pool_is_one_deployment_for_all_its_queues_and_secrets() -> None:
    refs = [vm(f"vm{i}", workerPool="web", maxConcurrentCommands=2) for i in (3, 1, 2)]
    group = WorkerGroup("ops", sorted(refs, key=lambda r: r.name), pool="web")
    dep = worker_deployment(group, SETTINGS, 2)
    assert dep["metadata"]["name"] == "vmfleet-pool-web"
    assert dep["spec"]["replicas"] == 2
    args = pod_of(dep)["containers"][0]["args"]
    assert args[args.index("-Q") + 1] == "vmfleet.ops.vm1,vmfleet.ops.vm2,vmfleet.ops.vm3"
    assert args[args.index("--concurrency") + 1] == "6"  # each VM's limit, held by the slots
    assert mounts(dep) == {f"vm{i}-ssh": f"{MOUNT}/vm{i}-ssh" for i in (1, 2, 3)}
    assert pod_of(dep)["automountServiceAccountToken"] is False
    owners = dep["metadata"]["ownerReferences"]
    assert [(o["name"], o["controller"]) for o in owners] == [
        ("vm1", False), ("vm2", False), ("vm3", False)]  # collected with the last of them
    assert dep["metadata"]["labels"]["vmfleet.io/pool"] == "web"
    assert "vmfleet.io/vm" not in dep["metadata"]["labels"]


def test_a_pool_pod_mounts_only_its_own_vms_secrets() -> None:
    web = WorkerGroup("ops", [vm("vm1", workerPool="web")], pool="web")
    db = WorkerGroup("ops", [vm("vm2", workerPool="db")], pool="db")
    assert set(mounts(worker_deployment(web, SETTINGS, 1))) == {"vm1-ssh"}
    assert set(mounts(worker_deployment(db, SETTINGS, 1))) == {"vm2-ssh"}


def test_a_changed_group_changes_the_spec_hash() -> None:
    one = worker_deployment(WorkerGroup("ops", [vm("vm1")], pool="p"), SETTINGS, 1)
    two = worker_deployment(WorkerGroup("ops", [vm("vm1"), vm("vm2")], pool="p"), SETTINGS, 1)
    rescaled = worker_deployment(WorkerGroup("ops", [vm("vm1")], pool="p"), SETTINGS, 3)
    key = "vmfleet.io/spec-hash"
    assert one["metadata"]["annotations"][key] != two["metadata"]["annotations"][key]
    assert one["metadata"]["annotations"][key] == rescaled["metadata"]["annotations"][key]


def test_broker_url_from_secret() -> None:
    settings = DeploymentSettings("img", "ignored", broker_secret_name="broker", broker_secret_key="u")
    env = pod_of(worker_deployment(single(vm(queue="custom")), settings, 1))["containers"][0]["env"]
    assert env[0] == {"name": "VMFLEET_BROKER_URL",
                      "valueFrom": {"secretKeyRef": {"name": "broker", "key": "u"}}}
    assert "ignored" not in repr(env)


def test_a_separate_state_redis_is_passed_on_through_the_namespace_s_secret() -> None:
    settings = DeploymentSettings("img", "amqp://b", state_url="redis://u:pw@state:6379/0")
    env = pod_of(worker_deployment(single(vm()), settings, 1))["containers"][0]["env"]
    assert {"name": "VMFLEET_STATE_URL", "valueFrom": {"secretKeyRef": {
        "name": "vmfleet-broker", "key": "state-url"}}} in env


def test_no_connection_string_is_a_literal_value_in_a_worker_pod() -> None:
    settings = DeploymentSettings("img", "redis://vmfleet-controller:pw@b:6379/0",
                                  state_url="redis://vmfleet-controller:pw@s:6379/0")
    group = single(vm())
    env = pod_of(worker_deployment(group, settings, 1))["containers"][0]["env"]
    assert "redis://" not in repr(env) and "pw" not in repr(env)
    by_name = {e["name"]: e for e in env}
    assert by_name["VMFLEET_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "vmfleet-broker", "key": "url"}
    assert by_name["VMFLEET_NAMESPACE"] == {"name": "VMFLEET_NAMESPACE", "value": group.namespace}


def test_desired_replicas() -> None:
    assert desired_replicas(None) == 1
    assert desired_replicas(WorkersSpec(replicas=3)) == 3
    assert desired_replicas(WorkersSpec(replicas=0)) == 0
    assert desired_replicas(WorkersSpec.model_validate(
        {"autoscale": {"minReplicas": 2, "maxReplicas": 4}})) == 2


def test_a_pool_is_sized_by_the_largest_floor_and_ceiling_of_its_vms() -> None:
    refs = [vm("vm1", workerPool="p", workers={"autoscale": {"minReplicas": 0, "maxReplicas": 2}}),
            vm("vm2", workerPool="p", workers={"autoscale": {"minReplicas": 1, "maxReplicas": 5}})]
    workers = WorkerGroup("ops", refs, pool="p").workers
    assert workers is not None and workers.autoscale is not None
    assert (workers.autoscale.min_replicas, workers.autoscale.max_replicas) == (1, 5)


def test_label_value_is_bounded_and_distinct() -> None:
    long_a, long_b = "a" * 70, "a" * 69 + "b"
    assert len(label_value(long_a)) <= 63
    assert label_value(long_a) != label_value(long_b)
    assert label_value("vm1") == "vm1"


def test_a_new_process_runtime_stops_the_workers_an_earlier_controller_left(tmp_path) -> None:
    """A controller killed with -9 leaves its worker processes running; the next one stops
    them (a deleted VM's worker would run for ever, a live VM's would run twice)."""
    import subprocess
    import time

    from controller.process_runtime import ProcessRuntime
    from vmfleet.procs import ManagedProcess, write_pid_file

    logs = tmp_path / "workers"
    logs.mkdir()
    left = ManagedProcess("orphan", ["sleep", "300"], logs / "ns.vm1.0.log").start()
    write_pid_file(left, logs / "ns.vm1.0.pgid")
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        runtime = ProcessRuntime("redis://b", logs)
        assert (logs / "ns.vm1.0.pgid").exists()  # a standby leaves the leader's workers alone
        assert runtime.stop_predecessors() == [left.pid]  # it stops them when it leads
        assert not (logs / "ns.vm1.0.pgid").exists()  # a new worker may take the name at once
        orphan = logs / f"ns.vm1.0.orphan-{left.pid}.pgid"  # found by dev down until it is gone
        deadline = time.monotonic() + 10
        while (left.running() or orphan.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left.running() and not orphan.exists()
        assert unrelated.poll() is None
        assert runtime.stop_predecessors() == []  # nothing left the second time
    finally:
        left.stop(grace=0)
        unrelated.kill()
        unrelated.wait()


def test_a_group_serves_its_vms_and_their_bastions_with_their_secrets() -> None:
    jumping = vm("vm1", bastion_secret="gw-ssh", proxyJump={"vm": "gw"})
    served = single(jumping).served
    assert dict(served.vms) == {"ops/vm1": "vm1-ssh", "ops/gw": "gw-ssh"}
    dep = worker_deployment(single(jumping), SETTINGS, 1)
    env = {e["name"]: e.get("value") for e in pod_of(dep)["containers"][0]["env"]}
    assert env["VMFLEET_SERVED_VMS"] == served.encode()


def test_workers_holding_only_resources_or_nothing_size_the_group_at_one_replica() -> None:
    """``workers: {}`` and ``workers: {resources: ...}`` are valid: one worker, never a
    crash (``max()`` of no replicas stopped the controller)."""
    resources = {"requests": {"cpu": "100m"}}
    for workers in ({}, {"resources": resources}):
        refs = [vm("vm1", workerPool="p", workers=workers), vm("vm2", workerPool="p")]
        for group in (WorkerGroup("ops", refs, pool="p"), single(refs[0])):
            sized = group.workers
            assert sized is not None and sized.autoscale is None
            assert desired_replicas(sized) == 1
    mixed = [vm("vm1", workerPool="p", workers={"resources": resources}),
             vm("vm2", workerPool="p", workers={"replicas": 3})]
    sized = WorkerGroup("ops", mixed, pool="p").workers
    assert sized is not None and sized.resources is not None
    assert (sized.replicas, sized.resources.wire()) == (3, resources)
# --------------------------------------------------------------------------- transfers


def test_a_namespaces_transfer_worker_mounts_its_vms_keys_and_runs_as_its_account() -> None:
    settings = DeploymentSettings("img:1", "redis://b", transfer_service_account="rel-transfer")
    group = transfer_group("ops", [vm("vm2"), vm("vm1", bastion_secret="jump-ssh")])
    dep = worker_deployment(group, settings, 0)
    assert (dep["metadata"]["name"], dep["spec"]["replicas"]) == ("vmfleet-transfers", 0)
    pod = pod_of(dep)
    assert pod["serviceAccountName"] == "rel-transfer"
    assert pod["automountServiceAccountToken"] is True  # the one worker with a token
    assert mounts(dep) == {s: f"{MOUNT}/{s}" for s in ("jump-ssh", "vm1-ssh", "vm2-ssh")}
    # One VM's missing Secret must not keep the pod (every transfer of the namespace) from starting.
    assert all(v["secret"]["optional"] is True for v in pod["volumes"] if "secret" in v)
    (container,) = pod["containers"]
    assert container["args"][container["args"].index("-Q") + 1] == "vmfleet.ops:transfers"
    assert dep["metadata"]["labels"]["vmfleet.io/transfers"] == "true"
    assert {r["name"] for r in dep["metadata"]["ownerReferences"]} == {"vm1", "vm2"}
    assert not any(r["controller"] for r in dep["metadata"]["ownerReferences"])
    # Without the chart's account (no `transferWorker`): no token either.
    pod = pod_of(worker_deployment(group, SETTINGS, 1))
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    # A command worker never runs as the transfer account.
    pod = pod_of(worker_deployment(single(vm()), settings, 1))
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod


def test_a_worker_mounts_nothing_but_its_vms_credentials() -> None:
    group = single(vm())
    check_mounts(group, {"volumes": [{"name": "a", "secret": {"secretName": "vm1-ssh"}},
                                     {"name": "tmp", "emptyDir": {}}]})
    for volume in ({"name": "b", "secret": {"secretName": "other-ssh"}},
                   {"name": "h", "hostPath": {"path": "/"}},
                   {"name": "p", "projected": {"sources": []}}):
        with pytest.raises(ValueError, match="may mount only its RemoteVMs' credentials"):
            check_mounts(group, {"volumes": [volume]})
    stranger = VMRef("elsewhere", "vm9", "uid-9", vm().spec)
    with pytest.raises(ValueError, match="another namespace: elsewhere/vm9"):
        worker_deployment(WorkerGroup("ops", [vm(), stranger], pool="p"), SETTINGS, 1)


def test_workers_of_one_group_spread_over_the_nodes() -> None:
    """Several replicas of one VM's workers, or of a pool's, prefer distinct nodes (a
    node lost takes only its share); never a hard rule, so one node still runs them all.
    Counted per revision: during a rollout the old pods do not push the new ones onto
    one node."""
    for group in (single(vm()), WorkerGroup("ops", [vm("vm1", workerPool="web")], pool="web")):
        dep = worker_deployment(group, SETTINGS, 3)
        (spread,) = pod_of(dep)["topologySpreadConstraints"]
        assert spread == {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                          "whenUnsatisfiable": "ScheduleAnyway",
                          "labelSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]},
                          "matchLabelKeys": ["pod-template-hash"]}
