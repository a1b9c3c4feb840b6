"""airflow_deferred: N RemoteCommand tasks deferred at once in one Airflow triggerer.

Airflow 3 runs as services (``vmfleet.dev.airflow``: scheduler with the LocalExecutor and
8 task slots, dag-processor, triggerer, API server, SQLite) from ``.venv-airflow``. One
DAG run maps ``RemoteCommandOperator`` over N items (100, quick 20), ``defer_after_seconds=0``
so that every task defers at once. The RemoteCommands are created in a namespace the
controller does not serve: the bench itself writes each one's ``Succeeded`` status (as the
controller would), so the figures are Airflow's and the trigger's side only — no SSH.

Measured, with the figures of the idle triggerer (before the run) subtracted where it says:

* ``rss_mb`` (system ``vmfleet_triggerer``): the triggerer's RSS (its process and the trigger
  runner it starts) with N tasks deferred, minus the idle figure;
* ``api_watches``: RemoteCommand watches the API server holds for the namespace (its
  ``apiserver_longrunning_requests`` gauge, minus the idle figure);
* ``api_connections``: TCP connections from the triggerer's processes to the API server;
* ``p50_ms``/``p99_ms``: from the moment the bench starts writing a command's
  ``Succeeded`` to the trigger's event (``vmfleet_trigger``) or to the task's
  ``end_date`` with state ``success`` (``vmfleet_triggerer``).

Three systems. ``vmfleet_trigger`` runs 500 RemoteCommandTriggers (the real class, its shared
watch, a real API server) in one asyncio loop of one process, as the triggerer's trigger
runner runs them, without a scheduler (``bench/airflow_trigger_runner.py``, from
``.venv-airflow``; one ``Succeeded`` every 20 ms); ``vmfleet_triggerer`` is the whole
Airflow above with fewer tasks (100, quick 20, ``VMFLEET_BENCH_AIRFLOW_TASKS``; 0 skips
it), since every task costs two task processes of a few CPU seconds each on 2 cores.

The third system, ``cncf_kubernetes_pod``, is the cncf-kubernetes provider's deferrable pod
wait (``KubernetesPodOperator(deferrable=True)``, its defaults: a trigger that polls the pod
every 2 s) through the same Airflow, on a local node (``vmfleet.dev.node``: kubelet,
containerd, the project's image from ``make image``): 20 pods (quick 5,
``VMFLEET_BENCH_AIRFLOW_PODS``; 0 skips it), each waiting for a file the bench creates one
every 0.5 s; timed from the moment a watch sees the pod ``Succeeded`` to the task's
``success``. Without root, containerd or runc it is reported as skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.fixtures import PRODUCTION, REPO, cluster, vm_pool
from bench.harness import Bench, percentile
from tests.e2e.fleet import start_controller
from vmfleet.airflow.naming import CREATED_BY_AIRFLOW, LABEL_CREATED_BY
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION
from vmfleet.dev import logsapi
from vmfleet.dev.airflow import AirflowServices, kubernetes_connection
from vmfleet.dev.brokers import output_store
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.node import Node, build_image, missing_requirements
from vmfleet.dev.proc import wait_until
from vmfleet.procs import free_port

SCENARIOS = ("airflow_deferred",)
NAMESPACE = "bench-airflow"
OUTPUT_NAMESPACE = "bench-airflow-output"
OUTPUT_DAG_ID = "bench_airflow_output"
OUTPUT_VMS = 4
OUTPUT_LINES, OUTPUT_EVERY = 20, 0.5
OUTPUT_GO = "/tmp/bench-airflow-output.go"
DAG_ID = "bench_airflow_deferred"
POD_DAG_ID = "bench_airflow_pod_deferred"
AIRFLOW_BIN = REPO / ".venv-airflow" / "bin"

DAG = '''
from datetime import datetime
from airflow.sdk import DAG
from vmfleet.airflow import RemoteCommandOperator

with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime(2024, 5, 1),
         max_active_tasks={n}, default_args={{"retries": 0}}):
    RemoteCommandOperator.partial(
        task_id="wait", vm="vm1", command="true", defer_after_seconds=0,
        kubernetes_conn_id="kubernetes_default", stream_output=False,  # the wait alone
    ).expand(env=[{{"I": str(i)}} for i in range({n})])
'''

# The output in the task log: each task's command waits for the go file, then prints a
# timestamp every EVERY seconds; its lines reach the task log through the trigger.
OUTPUT_DAG = '''
from datetime import datetime
from airflow.sdk import DAG
from vmfleet.airflow import RemoteCommandOperator

with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime(2024, 5, 1),
         max_active_tasks={n}, default_args={{"retries": 0}}):
    RemoteCommandOperator.partial(
        task_id="print", namespace="{namespace}", defer_after_seconds=0,
        kubernetes_conn_id="kubernetes_default",
        command='while [ ! -e {go} ]; do sleep 0.2; done; '
                'for i in $(seq 1 {lines}); do echo "printed $(date +%s.%N)"; sleep {every}; done',
    ).expand(vm={vms!r})
'''


# The cncf-kubernetes provider's deferrable pod wait, as its users write it (defaults but
# for what this node needs: the local image, host networking). Pod i waits for a file.
POD_DAG = '''
from datetime import datetime
from airflow.sdk import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime(2024, 5, 1),
         max_active_tasks={n}, default_args={{"retries": 0}}):
    KubernetesPodOperator.partial(
        task_id="pod", namespace="{namespace}", image="{image}", image_pull_policy="Never",
        hostnetwork=True, deferrable=True, kubernetes_conn_id="kubernetes_default",
        cmds=["sh", "-c"],
        volumes=[k8s.V1Volume(name="go", host_path=k8s.V1HostPathVolumeSource(path="{go}"))],
        volume_mounts=[k8s.V1VolumeMount(name="go", mount_path="/go", read_only=True)],
    ).expand(arguments=[["while [ ! -e /go/%d ]; do sleep 0.1; done" % i] for i in range({n})])
'''

def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def connections_to(pids: list[int], port: int) -> int:
    """Established TCP connections of ``pids`` whose remote port is ``port``."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and remote_port == port and fields[9] in inodes:
                count += 1
    return count


