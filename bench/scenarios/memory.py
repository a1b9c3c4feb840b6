"""memory: resident memory (RSS, MiB) of a vmfleet worker and of the controller.

- **vmfleet_worker**: the Celery worker the Process runtime starts for one RemoteVM
  (``python -m remote_tasks.worker -Q <queue> --pool threads --concurrency 8``,
  ``controller/process_runtime.py``), summed over its process group. *idle*: its log says
  ``ready`` and no command has run (a health probe may have); *under load*: the peak,
  sampled every 100 ms, while 500 RemoteCommands (``true``; quick: 200) go through the
  local cluster (``bench.fixtures.cluster``), 8 at once. The RemoteVM is ``membench``, an
  alias of the pool's vm1 sshd with its own queue and worker, so the figure does not
  depend on what other scenarios ran on vm1.
- **guide_baseline**: the original guide's worker, idle: ``celery -A <tasks> worker
  --queues vm1_queue,default --concurrency 2`` (prefork: a parent and two children), its
  tasks module importing paramiko, summed over the process group. RSS counts pages the
  prefork children share with the parent once per process, as ``ps``/``top`` do.
- **vmfleet_controller**: ``kopf run -m controller`` with the Deployment runtime, on the
  fleet of ``scale`` (``BigFleet``: 1,000 RemoteVMs; quick: 100) plus 10,000 RemoteCommands
  (quick: 1,000) that are already finished: created while the controller is stopped,
  given a terminal status through the status subresource, then the controller is
  started. *catch-up peak*: the peak from its start until every RemoteVM is reconciled
  again (its status fields are cleared first, as in ``scale``) and it has gone through
  the commands (its CPU use over 2 s falls below 20 % of a core: nothing else says it
  has, since a finished command gets no finalizer or write); *steady*: the peak over the
  next 20 s (quick: 10 s). If it has
  not caught up after 900 s (quick: 300 s), the row is the peak so far, marked NOT caught
  up, and where its threads are (``py-spy dump``) is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import Bench
from vmfleet.api import constants as c
from vmfleet.dev.proc import ManagedProcess, wait_until

from .scale import NAMESPACE as FLEET_NAMESPACE
from .scale import BigFleet, big_fleet, parallel, size_note

SCENARIOS = ("memory",)
MIB = 1024 * 1024


# --------------------------------------------------------------------------- RSS


def group_pids(pgid: int) -> list[int]:
    """The processes of one process group (a ManagedProcess and its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # from field 3 (state)
        if int(fields[2]) == pgid and fields[0] != b"Z":  # field 5: pgrp
            pids.append(int(entry))
    return pids


def proc_kib(pid: int, path: str, key: str) -> int:
    """A ``Key:  N kB`` line of /proc/<pid>/<path>, in KiB (0 for a process gone)."""
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def group_rss_mb(pgid: int) -> float:
    return sum(proc_kib(pid, "status", "VmRSS") for pid in group_pids(pgid)) / 1024


def group_pss_mb(pgid: int) -> float:
    return sum(proc_kib(pid, "smaps_rollup", "Pss") for pid in group_pids(pgid)) / 1024


class Sampler:
    """The RSS of a process group every ``interval`` seconds, in a thread."""

    def __init__(self, pgid: int, interval: float = 0.1) -> None:
        self.pgid = pgid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), group_rss_mb(self.pgid)))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def peak(self, since: float = 0.0) -> float:
        return max(v for t, v in self.samples if t >= since)


def settle(pgid: int, seconds: float) -> float:
    """The peak RSS over ``seconds`` seconds."""
    sampler = Sampler(pgid)
    time.sleep(seconds)
    sampler.stop()
    return sampler.peak()


# --------------------------------------------------------------------------- worker


