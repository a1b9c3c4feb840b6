"""The worker side of health checks and bastions: what is reported, which key is read.

The worker holds no Kubernetes client: the probe message carries the VM's ``Target`` and
the keys come from the Secrets mounted under the credentials directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from remote_tasks import health
from remote_tasks.execute import AttemptFailed, CommandExecutor
from remote_tasks.health import HealthChecker
from remote_tasks.ssh import ConnectionPool
from vmfleet.api.envelope import Target
from vmfleet.api.facts import Facts
from vmfleet.api.models import VMFacts

VM = Target("vm1", "10.0.0.5", 22, "rocky", "vm1-ssh", host_keys=("ssh-ed25519 AAAA",))


class FakeState:
    """Collects what a worker reports (vmfleet.state.State.report)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.scopes: list[str] = []

    def report(self, body: dict[str, Any], scope: str = "default",
               namespace: str | None = None) -> str:
        self.scopes.append(scope)
        self.reports.append(body)
        return f"{len(self.reports)}-0"


def secrets(root: Path, **keys: str | tuple[str, str]) -> Path:
    """Secrets as a pod has them mounted: ``<root>/<secret>/ssh-privatekey`` (+ passphrase)."""
    for name, value in keys.items():
        key, phrase = value if isinstance(value, tuple) else (value, None)
        (root / name).mkdir()
        (root / name / "ssh-privatekey").write_text(key)
        if phrase is not None:
            (root / name / "passphrase").write_text(phrase + "\n")
    return root


def executor(credentials: Path, state: FakeState | None = None) -> CommandExecutor:
    return CommandExecutor(state or FakeState(), ConnectionPool(), credentials)  # type: ignore[arg-type]


def probe(target: Target | None, uid: str = "u1") -> dict[str, Any]:
    return {"namespace": "ops", "vm": "vm1", "uid": uid, "timeoutSeconds": 5,
            "target": target.to_message() if target else None}


def test_a_missing_secret_is_reported_as_a_probe_result_not_a_crash(tmp_path: Path) -> None:
    state = FakeState()
    checker = HealthChecker(executor(tmp_path, state))
    assert checker.check(probe(VM), "w1") == "CredentialsInvalid"
    (report,) = state.reports
    assert (report["kind"], report["namespace"], report["vm"], report["uid"]) == (
        "probe", "ops", "vm1", "u1")
    last = report["status"]["lastProbe"]
    assert (last["succeeded"], last["reason"], last["worker"]) == (False, "CredentialsInvalid", "w1")
    assert "cannot read Secret vm1-ssh" in last["message"]
    assert "is it mounted in this worker?" in last["message"]
    assert "facts" not in report["status"]  # the last known facts stay


def test_the_report_names_the_vm_uid_so_the_controller_can_drop_a_replaced_vms_probe(
        tmp_path: Path) -> None:
    state = FakeState()
    HealthChecker(executor(tmp_path, state)).check(probe(VM, uid="other"), "w1")
    assert state.reports[0]["uid"] == "other"


def test_a_probe_without_a_target_is_reported_invalid(tmp_path: Path) -> None:
    state = FakeState()
    assert HealthChecker(executor(tmp_path, state)).check(probe(None), "w1") == "InvalidSpec"
    assert state.reports[0]["status"]["lastProbe"]["message"] == "the probe names no target"


def test_keys_are_read_from_each_secrets_own_mount(tmp_path: Path) -> None:
    keys: dict[str, str | tuple[str, str]] = {"vm1-ssh": "own key", "b-ssh": ("bastion key", "secret")}
    ex = executor(secrets(tmp_path, **keys))
    assert ex.credentials("vm1-ssh") == ("own key", None)
    assert ex.credentials("b-ssh") == ("bastion key", "secret")


def test_an_empty_key_is_invalid_credentials(tmp_path: Path) -> None:
    ex = executor(secrets(tmp_path, **{"vm1-ssh": "  \n"}))
    with pytest.raises(AttemptFailed, match="Secret vm1-ssh has an empty 'ssh-privatekey'") as caught:
        ex.ssh_target(VM)
    assert caught.value.reason == "CredentialsInvalid"


