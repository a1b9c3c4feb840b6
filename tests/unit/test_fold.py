"""Folding per-VM results into the command's phase, summary and conditions."""

import pytest

from controller.fold import changed, fold

NOW = "2026-11-23T10:00:00.000Z"


def r(vm, phase, **extra):
    return {"vm": vm, "phase": phase, "attempt": 1, **extra}


@pytest.mark.parametrize(
    ("phases", "phase", "completions"),
    [
        (["Queued"], "Pending", "0/1"),
        (["Pending", "Queued"], "Pending", "0/2"),
        (["Running", "Queued"], "Running", "0/2"),
        (["Succeeded", "Queued"], "Running", "1/2"),
        (["Succeeded", "Succeeded", "Succeeded"], "Succeeded", "3/3"),
        (["Succeeded", "Failed"], "Failed", "1/2"),
        (["Cancelled", "Succeeded"], "Cancelled", "1/2"),
        ([], "Failed", "0/0"),
    ],
)
def test_phase_and_completions(phases, phase, completions):
    results = [r(f"vm{i}", p, completionTime=NOW) for i, p in enumerate(phases)]
    status = fold(results, {}, NOW)
    assert (status["phase"], status["completions"]) == (phase, completions)


def test_success_sets_complete_and_finished():
    status = fold([r("vm1", "Succeeded", completionTime="2026-11-23T09:59:59.000Z")], {}, NOW)
    types = {c["type"]: c for c in status["conditions"]}
    assert types.keys() == {"Complete", "Finished"}
    assert types["Complete"]["status"] == types["Finished"]["status"] == "True"
    assert types["Finished"]["reason"] == "Succeeded"
    assert status["completionTime"] == "2026-11-23T09:59:59.000Z"
    assert status["summary"] == {"targets": 1, "pending": 0, "running": 0, "succeeded": 1,
                                 "failed": 0, "cancelled": 0}


def test_failure_names_the_vm_and_reason():
    results = [
        r("vm1", "Succeeded"),
        r("vm2", "Failed", reason="ExitCode", message="exit code 3", exitCode=3),
    ]
    status = fold(results, {}, NOW)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ExitCode"
    assert failed["message"] == "1 of 2 VMs failed; vm2: exit code 3"
    assert {c["type"] for c in status["conditions"]} == {"Failed", "Finished"}


def test_running_sets_no_conditions_and_fold_is_stable():
    status = fold([r("vm1", "Running")], {}, NOW)
    assert status["conditions"] == []
    assert "completionTime" not in status
    assert not changed({**status, "results": []}, fold([r("vm1", "Running")], status, NOW))


def test_transition_time_kept_when_status_unchanged():
    first = fold([r("vm1", "Succeeded")], {}, NOW)
    again = fold([r("vm1", "Succeeded")], first, "2026-11-23T11:00:00.000Z")
    assert again["conditions"] == first["conditions"]
    assert not changed(first, again)