_GAUGE = re.compile(r'^apiserver_longrunning_requests\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def watches(metrics: str) -> float:
    """RemoteCommand watches the API server holds (namespaced ones)."""
    total = 0.0
    for line in metrics.splitlines():
        m = _GAUGE.match(line)
        if not m:
            continue
        labels = m.group("labels")
        if ('resource="remotecommands"' in labels and 'verb="WATCH"' in labels
                and 'scope="namespace"' in labels):
            total += float(m.group("value"))
    return total


def _succeeded_status(now: str) -> dict[str, Any]:
    return {"status": {
        "phase": "Succeeded", "startTime": now, "completionTime": now,
        "results": [{"vm": "vm1", "host": "127.0.0.1", "phase": "Succeeded", "exitCode": 0,
                     "stdout": "", "stderr": "", "attempt": 1, "startTime": now,
                     "completionTime": now}],
    }}


def _command(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RemoteCommand",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {LABEL_CREATED_BY: CREATED_BY_AIRFLOW}},
            "spec": {"vm": "vm1", "command": "true"}}


def run_triggers(bench: Bench, fleet: Any, n: int, gap: float) -> None:
    """N RemoteCommandTriggers in one loop (bench/airflow_trigger_runner.py)."""
    names = [f"trig-{i:04d}" for i in range(n)]
    for name in names:
        fleet.kube.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE,
                                                          COMMAND_PLURAL, _command(name))
    port = int(fleet.cp.server.rsplit(":", 1)[1])
    idle_watches = watches(fleet.apiserver_metrics())
    proc = subprocess.Popen(
        [str(AIRFLOW_BIN / "python"), str(REPO / "bench" / "airflow_trigger_runner.py"),
         str(fleet.cp.kubeconfig), NAMESPACE, *names],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "AIRFLOW_HOME": str(bench.workdir / "airflow-triggers")},
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = proc.stdout

    def expect(word: str) -> None:
        for line in out:  # Airflow's own log lines may come first
            if line.strip() == word:
                return
        raise RuntimeError(f"the trigger runner exited before {word}")

    try:
        expect("IMPORTED")
        idle_rss = rss_mb([proc.pid])
        t0 = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        expect("SUBSCRIBED")
        subscribed_s = time.monotonic() - t0
        time.sleep(2)
        peak_rss = rss_mb([proc.pid])
        peak_conn = connections_to([proc.pid], port)
        peak_watches = watches(fleet.apiserver_metrics()) - idle_watches
        succeeded_at: dict[str, float] = {}
        for i, name in enumerate(names):
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            succeeded_at[name] = time.time()  # the write of Succeeded starts
            fleet.kube.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, NAMESPACE, COMMAND_PLURAL, name, _succeeded_status(now))
            if i % 50 == 0:
                peak_rss = max(peak_rss, rss_mb([proc.pid]))
                peak_conn = max(peak_conn, connections_to([proc.pid], port))
                peak_watches = max(peak_watches, watches(fleet.apiserver_metrics()) - idle_watches)
            time.sleep(gap)
        fired: dict[str, float] = {}
        stats = ""
        for line in proc.stdout:
            if line.startswith("EVENT "):
                _, name, when, kind = line.split()
                assert kind == "finished", line
                fired[name] = float(when)
            elif line.startswith("STATS "):
                stats = line[6:].strip()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert sorted(fired) == names, f"{len(fired)} events for {n} triggers"
    latencies = [fired[name] - succeeded_at[name] for name in names]
    note = (f"{n} triggers in one asyncio loop (the trigger runner's way), no scheduler; "
            f"all subscribed in {subscribed_s:.1f} s; idle process {idle_rss:.0f} MiB; "
            f"one Succeeded every {gap} s; watch stats {stats}; load {os.getloadavg()[0]:.1f}")
    system = "vmfleet_trigger"
    bench.record("airflow_deferred", system, "rss_mb", [peak_rss - idle_rss], note)
    bench.record("airflow_deferred", system, "api_watches", [peak_watches], note)
    bench.record("airflow_deferred", system, "api_connections", [float(peak_conn)], note)
    bench.record("airflow_deferred", system, "p50_ms", [percentile(latencies, 50) * 1000], note)
    bench.record("airflow_deferred", system, "p99_ms", [percentile(latencies, 99) * 1000], note)
    fleet.kube.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NAMESPACE,
                                                                COMMAND_PLURAL)