def test_a_bastion_target_is_resolved_with_its_own_keys(tmp_path: Path) -> None:
    bastion = Target("b", "10.0.0.1", 22, "jump", "b-ssh", host_keys=("ssh-ed25519 BBBB",))
    inner = Target("vm1", "10.0.0.5", 22, "rocky", "vm1-ssh", host_keys=("ssh-ed25519 AAAA",),
                   bastion=bastion)
    ex = executor(secrets(tmp_path, **{"vm1-ssh": "k1", "b-ssh": "k2"}))
    target = ex.ssh_target(inner)
    assert target.jump is not None
    assert (target.jump.host, target.jump.user, target.jump.private_key, target.jump.host_keys) == (
        "10.0.0.1", "jump", "k2", ("ssh-ed25519 BBBB",))
    assert (target.private_key, target.host_keys) == ("k1", ("ssh-ed25519 AAAA",))


def test_a_bastion_behind_a_bastion_is_refused(tmp_path: Path) -> None:
    outer = Target("o", "10.0.0.9", 22, "u", "b-ssh")
    middle = Target("b", "10.0.0.1", 22, "u", "b-ssh", bastion=outer)
    ex = executor(secrets(tmp_path, **{"vm1-ssh": "k1", "b-ssh": "k2"}))
    with pytest.raises(AttemptFailed, match="proxyJump supports one bastion hop"):
        ex.ssh_target(Target("vm1", "h", 22, "u", "vm1-ssh", bastion=middle))


def test_tofu_without_a_recorded_key_trusts_the_first_one_then_pins_it(tmp_path: Path) -> None:
    ex = executor(secrets(tmp_path, **{"vm1-ssh": "k1"}))
    unrecorded = Target("vm1", "10.0.0.5", 22, "rocky", "vm1-ssh", trust_on_first_use=True)
    # A command never connects to an unrecorded key; only the probe (which records it) does.
    with pytest.raises(AttemptFailed, match="its host key is not recorded yet") as refused:
        ex.ssh_target(unrecorded)
    assert refused.value.reason == "TransportError"
    first = ex.ssh_target(unrecorded, first_use=True)
    assert (first.trust_on_first_use, first.host_keys) == (True, ())
    # Once recorded, the controller sends the key in the Target: pinned, for both.
    recorded = Target("vm1", "10.0.0.5", 22, "rocky", "vm1-ssh", host_keys=("ssh-ed25519 CCCC",),
                      trust_on_first_use=True)
    for later in (ex.ssh_target(recorded), ex.ssh_target(recorded, first_use=True)):
        assert (later.trust_on_first_use, later.host_keys) == (False, ("ssh-ed25519 CCCC",))


def test_facts_are_reported_as_the_api_model_reads_them(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state = FakeState()
    checker = HealthChecker(executor(secrets(tmp_path, **{"vm1-ssh": "k1"}), state))
    facts = Facts(hostname="vm1", load1=0.5, memory_total_bytes=1024)
    monkeypatch.setattr(health, "probe_vm", lambda *a: health.ProbeResult(
        True, "Completed", "the VM answered every check", 0.25, facts))
    assert checker.check(probe(VM), "w1") == "Completed"
    (report,) = state.reports
    reported = report["status"]["facts"]
    assert reported == {"hostname": "vm1", "load1": 0.5, "memoryTotalBytes": 1024,
                        "lastProbeTime": report["status"]["lastProbe"]["time"],
                        "probeLatencySeconds": 0.25}
    assert VMFacts.model_validate(reported).last_probe_time == reported["lastProbeTime"]
    assert report["status"]["lastProbe"]["succeeded"] is True


def test_a_probe_is_reported_to_the_scope_of_the_controller_that_sent_it(tmp_path: Path) -> None:
    state = FakeState()
    checker = HealthChecker(executor(tmp_path, state))
    checker.check({**probe(VM), "scope": "release-a"}, "w1")
    checker.check(probe(VM), "w1")
    assert state.scopes == ["release-a", "default"]
