"""The worker Deployment of the Deployment runtime, and replica sizing."""

from controller.runtime import (
    DeploymentSettings,
    VMRef,
    desired_replicas,
    label_value,
    worker_deployment,
)
from vmfleet.api.models import RemoteVMSpec


def vm(**spec):
    body = {"host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
            "hostKeys": ["ssh-ed25519 AAAA"], **spec}
    return VMRef("ops", "vm1", "uid-1", RemoteVMSpec.model_validate(body))


def test_deployment_runs_the_vm_queue_with_its_secret_only():
    dep = worker_deployment(vm(maxConcurrentCommands=4), DeploymentSettings("img:1", "redis://b"), 1)
    assert dep["metadata"]["name"] == "vmfleet-worker-vm1"
    assert dep["metadata"]["ownerReferences"] == [{
        "apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM", "name": "vm1", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == [
        "celery", "-A", "remote_tasks", "worker", "-Q", "vmfleet.ops.vm1", "--pool", "threads",
        "--concurrency", "4", "-n", "vmfleet-worker-vm1@%h", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO"]
    assert pod["volumes"] == [{"name": "ssh-credentials",
                               "secret": {"secretName": "vm1-ssh", "defaultMode": 0o440}}]
    assert container["volumeMounts"][0]["readOnly"] is True
    assert {"name": "VMFLEET_BROKER_URL", "value": "redis://b"} in container["env"]
    assert pod["serviceAccountName"] == "vmfleet-worker"
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]


def test_broker_url_from_secret():
    settings = DeploymentSettings("img", "ignored", broker_secret_name="broker", broker_secret_key="u")
    env = worker_deployment(vm(queue="custom"), settings, 1)["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert env[0] == {"name": "VMFLEET_BROKER_URL",
                      "valueFrom": {"secretKeyRef": {"name": "broker", "key": "u"}}}


def test_desired_replicas():
    assert desired_replicas(vm().spec) == 1
    assert desired_replicas(vm(workers={"replicas": 3}).spec) == 3
    assert desired_replicas(vm(workers={"replicas": 0}).spec) == 0
    assert desired_replicas(vm(workers={"autoscale": {"minReplicas": 2, "maxReplicas": 4}}).spec) == 2


def test_label_value_is_bounded_and_distinct():
    long_a, long_b = "a" * 70, "a" * 69 + "b"
    assert len(label_value(long_a)) <= 63
    assert label_value(long_a) != label_value(long_b)
    assert label_value("vm1") == "vm1"