def run(bench: Bench, wanted: list[str]) -> None:
    if not (AIRFLOW_BIN / "airflow").exists():
        bench.skip("airflow_deferred", "vmfleet_triggerer", "no .venv-airflow (make airflow-venv)")
        return
    fleet = cluster(bench)
    fleet.kubectl("create", "namespace", NAMESPACE)
    run_triggers(bench, fleet, 500, 0.02)
    # Through Airflow's services, task processes are the cost (two per task, a few CPU
    # seconds each on 2 cores): fewer tasks than the triggers above.
    n = int(os.environ.get("VMFLEET_BENCH_AIRFLOW_TASKS") or (20 if bench.quick else 100))
    pods = int(os.environ.get("VMFLEET_BENCH_AIRFLOW_PODS") or (5 if bench.quick else 20))
    node = image = None
    if pods > 0:
        node, image, why = _node_for_pods(bench, fleet)
        if node is None:
            bench.skip("airflow_deferred", "cncf_kubernetes_pod", why)
    out_n = int(os.environ.get("VMFLEET_BENCH_AIRFLOW_OUTPUT_TASKS") or (20 if bench.quick else 100))
    if n <= 0 and node is None and out_n <= 0:
        return
    dags = bench.workdir / "airflow-dags"
    dags.mkdir(parents=True, exist_ok=True)
    dag_ids = []
    out_vms: list[Any] = []
    if out_n > 0:
        out_vms = _output_fleet(bench, fleet, out_n)
        (dags / f"{OUTPUT_DAG_ID}.py").write_text(OUTPUT_DAG.format(
            dag_id=OUTPUT_DAG_ID, n=out_n, namespace=OUTPUT_NAMESPACE, go=OUTPUT_GO,
            lines=OUTPUT_LINES, every=OUTPUT_EVERY,
            vms=[out_vms[i % len(out_vms)].name for i in range(out_n)]))
        dag_ids.append(OUTPUT_DAG_ID)
    if n > 0:
        (dags / f"{DAG_ID}.py").write_text(DAG.format(dag_id=DAG_ID, n=n))
        dag_ids.append(DAG_ID)
    go_dir = bench.workdir / "pod-go"
    if node is not None:
        go_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        (dags / f"{POD_DAG_ID}.py").write_text(POD_DAG.format(
            dag_id=POD_DAG_ID, n=pods, namespace=NAMESPACE, image=image, go=go_dir))
        dag_ids.append(POD_DAG_ID)
    services = AirflowServices(
        bench.workdir / "airflow", AIRFLOW_BIN, dags, parallelism=8,
        env={"AIRFLOW_CONN_KUBERNETES_DEFAULT": kubernetes_connection(fleet.cp.kubeconfig, NAMESPACE)},
    )
    bench._cleanups.append(services.stop)
    print(f"  starting Airflow (scheduler, dag-processor, triggerer, API server); {n} tasks"
          + (f", then {pods} pods" if node is not None else ""), flush=True)
    services.start(dag_ids=tuple(dag_ids))
    if n > 0:
        run_services(bench, fleet, services, n)
    if out_n > 0:
        run_output(bench, fleet, services, out_n, out_vms)
    if node is not None:
        run_pod_waits(bench, fleet, services, pods, go_dir)


