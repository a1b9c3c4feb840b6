"""Invalid RemoteVMs and RemoteCommands are refused by the real API server, readably.

Each case is applied with ``kubectl apply --validate=strict`` (unknown fields are errors)
to the session's API server with the generated CRDs; the object must not be created and
kubectl's message must name what is wrong.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.fleet import REPO, Kubectl
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e

VM: dict[str, Any] = {
    "host": "192.0.2.10", "user": "deploy", "credentialsSecretRef": {"name": "vm1-ssh"},
    "hostKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDk1"],
}
CMD: dict[str, Any] = {"vm": "vm1", "command": "uptime"}
TRANSFER: dict[str, Any] = {"from": {"vm": "vm1", "path": "/etc/hostname"},
                            "to": [{"vm": "vm2", "path": "/tmp/hostname"}]}


def changed(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    for key, value in fields.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


VM_CASES = [
    ("port-zero", changed(VM, port=0), "should be greater than or equal to 1"),
    ("port-too-big", changed(VM, port=65536), "should be less than or equal to 65535"),
    ("empty-host", changed(VM, host=""), "spec.host"),
    ("host-with-shell", changed(VM, host="vm1;reboot"), "spec.host in body should match"),
    ("host-with-space", changed(VM, host="vm1 -oProxyCommand=x"), "spec.host in body should match"),
    ("huge-host", changed(VM, host="a" * 300), "spec.host: Too long"),
    ("no-user", changed(VM, user=None), "spec.user: Required value"),
    ("user-option", changed(VM, user="-oProxyCommand=x"), "spec.user in body should match"),
    ("no-credentials", changed(VM, credentialsSecretRef=None),
     "spec.credentialsSecretRef: Required value"),
    ("secret-in-other-namespace", changed(VM, credentialsSecretRef={"name": "kube-system/ssh"}),
     "spec.credentialsSecretRef.name in body should match"),
    ("pinned-without-keys", changed(VM, hostKeys=None), "hostKeyPolicy Pinned needs hostKeys"),
    ("unknown-policy", changed(VM, hostKeyPolicy="AutoAdd"), 'supported values: "Pinned", '
     '"TrustOnFirstUse"'),
    ("too-many-host-keys", changed(VM, hostKeys=["ssh-ed25519 AAAA"] * 17),
     "spec.hostKeys: Too many: 17: must have at most 16 items"),
    ("bastion-in-other-namespace", changed(VM, proxyJump={"vm": "other/bastion"}),
     "spec.proxyJump.vm in body should match"),
    ("unknown-field", changed(VM, password="hunter2"), 'unknown field "spec.password"'),
    ("replicas-and-autoscale", changed(VM, workers={"replicas": 1, "autoscale": {"maxReplicas": 2}}),
     "set workers.replicas or workers.autoscale, not both"),
    ("floor-above-ceiling", changed(VM, workers={"autoscale": {"minReplicas": 3, "maxReplicas": 2}}),
     "workers.autoscale.minReplicas must not exceed maxReplicas"),
    ("floor-above-default-ceiling", changed(VM, workers={"autoscale": {"minReplicas": 2}}),
     "workers.autoscale.minReplicas must not exceed maxReplicas"),
    ("resources-not-a-quantity", changed(VM, workers={"resources": {"requests": {"cpu": "lots"}}}),
     "spec.workers.resources.requests.cpu in body should match"),
    ("resources-negative", changed(VM, workers={"resources": {"limits": {"memory": "-1Gi"}}}),
     "spec.workers.resources.limits.memory in body should match"),
    ("resources-negative-int", changed(VM, workers={"resources": {"limits": {"cpu": -2}}}),
     "spec.workers.resources.limits.cpu in body should be greater than or equal to 0"),
    ("resources-unknown-field", changed(VM, workers={"resources": {"request": {"cpu": "1"}}}),
     'unknown field "spec.workers.resources.request"'),
]

CMD_CASES = [
    ("both-targets", changed(CMD, selector={"matchLabels": {"a": "b"}}),
     "exactly one target must be set: vm, vms or selector"),
    ("no-target", changed(CMD, vm=None), "exactly one target must be set: vm, vms or selector"),
    ("no-action", changed(CMD, command=None), "exactly one action must be set"),
    ("two-actions", changed(CMD, argv=["uptime"]), "exactly one action must be set"),
    ("vm-in-other-namespace", changed(CMD, vm="other-ns/vm1"), "spec.vm in body should match"),
    ("vm-namespace-qualified", changed(CMD, vm="vm1.other-ns"), "spec.vm in body should match"),
    ("env-name-digit", changed(CMD, env={"1A": "x"}),
     "env names must be letters, digits and underscores"),
    ("env-name-shell", changed(CMD, env={"A;touch x": "x"}),
     "env names must be letters, digits and underscores"),
    ("env-name-newline", changed(CMD, env={"A\n": "x"}),
     "env names must be letters, digits and underscores"),
    ("too-many-argv", changed(CMD, command=None, argv=["x"] * 257),
     "spec.argv: Too many: 257: must have at most 256 items"),
    ("huge-argv-item", changed(CMD, command=None, argv=["echo", "x" * 4097]), "spec.argv[1]: Too long"),
    ("huge-command", changed(CMD, command="x" * (64 * 1024 + 1)), "spec.command: Too long"),
    ("empty-argv", changed(CMD, command=None, argv=[]), "spec.argv"),
    ("zero-timeout", changed(CMD, timeoutSeconds=0),
     "spec.timeoutSeconds in body should be greater than or equal to 1"),
    ("exit-code-256", changed(CMD, successExitCodes=[256]), "should be less than or equal to 255"),
    ("unknown-field", changed(CMD, sudo=True), 'unknown field "spec.sudo"'),
    ("transfer-with-vm", changed(CMD, command=None, transfer=TRANSFER),
     "a transfer names its VMs in transfer.from and transfer.to"),
    ("transfer-relative-path", changed(CMD, vm=None, command=None, transfer={
        **TRANSFER, "to": [{"vm": "vm2", "path": "tmp/x"}]}), "spec.transfer.to[0].path in body "
     "should match '^/'"),
    ("transfer-same-vm-twice", changed(CMD, vm=None, command=None, transfer={
        **TRANSFER, "to": [{"vm": "vm2", "path": "/a"}, {"vm": "vm2", "path": "/b"}]}),
     "each destination VM may appear once in transfer.to"),
    ("transfer-secret-other-namespace", changed(CMD, vm=None, command=None, transfer={
        "from": {"secretKeyRef": {"name": "kube-system/token", "key": "k"}},
        "to": [{"vm": "vm2", "path": "/a"}]}),
     "spec.transfer.from.secretKeyRef.name in body should match"),
    ("transfer-two-sources", changed(CMD, vm=None, command=None, transfer={
        **TRANSFER, "from": {"vm": "vm1", "path": "/a", "configMapKeyRef": {"name": "c", "key": "k"}}}),
     "transfer.from needs exactly one source"),
]


def apply_strict(kubectl: Kubectl, namespace: str, kind: str, name: str,
                 spec: dict[str, Any]) -> tuple[int, str]:
    obj = {"apiVersion": "vmfleet.io/v1alpha1", "kind": kind,
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    proc = kubectl("apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(obj), check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def schema_ns(kubectl: Kubectl, crds: None) -> Iterator[str]:
    """A namespace no controller watches: only the API server judges these objects."""
    name = f"schema-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize(("case", "spec", "message"), VM_CASES, ids=[c[0] for c in VM_CASES])
def test_invalid_remotevm_is_refused(kubectl: Kubectl, schema_ns: str, case: str,
                                     spec: dict[str, Any], message: str) -> None:
    code, output = apply_strict(kubectl, schema_ns, "RemoteVM", case, spec)
    assert code != 0, output
    assert message in output, output
    assert kubectl("get", "-n", schema_ns, "remotevm", case, check=False).returncode != 0


@pytest.mark.parametrize(("case", "spec", "message"), CMD_CASES, ids=[c[0] for c in CMD_CASES])
def test_invalid_remotecommand_is_refused(kubectl: Kubectl, schema_ns: str, case: str,
                                          spec: dict[str, Any], message: str) -> None:
    code, output = apply_strict(kubectl, schema_ns, "RemoteCommand", case, spec)
    assert code != 0, output
    assert message in output, output
    assert kubectl("get", "-n", schema_ns, "remotecommand", case, check=False).returncode != 0


def test_valid_objects_are_accepted_and_a_command_spec_is_immutable(
    kubectl: Kubectl, schema_ns: str
) -> None:
    """The bases of the table are valid (so each case fails for its own reason)."""
    assert apply_strict(kubectl, schema_ns, "RemoteVM", "vm1", VM)[0] == 0
    assert apply_strict(kubectl, schema_ns, "RemoteCommand", "c1", CMD)[0] == 0
    assert apply_strict(kubectl, schema_ns, "RemoteCommand", "t1",
                        changed(CMD, vm=None, command=None, transfer=TRANSFER))[0] == 0
    code, output = apply_strict(kubectl, schema_ns, "RemoteCommand", "c1",
                                changed(CMD, command="rm -rf /"))
    assert code != 0
    assert "spec is immutable once created; create a new RemoteCommand instead" in output
    stored = kubectl.get_json("-n", schema_ns, "remotecommand", "c1")
    assert stored["spec"]["command"] == "uptime"
    for name, workers in (("sized", {"resources": {"requests": {"cpu": 1, "memory": "512Mi"},
                                                   "limits": {"cpu": "1500m", "memory": "1Gi"}}}),
                          ("empty-workers", {}),
                          ("autoscaled", {"autoscale": {"minReplicas": 2, "maxReplicas": 2}})):
        assert apply_strict(kubectl, schema_ns, "RemoteVM", name, changed(VM, workers=workers))[0] == 0
    # A RemoteVM may change (a new host key, a new address): that is how keys are rotated.
    assert apply_strict(kubectl, schema_ns, "RemoteVM", "vm1", changed(VM, port=2222))[0] == 0


@functools.cache
def helm_binary() -> str:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")],
                          capture_output=True, text=True, timeout=900, check=True)
    return proc.stdout.strip().splitlines()[-1]


def queue_policy(namespace: str) -> list[dict[str, Any]]:
    """The chart's queue policy and binding, renamed for this test and bound to
    ``namespace`` only (the session's other tests create RemoteVMs of every kind)."""
    out = subprocess.run(
        [helm_binary(), "template", "rel", str(REPO / "charts" / "vmfleet"), "--api-versions",
         "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
         "--show-only", "templates/remotevm-queue-policy.yaml"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    policy, binding = (d for d in yaml.safe_load_all(out) if d)
    name = f"queue-{namespace}"
    policy["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}}
    return [policy, binding]


def dry_run(kubectl: Kubectl, namespace: str, spec: dict[str, Any]) -> tuple[int, str]:
    obj = {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM",
           "metadata": {"name": "q", "namespace": namespace}, "spec": spec}
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(obj), check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_charts_policy_refuses_a_queue_outside_the_namespace_at_admission(
    kubectl: Kubectl, schema_ns: str
) -> None:
    objects = queue_policy(schema_ns)
    kubectl.apply(*objects)
    try:
        foreign = changed(VM, queue="vmfleet.kube-system.vm1")
        wait_until(lambda: dry_run(kubectl, schema_ns, foreign)[0] != 0, timeout=60, interval=1,
                   what="the ValidatingAdmissionPolicy to take effect")
        code, output = dry_run(kubectl, schema_ns, foreign)
        assert code != 0
        assert (f"spec.queue vmfleet.kube-system.vm1 is outside namespace {schema_ns}: a RemoteVM "
                f"queue must start with vmfleet.{schema_ns}.") in output, output
        for queue in (f"vmfleet.{schema_ns}.a:b", f"vmfleet.{schema_ns}.", "celery",
                      f"vmfleet.{schema_ns}x.vm1"):
            assert dry_run(kubectl, schema_ns, changed(VM, queue=queue))[0] != 0, queue
        for spec in (VM, changed(VM, queue=f"vmfleet.{schema_ns}.db.primary")):
            code, output = dry_run(kubectl, schema_ns, spec)
            assert code == 0, output
    finally:
        for obj in reversed(objects):
            kubectl("delete", obj["kind"], obj["metadata"]["name"], "--wait=false", check=False)
