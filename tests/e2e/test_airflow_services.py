"""Airflow 3 as users run it, against the local environment: a scheduler (LocalExecutor),
a dag-processor, a triggerer and an API server from ``.venv-airflow``, on loopback, with
their own ``AIRFLOW_HOME`` and SQLite database in a temporary directory. The DAGs folder
is the repository's ``dags/``; the tests' own DAGs are a second bundle
(``tests/e2e/airflow_dags``). The tests drive Airflow only through its REST API
(``/api/v2``, a token from the simple auth manager), as a user or a CI system would, and
compare what Airflow says with the RemoteCommands and the VMs.

``kubernetes_default`` (type ``kubernetes``) points at one namespace of the local control
plane for the whole module. Parallelism is 4 task slots: 20 tasks deferred at once hold
none of them. The module runs a controller of its own (namespaces ``af-*``) with the output
store and the output API (``logs.vmfleet.io`` behind its APIService), so that deferred
tasks show their commands' output in the task log, as shipped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import REPO, Kubectl, Namespace, assert_no_tracebacks, logs_api_controller, unique_namespace
from vmfleet.airflow.naming import ANNOTATION_OUTPUT_POSITION
from vmfleet.dev.airflow import AirflowApi, AirflowServices, kubernetes_connection
from vmfleet.dev.brokers import RedisServer
from vmfleet.dev.proc import ManagedProcess, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("airflow") is None,
        reason="Apache Airflow is not installed in this interpreter: run `make airflow-venv` "
        "(`make test` runs these tests from .venv-airflow)",
    ),
]

PARALLELISM = 4
TEST_DAGS = REPO / "tests" / "e2e" / "airflow_dags"


@dataclass
class Airflow:
    services: AirflowServices
    ns: Namespace

    @property
    def api(self) -> AirflowApi:
        return self.services.api

    @property
    def home(self) -> Path:
        return self.services.home

    def restart_triggerer(self, sig: int) -> None:
        """Stop the triggerer with ``sig`` (TERM: gracefully; KILL: no cleanup at all)."""
        proc = self.services.procs["triggerer"]
        if sig == signal.SIGTERM:
            proc.stop(grace=30)
        else:
            proc.signal(sig)
            wait_until(lambda: not proc.running(), timeout=30, what="the triggerer to die")

    def start_triggerer(self) -> None:
        self.services.start_component("triggerer")

    def check_running(self) -> None:
        self.services.check_running()

    def commands(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.ns.kubectl.get_json(
            "-n", str(self.ns), "remotecommands")["items"]
        return items

    def commands_of(self, dag_id: str) -> list[dict[str, Any]]:
        return [c for c in self.commands()
                if c["metadata"].get("annotations", {}).get("airflow.vmfleet.io/dag-id") == dag_id]


PREFIX = "af"


@pytest.fixture(scope="module")
def controller_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("af-controller")


@pytest.fixture(scope="module")
def controller(controlplane, redis_server, crds, output: RedisServer,  # type: ignore[no-untyped-def]
               controller_dir: Path) -> Iterator[ManagedProcess]:
    """This module's controller: namespaces ``af-*``, the output store and the output API."""
    with logs_api_controller(controlplane, redis_server.url, output.url, controller_dir, [f"{PREFIX}-*"],
                             "e2e-airflow") as proc:
        yield proc


@pytest.fixture(scope="module")
def airflow_ns(kubectl: Kubectl, controller: ManagedProcess, vms) -> Iterator[Namespace]:  # type: ignore[no-untyped-def]
    namespace = Namespace(kubectl, unique_namespace(PREFIX)).create()
    # 20 commands wait on vm1 at once (the restart test): room for all of them.
    namespace.add_vms(vms, maxConcurrentCommands=32)
    yield namespace
    controller.check_running()
    namespace.delete()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, airflow_ns: Namespace,
            kubeconfig: Path) -> Iterator[Airflow]:
    services = AirflowServices(
        tmp_path_factory.mktemp("airflow-services"), Path(sys.executable).parent, REPO / "dags",
        extra_bundles={"vmfleet-e2e": TEST_DAGS}, parallelism=PARALLELISM,
        env={"AIRFLOW_CONN_KUBERNETES_DEFAULT": kubernetes_connection(kubeconfig, str(airflow_ns))},
    )
    try:
        services.start(dag_ids=("remote_vm_execution", "remote_ftp_processing",
                                "vmfleet_e2e_many_deferred", "vmfleet_e2e_cancel",
                                "vmfleet_e2e_output"))
        yield Airflow(services, airflow_ns)
    finally:
        services.stop()


