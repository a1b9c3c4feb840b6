"""fanout200_warm: `true` on 200 VMs at once, warm; per-VM workers and one worker pool.

200 sshd VMs from the pool (127.0.30.1-200). Systems, in alternation, each warm (a
fan-out just ran, untimed):

- ``vmfleet_pool``: 200 RemoteVMs ``poolvm1..poolvm200`` (aliases of the 200 sshds) with
  ``spec.workerPool: fan200``: one worker process (Process runtime) consumes the 200
  queues, with ``sum(maxConcurrentCommands)`` threads (capped at 256). One RemoteCommand
  with their label selector; wall = create request → the watch sees the terminal phase;
  checked as ``fanout50`` checks (``Succeeded``, 200 results exit 0 on attempt 1).
- ``vmfleet``: the same with 200 RemoteVMs ``vm1..vm200`` without a pool: one worker
  process per VM, as the Process runtime starts them (200 Celery processes on 2 cores:
  their start-up time and summed RSS are printed and noted). Skipped when the machine
  has not the memory for them (MemAvailable < 1.2 × the new workers × one worker's PSS
  + 3 GiB).
- ``ansible``: ``ansible all -m raw -a true -f 200``, host keys checked, ControlPersist.
- ``parallel_ssh``: ``ParallelSSHClient`` with ``pool_size=200`` (no host key checking).

Metrics: ``wall_s`` and, for vmfleet, ``writes_per_vm``: mutating requests on
RemoteCommands (the create and the controller's status patches) during the round, over
200 (targets: wall ≤ 0.25× ``ansible -f 200``, ≤ 0.2 writes per VM).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fixtures import NAMESPACE, Alias, cluster, vm_pool
from bench.harness import Bench, alternate, close_systems, record_all, start_systems
from bench.scenarios.fanout import Ansible, ParallelSSH, Vmfleet
from bench.scenarios.memory import proc_kib

SCENARIOS = ("fanout200_warm",)
N_VMS = 200
POOL = "fan200"
POOL_LABEL = {"fanout200": "pool"}
PER_VM_LABEL = {"fanout200": "per-vm"}


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _groups() -> dict[int, list[int]]:
    """Every live process by process group, from one scan of /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # from field 3 (state)
        if fields[0] != b"Z":
            out.setdefault(int(fields[2]), []).append(int(entry))
    return out


def workers_rss_mb(worker_dir: Path, names: list[str], pss: bool = False) -> tuple[float, int]:
    """Summed RSS (or PSS) in MiB of the worker process groups whose pid files name these
    VMs or pools, and how many groups (one scan of /proc for all of them)."""
    groups = _groups()
    path, key = ("smaps_rollup", "Pss") if pss else ("status", "VmRSS")
    total, count = 0.0, 0
    for name in names:
        for pid_file in worker_dir.glob(f"{NAMESPACE}.{name}.*.pgid"):
            try:
                pgid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            kib = sum(proc_kib(pid, path, key) for pid in groups.get(pgid, []))
            if kib:
                total += kib / 1024
                count += 1
    return total, count


def run(bench: Bench, wanted: list[str]) -> None:
    print(f"  starting {N_VMS} sshd VMs ...", flush=True)
    vms = vm_pool(bench, N_VMS)
    workdir = bench.workdir / "fanout200"
    workdir.mkdir(parents=True, exist_ok=True)
    n_rounds = bench.rounds(full=5, quick=2)
    fleet = cluster(bench)
    scenario = "fanout200_warm"
    notes = {
        "vmfleet_pool": f"end to end, {N_VMS} RemoteVMs in one workerPool: one worker process",
        "vmfleet": f"end to end, {N_VMS} RemoteVMs, a worker process each (Process runtime)",
        "ansible": f"ansible -m raw -f {N_VMS}, host keys checked, ControlPersist=60s",
        "parallel_ssh": f"ParallelSSHClient pool_size={N_VMS} (no host key checking)",
    }

    systems: dict[str, Any] = {}

    def pool() -> Vmfleet:
        aliases = [Alias(f"pool{vm.name}", vm) for vm in vms]
        system = Vmfleet(bench, aliases, label=POOL_LABEL, prefix="fanout200-pool",
                         workerPool=POOL)
        rss, procs = workers_rss_mb(fleet.worker_dir, [f"pool-{POOL}"])
        pss, _ = workers_rss_mb(fleet.worker_dir, [f"pool-{POOL}"], pss=True)
        notes["vmfleet_pool"] += (f"; ready {system.ready_seconds:.0f} s after register, "
                                  f"{procs} process, {rss:.0f} MiB RSS ({pss:.0f} MiB PSS) idle")
        return system

    def per_vm() -> Vmfleet:
        # Memory: 200 Python processes. Each one's PSS (its own pages; RSS also counts the
        # shared libraries once per process) from a worker that runs already.
        one, _ = workers_rss_mb(fleet.worker_dir, [f"pool-{POOL}"], pss=True)
        pss, procs = workers_rss_mb(fleet.worker_dir, [vm.name for vm in vms[:50]], pss=True)
        per_worker = pss / procs if procs else max(one, 60.0)
        need = 1.2 * (N_VMS - procs) * per_worker + 3072
        if mem_available_mb() < need:
            raise RuntimeError(f"not started: {N_VMS - procs} more workers of ~{per_worker:.0f} "
                               f"MiB PSS need ~{need:.0f} MiB, {mem_available_mb():.0f} MiB "
                               "available")
        system = Vmfleet(bench, vms, label=PER_VM_LABEL, prefix="fanout200")
        rss, procs = workers_rss_mb(fleet.worker_dir, [vm.name for vm in vms])
        pss, _ = workers_rss_mb(fleet.worker_dir, [vm.name for vm in vms], pss=True)
        notes["vmfleet"] += (f"; {procs} worker processes ready {system.ready_seconds:.0f} s "
                             f"after register, {rss:.0f} MiB RSS ({pss:.0f} MiB PSS) summed "
                             f"idle; load average "
                             f"{os.getloadavg()[0]:.1f} with them idle")
        return system

    makers: dict[str, Callable[[], Any]] = {
        "vmfleet_pool": pool,
        "vmfleet": per_vm,
        "ansible": lambda: Ansible(vms, workdir),
        "parallel_ssh": lambda: ParallelSSH(vms),
    }
    try:
        start_systems(bench, scenario, makers, systems)

        def measure(system: Any) -> Callable[[], dict[str, float]]:
            return lambda: system.round(False)

        print(f"  {scenario}: {n_rounds} rounds, `true` on {N_VMS} VMs; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        t0 = time.monotonic()
        measured = alternate(n_rounds, {name: measure(s) for name, s in systems.items()})
        print(f"  {scenario}: rounds took {time.monotonic() - t0:.0f} s", flush=True)
        ansible = measured.get("ansible", {}).get("wall_s")
        if ansible:
            import statistics

            ref = statistics.median(ansible)
            for name in ("vmfleet_pool", "vmfleet"):
                walls = measured.get(name, {}).get("wall_s")
                if walls:
                    notes[name] += f"; {statistics.median(walls) / ref:.2f}× ansible -f {N_VMS}"
        record_all(bench, scenario, measured, notes)
    finally:
        close_systems(systems)
