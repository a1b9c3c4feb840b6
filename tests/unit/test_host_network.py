"""The chart's `hostNetwork` and the workers' extra environment (the local node's pods
reach loopback VMs, broker and API server), rendered by the real helm and by the
controller's worker Deployment."""

from __future__ import annotations

import json

import pytest

from controller.context import worker_pod_settings
from controller.deployment_runtime import DeploymentSettings, worker_deployment
from controller.runtime import VMRef, WorkerGroup, single
from tests.chart import find, render
from vmfleet import settings as vmfleet_settings
from vmfleet.api.models import RemoteVMSpec

API_ENV = [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
           {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]


def vm() -> WorkerGroup:
    body = {"host": "127.0.10.1", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
            "hostKeys": ["ssh-ed25519 AAAA"]}
    return single(VMRef("ops", "vm1", "uid-1", RemoteVMSpec.model_validate(body)))


def test_worker_pods_on_the_host_network_with_extra_env():
    settings = DeploymentSettings("img:1", "redis://b", host_network=True, extra_env=tuple(API_ENV))
    pod = worker_deployment(vm(), settings, 1)["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = pod["containers"][0]["env"]
    assert env[-2:] == API_ENV
    assert env[0] == {"name": "VMFLEET_BROKER_URL",
                      "valueFrom": {"secretKeyRef": {"name": "vmfleet-broker", "key": "url"}}}


def test_worker_pods_default_to_the_pod_network():
    pod = worker_deployment(vm(), DeploymentSettings("img:1", "redis://b"), 1)["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod


def test_worker_pod_settings_from_the_environment():
    conf = vmfleet_settings.Settings.from_environment({
        "VMFLEET_WORKER_HOST_NETWORK": "true", "VMFLEET_WORKER_EXTRA_ENV": json.dumps(API_ENV),
        "VMFLEET_WORKER_IMAGE_PULL_POLICY": "Never"})
    assert worker_pod_settings(conf) == {"image_pull_policy": "Never", "host_network": True,
                                         "extra_env": tuple(API_ENV)}
    assert worker_pod_settings(vmfleet_settings.Settings.from_environment({})) == {
        "image_pull_policy": "IfNotPresent", "host_network": False, "extra_env": ()}
    with pytest.raises(vmfleet_settings.SettingsError, match="not one of"):
        vmfleet_settings.Settings.from_environment({"VMFLEET_WORKER_IMAGE_PULL_POLICY": "Sometimes"})
    with pytest.raises(vmfleet_settings.SettingsError, match="not true or false"):
        vmfleet_settings.Settings.from_environment({"VMFLEET_WORKER_HOST_NETWORK": "perhaps"})
    with pytest.raises(ValueError, match="JSON list"):
        worker_pod_settings(vmfleet_settings.Settings.from_environment(
            {"VMFLEET_WORKER_EXTRA_ENV": '{"name": "X"}'}))


def test_chart_host_network_reaches_every_pod_and_the_workers():
    docs = render(None, "hostNetwork=true", "workers.extraEnv[0].name=KUBERNETES_SERVICE_HOST",
                  "workers.extraEnv[0].value=127.0.0.1")
    (deploy,) = find(docs, "Deployment", "rel-vmfleet-controller")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (controller,) = find(docs, "Deployment", "rel-vmfleet-controller")
    env = {e["name"]: e.get("value") for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VMFLEET_WORKER_HOST_NETWORK"] == "true"
    assert env["VMFLEET_WORKER_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert json.loads(env["VMFLEET_WORKER_EXTRA_ENV"]) == [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}]
    # The controller's fence lets its workers on the node's network only when the chart says so.
    (policy,) = find(docs, "ValidatingAdmissionPolicy")
    assert not [v for v in policy["spec"]["validations"] if "hostNetwork" in v["expression"]]
    (policy,) = find(render(), "ValidatingAdmissionPolicy")
    assert [v for v in policy["spec"]["validations"] if "hostNetwork" in v["expression"]]


def test_chart_default_is_the_pod_network():
    for deploy in find(render(), "Deployment"):
        assert "hostNetwork" not in deploy["spec"]["template"]["spec"]
    (controller,) = find(render(), "Deployment", "rel-vmfleet-controller")
    names = {e["name"] for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {"VMFLEET_WORKER_HOST_NETWORK", "VMFLEET_WORKER_EXTRA_ENV"} & names


def test_worker_runs_as_the_image_user_and_can_read_its_key():
    """The Secret's files belong to root; the worker (user 10001) reads them through
    fsGroup and a group-readable mode (0400 was unreadable in a real pod)."""
    pod = worker_deployment(vm(), DeploymentSettings("img:1", "redis://b"), 1)["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (10001, 10001, 10001)
    assert context["runAsNonRoot"] is True
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["defaultMode"] == 0o440