@pytest.fixture
def workdir(vms) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh directory, same path on every VM, for one test's files."""
    path = f"/tmp/vmfleet-e2e-{uuid.uuid4().hex[:8]}"
    for vm in vms:
        vm.host_path(path).mkdir(parents=True)
    yield path


def test_remote_vm_execution_runs_as_services_and_xcom_holds_each_vms_result(
    airflow: Airflow, vms, workdir: str, controller_dir: Path
):
    api = airflow.api
    conf = {"test_file": f"{workdir}/test_file.txt", "received_file": f"{workdir}/received.txt"}

    run_id = api.trigger("remote_vm_execution", conf)
    assert api.wait_run("remote_vm_execution", run_id) == "success", api.states(
        "remote_vm_execution", run_id)

    tis = api.task_instances("remote_vm_execution", run_id)
    assert len(tis) == 12  # 1 + 3 + 3 mapped + 3 + 2 mapped
    assert {ti["state"] for ti in tis.values()} == {"success"}
    assert {ti["try_number"] for ti in tis.values()} == {1}
    health = api.xcom("remote_vm_execution", run_id, "check_all_vms")
    assert sorted(health) == ["vm1", "vm2", "vm3"]
    for vm in vms:
        assert health[vm.name]["host"] == vm.host and health[vm.name]["exit_code"] == 0
        assert health[vm.name]["stdout"].startswith(vm.run("hostname")[1].decode())
    parallel = [api.xcom("remote_vm_execution", run_id, "parallel_run", i) for i in range(3)]
    assert [sorted(p) for p in parallel] == [["vm1"], ["vm2"], ["vm3"]]
    assert parallel[2]["vm3"]["stdout"].strip().isdigit()
    verify = api.xcom("remote_vm_execution", run_id, "file_transfer_test.verify")["vm2"]
    assert verify["stdout"].startswith("test content ")
    for vm in vms[:2]:  # cleaned up
        assert not vm.host_path(conf["test_file"]).exists()
        assert not vm.host_path(conf["received_file"]).exists()
    # One RemoteCommand per task instance, each Succeeded, results as XCom has them.
    objs = [c for c in airflow.commands_of("remote_vm_execution")
            if c["metadata"]["annotations"]["airflow.vmfleet.io/run-id"] == run_id]
    assert [c["status"]["phase"] for c in objs] == ["Succeeded"] * 12
    (health_obj,) = [c for c in objs
                     if c["metadata"]["annotations"]["airflow.vmfleet.io/task-id"] == "check_all_vms"]
    assert {r["vm"]: r["stdout"] for r in health_obj["status"]["results"]} == {
        vm: r["stdout"] for vm, r in health.items()}
    airflow.check_running()
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


PROCESSOR = """\
import pathlib, sys
src = pathlib.Path(sys.argv[1])
out = src.with_name(src.name + ".processed")
out.write_text("processed by simple_file_manager: " + src.read_text().upper())
print(f"wrote {out}")
"""


