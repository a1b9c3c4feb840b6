"""Target resolution and the exactly-once claim patches."""

import pytest

from controller.targets import describe_target, initial_results, label_selector_string
from remote_tasks.claims import claim_patch, finish_patch, fold_ops, result_index
from vmfleet.fold import changed, fold
from vmfleet.api.models import LabelSelector, RemoteCommandSpec


@pytest.mark.parametrize(
    ("selector", "query"),
    [
        ({"matchLabels": {"tier": "web", "env": "prod"}}, "env=prod,tier=web"),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
         "zone in (a,b)"),
        ({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["1"]},
                               {"key": "gpu", "operator": "Exists"},
                               {"key": "old", "operator": "DoesNotExist"}]},
         "x notin (1),gpu,!old"),
        ({}, ""),
    ],
)
def test_label_selector_string(selector, query):
    assert label_selector_string(LabelSelector.model_validate(selector)) == query


def test_describe_target():
    assert describe_target(RemoteCommandSpec(vm="vm1", command="x")) == "vm1"
    sel = RemoteCommandSpec.model_validate({"selector": {}, "command": "x"})
    assert describe_target(sel) == "all VMs"
    transfer = RemoteCommandSpec.model_validate({"transfer": {
        "from": {"vm": "vm1", "path": "/a"},
        "to": [{"vm": "vm3", "path": "/b"}, {"vm": "vm2", "path": "/b"}]}})
    assert describe_target(transfer) == "vm1 -> vm2,vm3"


def test_initial_results_queue_known_vms_and_fail_missing_ones():
    vms = {"vm1": {"spec": {"host": "127.0.10.1"}}}
    results = initial_results(["vm1", "ghost"], vms, "T")
    assert results == [
        {"vm": "vm1", "host": "127.0.10.1", "phase": "Queued", "attempt": 1, "dispatchTime": "T"},
        {"vm": "ghost", "phase": "Failed", "attempt": 1, "reason": "VMNotFound",
         "message": "RemoteVM ghost does not exist in this namespace", "completionTime": "T"},
    ]


def test_claim_tests_vm_phase_and_attempt_before_writing():
    patch = claim_patch(2, "vm3", 1, "w@h", "T")
    tests = [op for op in patch if op["op"] == "test"]
    assert tests == [
        {"op": "test", "path": "/status/results/2/vm", "value": "vm3"},
        {"op": "test", "path": "/status/results/2/phase", "value": "Queued"},
        {"op": "test", "path": "/status/results/2/attempt", "value": 1},
    ]
    assert patch[len(tests):][0] == {"op": "replace", "path": "/status/results/2/phase",
                                     "value": "Running"}


def test_finish_requires_own_running_attempt_and_skips_none():
    patch = finish_patch(0, "vm1", 2, "w@h", {"phase": "Succeeded", "exitCode": 0, "message": None})
    assert {"op": "test", "path": "/status/results/0/worker", "value": "w@h"} in patch
    assert {"op": "test", "path": "/status/results/0/attempt", "value": 2} in patch
    assert {"op": "add", "path": "/status/results/0/exitCode", "value": 0} in patch
    assert not any(op["path"].endswith("/message") for op in patch)


def test_result_index():
    status = {"results": [{"vm": "a"}, {"vm": "b"}]}
    assert (result_index(status, "b"), result_index(status, "c"), result_index(None, "a")) == (1, None, None)


def test_initial_results_pending_for_the_scheduler():
    results = initial_results(["vm1"], {"vm1": {"spec": {"host": "h"}}}, "T", phase="Pending")
    assert results == [{"vm": "vm1", "host": "h", "phase": "Pending", "attempt": 1}]


def _apply(status, ops):
    out = dict(status)
    for op in ops:
        assert op["op"] == "add" and op["path"].startswith("/status/")
        out[op["path"].removeprefix("/status/")] = op["value"]
    return out


def test_a_single_vm_command_is_folded_by_its_worker_so_the_controller_writes_nothing():
    queued = {"vm": "vm1", "phase": "Queued", "attempt": 1}
    status = {"startTime": "t0", "results": [queued], "phase": "Pending",
              "summary": {"targets": 1, "pending": 1}, "conditions": []}
    running = _apply(status, fold_ops(status, {**queued, "phase": "Running"}, "t1"))
    assert running["phase"] == "Running" and running["summary"]["running"] == 1
    done_entry = {**queued, "phase": "Succeeded", "exitCode": 0, "completionTime": "t2"}
    done = _apply(running, fold_ops(running, done_entry, "t2"))
    assert done["phase"] == "Succeeded" and done["completions"] == "1/1"
    assert done["completionTime"] == "t2"
    assert [c["type"] for c in done["conditions"]] == ["Complete", "Finished"]
    # What the controller folds from the same entry later (any time) changes nothing.
    assert not changed(done, fold([done_entry], done, "t9"))


def test_commands_with_several_vms_are_folded_by_the_controller_only():
    status = {"results": [{"vm": "vm1", "phase": "Queued"}, {"vm": "vm2", "phase": "Queued"}]}
    assert fold_ops(status, {"vm": "vm1", "phase": "Running"}, "t1") == []


def test_the_envelope_carries_what_the_worker_claims_with_and_old_messages_still_parse():
    from vmfleet.api.envelope import Envelope

    new = Envelope("ns", "c", "uid-1", "vm2", 2, "t0", {"command": "true"}, index=1, targets=3,
                   command_start="t-1", lost_pgid=4242, lost_marker="abc")
    assert Envelope.from_message(new.to_message()) == new
    old = {"namespace": "ns", "name": "c", "uid": "uid-1", "vm": "vm2", "attempt": 2,
           "dispatch_time": "t0", "spec": {"command": "true"}}
    parsed = Envelope.from_message(old)
    assert parsed.index is None and parsed.lost_pgid is None  # the worker reads the command
