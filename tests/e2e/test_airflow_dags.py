"""Real Airflow 3 (``dag.test()``) against the local environment: real kube-apiserver,
real sshd VMs, real Redis and the real controller.

Each DAG run happens in its own process (as an Airflow worker would run it) with its
own ``AIRFLOW_HOME`` and sqlite metadata DB from a temporary directory, and reaches the
cluster through an Airflow connection (``AIRFLOW_CONN_KUBERNETES_DEFAULT``) or through
the operators' ``config_file=`` / ``namespace=`` arguments.

Airflow lives in its own virtualenv (``make airflow-venv``: ``.venv-airflow``) so that
its dependency pins cannot break the main one; these tests run from that interpreter
(``make test`` does it) and skip elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import REPO, Namespace, assert_no_tracebacks
from vmfleet.dev.proc import ManagedProcess, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("airflow") is None,
        reason="Apache Airflow is not installed in this interpreter: run `make airflow-venv`, "
        "then `.venv-airflow/bin/python -m pytest tests/e2e/test_airflow_dags.py` "
        "(`make test` runs them from .venv-airflow)",
    ),
]

# Runs one DAG with dag.test() and prints its outcome on the last line.
RUNNER = textwrap.dedent("""
    import json, sys
    from datetime import datetime
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag_file, dag_id, logical_date, conf = sys.argv[1:5]
    bag = DagBag(dag_folder=dag_file)
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
    # run_after fixes the run id (manual__<run_after>): a re-run is the same task try.
    when = datetime.fromisoformat(logical_date)
    dr = dag.test(logical_date=when, run_after=when, run_conf=json.loads(conf))
    with create_session() as session:
        tis = {f"{ti.task_id}[{ti.map_index}]": str(ti.state)
               for ti in dr.get_task_instances(session=session)}
        xcoms = {f"{x.task_id}[{x.map_index}]": x.value for x in session.query(XComModel).filter(
            XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id,
            XComModel.key == "return_value")}
    print("DAGRUN-RESULT " + json.dumps({"state": str(dr.state), "run_id": dr.run_id,
                                         "tasks": tis, "xcoms": xcoms}, default=str))
""")


@dataclass
class DagRun:
    state: str
    run_id: str
    tasks: dict[str, str]
    xcoms: dict[str, Any]
    log: str

    def xcom(self, task: str) -> Any:
        value = self.xcoms[task]
        return json.loads(value) if isinstance(value, str) else value


@dataclass
class AirflowEnv:
    home: Path
    dags: Path
    env: dict[str, str]

    def for_namespace(self, ns: Namespace, kubeconfig: Path) -> dict[str, str]:
        """The environment of a DAG run whose ``kubernetes_default`` connection points at
        ``ns`` in the local control plane."""
        conn = {"conn_type": "kubernetes",
                "extra": {"kube_config_path": str(kubeconfig), "namespace": str(ns)}}
        return {**self.env, "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(conn)}

    def write_dag(self, name: str, text: str) -> Path:
        path = self.dags / f"{name}.py"
        path.write_text(textwrap.dedent(text))
        return path

    def argv(self, dag_file: Path, dag_id: str, logical_date: str, conf: dict[str, Any]) -> list[str]:
        return [sys.executable, "-c", RUNNER, str(dag_file), dag_id, logical_date, json.dumps(conf)]

    def run(self, env: dict[str, str], dag_file: Path, dag_id: str, conf: dict[str, Any] | None = None,
            logical_date: str | None = None, timeout: float = 240) -> DagRun:
        logical_date = logical_date or _new_logical_date()
        proc = subprocess.run(
            self.argv(dag_file, dag_id, logical_date, conf or {}), env=env, cwd=REPO,
            capture_output=True, text=True, timeout=timeout,
        )
        return dag_run_result(dag_id, proc.returncode, proc.stdout + proc.stderr)


def dag_run_result(dag_id: str, returncode: int | None, log: str) -> DagRun:
    """The outcome the RUNNER printed on its last line."""
    if os.environ.get("VMFLEET_TEST_DAG_LOGS"):
        print(log)
    lines = [ln for ln in log.splitlines() if ln.startswith("DAGRUN-RESULT ")]
    assert returncode == 0 and lines, f"dag.test() of {dag_id} crashed:\n{log[-6000:]}"
    result = json.loads(lines[-1].removeprefix("DAGRUN-RESULT "))
    return DagRun(log=log, **result)


_dates = iter(range(1, 86_400))


def _new_logical_date() -> str:
    # Distinct logical dates: dag.test() replaces an earlier run of the same date.
    n = next(_dates)
    return f"2026-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}+00:00"


@pytest.fixture(scope="session")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> AirflowEnv:
    """AIRFLOW_HOME with a migrated sqlite DB, and a DAGs folder with the project's DAGs."""
    home = tmp_path_factory.mktemp("airflow-home")
    dags = home / "dags"
    dags.mkdir()
    for dag_file in (REPO / "dags").glob("*.py"):
        (dags / dag_file.name).symlink_to(dag_file)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") and k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        # The default (getfqdn) waits for DNS, which this machine does not have.
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        # Nothing in these runs may reach beyond the machine.
        "NO_PROXY": "*",
    })
    proc = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout}\n{proc.stderr}"
    return AirflowEnv(home=home, dags=dags, env=env)