def test_remote_ftp_processing_sensor_defers_until_the_files_appear(
    airflow: Airflow, vms, workdir: str, controller_dir: Path
):
    api, dag = airflow.api, "remote_ftp_processing"
    vm2, vm3 = vms[1], vms[2]
    sources = [f"{workdir}/in/sample1.txt", f"{workdir}/bon/in/sample3.txt",
               f"{workdir}/in/never-arrives.txt"]
    vm3.host_path(f"{workdir}/scripts/simple_file_manager.py").parent.mkdir(parents=True)
    vm3.host_path(f"{workdir}/scripts/simple_file_manager.py").write_text(PROCESSOR)

    run_id = api.trigger(dag, {"source_paths": sources, "poke_interval": 1, "timeout": 120,
                               "processor": f"python3 {workdir}/scripts/simple_file_manager.py"})
    # The sensor waits in the triggerer: deferred, with a trigger held by a triggerer job.
    sensor = wait_until(
        lambda: (ti := api.task_instances(dag, run_id).get("wait_for_source_files[-1]"))
        and ti["state"] == "deferred" and ti["triggerer_job"] and ti, timeout=300, interval=1,
        what="the sensor to be deferred, its trigger taken by a triggerer")
    assert sensor["trigger"]["classpath"] == "vmfleet.airflow.triggers.RemoteCommandTrigger"
    assert sensor["triggerer_job"]["job_type"] == "TriggererJob"
    assert api.run_state(dag, run_id) == "running"
    for path, text in ((sources[0], "first sample\n"), (sources[1], "third sample\n")):
        vm2.host_path(path).parent.mkdir(parents=True, exist_ok=True)
        vm2.host_path(path).write_text(text)

    assert api.wait_run(dag, run_id) == "success", api.states(dag, run_id)
    assert api.xcom(dag, run_id, "wait_for_source_files") == sources[:2]
    assert api.states(dag, run_id) == {
        "wait_for_source_files[-1]": "success", "transfer_files[0]": "success",
        "transfer_files[1]": "success", "process_files[0]": "success", "process_files[1]": "success"}
    moved = [api.xcom(dag, run_id, "transfer_files", i) for i in range(2)]
    assert [m["to"] for m in moved] == [[{"vm": "vm3", "path": p}] for p in sources[:2]]
    for path, text in ((sources[0], "first sample\n"), (sources[1], "third sample\n")):
        assert vm3.host_path(path).read_text() == text
        assert vm3.host_path(path + ".processed").read_text() == (
            "processed by simple_file_manager: " + text.upper())
    airflow.check_running()
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


def _deferred(api: AirflowApi, dag: str, run_id: str, count: int) -> dict[str, dict[str, Any]] | None:
    tis = api.task_instances(dag, run_id)
    waiting = {k: ti for k, ti in tis.items() if ti["state"] == "deferred"}
    return waiting if len(waiting) == count else None


def _triggerer_ids(tis: dict[str, dict[str, Any]]) -> set[int | None]:
    return {(ti.get("trigger") or {}).get("triggerer_id") for ti in tis.values()}


def test_twenty_deferred_tasks_survive_a_triggerer_restart_and_a_sigkill_exactly_once(
    airflow: Airflow, vms, workdir: str, controller_dir: Path
):
    api, dag, n = airflow.api, "vmfleet_e2e_many_deferred", 20
    vm1 = vms[0]
    run_id = api.trigger(dag, {"dir": workdir})

    # All 20 wait at once with 4 task slots: deferred tasks hold no slot. A trigger
    # is created with the deferral and taken by the triggerer a moment later.
    tis = wait_until(lambda: (t := _deferred(api, dag, run_id, n)) and None not in _triggerer_ids(t)
                     and t, timeout=240, interval=1,
                     what=f"{n} tasks to be deferred at once, their triggers taken by a triggerer")
    assert n > PARALLELISM
    first_triggerer = _triggerer_ids(tis)
    assert len(first_triggerer) == 1
    wait_until(lambda: all(vm1.host_path(f"{workdir}/{i}.count").exists() for i in range(n)),
               timeout=120, what="every command to start on vm1")
    names = sorted(c["metadata"]["name"] for c in airflow.commands_of(dag))
    assert len(names) == n

    # A graceful restart moves the triggers: nothing is deleted, nothing runs again.
    airflow.restart_triggerer(signal.SIGTERM)
    airflow.start_triggerer()
    moved = wait_until(lambda: (t := _deferred(api, dag, run_id, n)) and None not in _triggerer_ids(t)
                       and _triggerer_ids(t) != first_triggerer and t,
                       timeout=120, interval=1, what="the triggers to move to the new triggerer")
    assert len(_triggerer_ids(moved)) == 1
    assert sorted(c["metadata"]["name"] for c in airflow.commands_of(dag)) == names

    # SIGKILL: no cleanup at all. The commands finish while no triggerer runs.
    airflow.restart_triggerer(signal.SIGKILL)
    vm1.host_path(f"{workdir}/go").write_text("")
    wait_until(lambda: all(c.get("status", {}).get("phase") == "Succeeded" for c in airflow.commands_of(dag)),
               timeout=120, interval=1, what="every RemoteCommand to succeed")
    assert set(api.states(dag, run_id).values()) == {"deferred"}
    airflow.start_triggerer()

    assert api.wait_run(dag, run_id) == "success", api.states(dag, run_id)
    tis = api.task_instances(dag, run_id)
    assert {ti["state"] for ti in tis.values()} == {"success"}
    assert {ti["try_number"] for ti in tis.values()} == {1}  # finished once: no retry, no clear
    for i in range(n):
        assert vm1.host_path(f"{workdir}/{i}.count").read_text() == "started\n"  # ran once
        assert api.xcom(dag, run_id, "wait", i)["vm1"]["stdout"] == f"done {i}\n"
    assert sorted(c["metadata"]["name"] for c in airflow.commands_of(dag)) == names  # none twice
    airflow.check_running()
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


