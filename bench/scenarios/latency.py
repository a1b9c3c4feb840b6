"""e2e_latency: one command at a time on one VM, from "submit" to "done" as the caller sees it.

Each round runs N ``true`` commands back to back (the next starts when the previous one
is seen done) for each system in turn; every system is warm (its first commands are not
timed). Metrics per round: ``p50_ms``/``p95_ms``/``p99_ms`` over the N commands and
``commands_per_s`` (N over the round's wall time).

* ``vmfleet``: create a RemoteCommand (``vm: vm1``) through the API server → the shared
  watch sees it ``Succeeded`` (controller, Redis, the VM's Celery worker with its pooled
  connection, its claim and result reports through Redis, and the controller's status
  write, the only one). Where the time goes (INTERVALS, from
  the status stamps and the controller's and worker's log lines) is printed and goes
  into the row note.
* ``guide_send_task``: the original guide's way (``bench/guide_app.py``): a prefork
  ``celery worker --concurrency 2`` on the same Redis (another DB), the caller does
  ``send_task('remote_tasks.execute_on_vm', ['vm1', 'true'], queue='vm1_queue').get()``;
  the task opens a new paramiko connection per command (host key pinned instead of the
  guide's AutoAddPolicy). Done = ``.get()`` returned ``exit_code`` 0.
* ``airflow_sshoperator``: Airflow 3 ``dag.test()`` of a one-task SSHOperator DAG
  (``bench/airflow_ssh_runner.py`` in ``.venv-airflow``, sqlite metadata DB, connection
  from ``AIRFLOW_CONN_VM1_SSH`` with the host key pinned). Done = ``dag.test()`` returned
  with the task in ``success``. Fewer runs per round: Airflow is slow.
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from bench.fixtures import NAMESPACE, REPO, Cluster, cluster, vm_pool
from bench.harness import Bench, alternate, latency_metrics, percentile, record_all
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION, Condition, Phase
from vmfleet.dev.proc import ManagedProcess
from vmfleet.dev.sshd import SshdVM

SCENARIOS = ("e2e_latency",)
AIRFLOW_VENV = REPO / ".venv-airflow"
TIMEOUT = 120.0
# Where the time of one vmfleet command goes: (from, to, what happens in between), between
# moments known for each command: "create" (the bench sent it), status stamps (startTime,
# results[0].dispatchTime / completionTime ("done"), the Finished condition's
# lastTransitionTime ("folded")), the millisecond times of log lines of the controller
# and the worker ("... log"; one machine, one clock) and "watch seen" (the bench's watch
# saw Succeeded). The controller is the only writer of the status: the worker claims in
# Redis and reports its claim and result through the Redis stream; the controller writes
# them (usually in one patch) and logs "RemoteCommand ns/name Succeeded" once the write
# landed and its reports are acknowledged ("written log"). See _breakdown.
INTERVALS = (
    ("create", "startTime", "API server create + the controller's watch event, until it stamps"),
    ("startTime", "dispatch", "the controller decides to dispatch"),
    ("dispatch", "dispatched log", "the controller publishes the task (Redis)"),
    ("dispatch", "received log", "publish + Redis + the worker's consumer, until Celery logs "
                                 "'received'"),
    ("received log", "claimed log", "the worker's handler starts, opens a channel on the pooled "
                                    "connection, the wrapper reports its process group, the "
                                    "claim in Redis (SET NX)"),
    ("claimed log", "done", "the claim report (XADD), the go to the wrapper, `true` runs and "
                            "exits"),
    ("done", "finished log", "the worker's result report (XADD)"),
    ("finished log", "written log", "the controller reads the stream, folds claim + result, "
                                    "its status PATCH lands"),
    ("done", "folded", "the terminal phase computed by the controller (its clock)"),
    ("written log", "watch seen", "the bench's watch event (the line is logged after the PATCH "
                                  "response and the Redis ack: often negative)"),
    ("done", "watch seen", "report, status write and the bench's watch event"),
    ("create", "watch seen", "all of it"),
)
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_LOG_EVENT = re.compile(r"(Dispatched|Claimed|Finished) RemoteCommand " + NAMESPACE + r"/(\S+)")
# The controller's line once the status write of an end state landed (controller.loop).
_LOG_WRITTEN = re.compile(r"\] RemoteCommand " + NAMESPACE + r"/(\S+) (Succeeded|Failed|Cancelled) \(")


def run(bench: Bench, wanted: list[str]) -> None:
    fleet = cluster(bench)
    vm = vm_pool(bench, 1)[0]
    fleet.register([vm])
    n = 40 if bench.quick else 200
    n_airflow = 10 if bench.quick else 40
    rounds = bench.rounds(full=3, quick=1)

    stages: dict[str, list[float]] = {}
    setups: dict[str, Callable[[], Callable[[], dict[str, float]] | None]] = {
        "vmfleet": lambda: _vmfleet(fleet, vm, n, stages),
        "guide_send_task": lambda: _guide(bench, fleet, vm, n),
        "airflow_sshoperator": lambda: _airflow(bench, vm, n_airflow),
    }
    systems: dict[str, Callable[[], dict[str, float]]] = {}
    for system, setup in setups.items():
        try:  # a system that cannot start (or fails its warm-up) is skipped, the rest run
            measure = setup()
        except Exception as exc:
            bench.skip("e2e_latency", system, f"setup or warm-up failed: {exc!r}"[:500])
            continue
        if measure is not None:
            systems[system] = measure
    notes = {
        "vmfleet": f"{n} sequential `true` per round, warm",
        "guide_send_task": f"{n} sequential `true` per round; prefork worker --concurrency 2, "
                           "new SSH connection per command, host key pinned (guide: AutoAddPolicy)",
        "airflow_sshoperator": f"{n_airflow} sequential dag.test() per round (fewer than {n}: "
                               "Airflow is slow); SSHOperator, host key pinned, sqlite DB; "
                               "in-process, no scheduler or executor: a lower bound",
    }
    # The bench client is a Python process too: its own full collections (the kubernetes
    # client's and the fixtures' objects) would land in the measured interval now and then.
    gc.collect()
    gc.freeze()
    measured = alternate(rounds, systems)
    if stages:
        keys = [f"{a}→{b}" for a, b, _ in INTERVALS if f"{a}→{b}" in stages]
        notes["vmfleet"] += "; median ms: " + ", ".join(
            f"{k} {statistics.median(stages[k]) * 1000:.1f}" for k in keys)
        print("  vmfleet: where the time of one command goes (ms over n commands):", flush=True)
        for a, b, what in INTERVALS:
            values = stages.get(f"{a}→{b}")
            if values:
                print(f"    {a + '→' + b:28} median {statistics.median(values) * 1000:6.1f}  "
                      f"p95 {percentile(values, 95) * 1000:6.1f}  n={len(values):<4} {what}", flush=True)
    record_all(bench, "e2e_latency", measured, notes)


# --------------------------------------------------------------------------- vmfleet


def _vmfleet(fleet: Cluster, vm: SshdVM, n: int, stages: dict[str, list[float]]
             ) -> Callable[[], dict[str, float]]:
    def one(name: str) -> tuple[float, float, float]:
        """(perf create time, perf seen time, wall create time)"""
        wall = time.time()
        t0 = fleet.create(name, vm=vm.name, command="true")
        t1, phase = fleet.watcher.wait([name], TIMEOUT)[name]
        if phase != Phase.SUCCEEDED:
            obj = cast(dict[str, Any], fleet.kube.custom.get_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, COMMAND_PLURAL, name))
            result = ((obj.get("status") or {}).get("results") or [{}])[0]
            raise RuntimeError(f"RemoteCommand {name} {phase}: {result.get('reason')}: "
                               f"{result.get('message')}")
        return t0, t1, wall

    tag = uuid.uuid4().hex[:6]
    for i in range(5):  # warm-up: the worker's connection is open
        one(f"lat-warm-{tag}-{i}")
    fleet.delete_all_commands()
    counter = iter(range(1_000_000))

    def measure() -> dict[str, float]:
        r = next(counter)
        times: dict[str, tuple[float, float, float]] = {}
        start = time.perf_counter()
        for i in range(n):
            name = f"lat-{tag}-{r}-{i}"
            times[name] = one(name)
        wall = time.perf_counter() - start
        _breakdown(fleet, times, stages)
        fleet.delete_all_commands()
        return {**latency_metrics([t1 - t0 for t0, t1, _ in times.values()]),
                "commands_per_s": n / wall}

    return measure


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _log_moments(fleet: Cluster) -> dict[str, dict[str, float]]:
    """{command: {"dispatched log"/"received log"/"claimed log"/"finished log"/"written log":
    wall time}}
    from the controller's and the workers' logs (their local-time millisecond stamps). A
    worker's "received" line names no command: it is the last one before "Claimed <name>"
    (commands run one at a time here)."""
    out: dict[str, dict[str, float]] = {}
    files = [fleet.workdir / "controller" / "controller.log", *sorted(fleet.worker_dir.glob("*.log"))]
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        received: float | None = None
        for line in lines:
            stamp = _LOG_TIME.match(line)
            if stamp is None:
                continue
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "Task remote_tasks.execute_on_vm[" in line and line.rstrip().endswith("received"):
                received = when
                continue
            written = _LOG_WRITTEN.search(line)
            if written is not None:
                out.setdefault(written.group(1), {}).setdefault("written log", when)
                continue
            event = _LOG_EVENT.search(line)
            if event is None:
                continue
            verb, name = event.group(1), event.group(2)
            mine = out.setdefault(name, {})
            mine.setdefault(f"{verb.lower()} log", when)
            if verb == "Claimed" and received is not None:
                mine.setdefault("received log", received)
    return out


def _breakdown(fleet: Cluster, times: dict[str, tuple[float, float, float]],
               stages: dict[str, list[float]]) -> None:
    """The INTERVALS of each command of a round, from its status, the logs and the bench's
    times; an interval with a moment the command lacks is left out."""
    listed = cast(dict[str, Any], fleet.kube.custom.list_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, COMMAND_PLURAL))
    logs = _log_moments(fleet)
    for obj in listed["items"]:
        name = obj["metadata"]["name"]
        if name not in times:
            continue
        t0, t1, wall0 = times[name]
        status = obj.get("status") or {}
        result = (status.get("results") or [{}])[0]
        finished = next((c.get("lastTransitionTime") for c in status.get("conditions") or []
                         if c.get("type") == Condition.FINISHED), None)
        moments: dict[str, float | None] = {
            "create": wall0,
            "startTime": _ts(status.get("startTime")),
            "dispatch": _ts(result.get("dispatchTime")),
            "done": _ts(result.get("completionTime")),
            "folded": _ts(finished),
            "watch seen": wall0 + (t1 - t0),
            **logs.get(name, {}),
        }
        for start, end, _ in INTERVALS:
            t_start, t_end = moments.get(start), moments.get(end)
            if t_start is not None and t_end is not None:
                stages.setdefault(f"{start}→{end}", []).append(t_end - t_start)


# --------------------------------------------------------------------------- the guide


def _guide(bench: Bench, fleet: Cluster, vm: SshdVM, n: int) -> Callable[[], dict[str, float]]:
    broker = fleet.redis.admin_url.rsplit("/", 1)[0] + "/1"  # the guide: no ACL of ours
    targets = {"vm1": {"host": vm.host, "port": vm.port, "username": vm.user,
                       "ssh_key": str(vm.user_key_path), "known_hosts": str(vm.known_hosts_path),
                       "queue": "vm1_queue"}}
    env = {**os.environ, "GUIDE_BROKER_URL": broker, "GUIDE_TARGET_VMS": json.dumps(targets),
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    workdir = bench.workdir / "guide"
    # The guide's systemd unit: celery -A airflow.tasks.remote_tasks worker
    #   --queues vm1_queue,default --hostname vm1_worker --concurrency 2   (prefork)
    worker = ManagedProcess(
        "guide-worker",
        [str(Path(sys.executable).with_name("celery")), "-A", "bench.guide_app", "worker",
         "--queues", "vm1_queue,default", "--hostname", "vm1_worker@%h", "--concurrency", "2",
         "--loglevel", "WARNING"],
        workdir / "worker.log", env=env, cwd=REPO,
    )
    from bench import guide_app

    # The caller's side of the same app (the module read no GUIDE_* variables here).
    guide_app.app.conf.update(broker_url=broker, result_backend=broker)

    def stop(w: ManagedProcess) -> None:
        # While Redis still runs: finished results unsubscribe now, not in __del__ at exit
        # (which would retry a stopped Redis for minutes).
        gc.collect()
        guide_app.app.close()
        w.stop(grace=10)

    bench.shared("guide_worker", worker.start, stop)

    def one() -> float:
        start = time.perf_counter()
        result = guide_app.app.send_task("remote_tasks.execute_on_vm", args=["vm1", "true"],
                                         queue="vm1_queue")
        out = result.get(timeout=TIMEOUT)
        elapsed = time.perf_counter() - start
        if out.get("exit_code") != 0:
            raise RuntimeError(f"guide task: {out}")
        result.forget()
        return elapsed

    first = time.monotonic()
    while True:  # the worker is up when a task comes back
        try:
            one()
            break
        except Exception:
            if time.monotonic() - first > 60:
                raise
    for _ in range(4):
        one()

    def measure() -> dict[str, float]:
        start = time.perf_counter()
        seconds = [one() for _ in range(n)]
        wall = time.perf_counter() - start
        return {**latency_metrics(seconds), "commands_per_s": n / wall}

    return measure


# --------------------------------------------------------------------------- Airflow


def _airflow(bench: Bench, vm: SshdVM, n: int) -> Callable[[], dict[str, float]] | None:
    python = AIRFLOW_VENV / "bin" / "python"
    if not python.exists():
        bench.skip("e2e_latency", "airflow_sshoperator",
                   f"{python} is missing (make airflow-venv)")
        return None
    home = bench.workdir / "airflow"
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    conn_id = "vm1_ssh"
    dag_id = "bench_ssh_true"
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from airflow_ssh_runner import DAG_TEMPLATE
    finally:
        sys.path.remove(str(REPO / "bench"))
    dag_file = dags / f"{dag_id}.py"
    dag_file.write_text(DAG_TEMPLATE.format(dag_id=dag_id, conn_id=conn_id))
    conn = {"conn_type": "ssh", "host": vm.host, "port": vm.port, "login": vm.user,
            "extra": {"key_file": str(vm.user_key_path), "host_key": vm.host_public_keys[0],
                      "no_host_key_check": "false"}}
    # As tests/e2e/test_airflow_dags.py: own AIRFLOW_HOME, sqlite DB, no examples.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "GUIDE_")) and k not in ("KUBECONFIG",)}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn),
        "PYTHONPATH": str(REPO),
        "NO_PROXY": "*",
    })
    print("  airflow: db migrate ...", flush=True)
    proc = subprocess.run([str(python), "-m", "airflow", "db", "migrate"], env=env, cwd=home,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        bench.skip("e2e_latency", "airflow_sshoperator",
                   f"airflow db migrate failed: {(proc.stderr or proc.stdout)[-300:]}")
        return None
    runner = REPO / "bench" / "airflow_ssh_runner.py"

    def measure() -> dict[str, float]:
        done = subprocess.run([str(python), str(runner), str(dag_file), dag_id, str(n), "1"],
                              env=env, cwd=home, capture_output=True, text=True,
                              timeout=60 + 60 * n)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("SSHOP-RESULT ")]
        if done.returncode != 0 or not lines:
            (bench.workdir / "airflow-runner.log").write_text(done.stdout + done.stderr)
            raise RuntimeError(f"airflow runner failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout)[-1500:]}")
        seconds = json.loads(lines[-1].removeprefix("SSHOP-RESULT "))["seconds"]
        # commands/s over the timed dag.test() calls only (not the interpreter start-up).
        return {**latency_metrics(seconds), "commands_per_s": len(seconds) / sum(seconds)}

    return measure
