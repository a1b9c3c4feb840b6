"""The worker side of health checks and bastions: what is written, which key is read."""

from __future__ import annotations

import pytest

from remote_tasks.execute import AttemptFailed, CommandExecutor
from remote_tasks.health import HealthChecker
from remote_tasks.ssh import ConnectionPool
from vmfleet.kube import ApiException

VM = {
    "metadata": {"name": "vm1", "namespace": "ops", "uid": "u1", "resourceVersion": "7"},
    "spec": {"host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
             "hostKeys": ["ssh-ed25519 AAAA"]},
}


class FakeKube:
    def __init__(self, vms, secrets=None):
        self.vms = vms
        self.secrets = secrets or {}
        self.patches = []

    def get_vm(self, namespace, name):
        return self.vms.get(name)

    def read_secret(self, namespace, name):
        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        return self.secrets[name]

    def patch_vm_status(self, namespace, name, patch):
        self.patches.append((name, patch))
        return {}


def test_a_missing_secret_is_reported_as_a_probe_result_not_a_crash():
    kube = FakeKube({"vm1": VM})
    checker = HealthChecker(CommandExecutor(kube, ConnectionPool()))  # type: ignore[arg-type]
    assert checker.check({"namespace": "ops", "vm": "vm1", "uid": "u1"}, "w1") == "CredentialsInvalid"
    ((name, patch),) = kube.patches
    probe = patch["status"]["lastProbe"]
    assert (name, probe["succeeded"], probe["reason"], probe["worker"]) == (
        "vm1", False, "CredentialsInvalid", "w1")
    assert "cannot read Secret ops/vm1-ssh" in probe["message"]
    assert "facts" not in patch["status"]  # the last known facts stay


def test_a_probe_for_a_replaced_vm_is_dropped():
    kube = FakeKube({"vm1": VM})
    checker = HealthChecker(CommandExecutor(kube, ConnectionPool()))  # type: ignore[arg-type]
    assert checker.check({"namespace": "ops", "vm": "vm1", "uid": "other"}, "w1") == "gone"
    assert kube.patches == []


def test_a_bastion_key_is_read_from_the_sibling_mount(tmp_path):
    own = tmp_path / "ssh"
    (tmp_path / "ssh").mkdir()
    (own / "ssh-privatekey").write_text("own key")
    (tmp_path / "ssh-bastion").mkdir()
    (tmp_path / "ssh-bastion" / "ssh-privatekey").write_text("bastion key")
    (tmp_path / "ssh-bastion" / "passphrase").write_text("secret\n")
    executor = CommandExecutor(FakeKube({}), ConnectionPool(), own)  # type: ignore[arg-type]
    assert executor.credentials("ops", "x") == ("own key", None)
    assert executor.credentials("ops", "y", bastion=True) == ("bastion key", "secret")


def test_a_bastion_target_is_resolved_with_its_own_keys():
    bastion = {"metadata": {"name": "b", "namespace": "ops", "uid": "u2"},
               "spec": {**VM["spec"], "host": "10.0.0.1", "credentialsSecretRef": {"name": "b-ssh"},
                        "hostKeys": ["ssh-ed25519 BBBB"]}}
    inner = {**VM, "spec": {**VM["spec"], "proxyJump": {"vm": "b"}}}
    kube = FakeKube({"vm1": inner, "b": bastion},
                    {"vm1-ssh": {"ssh-privatekey": "k1"}, "b-ssh": {"ssh-privatekey": "k2"}})
    target = CommandExecutor(kube, ConnectionPool()).resolve_target("ops", "vm1")  # type: ignore[arg-type]
    assert target.jump is not None
    assert (target.jump.host, target.jump.private_key, target.jump.host_keys) == (
        "10.0.0.1", "k2", ("ssh-ed25519 BBBB",))
    assert (target.private_key, target.host_keys) == ("k1", ("ssh-ed25519 AAAA",))


def test_tofu_without_a_recorded_key_trusts_the_first_one_then_pins_it():
    spec = {**VM["spec"], "hostKeyPolicy": "TrustOnFirstUse"}
    del spec["hostKeys"]
    kube = FakeKube({"vm1": {**VM, "spec": spec}}, {"vm1-ssh": {"ssh-privatekey": "k1"}})
    executor = CommandExecutor(kube, ConnectionPool())  # type: ignore[arg-type]
    # A command never connects to an unrecorded key; only the probe (which records it) does.
    with pytest.raises(AttemptFailed, match="its host key is not recorded yet") as refused:
        executor.resolve_target("ops", "vm1")
    assert refused.value.reason == "TransportError"
    first = executor.resolve_target("ops", "vm1", first_use=True)
    assert (first.trust_on_first_use, first.host_keys) == (True, ())
    kube.vms["vm1"] = {**VM, "spec": spec, "status": {"hostKey": {"publicKey": "ssh-ed25519 CCCC"}}}
    later = executor.resolve_target("ops", "vm1")
    assert (later.trust_on_first_use, later.host_keys) == (False, ("ssh-ed25519 CCCC",))


def test_facts_are_written_from_the_api_model(monkeypatch):
    from types import SimpleNamespace

    from remote_tasks import health
    from vmfleet.api.models import VMFacts

    kube = FakeKube({"vm1": VM})
    checker = HealthChecker(CommandExecutor(kube, ConnectionPool()))  # type: ignore[arg-type]
    monkeypatch.setattr(checker.executor, "resolve_target",
                        lambda *a, **k: SimpleNamespace(trust_on_first_use=False))
    facts = VMFacts(hostname="vm1", load1=0.5, memory_total_bytes=1024)
    monkeypatch.setattr(health, "probe_vm", lambda *a: health.ProbeResult(
        True, "Completed", "the VM answered every check", 0.25, facts))
    assert checker.check({"namespace": "ops", "vm": "vm1", "uid": "u1"}, "w1") == "Completed"
    ((_, patch),) = kube.patches
    written = patch["status"]["facts"]
    assert written == {"hostname": "vm1", "load1": 0.5, "memoryTotalBytes": 1024,
                       "lastProbeTime": patch["status"]["lastProbe"]["time"],
                       "probeLatencySeconds": 0.25}
    assert VMFacts.model_validate(written).last_probe_time == written["lastProbeTime"]