def _node_for_pods(bench: Bench, fleet: Any) -> tuple[Node | None, str | None, str]:
    """A kubelet for the cncf-kubernetes pods, with the project's image (``make image``)."""
    missing = missing_requirements()
    if missing:
        return None, None, "no local node here: " + "; ".join(missing)
    print("  building (or finding) the image and starting a node for the pod waits ...", flush=True)
    try:
        archive = build_image()
        node = Node(bench.workdir / "node", fleet.cp, exit_with_parent=True).start()
    except Exception as exc:  # noqa: BLE001 - reported as the skip's reason
        return None, None, f"no local node: {exc}"
    bench._cleanups.append(node.stop)
    return node, node.import_image(archive), ""


class _TriggererPeaks:
    """The triggerer's processes (it and its trigger runner): their idle RSS, then the
    peaks of RSS, API connections and RemoteCommand watches over ``sample()`` calls."""

    def __init__(self, fleet: Any, services: AirflowServices) -> None:
        self.fleet = fleet
        self.pid = services.procs["triggerer"].pid
        self.port = int(fleet.cp.server.rsplit(":", 1)[1])
        wait_until(lambda: len(_tree(self.pid)) >= 2, timeout=120, what="the trigger runner")
        self.idle_rss = rss_mb(_tree(self.pid))
        self.idle_watches = watches(fleet.apiserver_metrics())
        self.rss = self.connections = self.watches = 0.0

    def sample(self) -> None:
        pids = _tree(self.pid)
        self.rss = max(self.rss, rss_mb(pids))
        self.connections = max(self.connections, float(connections_to(pids, self.port)))
        self.watches = max(self.watches, watches(self.fleet.apiserver_metrics()) - self.idle_watches)


def _ended_at(ti: dict[str, Any]) -> float:
    """A task instance's ``end_date`` (from the REST API), seconds since the epoch."""
    return datetime.fromisoformat(ti["end_date"].replace("Z", "+00:00")).timestamp()


