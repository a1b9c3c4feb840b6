"""What the scaling and bastion logic hands the worker runtimes."""

from __future__ import annotations

from typing import Any

from controller.deployment_runtime import DeploymentSettings, worker_deployment
from controller.runtime import VMRef, single
from vmfleet.api.models import RemoteVMSpec

MOUNT = "/var/run/secrets/vmfleet.io/ssh"


def vm(bastion_secret: str | None = None, **spec: Any) -> VMRef:
    body = {"host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
            "hostKeys": ["ssh-ed25519 AAAA"], **spec}
    return VMRef("ops", "vm1", "uid-1", RemoteVMSpec.model_validate(body), bastion_secret)


def pod(ref: VMRef, replicas: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    dep = worker_deployment(single(ref), DeploymentSettings("img:1", "redis://b"), replicas)
    return dep, dep["spec"]["template"]["spec"]


def test_replicas_come_from_the_caller_including_zero() -> None:
    for replicas in (0, 1, 3):
        dep, _ = pod(vm(workers={"autoscale": {"minReplicas": 0, "maxReplicas": 3}}), replicas)
        assert dep["spec"]["replicas"] == replicas


def test_worker_threads_follow_the_vms_concurrency_limit() -> None:
    _, spec = pod(vm(maxConcurrentCommands=5))
    args = spec["containers"][0]["args"]
    assert args[args.index("--concurrency") + 1] == "5"
    # The limit itself travels in each message's Target (the slots), not in the pod's env.
    assert not [e for e in spec["containers"][0]["env"] if e["name"] == "VMFLEET_MAX_CONCURRENT_COMMANDS"]


def test_a_bastion_secret_is_mounted_beside_the_vms_own() -> None:
    _, spec = pod(vm("bastion-ssh", proxyJump={"vm": "bastion"}))
    secrets = sorted(v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v)
    assert secrets == ["bastion-ssh", "vm1-ssh"]
    paths = sorted(m["mountPath"] for m in spec["containers"][0]["volumeMounts"]
                   if m["name"] != "probes")
    assert paths == [f"{MOUNT}/bastion-ssh", f"{MOUNT}/vm1-ssh"]


def test_without_a_bastion_only_the_vms_own_secret() -> None:
    _, spec = pod(vm())
    assert [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v] == ["vm1-ssh"]
    assert len([m for m in spec["containers"][0]["volumeMounts"] if m["name"] != "probes"]) == 1