def commands_in(ns: Namespace) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = ns.kubectl.get_json("-n", str(ns), "remotecommands")["items"]
    return items


def test_remote_vm_execution_dag_succeeds(airflow: AirflowEnv, ns: Namespace, vms, kubeconfig,
                                          controller_dir):
    ns.add_vms(vms)
    run = airflow.run(airflow.for_namespace(ns, kubeconfig), airflow.dags / "remote_vm_execution.py",
                      "remote_vm_execution")

    assert run.state == "success", run.log[-6000:]
    assert set(run.tasks.values()) == {"success"}, run.tasks
    assert len(run.tasks) == 12  # 1 + 3 + 3 mapped + 3 + 2 mapped
    health = run.xcom("check_all_vms[-1]")
    assert sorted(health) == ["vm1", "vm2", "vm3"]
    for vm in vms:
        assert health[vm.name]["success"] is True
        assert health[vm.name]["host"] == vm.host
        assert health[vm.name]["stdout"].startswith(vm.run("hostname")[1].decode())
    parallel = [run.xcom(f"parallel_run[{i}]") for i in range(3)]
    assert [sorted(p) for p in parallel] == [["vm1"], ["vm2"], ["vm3"]]
    assert parallel[2]["vm3"]["stdout"].strip().isdigit()
    verify = run.xcom("file_transfer_test.verify[-1]")["vm2"]
    assert verify["stdout"].startswith("test content ")
    # Cleaned up on both VMs.
    for vm in vms[:2]:
        assert not vm.host_path("/tmp/test_file.txt").exists()
        assert not vm.host_path("/tmp/received_file.txt").exists()
    # One RemoteCommand per task instance, all Succeeded.
    phases = [c["status"]["phase"] for c in commands_in(ns)
              if c["metadata"].get("labels", {}).get("vmfleet.io/created-by") == "airflow"]
    assert phases == ["Succeeded"] * 12
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


PROCESSOR = """\
import pathlib, sys
src = pathlib.Path(sys.argv[1])
out = src.with_name(src.name + ".processed")
out.write_text("processed by simple_file_manager: " + src.read_text().upper())
print(f"wrote {out}")
"""