def run_services(bench: Bench, fleet: Any, services: AirflowServices, n: int) -> None:
    """N RemoteCommand tasks through Airflow's services; the bench writes each Succeeded."""
    gap = 0.5
    api = services.api
    peak = _TriggererPeaks(fleet, services)
    sample = peak.sample
    t0 = time.monotonic()
    run_id = api.trigger(DAG_ID, {})

    def all_deferred() -> bool:
        sample()
        states = api.states(DAG_ID, run_id)
        print(f"    {sum(s == 'deferred' for s in states.values())}/{n} deferred", flush=True)
        failed = sorted(k for k, s in states.items() if s in ("failed", "upstream_failed"))
        if failed:  # e.g. task processes timing out against an overloaded API server
            raise RuntimeError(f"{len(failed)} tasks failed before deferring: {failed[:5]}")
        return len(states) == n and all(s == "deferred" for s in states.values())

    wait_until(all_deferred, timeout=3600, interval=10, what=f"{n} tasks deferred")
    deferred_s = time.monotonic() - t0
    # Let the triggers subscribe (the stale-event guard holds events 10 s after deferral).
    time.sleep(12)
    sample()

    names = [c["metadata"]["name"] for c in fleet.kube.custom.list_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, COMMAND_PLURAL)["items"]
        if c["metadata"].get("annotations", {}).get("airflow.vmfleet.io/dag-id") == DAG_ID]
    assert len(names) == n, f"{len(names)} RemoteCommands for {n} tasks"
    succeeded_at: dict[str, float] = {}
    for i, name in enumerate(names):
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        succeeded_at[name] = time.time()  # the write of Succeeded starts
        fleet.kube.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NAMESPACE, COMMAND_PLURAL, name, _succeeded_status(now))
        if i % 25 == 0:
            sample()
        time.sleep(gap)
    state = api.wait_run(DAG_ID, run_id, timeout=3600)
    sample()
    tis = api.task_instances(DAG_ID, run_id)
    by_name = {c["metadata"]["name"]: c for c in fleet.kube.custom.list_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, COMMAND_PLURAL)["items"]}
    latencies = []
    for ti in tis.values():
        if ti["state"] != "success":
            continue
        name = next(n for n, c in by_name.items()
                    if c["metadata"]["annotations"].get("airflow.vmfleet.io/map-index") == str(ti["map_index"]))
        latencies.append(_ended_at(ti) - succeeded_at[name])
    failed = sum(ti["state"] != "success" for ti in tis.values())
    note = (f"{n} tasks, run {state}, {failed} not success; all deferred {deferred_s:.0f} s after "
            f"the trigger; idle triggerer {peak.idle_rss:.0f} MiB; one Succeeded every {gap} s; "
            f"8 task slots; load {os.getloadavg()[0]:.1f}")
    bench.record("airflow_deferred", "vmfleet_triggerer", "rss_mb", [peak.rss - peak.idle_rss], note)
    bench.record("airflow_deferred", "vmfleet_triggerer", "api_watches", [peak.watches], note)
    bench.record("airflow_deferred", "vmfleet_triggerer", "api_connections", [peak.connections], note)
    bench.record("airflow_deferred", "vmfleet_triggerer", "p50_ms", [percentile(latencies, 50) * 1000], note)
    bench.record("airflow_deferred", "vmfleet_triggerer", "p99_ms", [percentile(latencies, 99) * 1000], note)


