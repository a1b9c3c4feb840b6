"""The worker Deployment of the Deployment runtime: one per VM or one per pool, the
VMs' credentials Secrets mounted and no Kubernetes credentials; replica sizing."""

from __future__ import annotations

from typing import Any

from controller.runtime import (
    DeploymentSettings,
    VMRef,
    WorkerGroup,
    desired_replicas,
    label_value,
    single,
    worker_deployment,
)
from vmfleet.api.models import RemoteVMSpec, WorkersSpec

SETTINGS = DeploymentSettings("img:1", "redis://b")
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
    secret_of = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    return {secret_of[m["name"]]: m["mountPath"] for m in container["volumeMounts"]}


def test_deployment_runs_the_vm_queue_with_its_secret_and_no_token() -> None:
    dep = worker_deployment(single(vm(maxConcurrentCommands=4)), SETTINGS, 1)
    assert dep["metadata"]["name"] == "vmfleet-worker-vm1"
    assert dep["metadata"]["ownerReferences"] == [{
        "apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM", "name": "vm1", "uid": "uid-vm1",
        "controller": True, "blockOwnerDeletion": False}]
    pod = pod_of(dep)
    (container,) = pod["containers"]
    assert container["args"] == [
        "celery", "-A", "remote_tasks", "worker", "-Q", "vmfleet.ops.vm1", "--pool", "threads",
        "--concurrency", "4", "-n", "vmfleet-worker-vm1@%h", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO"]
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert mounts(dep) == {"vm1-ssh": f"{MOUNT}/vm1-ssh"}
    assert all(m["readOnly"] is True for m in container["volumeMounts"])
    assert [v["secret"]["defaultMode"] for v in pod["volumes"]] == [0o440]  # group-readable: fsGroup is the image's user
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env == {"VMFLEET_BROKER_URL": "redis://b", "VMFLEET_CREDENTIALS_DIR": MOUNT}
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


def test_a_separate_state_redis_is_passed_on() -> None:
    settings = DeploymentSettings("img", "amqp://b", state_url="redis://state:6379/0")
    env = pod_of(worker_deployment(single(vm()), settings, 1))["containers"][0]["env"]
    assert {"name": "VMFLEET_STATE_URL", "value": "redis://state:6379/0"} in env


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


def test_workers_of_one_group_spread_over_the_nodes() -> None:
    """Several replicas of one VM's workers, or of a pool's, prefer distinct nodes (a
    node lost takes only its share); never a hard rule, so one node still runs them all."""
    for group in (single(vm()), WorkerGroup("ops", [vm("vm1", workerPool="web")], pool="web")):
        dep = worker_deployment(group, SETTINGS, 3)
        (spread,) = pod_of(dep)["topologySpreadConstraints"]
        assert spread == {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                          "whenUnsatisfiable": "ScheduleAnyway",
                          "labelSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}