def test_remote_ftp_processing_dag_writes_processed_files_on_vm3(
    airflow: AirflowEnv, ns: Namespace, vms, kubeconfig, controller_dir
):
    ns.add_vms(vms)
    vm2, vm3 = vms[1], vms[2]
    sources = ["/tmp/in/sample1.txt", "/tmp/bon/in/sample3.txt", "/tmp/in/never-arrives.txt"]
    for path, text in ((sources[0], "first sample\n"), (sources[1], "third sample\n")):
        vm2.host_path(path).parent.mkdir(parents=True, exist_ok=True)
        vm2.host_path(path).write_text(text)
    script = vm3.host_path("/tmp/scripts/simple_file_manager.py")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(PROCESSOR)

    run = airflow.run(
        airflow.for_namespace(ns, kubeconfig), airflow.dags / "remote_ftp_processing.py",
        "remote_ftp_processing",
        conf={"source_paths": sources, "poke_interval": 2, "timeout": 60,
              "processor": "python3 /tmp/scripts/simple_file_manager.py"},
    )

    assert run.state == "success", run.log[-6000:]
    assert run.xcom("wait_for_source_files[-1]") == sources[:2]
    assert set(run.tasks) == {"wait_for_source_files[-1]", "transfer_files[0]", "transfer_files[1]",
                              "process_files[0]", "process_files[1]"}
    assert set(run.tasks.values()) == {"success"}
    for path, text in ((sources[0], "FIRST SAMPLE\n"), (sources[1], "THIRD SAMPLE\n")):
        assert vm3.host_path(path).read_text() == text.lower()
        assert vm3.host_path(path + ".processed").read_text() == (
            "processed by simple_file_manager: " + text)
    assert not vm2.host_path(sources[0] + ".processed").exists()
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


def _single_task_dag(airflow: AirflowEnv, dag_id: str, ns: Namespace, kubeconfig: Path,
                     command: str) -> Path:
    return airflow.write_dag(dag_id, f"""
        from datetime import datetime
        from airflow.sdk import DAG
        from vmfleet.airflow import RemoteCommandOperator

        with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2024, 5, 1),
                 default_args={{"retries": 0}}):
            remote = RemoteCommandOperator(
                task_id="remote", vm="vm1", command={command!r},
                config_file={str(kubeconfig)!r}, namespace={str(ns)!r}, defer_after_seconds=0,
            )
            after = RemoteCommandOperator(
                task_id="after", vm="vm1", command="echo after >> /tmp/after-{dag_id}.txt",
                config_file={str(kubeconfig)!r}, namespace={str(ns)!r},
            )
            remote >> after
        """)


def test_a_failing_command_fails_its_task_with_the_remote_stderr(
    airflow: AirflowEnv, ns: Namespace, vms, kubeconfig, controller_dir
):
    ns.add_vms(vms[:1])
    dag_id = f"fails_{uuid.uuid4().hex[:6]}"
    dag_file = _single_task_dag(airflow, dag_id, ns, kubeconfig,
                                "echo checking; echo 'disk check failed: /data is full' >&2; exit 3")

    run = airflow.run(airflow.env, dag_file, dag_id)

    assert run.state == "failed"
    assert run.tasks == {"remote[-1]": "failed", "after[-1]": "upstream_failed"}
    assert "disk check failed: /data is full" in run.log
    assert "on vm1: ExitCode (exit code 3)" in run.log
    assert not vms[0].host_path(f"/tmp/after-{dag_id}.txt").exists()
    (obj,) = commands_in(ns)
    assert obj["status"]["phase"] == "Failed"
    assert obj["status"]["results"][0]["exitCode"] == 3
    assert obj["metadata"]["annotations"]["airflow.vmfleet.io/task-id"] == "remote"
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


@pytest.fixture
def killed_runs() -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for proc in started:
        proc.stop(grace=5)


