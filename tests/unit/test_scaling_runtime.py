"""What the scaling and bastion logic hands the worker runtimes."""

from __future__ import annotations

from controller.runtime import DeploymentSettings, VMRef, worker_deployment
from vmfleet.api.models import RemoteVMSpec


def vm(bastion_secret=None, **spec):
    body = {"host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
            "hostKeys": ["ssh-ed25519 AAAA"], **spec}
    return VMRef("ops", "vm1", "uid-1", RemoteVMSpec.model_validate(body), bastion_secret)


def pod(ref, replicas=1):
    dep = worker_deployment(ref, DeploymentSettings("img:1", "redis://b"), replicas)
    return dep, dep["spec"]["template"]["spec"]


def test_replicas_come_from_the_caller_including_zero():
    for replicas in (0, 1, 3):
        dep, _ = pod(vm(workers={"autoscale": {"minReplicas": 0, "maxReplicas": 3}}), replicas)
        assert dep["spec"]["replicas"] == replicas


def test_workers_know_the_vm_wide_concurrency_limit():
    _, spec = pod(vm(maxConcurrentCommands=5))
    assert {"name": "VMFLEET_MAX_CONCURRENT_COMMANDS", "value": "5"} in spec["containers"][0]["env"]


def test_a_bastion_secret_is_mounted_beside_the_vms_own():
    _, spec = pod(vm("bastion-ssh", proxyJump={"vm": "bastion"}))
    assert spec["volumes"][1] == {"name": "bastion-ssh-credentials",
                                  "secret": {"secretName": "bastion-ssh", "defaultMode": 0o440}}
    assert spec["containers"][0]["volumeMounts"][1] == {
        "name": "bastion-ssh-credentials", "mountPath": "/var/run/secrets/vmfleet.io/ssh-bastion",
        "readOnly": True}


def test_without_a_bastion_only_the_vms_own_secret():
    _, spec = pod(vm())
    assert [v["name"] for v in spec["volumes"]] == ["ssh-credentials"]
    assert len(spec["containers"][0]["volumeMounts"]) == 1
