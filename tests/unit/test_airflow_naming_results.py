"""vmfleet.airflow's pure parts: RemoteCommand names per task try, and result mapping.

These import no Airflow and run in every virtualenv.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfleet.airflow.naming import TaskIdentity, command_name, label_value, spec_hash
from vmfleet.airflow.results import failure_message, is_finished, results_of

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

BASE = TaskIdentity("remote_vm_execution", "on_each_vm.vm1_uptime",
                    "manual__2026-01-01T00:00:00+00:00", -1, 1)


def test_the_same_task_try_always_gets_the_same_name():
    again = TaskIdentity(BASE.dag_id, BASE.task_id, BASE.run_id, BASE.map_index, BASE.try_number)
    assert command_name(again) == command_name(BASE)
    assert command_name(BASE).startswith("remote-vm-execution-on-each-vm-vm1-uptime-")


@pytest.mark.parametrize("field, value", [
    ("dag_id", "other_dag"),
    ("task_id", "on_each_vm.vm2_disk"),
    ("run_id", "manual__2026-01-02T00:00:00+00:00"),
    ("map_index", 0),
    ("try_number", 2),  # a retry runs anew
])
def test_any_other_task_try_gets_another_name(field, value):
    other = TaskIdentity(**{**BASE.__dict__, field: value})
    assert command_name(other) != command_name(BASE)


def test_map_indexes_and_tries_differ_only_in_the_hash():
    names = {command_name(TaskIdentity(BASE.dag_id, BASE.task_id, BASE.run_id, i, t))
             for i in range(-1, 20) for t in range(1, 4)}
    assert len(names) == 21 * 3
    assert {n.rsplit("-", 1)[0] for n in names} == {"remote-vm-execution-on-each-vm-vm1-uptime"}


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300),
       st.text(max_size=300), st.integers(-1, 10**6), st.integers(0, 10**4))
def test_names_are_dns_labels_of_at_most_63_characters(dag_id, task_id, run_id, map_index, try_number):
    name = command_name(TaskIdentity(dag_id, task_id, run_id, map_index, try_number))
    assert len(name) <= 63
    assert DNS_LABEL.match(name), name


@given(st.text(max_size=300))
def test_label_values_are_valid(text):
    value = label_value(text)
    assert len(value) <= 63
    assert value == "" or DNS_LABEL.match(value)


def test_annotations_identify_the_task_try():
    annotations = BASE.annotations()
    assert annotations == {
        "airflow.vmfleet.io/dag-id": "remote_vm_execution",
        "airflow.vmfleet.io/task-id": "on_each_vm.vm1_uptime",
        "airflow.vmfleet.io/run-id": "manual__2026-01-01T00:00:00+00:00",
        "airflow.vmfleet.io/map-index": "-1",
        "airflow.vmfleet.io/try-number": "1",
    }
    assert BASE.matches({**annotations, "other": "x"})
    assert not BASE.matches({**annotations, "airflow.vmfleet.io/try-number": "2"})
    assert not BASE.matches(None)
    assert BASE.labels()["vmfleet.io/created-by"] == "airflow"


def test_spec_hash_ignores_key_order():
    assert spec_hash({"vm": "vm1", "command": "x"}) == spec_hash({"command": "x", "vm": "vm1"})
    assert spec_hash({"vm": "vm1", "command": "x"}) != spec_hash({"vm": "vm2", "command": "x"})


SUCCEEDED = {
    "phase": "Succeeded",
    "results": [
        {"vm": "vm2", "host": "127.0.10.2", "phase": "Succeeded", "attempt": 1, "exitCode": 0,
         "reason": "Completed", "stdout": "b\n", "stderr": "", "stdoutBytes": 2, "stderrBytes": 0,
         "outputTruncated": False, "dispatchTime": "2026-11-23T21:04:12.101Z",
         "startTime": "2026-11-23T21:04:12.133Z", "completionTime": "2026-11-23T21:04:13.383Z",
         "worker": "w", "someNewerField": 1},
        {"vm": "vm1", "host": "127.0.10.1", "phase": "Succeeded", "attempt": 1, "exitCode": 0,
         "reason": "Completed", "stdout": "a\n", "stderr": "warn\n", "stdoutBytes": 2,
         "stderrBytes": 5, "outputTruncated": False, "startTime": "2026-11-23T21:04:12Z",
         "completionTime": "2026-11-23T21:04:12.500Z"},
    ],
}


def test_results_map_to_one_plain_entry_per_vm():
    results = results_of(SUCCEEDED)
    assert list(results) == ["vm1", "vm2"]
    assert results["vm2"] == {
        "vm": "vm2", "host": "127.0.10.2", "phase": "Succeeded", "success": True, "exit_code": 0,
        "reason": "Completed", "message": None, "stdout": "b\n", "stderr": "",
        "stdout_bytes": 2, "stderr_bytes": 0, "output_truncated": False, "attempt": 1,
        "dispatch_time": "2026-11-23T21:04:12.101Z", "start_time": "2026-11-23T21:04:12.133Z",
        "completion_time": "2026-11-23T21:04:13.383Z", "duration_seconds": 1.25,
    }
    assert results["vm1"]["stderr"] == "warn\n"
    assert results["vm1"]["duration_seconds"] == 0.5
    assert failure_message("ns", "cmd", SUCCEEDED) is None
    assert is_finished({"status": SUCCEEDED})


def test_a_failure_names_each_failed_vm_with_its_reason_exit_code_and_stderr():
    status = {
        "phase": "Failed",
        "results": [
            {"vm": "vm1", "phase": "Succeeded", "exitCode": 0, "stderr": "fine\n"},
            {"vm": "vm3", "phase": "Failed", "reason": "HostKeyMismatch",
             "message": "the host key of 127.0.10.3 does not match"},
            {"vm": "vm2", "phase": "Failed", "exitCode": 3, "reason": "ExitCode",
             "message": "exited with 3", "stderr": "disk check failed: /data is full\n"},
        ],
    }
    assert failure_message("ops", "check", status) == (
        "RemoteCommand ops/check failed\n"
        "on vm2: ExitCode (exit code 3): exited with 3\n"
        "stderr of vm2:\ndisk check failed: /data is full\n"
        "on vm3: HostKeyMismatch: the host key of 127.0.10.3 does not match"
    )
    results = results_of(status)
    assert [r["success"] for r in results.values()] == [True, False, False]
    assert results["vm3"]["exit_code"] is None


def test_a_command_refused_before_any_vm_ran_says_why():
    status = {"phase": "Failed", "conditions": [
        {"type": "Complete", "status": "False"},
        {"type": "Failed", "status": "True", "reason": "InvalidSpec",
         "message": "file transfers are not available"},
    ]}
    message = failure_message("ops", "copy", status)
    assert message == ("RemoteCommand ops/copy failed\n"
                       "Failed: InvalidSpec: file transfers are not available")


def test_long_stderr_is_cut_to_its_tail_in_the_message():
    status = {"phase": "Failed", "results": [
        {"vm": "vm1", "phase": "Failed", "exitCode": 1, "reason": "ExitCode",
         "stderr": "x" * 10000 + "the end\n"}]}
    message = failure_message("ns", "c", status)
    assert message is not None and message.endswith("the end") and len(message) < 4300


@pytest.mark.parametrize("phase, finished", [
    (None, False), ("Pending", False), ("Running", False),
    ("Succeeded", True), ("Failed", True), ("Cancelled", True),
])
def test_finished_phases(phase, finished):
    assert is_finished({"status": {"phase": phase}}) is finished
    assert is_finished(None) is False


def test_boundaries_airflow_only_in_vmfleet_airflow_and_no_kopf_there():
    """vmfleet's core never imports Airflow; vmfleet.airflow and the DAGs never import kopf."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    imports = re.compile(r"^\s*(?:from|import)\s+(airflow|kopf)\b", re.MULTILINE)
    for path in sorted((repo / "vmfleet").rglob("*.py")):
        found = set(imports.findall(path.read_text()))
        if "airflow" in path.relative_to(repo / "vmfleet").parts[:1]:
            assert "kopf" not in found, path
        else:
            assert not found & {"airflow", "kopf"}, path
    for path in sorted((repo / "dags").glob("*.py")):
        assert "kopf" not in set(imports.findall(path.read_text())), path
