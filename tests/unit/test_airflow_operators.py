"""vmfleet.airflow with real Airflow classes, no servers: the DagBag import test, the
trigger's serialize() round trip, the specs the operators create, the sensor's script,
and how the cluster connection is resolved.

Airflow lives in its own virtualenv (``make airflow-venv``); elsewhere this module skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.airflow_env import use_airflow

use_airflow(__file__)  # skips this module without Airflow; a throwaway AIRFLOW_HOME

from airflow.sdk.exceptions import AirflowException  # noqa: E402

from vmfleet.airflow import (  # noqa: E402
    RemoteCommandOperator,
    RemoteCommandTrigger,
    RemoteFileSensor,
    RemoteFileTransferOperator,
)
from vmfleet.airflow.connection import KubeSettings  # noqa: E402
from vmfleet.airflow.sensors import NOT_FOUND_EXIT_CODE, wait_argv  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ DagBag

def test_the_dags_import_without_errors_and_contact_nothing(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    contacted: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        contacted.append(address)
        raise OSError(f"DAG files must not connect anywhere at import time (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    bag = DagBag(dag_folder=str(REPO / "dags"))

    assert bag.import_errors == {}
    assert contacted == []
    assert sorted(bag.dag_ids) == ["remote_ftp_processing", "remote_vm_execution"]
    ours = (RemoteCommandOperator, RemoteFileTransferOperator, RemoteFileSensor)
    for dag in bag.dags.values():
        for task in dag.tasks:
            cls = task.operator_class if isinstance(task, MappedOperator) else type(task)
            assert issubclass(cls, ours), f"{dag.dag_id}.{task.task_id} is a {cls}"
    vm = bag.dags["remote_vm_execution"]
    assert {k: vm.params[k] for k in ("vm1", "vm2", "vm3", "test_file", "received_file")} == {
        "vm1": "vm1", "vm2": "vm2", "vm3": "vm3",
        "test_file": "/tmp/test_file.txt", "received_file": "/tmp/received_file.txt"}
    ftp = bag.dags["remote_ftp_processing"]
    assert ftp.params["source_vm"] == "vm2" and ftp.params["dest_vm"] == "vm3"
    assert ftp.params["source_paths"] == ["/home/rocky/in/sample1.txt",
                                          "/home/rocky/bon/in/sample3.txt"]
    assert (ftp.params["poke_interval"], ftp.params["timeout"]) == (120, 3600)
    assert [t.task_id for t in ftp.topological_sort()] == [
        "wait_for_source_files", "transfer_files", "process_files"]


# ------------------------------------------------------------------------------ trigger

TRIGGER_KWARGS = {
    "name": "remote-vm-execution-check-all-vms-0123456789",
    "namespace": "ops",
    "kubernetes_conn_id": "kubernetes_default",
    "config_file": "/etc/kube/config",
    "cluster_context": "prod",
    "in_cluster": False,
    "watch_timeout_seconds": 120,
    "not_before": 1_800_000_000.5,
    "stream_output": True,
    "output_checkpoint_seconds": 5.0,
}


def test_trigger_serialize_round_trips():
    classpath, kwargs = RemoteCommandTrigger(**TRIGGER_KWARGS).serialize()
    assert classpath == "vmfleet.airflow.triggers.RemoteCommandTrigger"
    assert kwargs == TRIGGER_KWARGS
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)


def test_trigger_kwargs_survive_airflows_serde_as_the_triggerer_stores_them():
    from airflow.sdk.serde import deserialize, serialize

    classpath, kwargs = RemoteCommandTrigger(name="c", namespace="default").serialize()
    stored = json.loads(json.dumps(serialize(kwargs)))
    assert deserialize(stored) == kwargs
    assert RemoteCommandTrigger(**deserialize(stored)).serialize() == (classpath, kwargs)
    assert kwargs["kubernetes_conn_id"] is None  # no credentials, only names and paths


# ------------------------------------------------------------------------------ specs

def test_the_command_operator_builds_a_validated_spec():
    op = RemoteCommandOperator(
        task_id="t", vm="vm1", argv=["cat", "/tmp/a b"], env={"MODE": "fast"},
        timeout_seconds=30, command_retries={"limit": 2, "onExitCodes": [75]},
        success_exit_codes=[0, 1], output_max_bytes=1024, ttl_seconds_after_finished=3600,
    )
    assert op.validated_spec() == {
        "vm": "vm1", "argv": ["cat", "/tmp/a b"], "env": {"MODE": "fast"}, "timeoutSeconds": 30,
        "retries": {"limit": 2, "backoffSeconds": 60, "onExitCodes": [75]},
        "successExitCodes": [0, 1], "output": {"maxBytes": 1024},
        "ttlSecondsAfterFinished": 3600,
    }
    fanout = RemoteCommandOperator(task_id="f", selector={"matchLabels": {"role": "web"}},
                                   script="uptime\n", max_parallel=2)
    assert fanout.validated_spec()["selector"] == {"matchLabels": {"role": "web"}}
    assert RemoteCommandOperator(task_id="all", selector={}, command="true").validated_spec()[
        "selector"] == {}


def test_an_invalid_spec_fails_the_task_with_what_was_wrong():
    op = RemoteCommandOperator(task_id="t", vm="vm1", command="env", env={"1BAD": "x"})
    with pytest.raises(AirflowException, match="env name '1BAD' is invalid"):
        op.validated_spec()
    op = RemoteCommandOperator(task_id="u", vm="Not_A_Name", command="true")
    with pytest.raises(AirflowException, match="Task u builds an invalid RemoteCommand"):
        op.validated_spec()


@pytest.mark.parametrize("kwargs, message", [
    ({"command": "true"}, "exactly one target"),
    ({"vm": "a", "selector": {}, "command": "true"}, "exactly one target"),
    ({"vm": "a"}, "exactly one of command, argv or script"),
    ({"vm": "a", "command": "true", "script": "true"}, "exactly one of command, argv or script"),
])
def test_target_and_action_are_checked_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RemoteCommandOperator(task_id="t", **kwargs)


def test_the_transfer_operator_builds_the_api_transfer_shape():
    op = RemoteFileTransferOperator(
        task_id="copy", source_vm="vm1", source_path="/tmp/test_file.txt",
        dest_vm=["vm2", "vm3"], mode="0640", create_dirs=True, overwrite="IfDifferent",
        verify=True,
    )
    spec = op.validated_spec()
    assert spec["transfer"] == {
        "from": {"vm": "vm1", "path": "/tmp/test_file.txt"},
        "to": [{"vm": "vm2", "path": "/tmp/test_file.txt"}, {"vm": "vm3", "path": "/tmp/test_file.txt"}],
        "mode": "0640", "createDirs": True, "overwrite": "IfDifferent", "verify": True}
    assert "vm" not in spec and "selector" not in spec
    one = RemoteFileTransferOperator(task_id="c", source_vm="vm1", source_path="/a",
                                     dest_vm="vm2", dest_path="/b")
    assert one.validated_spec()["transfer"]["to"] == [{"vm": "vm2", "path": "/b"}]


# ------------------------------------------------------------------------------ sensor

def test_the_sensor_is_one_command_with_the_paths_as_arguments():
    sensor = RemoteFileSensor(task_id="s", vm="vm2", paths=["/in/a.txt", "/in/$(reboot).txt"],
                              poke_interval=120, timeout=3600)
    spec = sensor.validated_spec()
    assert spec["vm"] == "vm2"
    assert spec["argv"][:2] == ["sh", "-c"]
    assert spec["argv"][3:] == ["vmfleet-file-sensor", "120", "3600", "/in/a.txt", "/in/$(reboot).txt"]
    assert spec["timeoutSeconds"] == 3660
    with pytest.raises(ValueError, match="invalid path"):
        wait_argv(["/in/a\nb"], 1, 1)


def _run_wait_script(tmp_path: Path, paths: list[str], interval: int, timeout: int):
    return subprocess.run(wait_argv(paths, interval, timeout), capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)


def test_the_wait_script_returns_every_path_that_exists(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "c d.txt").write_text("y")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.txt", "c d.txt")]
    proc = _run_wait_script(tmp_path, paths, 1, 5)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [paths[0], paths[2]]


def test_the_wait_script_waits_for_a_file_then_gives_up_at_its_timeout(tmp_path):
    target = tmp_path / "late.txt"
    waiting = subprocess.Popen(wait_argv([str(target)], 1, 20), stdout=subprocess.PIPE, text=True)
    target.write_text("arrived")
    out, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and out == f"{target}\n"

    proc = _run_wait_script(tmp_path, [str(tmp_path / "never.txt")], 1, 1)
    assert proc.returncode == NOT_FOUND_EXIT_CODE
    assert "none of the 1 paths appeared within 1s" in proc.stderr


# ------------------------------------------------------------------------------ connection

def _kubeconfig(path: Path, contexts: dict[str, str]) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": next(iter(contexts)),
        "clusters": [{"name": n, "cluster": {"server": s}} for n, s in contexts.items()],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": n, "context": {"cluster": n, "user": "u"}} for n in contexts],
    }))
    return path


def test_config_file_and_cluster_context_choose_the_api_server(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = _kubeconfig(tmp_path / "kc", {"dev": "https://127.0.0.1:6443",
                                           "prod": "https://127.0.0.2:6443"})
    assert KubeSettings(config_file=str(config)).api_client().configuration.host == (
        "https://127.0.0.1:6443")
    prod = KubeSettings(config_file=str(config), cluster_context="prod").api_client()
    assert prod.configuration.host == "https://127.0.0.2:6443"
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert KubeSettings().api_client().configuration.host == "https://127.0.0.1:6443"


def test_an_airflow_connection_supplies_kubeconfig_context_and_namespace(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = _kubeconfig(tmp_path / "kc", {"dev": "https://127.0.0.1:6443",
                                           "prod": "https://127.0.0.2:6443"})
    monkeypatch.setenv("AIRFLOW_CONN_FLEET", json.dumps({"conn_type": "kubernetes", "extra": {
        "kube_config_path": str(config), "cluster_context": "prod", "namespace": "ops"}}))
    fleet = KubeSettings(kubernetes_conn_id="fleet")
    assert fleet.api_client().configuration.host == "https://127.0.0.2:6443"
    assert fleet.namespace(None) == "ops"
    assert fleet.namespace("explicit") == "explicit"
    # Explicit arguments win over the connection's extras.
    assert KubeSettings(kubernetes_conn_id="fleet", cluster_context="dev").api_client() \
        .configuration.host == "https://127.0.0.1:6443"
    # A missing kubernetes_default means the defaults (as in the provider); others are errors.
    assert KubeSettings(kubernetes_conn_id="kubernetes_default").namespace(None) == "default"
    with pytest.raises(Exception, match="isn't defined|not defined|not found"):
        KubeSettings(kubernetes_conn_id="missing").namespace(None)


def test_in_cluster_cannot_be_combined_with_a_kubeconfig(tmp_path):
    config = _kubeconfig(tmp_path / "kc", {"dev": "https://127.0.0.1:6443"})
    with pytest.raises(ValueError, match="in_cluster cannot be combined"):
        KubeSettings(in_cluster=True, config_file=str(config)).api_client()


# ------------------------------------------------------------------------------ results

FOUND = {"phase": "Succeeded", "results": [
    {"vm": "vm2", "phase": "Succeeded", "exitCode": 0, "reason": "Completed",
     "stdout": "/in/a.txt\n/in/c d.txt\n"}]}
NOT_FOUND = {"phase": "Failed", "results": [
    {"vm": "vm2", "phase": "Failed", "exitCode": NOT_FOUND_EXIT_CODE, "reason": "ExitCode",
     "stderr": "none of the 2 paths appeared within 60s\n"}]}


def test_the_sensor_returns_the_files_found_and_times_out_with_airflows_exception():
    from airflow.sdk.exceptions import AirflowSensorTimeout

    sensor = RemoteFileSensor(task_id="s", vm="vm2", paths=["/in/a.txt", "/in/c d.txt"],
                              poke_interval=5, timeout=60)
    assert sensor.finish("ops", "s", FOUND) == ["/in/a.txt", "/in/c d.txt"]
    with pytest.raises(AirflowSensorTimeout, match=r"appeared on vm2 within 60 s"):
        sensor.finish("ops", "s", NOT_FOUND)


def test_the_trigger_event_becomes_the_tasks_result_or_failure():
    op = RemoteCommandOperator(task_id="t", vm="vm2", command="ls /in")
    event = {"event": "finished", "name": "c", "namespace": "ops", "phase": "Succeeded",
             "command_status": FOUND}
    result = op.execute_complete({}, event)
    assert result["vm2"]["stdout"] == "/in/a.txt\n/in/c d.txt\n"
    assert result["vm2"]["success"] is True
    failed = {**event, "phase": "Failed", "command_status": NOT_FOUND}
    with pytest.raises(AirflowException, match=r"(?s)on vm2: ExitCode \(exit code 99\).*appeared within"):
        op.execute_complete({}, failed)
    with pytest.raises(AirflowException, match="was deleted before it finished"):
        op.execute_complete({}, {"event": "deleted", "name": "c", "namespace": "ops"})


def test_the_transfer_operator_returns_where_the_file_went():
    op = RemoteFileTransferOperator(task_id="c", source_vm="vm2", source_path="/in/a.txt",
                                    dest_vm="vm3")
    status = {"phase": "Succeeded", "results": [{"vm": "vm3", "phase": "Succeeded",
                                                 "reason": "Completed"}]}
    out = op.finish("ops", "c", status)
    assert out["from"] == {"vm": "vm2", "path": "/in/a.txt"}
    assert out["to"] == [{"vm": "vm3", "path": "/in/a.txt"}]
    assert out["results"]["vm3"]["success"] is True


def test_importing_the_operators_loads_no_kopf():
    code = ("import sys; import vmfleet.airflow as m; m.RemoteCommandOperator; m.RemoteFileSensor; "
            "import dags.remote_ftp_processing; print(sorted(n for n in sys.modules if n == 'kopf' "
            "or n.startswith('kopf.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
