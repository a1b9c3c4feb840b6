"""The Airflow operator's fleet operations, with real Airflow classes and no servers:
the vms target, dry runs refused unless allowed, and only_failed on a task retry.

Airflow lives in its own virtualenv (``make airflow-venv``); elsewhere this module skips.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

if importlib.util.find_spec("airflow") is None:
    pytest.skip(
        "Apache Airflow is not installed in this interpreter: run `make airflow-venv`, then "
        "`.venv-airflow/bin/python -m pytest tests/unit/test_airflow_operators.py` "
        "(`make test` runs it from .venv-airflow)",
        allow_module_level=True,
    )

# Airflow reads its home when first imported: a throwaway one, never ~/airflow.
_HOME = tempfile.mkdtemp(prefix="vmfleet-airflow-unit-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.setdefault("AIRFLOW_HOME", _HOME)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__HOSTNAME_CALLABLE", "socket.gethostname")

from airflow.sdk.exceptions import AirflowException  # noqa: E402 - after AIRFLOW_HOME is set

from vmfleet.airflow import RemoteCommandOperator  # noqa: E402
from vmfleet.airflow.naming import TaskIdentity, command_name  # noqa: E402

PREVIOUS = {
    "metadata": {"name": "prev", "namespace": "ops"},
    "status": {"phase": "Failed", "results": [
        {"vm": "vm1", "phase": "Succeeded", "reason": "Completed", "exitCode": 0},
        {"vm": "vm2", "phase": "Failed", "reason": "ExitCode", "exitCode": 3},
        {"vm": "vm3", "phase": "Cancelled", "reason": "MaxFailuresReached"},
    ]},
}


class TI:
    dag_id, task_id, run_id, map_index = "d", "t", "manual__1", -1

    def __init__(self, try_number: int) -> None:
        self.try_number = try_number


def test_vms_target_and_dry_run_spec():
    op = RemoteCommandOperator(task_id="t", vms=["vm1", "vm2"], command="true", dry_run=True,
                               allow_dry_run=True, max_parallel="50%")
    assert op.validated_spec() == {
        "vms": ["vm1", "vm2"], "command": "true", "dryRun": True, "maxParallel": "50%",
        "retries": {"limit": 0, "backoffSeconds": 60, "onExitCodes": []},
        "successExitCodes": [0], "output": {"maxBytes": 16384}}
    with pytest.raises(ValueError, match="exactly one target: vm, vms or selector"):
        RemoteCommandOperator(task_id="t", vm="vm1", vms=["vm2"], command="true")


def test_a_dry_run_is_refused_unless_asked():
    with pytest.raises(ValueError, match="pass allow_dry_run=True"):
        RemoteCommandOperator(task_id="t", vm="vm1", command="true", dry_run=True)
    status = {"phase": "DryRun", "dryRun": {"matched": ["vm1"], "runnable": ["vm1"], "blocked": []}}
    plain = RemoteCommandOperator(task_id="t", vm="vm1", command="true")
    with pytest.raises(AirflowException, match="was a dry run: nothing ran"):
        plain.finish("ops", "c", status)
    allowed = RemoteCommandOperator(task_id="t", vm="vm1", command="true", dry_run=True,
                                    allow_dry_run=True)
    assert allowed.finish("ops", "c", status) == {"dry_run": status["dryRun"]}


def _execute(op, monkeypatch, try_number, previous):
    created = []

    def create(settings, namespace, name, identity, spec, rerun_of=None):
        created.append((name, spec, rerun_of))
        return {"metadata": {"name": name}, "status": {"phase": "Succeeded", "results": [
            {"vm": vm, "phase": "Succeeded", "reason": "Completed", "exitCode": 0}
            for vm in spec.get("vms") or ["vm1", "vm2", "vm3"]]}}

    asked = []

    def previous_try(settings, namespace, identity):
        asked.append(identity.try_number)
        return previous if op.only_failed and identity.try_number > 1 else None

    def get_command(settings, namespace, name):
        tries = {command_name(TaskIdentity("d", "t", "manual__1", -1, n)): n for n in range(1, 5)}
        return previous if tries.get(name) == try_number - 1 else None

    monkeypatch.setattr(op, "_create_or_attach", create)
    monkeypatch.setattr(op, "_previous_try", previous_try)
    monkeypatch.setattr(op, "_get_command", get_command)
    result = op.execute({"ti": TI(try_number)})
    return created, result


def test_only_failed_retry_runs_only_what_did_not_succeed(monkeypatch):
    op = RemoteCommandOperator(task_id="t", selector={"matchLabels": {"a": "b"}}, command="x",
                               only_failed=True, namespace="ops")
    created, result = _execute(op, monkeypatch, 2, PREVIOUS)
    ((name, spec, rerun_of),) = created
    assert spec["vms"] == ["vm2", "vm3"] and "selector" not in spec
    assert rerun_of == "prev"
    assert name == command_name(TaskIdentity("d", "t", "manual__1", -1, 2))
    # The task's result holds every VM: this try's two, and vm1 from the first try.
    assert sorted(result) == ["vm1", "vm2", "vm3"]
    assert all(entry["success"] for entry in result.values())


def test_only_failed_first_try_and_without_the_flag_run_everything(monkeypatch):
    first = RemoteCommandOperator(task_id="t", selector={}, command="x", only_failed=True,
                                  namespace="ops")
    created, _ = _execute(first, monkeypatch, 1, PREVIOUS)
    assert created[0][1]["selector"] == {} and created[0][2] is None
    plain = RemoteCommandOperator(task_id="t", selector={}, command="x", namespace="ops")
    created, _ = _execute(plain, monkeypatch, 2, PREVIOUS)
    assert created[0][1]["selector"] == {}


def test_only_failed_after_a_full_success_runs_nothing(monkeypatch):
    done = {"metadata": {"name": "prev"}, "status": {"phase": "Succeeded", "results": [
        {"vm": "vm1", "phase": "Succeeded", "reason": "Completed", "exitCode": 0}]}}
    op = RemoteCommandOperator(task_id="t", selector={}, command="x", only_failed=True,
                               namespace="ops")
    created, result = _execute(op, monkeypatch, 3, done)
    assert created == []
    assert result["vm1"]["success"] is True