def test_a_task_restarted_within_its_try_reattaches_instead_of_running_again(
    airflow: AirflowEnv, ns: Namespace, vms, kubeconfig, controller_dir, tmp_path,
    killed_runs: list[ManagedProcess],
):
    vm1 = vms[0]
    ns.add_vms(vms[:1])
    tag = uuid.uuid4().hex[:6]
    counter, go = f"/tmp/reattach-{tag}.count", f"/tmp/reattach-{tag}.go"
    dag_id = f"reattach_{tag}"
    # Counts its executions on the VM, then waits until the test lets it finish.
    dag_file = _single_task_dag(
        airflow, dag_id, ns, kubeconfig,
        f"echo started >> {counter}; while [ ! -e {go} ]; do sleep 0.2; done; echo finished")
    logical_date = _new_logical_date()
    argv = airflow.argv(dag_file, dag_id, logical_date, {})

    # First worker: creates the RemoteCommand, then dies while the command runs.
    first = ManagedProcess("dag-test-1", argv, tmp_path / "first.log", env=airflow.env, cwd=REPO)
    killed_runs.append(first.start())

    def running() -> bool:
        items = commands_in(ns)
        return bool(items) and any(r.get("phase") == "Running"
                                   for r in items[0].get("status", {}).get("results") or [])

    wait_until(running, timeout=90, what="the first run's RemoteCommand to be Running")
    first.signal(9)
    first.proc.wait(10)  # type: ignore[union-attr]

    # The same task try runs again (same dag, task, run id, map index, try number): it
    # finds the command still running, re-attaches and defers to the trigger.
    second = ManagedProcess("dag-test-2", argv, tmp_path / "second.log", env=airflow.env, cwd=REPO)
    killed_runs.append(second.start())
    wait_until(lambda: "Re-attached to RemoteCommand" in second.log_path.read_text(), timeout=120,
               what="the restarted task to re-attach")
    vm1.host_path(go).write_text("")
    wait_until(lambda: not second.running(), timeout=120, what="the restarted DAG run to end")
    run = dag_run_result(dag_id, second.proc.returncode,  # type: ignore[union-attr]
                         second.log_path.read_text())

    assert run.state == "success", run.log[-6000:]
    assert "(phase Running): created by an earlier run of this task try" in run.log
    assert "[DAG TEST] running trigger in line" in run.log
    assert run.xcom("remote[-1]")["vm1"]["stdout"] == "finished\n"
    assert vm1.host_path(counter).read_text() == "started\n"  # ran once on the VM
    names = sorted(c["metadata"]["name"] for c in commands_in(ns))
    assert len(names) == 2 and any(n.startswith(f"{dag_id.replace('_', '-')}-remote-") for n in names)
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


KILL_RUNNER = textwrap.dedent("""
    import sys, time
    from airflow.sdk.exceptions import TaskDeferred
    from vmfleet.airflow import RemoteCommandOperator

    kubeconfig, namespace, command = sys.argv[1:4]

    class TI:  # what the operator reads of its task instance
        dag_id, task_id, run_id, map_index, try_number = "killed", "remote", "manual__1", -1, 1

    op = RemoteCommandOperator(task_id="remote", vm="vm1", command=command,
                               config_file=kubeconfig, namespace=namespace)
    try:
        op.execute({"ti": TI()})
    except TaskDeferred as deferred:
        print("DEFERRED", deferred.trigger.serialize()[1]["name"], flush=True)
    sys.stdin.readline()  # the test says when to kill
    op.on_kill()
    print("KILLED", flush=True)
""")


def test_killing_the_task_deletes_its_remote_command_and_stops_the_remote_process(
    airflow: AirflowEnv, ns: Namespace, vms, kubeconfig, controller_dir, tmp_path
):
    vm1 = vms[0]
    ns.add_vms(vms[:1])
    marker = f"/tmp/killed-{uuid.uuid4().hex[:6]}"
    command = f"echo $$ > {marker}; exec sleep 300"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_RUNNER, str(kubeconfig), str(ns), command],
            env=airflow.env, cwd=REPO, stdin=subprocess.PIPE, stdout=log,
            stderr=subprocess.STDOUT, text=True,
        )
    try:
        assert proc.stdin is not None

        def deferred() -> str | None:
            assert proc.poll() is None, f"the task process exited:\n{log_path.read_text()[-4000:]}"
            lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("DEFERRED ")]
            return lines[0].split()[1] if lines else None

        name = wait_until(deferred, timeout=90, what="the task to defer")
        wait_until(lambda: vm1.host_path(marker).exists() and vm1.host_path(marker).read_text(),
                   timeout=60, what="the remote command to start")
        pid = vm1.host_path(marker).read_text().strip()
        assert vm1.run(f"kill -0 {pid}")[0] == 0

        proc.stdin.write("\n")  # now kill the task
        proc.stdin.close()
        assert proc.wait(60) == 0, log_path.read_text()[-4000:]
        assert "KILLED" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # Deleting cancels: the remote process ends and the object goes once it is Cancelled.
    wait_until(lambda: vm1.run(f"kill -0 {pid}")[0] != 0, timeout=60,
               what="the remote process to be terminated")
    wait_until(lambda: ns.k("get", "remotecommand", name, check=False).returncode != 0,
               timeout=60, what=f"RemoteCommand {name} to be deleted")
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")
