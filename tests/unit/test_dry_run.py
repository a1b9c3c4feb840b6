"""spec.dryRun: the controller reports targets and blockers, and sends nothing."""

from __future__ import annotations

from typing import Any

import pytest

from controller.dryrun import blocker, report
from tests.fakes import FakeState, Fleet, command
from vmfleet.api.models import RemoteCommandSpec, RemoteCommandStatus


def ready(status: str = "True", message: str | None = None) -> dict[str, Any]:
    return {"conditions": [{"type": "Ready", "status": status, "reason": "R",
                            **({"message": message} if message else {})}]}


def _spec(**fields: Any) -> RemoteCommandSpec:
    return RemoteCommandSpec.model_validate({"selector": {}, "command": "true", **fields})


@pytest.mark.parametrize(
    ("vm_spec", "status", "fields", "reason"),
    [
        (None, None, {}, "VMNotFound"),
        ({"paused": True}, ready(), {}, "Paused"),
        ({}, ready(), {"become": {}}, "BecomeNotAllowed"),
        ({"allowBecome": True}, ready(), {"become": {}}, None),
        ({}, ready("False", "unreachable: connection refused"), {}, "NotReady"),
        ({}, {}, {}, "NotReady"),
        ({}, ready(), {}, None),
    ],
)
def test_blockers(vm_spec, status, fields, reason):
    obj = None if vm_spec is None else {"spec": vm_spec, "status": status}
    found = blocker(_spec(**fields), "vm1", obj)
    assert (found or {}).get("reason") == reason


def test_report_resolves_budgets_and_sees_the_failure_budget_exhausted():
    vms = {f"vm{i}": {"spec": {}, "status": ready()} for i in range(8)}
    vms["vm3"]["spec"]["paused"] = True
    names = [f"vm{i}" for i in range(10)]  # vm8 and vm9 do not exist
    dry = report(_spec(maxParallel="30%", maxFailures="20%"), names, vms)
    assert dry["matched"] == names
    assert dry["runnable"] == ["vm0", "vm1", "vm2", "vm4", "vm5", "vm6", "vm7"]
    assert [(b["vm"], b["reason"]) for b in dry["blocked"]] == [
        ("vm3", "Paused"), ("vm8", "VMNotFound"), ("vm9", "VMNotFound")]
    assert (dry["maxParallel"], dry["maxFailures"]) == (3, 2)
    assert dry["budget"] == ("2 blocked VMs would fail, reaching maxFailures (20% of 10 = 2): "
                             "the run would stop starting VMs there")
    RemoteCommandStatus.model_validate({"phase": "DryRun", "dryRun": dry})  # fits the schema


def test_a_dry_run_sends_nothing_and_finishes_as_dry_run():
    fleet = Fleet("vm1", "vm2")
    fleet.vms["vm1"]["status"] = ready()
    commands = fleet.commands(FakeState())
    commands.observe(command(selector={}, dryRun=True, maxParallel=1))
    (tracked,) = commands.tracked()
    assert fleet.sent == [] and fleet.woken == []
    status = tracked.status
    assert status["phase"] == "DryRun"
    assert "results" not in status
    assert tracked.finished
    assert tracked.due is not None
    (finished,) = status["conditions"]
    assert (finished["type"], finished["status"], finished["reason"]) == ("Finished", "True", "DryRun")
    assert finished["message"] == "dry run: 2 VMs matched, 1 would run, 1 would block; nothing ran"
    assert status["dryRun"]["runnable"] == ["vm1"]
    assert status["dryRun"]["blocked"][0]["reason"] == "NotReady"
    assert status["completions"] == "0/2"


def test_a_finished_dry_run_is_not_started_again():
    fleet = Fleet("vm1")
    commands = fleet.commands(FakeState())
    commands.observe({**command(vm="vm1", dryRun=True), "status": {"phase": "DryRun"}})
    assert commands.tracked() == [] and fleet.sent == []


# --------------------------------------------------------------------------- vmfleet exec


def test_exec_dry_run_creates_a_dry_run_and_prints_the_answer():
    from tests.fakes import ExecKube, obj_with, run

    dry = {"matched": ["vm1", "vm2"], "runnable": ["vm1"], "maxParallel": 1,
           "blocked": [{"vm": "vm2", "reason": "Paused", "message": "spec.paused is true"}]}
    kube = ExecKube([[("MODIFIED", obj_with(12, None, phase="DryRun", dryRun=dry))]], vms=2)
    code, out, err = run(kube, "--dry-run", "-l", "role=web", "--", "systemctl", "restart", "x")
    assert kube.created[0]["spec"]["dryRun"] is True
    assert code == 1
    assert out == (
        "Dry run of RemoteCommand default/exec-vm1-abcde: nothing ran.\n"
        "Matched 2 VMs: vm1, vm2\n"
        "Would run on 1: vm1\n"
        "Would block on 1:\n"
        "  vm2  Paused: spec.paused is true\n"
        "Budgets: maxParallel 1\n"
    )
    assert err == ""
    assert kube.deleted == ["exec-vm1-abcde"]


def test_exec_dry_run_with_nothing_blocking_exits_0():
    from tests.fakes import ExecKube, obj_with, run

    dry = {"matched": ["vm1"], "runnable": ["vm1"], "blocked": []}
    kube = ExecKube([[("MODIFIED", obj_with(12, None, phase="DryRun", dryRun=dry))]])
    code, out, _ = run(kube, "--dry-run", "vm1", "--", "true")
    assert code == 0
    assert "Would run on 1: vm1" in out


def test_a_dry_run_lists_the_waves_of_a_rollout():
    vms = {f"vm{i}": {"metadata": {"labels": {"zone": "b" if i % 2 else "a"}}, "spec": {},
                      "status": ready()} for i in range(4)}
    dry = report(_spec(rollout={"partitionBy": "zone", "batchSize": 1}), list(vms), vms)
    assert dry["waves"] == [["vm0"], ["vm2"], ["vm1"], ["vm3"]]
    RemoteCommandStatus.model_validate({"phase": "DryRun", "dryRun": dry})