def test_marking_a_deferred_task_failed_or_clearing_it_deletes_its_command_and_remote_process(
    airflow: Airflow, vms, workdir: str, controller_dir: Path
):
    api, dag = airflow.api, "vmfleet_e2e_cancel"
    on = {"marked_failed": vms[0], "cleared": vms[1]}  # cleared's try 2 runs on vm3
    run_id = api.trigger(dag, {"dir": workdir})
    wait_until(lambda: _deferred(api, dag, run_id, 2), timeout=180, interval=1,
               what="both tasks to be deferred")

    def pid_of(task: str, try_number: int) -> str:
        vm = vms[2] if try_number == 2 else on[task]
        path = vm.host_path(f"{workdir}/{task}-{try_number}.pid")
        return wait_until(lambda: path.exists() and path.read_text().strip(), timeout=60,
                          what=f"{task} try {try_number} to start on {vm.name}")

    def alive(task: str, pid: str) -> bool:
        return on[task].run(f"kill -0 {pid}")[0] == 0

    pids = {task: pid_of(task, 1) for task in on}
    assert all(alive(task, pid) for task, pid in pids.items())
    objs = {c["metadata"]["annotations"]["airflow.vmfleet.io/task-id"]: c["metadata"]["name"]
            for c in airflow.commands_of(dag)}
    assert sorted(objs) == ["cleared", "marked_failed"]

    api.patch(f"/dags/{dag}/dagRuns/{run_id}/taskInstances/marked_failed", {"new_state": "failed"})
    api.post(f"/dags/{dag}/clearTaskInstances",
             {"dag_run_id": run_id, "task_ids": ["cleared"], "dry_run": False, "only_failed": False})

    for task, pid in pids.items():
        wait_until(lambda t=task, p=pid: not alive(t, p), timeout=60,
                   what=f"the remote process of {task} to be gone")
        wait_until(lambda t=task: airflow.ns.k("get", "remotecommand", objs[t], check=False).returncode != 0,
                   timeout=60, what=f"the RemoteCommand of {task} to be deleted")
    # The cleared task runs again as try 2, with a RemoteCommand of its own.
    pid_of("cleared", 2)
    wait_until(lambda: (ti := api.task_instances(dag, run_id)["cleared[-1]"])["state"] == "deferred"
               and ti["try_number"] == 2, timeout=120, interval=1, what="try 2 to be deferred")
    for vm in vms:
        vm.host_path(f"{workdir}/go").write_text("")
    assert api.wait_run(dag, run_id) == "failed"  # marked_failed stays failed
    assert api.states(dag, run_id) == {"marked_failed[-1]": "failed", "cleared[-1]": "success"}
    assert api.xcom(dag, run_id, "cleared")["vm3"]["stdout"] == "try 2 done\n"
    assert not on["marked_failed"].host_path(f"{workdir}/marked_failed-2.pid").exists()
    remaining = {c["metadata"]["name"] for c in airflow.commands_of(dag)}
    assert remaining.isdisjoint(objs.values()) and len(remaining) == 1
    airflow.check_running()
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