def run_pod_waits(bench: Bench, fleet: Any, services: AirflowServices, n: int, go_dir: Path) -> None:
    """The same measurement for KubernetesPodOperator(deferrable=True) on the local node:
    from the moment a watch sees the pod ``Succeeded`` to the task's ``success``."""
    from kubernetes import client, watch

    gap = 0.5
    api = services.api
    core = client.CoreV1Api(fleet.kube.api_client)
    peak = _TriggererPeaks(fleet, services)
    sample = peak.sample
    succeeded_at: dict[str, float] = {}  # map index -> when the watch saw Succeeded
    stop = threading.Event()

    def watch_pods() -> None:
        while not stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(core.list_namespaced_pod, NAMESPACE,
                                           label_selector=f"dag_id={POD_DAG_ID}",
                                           timeout_seconds=5):
                    pod = event["object"]
                    index = (pod.metadata.labels or {}).get("map_index")
                    if pod.status and pod.status.phase == "Succeeded" and index is not None:
                        succeeded_at.setdefault(index, time.time())
                    if stop.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - the watch is restarted
                print(f"    pod watch: {exc}", flush=True)
                time.sleep(0.5)

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    run_id = api.trigger(POD_DAG_ID, {})

    def all_waiting() -> bool:
        sample()
        states = api.states(POD_DAG_ID, run_id)
        running = [p for p in core.list_namespaced_pod(
            NAMESPACE, label_selector=f"dag_id={POD_DAG_ID}").items
            if p.status and p.status.phase == "Running"]
        print(f"    {sum(s == 'deferred' for s in states.values())}/{n} deferred, "
              f"{len(running)} pods running", flush=True)
        failed = sorted(k for k, s in states.items() if s in ("failed", "upstream_failed"))
        if failed:
            raise RuntimeError(f"{len(failed)} pod tasks failed before their pods finished: {failed[:5]}")
        return (len(states) == n and all(s == "deferred" for s in states.values())
                and len(running) == n)

    try:
        wait_until(all_waiting, timeout=1800, interval=5, what=f"{n} pod tasks deferred, pods running")
        waiting_s = time.monotonic() - t0
        time.sleep(5)
        sample()
        for i in range(n):
            (go_dir / str(i)).write_text("")
            time.sleep(gap)
            if i % 5 == 0:
                sample()
        state = api.wait_run(POD_DAG_ID, run_id, timeout=1800)
        sample()
    finally:
        stop.set()
        watcher.join(10)
    tis = api.task_instances(POD_DAG_ID, run_id)
    latencies = []
    for ti in tis.values():
        seen = succeeded_at.get(str(ti["map_index"]))
        if ti["state"] == "success" and seen is not None:
            latencies.append(_ended_at(ti) - seen)
    failed = sum(ti["state"] != "success" for ti in tis.values())
    if not latencies:
        bench.skip("airflow_deferred", "cncf_kubernetes_pod",
                   f"no pod task succeeded (run {state}, {failed} not success)")
        return
    note = (f"KubernetesPodOperator(deferrable=True, poll_interval 2 s: the default), {n} pods "
            f"on the local node, run {state}, {failed} not success, {len(latencies)} timed; all "
            f"deferred with pods running {waiting_s:.0f} s after the trigger; idle triggerer "
            f"{peak.idle_rss:.0f} MiB; one pod finishing every {gap} s; load {os.getloadavg()[0]:.1f}")
    system = "cncf_kubernetes_pod"
    bench.record("airflow_deferred", system, "rss_mb", [peak.rss - peak.idle_rss], note)
    bench.record("airflow_deferred", system, "api_connections", [peak.connections], note)
    bench.record("airflow_deferred", system, "p50_ms", [percentile(latencies, 50) * 1000], note)
    bench.record("airflow_deferred", system, "p99_ms", [percentile(latencies, 99) * 1000], note)


def _output_fleet(bench: Bench, fleet: Any, n: int) -> list[Any]:
    """A controller of its own for OUTPUT_NAMESPACE with the output store and the output
    API behind its APIService (as shipped), and OUTPUT_VMS VMs of the pool there."""
    workdir = bench.workdir / "output-controller"
    workdir.mkdir(parents=True, exist_ok=True)
    store = output_store(workdir / "store", maxmemory="256mb").start()
    bench._cleanups.append(store.stop)
    ca, serving = logsapi.serving_pki(workdir)
    port = free_port()
    fleet.kubectl("create", "namespace", OUTPUT_NAMESPACE)
    controller = start_controller(fleet.cp.kubeconfig, fleet.redis.url, workdir, [OUTPUT_NAMESPACE],
                                  extra_env={**PRODUCTION, "VMFLEET_CONTROLLER_ID": "bench-output",
                                             "VMFLEET_OUTPUT_URL": store.url,
                                             "VMFLEET_LOGS_API_PORT": str(port),
                                             "VMFLEET_LOGS_API_CERT_FILE": str(serving.cert),
                                             "VMFLEET_LOGS_API_KEY_FILE": str(serving.key)})
    bench._cleanups.append(lambda: controller.stop(grace=60))
    logsapi.register(fleet.cp.kubectl_run, port, ca.cert.read_bytes())
    bench._cleanups.append(lambda: logsapi.unregister(fleet.cp.kubectl_run))
    logsapi.wait_available(fleet.cp.kubectl_run, timeout=120)
    vms = vm_pool(bench, OUTPUT_VMS)
    per_vm = -(-n // len(vms)) + 2
    objects = [o for vm in vms for o in vm_manifests(vm, OUTPUT_NAMESPACE, maxConcurrentCommands=per_vm)]
    fleet.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def ready() -> bool:
        items = fleet.kube.custom.list_namespaced_custom_object(GROUP, VERSION, OUTPUT_NAMESPACE,
                                                                "remotevms")["items"]
        return len(items) == len(vms) and all(
            ((i.get("status") or {}).get("workers") or {}).get("readyReplicas", 0) >= 1 for i in items)

    wait_until(ready, timeout=300, interval=1, what="the output VMs' workers")
    return vms


def _log_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=UTC).timestamp()