def worker_rows(bench: Bench) -> None:
    from bench.fixtures import NAMESPACE, Alias, cluster, vm_pool

    cl = cluster(bench)
    vm = Alias("membench", vm_pool(bench, 1)[0])
    concurrency = 8
    cl.register([vm], maxConcurrentCommands=concurrency)
    pid_file = cl.worker_dir / f"{NAMESPACE}.{vm.name}.0.pgid"
    log_file = pid_file.with_suffix(".log")
    wait_until(lambda: pid_file.exists() and " ready." in log_file.read_text(errors="replace"),
               timeout=120, interval=0.2, what="the membench worker ready")
    pgid = int(pid_file.read_text().split()[0])
    time.sleep(3)
    idle = settle(pgid, 5)
    print(f"  worker pid {pgid}: idle {idle:.1f} MiB RSS, {group_pss_mb(pgid):.1f} MiB PSS "
          f"({len(group_pids(pgid))} process(es))", flush=True)
    bench.record("memory", "vmfleet_worker", "rss_mb", [idle],
                 note=f"idle after start (--pool threads --concurrency {concurrency})")

    total = 200 if bench.quick else 500
    stamp = datetime.now(UTC).strftime("%H%M%S")
    names = [f"mem-{stamp}-{i:04d}" for i in range(total)]
    todo = iter(names)
    lock = threading.Lock()
    failed: list[str] = []

    def lane() -> None:
        while True:
            with lock:
                name = next(todo, None)
            if name is None:
                return
            cl.create(name, vm=vm.name, command="true")
            (_, phase), = cl.watcher.wait([name], timeout=120).values()
            if phase != c.Phase.SUCCEEDED:
                failed.append(name)

    sampler = Sampler(pgid)
    t0 = time.monotonic()
    lanes = [threading.Thread(target=lane, daemon=True) for _ in range(concurrency)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    wall = time.monotonic() - t0
    sampler.stop()
    peak = sampler.peak()
    after = settle(pgid, 3)
    print(f"  worker under load: {total} commands in {wall:.1f} s ({len(failed)} not Succeeded), "
          f"peak {peak:.1f} MiB RSS, {after:.1f} MiB after, {group_pss_mb(pgid):.1f} MiB PSS",
          flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} commands did not succeed: {failed[:3]}")
    bench.record("memory", "vmfleet_worker", "rss_mb", [peak],
                 note=f"under load: peak while {total} commands ran, {concurrency} at once")


GUIDE_TASKS = '''\
"""The original guide's tasks module, as far as memory goes: Celery + paramiko."""
import os
import subprocess

import paramiko
from celery import Celery

app = Celery("remote_tasks", broker=os.environ["GUIDE_BROKER_URL"])


@app.task
def execute_remote_command(hostname, command):
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(hostname)
    _, stdout, stderr = client.exec_command(command)
    return stdout.read().decode(), stderr.read().decode()
'''


def guide_row(bench: Bench) -> None:
    from bench.fixtures import cluster

    cl = cluster(bench)
    workdir = bench.workdir / "guide-worker"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "guide_tasks.py").write_text(GUIDE_TASKS)
    env = {**os.environ, "GUIDE_BROKER_URL": cl.redis.admin_url, "PYTHONPATH": str(workdir)}
    argv = [sys.executable, "-m", "celery", "-A", "guide_tasks", "worker",
            "--queues", "vm1_queue,default", "--hostname", "vm1_worker@%h", "--concurrency", "2",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    proc = ManagedProcess("guide worker", argv, workdir / "worker.log", env=env, cwd=workdir)
    proc.start()
    try:
        wait_until(lambda: proc.check_running() or " ready." in proc.log_tail(50),
                   timeout=120, interval=0.2, what="the guide's worker ready")
        time.sleep(3)
        idle = settle(proc.pid, 5)
        print(f"  guide worker: idle {idle:.1f} MiB RSS, {group_pss_mb(proc.pid):.1f} MiB PSS "
              f"({len(group_pids(proc.pid))} processes)", flush=True)
        bench.record("memory", "guide_baseline", "rss_mb", [idle],
                     note="idle after start (prefork --concurrency 2: 3 processes)")
    finally:
        proc.stop(grace=15)


# --------------------------------------------------------------------------- controller


def finished_status(vm: str, now: str) -> dict[str, Any]:
    """What the controller and a worker leave on a command that succeeded on one VM."""
    entry = {"vm": vm, "host": vm, "phase": c.Phase.SUCCEEDED, "attempt": 1, "exitCode": 0,
             "reason": "ExitCode", "stdout": "ok\n", "stderr": "", "stdoutBytes": 3,
             "stderrBytes": 0, "dispatchTime": now, "startTime": now, "completionTime": now,
             "worker": f"vmfleet-worker-{vm}@bench"}
    conditions = [
        {"type": kind, "status": "True", "reason": reason, "message": "succeeded on 1 VM",
         "lastTransitionTime": now}
        for kind, reason in (("Complete", "Completed"), ("Finished", c.Phase.SUCCEEDED))
    ]
    return {"status": {
        "phase": c.Phase.SUCCEEDED, "target": f"vm {vm}", "completions": "1/1",
        "startTime": now, "completionTime": now, "observedGeneration": 1,
        "summary": {"targets": 1, "pending": 0, "running": 0, "succeeded": 1, "failed": 0,
                    "cancelled": 0},
        "conditions": conditions, "results": [entry]}}


def add_finished_commands(fleet: BigFleet, total: int) -> None:
    """``total`` RemoteCommands over the fleet's VMs, each already Succeeded (controller down)."""
    assert fleet.controller is None
    custom = fleet.kube.custom
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def create(i: int) -> None:
        vm = fleet.names[i % len(fleet.names)]
        name = f"done-{i:05d}"
        body = {"apiVersion": c.API_VERSION, "kind": c.COMMAND_KIND,
                "metadata": {"name": name, "namespace": FLEET_NAMESPACE},
                "spec": {"vm": vm, "command": "uptime"}}
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, FLEET_NAMESPACE,
                                               c.COMMAND_PLURAL, body)
        custom.patch_namespaced_custom_object_status(c.GROUP, c.VERSION, FLEET_NAMESPACE,
                                                     c.COMMAND_PLURAL, name,
                                                     finished_status(vm, now))

    t0 = time.monotonic()
    parallel(create, range(total))
    print(f"  created {total} finished RemoteCommands in {time.monotonic() - t0:.1f} s",
          flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled(pid: int, window: float = 2.0, busy: float = 0.2) -> bool:
    """The process used less than ``busy`` of one core over the last ``window`` seconds:
    it has gone through the start-up list of every RemoteCommand (the controller keeps
    no per-command state to poll from outside: no finalizer, no annotation, and finished
    commands are not tracked)."""
    before = cpu_seconds(pid)
    time.sleep(window)
    return cpu_seconds(pid) - before < busy * window


def busy_frames(pid: int) -> str:
    """Where the controller's threads are (py-spy dump): our functions, by thread count."""
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(pid)],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return "(py-spy unavailable)"
    counts: dict[str, int] = {}
    for line in out.splitlines():
        line = line.strip()
        if "(controller/" in line or "(vmfleet/kube.py" in line:
            frame = line.split(" (")[0] + " (" + line.split(" (")[1].split(":")[0] + ")"
            counts[frame] = counts.get(frame, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
    return ", ".join(f"{n}× {frame}" for frame, n in top) or "(no vmfleet frames)"


def controller_rows(bench: Bench) -> None:
    fleet = big_fleet(bench)
    total = 1000 if bench.quick else 10000
    limit = 300 if bench.quick else 900  # seconds to catch up before reporting what it reached
    fleet.stop_controller()
    add_finished_commands(fleet, total)
    fleet.clear_status()
    t0 = time.monotonic()
    fleet.start_controller()
    assert fleet.controller is not None
    pgid = fleet.controller.pid
    sampler = Sampler(pgid, interval=0.25)
    what = f"{size_note(fleet)}, {total} finished RemoteCommands, Deployment runtime"
    try:
        fleet.wait_reconciled(t0, timeout=limit)
        wait_until(lambda: settled(pgid), timeout=max(60.0, limit - (time.monotonic() - t0)),
                   interval=0.1, what="the controller idle (every RemoteCommand seen)")
    except TimeoutError as exc:
        frames = busy_frames(pgid)
        sampler.stop()
        peak = sampler.peak()
        left = fleet.unreconciled()
        print(f"  controller pid {pgid} did not catch up in {limit} s ({left} RemoteVMs not "
              f"reconciled; {exc}); peak {peak:.1f} MiB RSS; its threads: {frames}", flush=True)
        bench.record("memory", "vmfleet_controller", "rss_mb", [peak],
                     note=f"NOT caught up after {limit} s ({left} of {fleet.n} RemoteVMs not "
                          f"reconciled): peak so far; {what}")
        return
    caught_up = time.monotonic()
    time.sleep(10 if bench.quick else 20)
    sampler.stop()
    catch_up = sampler.peak()
    steady = sampler.peak(since=caught_up)
    print(f"  controller pid {pgid}: caught up in {caught_up - t0:.1f} s, peak {catch_up:.1f} "
          f"MiB RSS then, {steady:.1f} MiB steady, {group_pss_mb(pgid):.1f} MiB PSS now",
          flush=True)
    bench.record("memory", "vmfleet_controller", "rss_mb", [steady], note=f"steady: {what}")
    bench.record("memory", "vmfleet_controller", "rss_mb", [catch_up],
                 note=f"catch-up peak ({caught_up - t0:.0f} s from start): {what}")


def run(bench: Bench, wanted: list[str]) -> None:
    for name, step in (("vmfleet_worker", worker_rows), ("guide_baseline", guide_row),
                       ("vmfleet_controller", controller_rows)):
        try:
            step(bench)
        except Exception as exc:
            print(f"  memory/{name} failed: {exc!r}", file=sys.stderr, flush=True)
            bench.skip("memory", name, f"failed: {exc}")