def _output_lines(api: AirflowApi, dag: str, run_id: str, task: str) -> list[str]:
    """The task log's lines that show the command's output (``[vm1] …``), in order."""
    return [str(e.get("event")) for e in api.task_log(dag, run_id, task)
            if str(e.get("event", "")).startswith("[vm")]


def test_a_deferred_tasks_log_shows_the_output_as_it_comes_and_loses_none_over_a_triggerer_kill(
    airflow: Airflow, vms, workdir: str, controller_dir: Path
):
    api, dag, vm1 = airflow.api, "vmfleet_e2e_output", vms[0]
    run_id = api.trigger(dag, {"dir": workdir})
    wait_until(lambda: (t := _deferred(api, dag, run_id, 1)) and None not in _triggerer_ids(t),
               timeout=240, interval=1, what="the task to be deferred, its trigger taken by a triggerer")
    first_part = [f"[vm1] line {i}" for i in range(1, 6)] + ["[vm1 stderr] warning after 5"]

    # While the task is deferred (no worker slot), its log already holds the first lines.
    wait_until(lambda: set(first_part) <= set(_output_lines(api, dag, run_id, "print")),
               timeout=60, interval=0.5, what="the first lines in the deferred task's log")
    assert api.states(dag, run_id) == {"print[-1]": "deferred"}
    assert _output_lines(api, dag, run_id, "print")[:6] == first_part  # in order, once each
    (obj,) = airflow.commands_of(dag)
    assert ANNOTATION_OUTPUT_POSITION in obj["metadata"]["annotations"]  # the read position

    # SIGKILL: no cleanup at all; the next part prints while no triggerer runs.
    airflow.restart_triggerer(signal.SIGKILL)
    vm1.host_path(f"{workdir}/go1").write_text("")
    airflow.start_triggerer()
    wait_until(lambda: "[vm1] line 10" in _output_lines(api, dag, run_id, "print"), timeout=180,
               interval=1, what="the lines printed while no triggerer ran to reach the task log")
    vm1.host_path(f"{workdir}/go2").write_text("")
    assert api.wait_run(dag, run_id) == "success", api.states(dag, run_id)

    shown = _output_lines(api, dag, run_id, "print")
    if os.environ.get("VMFLEET_TEST_DAG_LOGS"):  # the task log as the UI shows it
        for entry in api.task_log(dag, run_id, "print"):
            print(entry.get("timestamp"), entry.get("event"))
    expected = [f"[vm1] line {i}" for i in range(1, 16)] + ["[vm1 stderr] warning after 5"]
    plain = [line for line in shown if "(repeat) " not in line]
    repeats = [line.replace("(repeat) ", "") for line in shown if "(repeat) " in line]
    # No line lost, none shown twice without the mark; the restarted trigger showed
    # again, marked, what the killed one may have shown; the task showed the last lines
    # again, marked (the triggerer may not have written them before the task resumed).
    assert sorted(set(plain) | set(repeats)) == sorted(expected), shown
    assert sorted(plain) == sorted(set(plain)), shown
    assert set(repeats) & set(first_part), shown
    assert shown[-1] == "[vm1] (repeat) line 15", shown
    assert [x for x in plain if x.startswith("[vm1] ")] == [  # in order
        x for x in expected if x.startswith("[vm1] ") and x in plain]
    events = [str(e.get("event")) for e in api.task_log(dag, run_id, "print")]
    assert "The output is above, shown while the task was deferred" in events
    assert not any(e.startswith("vm1 stdout:") for e in events)  # not logged a second time
    assert api.xcom(dag, run_id, "print")["vm1"]["stdout"].endswith("line 15\n")
    airflow.check_running()
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")