def run_output(bench: Bench, fleet: Any, services: AirflowServices, n: int, vms: list[Any]) -> None:
    """N deferred tasks whose commands print a timestamp every OUTPUT_EVERY s: from the
    moment a line is printed on the VM to the moment the triggerer logged it in the task log."""
    api = services.api
    peak = _TriggererPeaks(fleet, services)
    for vm in vms:
        vm.host_path(OUTPUT_GO).unlink(missing_ok=True)
    run_id = api.trigger(OUTPUT_DAG_ID, {})

    def all_deferred() -> bool:
        peak.sample()
        states = api.states(OUTPUT_DAG_ID, run_id)
        print(f"    {sum(s == 'deferred' for s in states.values())}/{n} output tasks deferred", flush=True)
        failed = sorted(k for k, s in states.items() if s in ("failed", "upstream_failed"))
        if failed:
            raise RuntimeError(f"{len(failed)} tasks failed before deferring: {failed[:5]}")
        return len(states) == n and all(s == "deferred" for s in states.values())

    wait_until(all_deferred, timeout=3600, interval=10, what=f"{n} output tasks deferred")
    time.sleep(15)  # every trigger started and follows its command's (still empty) output
    peak.sample()
    writes_before = fleet.write_requests().get("remotecommands", 0.0)
    started = time.monotonic()
    for vm in vms:
        vm.host_path(OUTPUT_GO).write_text("")
    while time.monotonic() - started < OUTPUT_LINES * OUTPUT_EVERY + 2:
        peak.sample()
        time.sleep(2)
    printing_s = time.monotonic() - started
    writes = fleet.write_requests().get("remotecommands", 0.0) - writes_before
    state = api.wait_run(OUTPUT_DAG_ID, run_id, timeout=3600)
    latencies: list[float] = []
    tasks_with_all = in_time = 0
    for task_dir in (services.home / "logs" / f"dag_id={OUTPUT_DAG_ID}").glob("run_id=*/task_id=print/*"):
        seen: set[str] = set()
        for path in task_dir.glob("attempt=1.log*"):  # the worker's log and the triggers'
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                event = str(entry.get("event", ""))
                if not (event.startswith("[vm") and " printed " in event):
                    continue
                printed = event.rsplit(" ", 1)[1]
                seen.add(printed)
                if ".trigger." in path.name and "(repeat)" not in event:
                    latencies.append(_log_time(str(entry["timestamp"])) - float(printed))
        tasks_with_all += len(seen) >= OUTPUT_LINES
        in_time += len(seen)
    expected = n * OUTPUT_LINES
    note = (f"{n} tasks deferred at once (run {state}), each command printing a line every "
            f"{OUTPUT_EVERY} s for {OUTPUT_LINES * OUTPUT_EVERY:.0f} s on {len(vms)} VMs; "
            f"{len(latencies)}/{expected} lines logged by the triggerer while deferred, {in_time}/{expected} "
            f"in the task logs in all ({tasks_with_all}/{n} tasks with all theirs); "
            f"output_checkpoint_seconds 2 (the default); {writes:.0f} position writes in "
            f"{printing_s:.0f} s; idle triggerer {peak.idle_rss:.0f} MiB; load {os.getloadavg()[0]:.1f}")
    print("    " + note, flush=True)
    system = "vmfleet_task_log"
    if not latencies:
        bench.skip("airflow_deferred", system, "no output line reached the task logs: " + note)
        return
    bench.record("airflow_deferred", system, "p50_ms", [percentile(latencies, 50) * 1000], note)
    bench.record("airflow_deferred", system, "p99_ms", [percentile(latencies, 99) * 1000], note)
    bench.record("airflow_deferred", system, "writes_per_s", [writes / printing_s], note)
    bench.record("airflow_deferred", system, "rss_mb", [peak.rss - peak.idle_rss], note)
    bench.record("airflow_deferred", system, "api_connections", [peak.connections], note)
