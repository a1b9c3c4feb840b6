"""vmfleet registered as an Airflow provider: what `airflow providers ...` prints from the
interpreter that has Airflow (.venv-airflow), with a throwaway AIRFLOW_HOME."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("airflow") is None,
    reason="Apache Airflow is not installed in this interpreter (make airflow-venv)",
)


def run_python(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname"})
    proc = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def airflow_cli(tmp_path: Path, *args: str) -> str:
    return run_python(tmp_path, "-m", "airflow", *args)


def test_airflow_lists_vmfleet_among_its_providers(tmp_path):
    listed = json.loads(airflow_cli(tmp_path, "providers", "list", "-o", "json"))
    by_name = {p["package_name"]: p for p in listed}
    from importlib.metadata import version

    assert by_name["vmfleet"]["version"] == version("vmfleet")
    # The connection type vmfleet uses comes from the cncf-kubernetes provider.
    assert "apache-airflow-providers-cncf-kubernetes" in by_name


def test_providers_get_shows_the_operators_sensor_trigger_and_hook(tmp_path):
    (info,) = json.loads(airflow_cli(tmp_path, "providers", "get", "vmfleet", "--full", "-o", "json"))
    modules = {kind: [m for entry in info[kind] for m in entry["python-modules"]]
               for kind in ("operators", "sensors", "triggers", "hooks")}
    assert modules == {"operators": ["vmfleet.airflow.operators"],
                       "sensors": ["vmfleet.airflow.sensors"],
                       "triggers": ["vmfleet.airflow.triggers"],
                       "hooks": ["vmfleet.airflow.hooks"]}
    # Every module named there imports, and holds what the README says it does.
    code = ("from vmfleet.airflow import hooks, operators, sensors, triggers; "
            "print(operators.RemoteCommandOperator.__name__, operators.RemoteFileTransferOperator"
            ".__name__, sensors.RemoteFileSensor.__name__, triggers.RemoteCommandTrigger.__name__, "
            "hooks.VmfleetHook.conn_type)")
    assert run_python(tmp_path, "-c", code).split() == [
        "RemoteCommandOperator", "RemoteFileTransferOperator", "RemoteFileSensor",
        "RemoteCommandTrigger", "kubernetes"]


def test_the_trigger_is_listed_and_the_kubernetes_connection_type_is_registered(tmp_path):
    triggers = json.loads(airflow_cli(tmp_path, "providers", "triggers", "-o", "json"))
    assert {"package_name": "vmfleet", "class": "vmfleet.airflow.triggers",
            "integration_name": "vmfleet"}.items() <= next(
        t for t in triggers if t["package_name"] == "vmfleet").items()
    hooks = json.loads(airflow_cli(tmp_path, "providers", "hooks", "-o", "json"))
    (kube,) = [h for h in hooks if h["connection_type"] == "kubernetes"]
    assert kube["conn_id_attribute_name"] == "kubernetes_conn_id"
