"""The Airflow operator's fleet operations, with real Airflow classes and no servers:
the vms target, dry runs refused unless allowed, and only_failed on a task retry.

Airflow lives in its own virtualenv (``make airflow-venv``); elsewhere this module skips.
"""

from __future__ import annotations

import pytest

from tests.airflow_env import use_airflow

use_airflow(__file__)  # skips this module without Airflow; a throwaway AIRFLOW_HOME

from airflow.sdk.exceptions import AirflowException  # noqa: E402 - after AIRFLOW_HOME is set

from vmfleet.airflow import RemoteCommandOperator  # noqa: E402
from vmfleet.airflow.connection import KubeSettings  # noqa: E402
from vmfleet.airflow.naming import TaskIdentity, command_name  # noqa: E402
from vmfleet.rerun import LABEL_RERUN_OF  # noqa: E402

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


class FakeHook:
    """A VmfleetHook without a server: RemoteCommands in a dict, every call recorded."""

    def __init__(self, objects: dict[str, dict] | None = None, finish: bool = True) -> None:
        self.objects = dict(objects or {})
        self.finish = finish
        self.calls: list[tuple[str, str]] = []
        self.settings = KubeSettings(kubernetes_conn_id="fleet")  # for the trigger

    def namespace(self, explicit=None):
        return explicit or "default"

    def get_command(self, name, namespace=None):
        self.calls.append(("get", name))
        return self.objects.get(name)

    def create_or_get_command(self, body):
        name, spec = body["metadata"]["name"], body["spec"]
        self.calls.append(("create", name))
        if name in self.objects:
            return self.objects[name], False
        status = {"phase": "Running"}
        if self.finish:
            status = {"phase": "Succeeded", "results": [
                {"vm": vm, "phase": "Succeeded", "reason": "Completed", "exitCode": 0}
                for vm in spec.get("vms") or ["vm1", "vm2", "vm3"]]}
        self.objects[name] = {**body, "status": status}
        return self.objects[name], True

    def delete_command(self, name, namespace=None):
        self.calls.append(("delete", name))
        return self.objects.pop(name, None) is not None


def _name(try_number: int) -> str:
    return command_name(TaskIdentity("d", "t", "manual__1", -1, try_number))


def _execute(op, monkeypatch, try_number, previous):
    """Run ``execute`` with a fake hook holding ``previous`` as the previous try's command;
    returns (name, spec, rerun_of) of each command created, and the task's result."""
    hook = FakeHook({_name(try_number - 1): previous} if try_number > 1 else {})
    monkeypatch.setattr(RemoteCommandOperator, "hook", hook)
    result = op.execute({"ti": TI(try_number)})
    created = [(name, hook.objects[name]["spec"],
                hook.objects[name]["metadata"]["labels"].get(LABEL_RERUN_OF))
               for kind, name in hook.calls if kind == "create"]
    return created, result


def test_the_operator_makes_its_api_calls_through_its_hook(monkeypatch):
    op = RemoteCommandOperator(task_id="t", vms=["vm1", "vm2", "vm3"], command="x",
                               only_failed=True, namespace="ops", defer_after_seconds=0.2)
    hook = FakeHook({_name(1): PREVIOUS}, finish=False)
    monkeypatch.setattr(RemoteCommandOperator, "hook", hook)
    deferred = []
    monkeypatch.setattr(op, "defer", lambda **kwargs: deferred.append(kwargs))
    op.execute({"ti": TI(2)})
    # The previous try's command looked up, this try's created, then polled: all via the hook.
    assert hook.calls[:2] == [("get", _name(1)), ("create", _name(2))]
    assert set(hook.calls[2:]) == {("get", _name(2))}
    assert deferred[0]["trigger"].settings.kubernetes_conn_id == "fleet"
    # The trigger shows the output in the task log unless the task says not to.
    assert deferred[0]["trigger"].serialize()[1]["stream_output"] is True
    assert hook.objects[_name(2)]["spec"]["vms"] == ["vm2", "vm3"]
    # A second run of the same try attaches to the command instead of creating another.
    assert op._create_or_attach("ops", _name(2), TaskIdentity("d", "t", "manual__1", -1, 2),
                                hook.objects[_name(2)]["spec"], "prev") is hook.objects[_name(2)]
    op.on_kill()
    assert hook.calls[-1] == ("delete", _name(2)) and _name(2) not in hook.objects


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


def test_the_hook_creates_or_attaches_through_the_one_kube_layer():
    from kubernetes.client.exceptions import ApiException

    from vmfleet.airflow.hooks import VmfleetHook

    class Kube:
        def __init__(self, status: int) -> None:
            self.status, self.stored = status, {"metadata": {"name": "c"}, "status": {}}

        def create_command(self, namespace, body):
            raise ApiException(status=self.status, reason="Conflict" if self.status == 409
                               else "Forbidden")

        def get_command(self, namespace, name):
            return self.stored if (namespace, name) == ("ops", "c") else None

    body = {"metadata": {"namespace": "ops", "name": "c"}, "spec": {}}
    hook = VmfleetHook(kubernetes_conn_id=None)
    hook.__dict__["kube"] = Kube(409)
    assert hook.create_or_get_command(body) == (hook.kube.stored, False)
    assert hook.get_command("gone", "ops") is None
    hook.__dict__["kube"] = Kube(403)
    with pytest.raises(AirflowException, match="Creating RemoteCommand ops/c failed: 403 Forbidden"):
        hook.create_or_get_command(body)
