"""throughput: many RemoteCommands over 10 VMs, 32 in flight at any time.

Each command is ``true`` on one of 10 VMs (round robin). A window of 32 threads each
creates a command, waits (one shared watch) until it is finished, checks it Succeeded and
creates the next, until N commands are done (2,000; QUICK=1: 300). Metrics:

* ``commands_per_s``: N over the wall time from the first create to the last finish;
* ``p50_ms``/``p95_ms``/``p99_ms``: create → terminal phase seen, per command, under load;
* ``writes_per_command``: mutating requests (POST, PUT, PATCH, DELETE) on RemoteCommands
  (the object and its status subresource) the API server counted during the window (its
  own ``apiserver_request_total``), over N. The create itself is one of them; the
  controller is the only other writer (its status patches). The note says how they split
  by resource and what else was written meanwhile (RemoteVM status, leases, Events),
  which is not the commands' doing and not counted.

It also prints (and notes) the CPU milliseconds each component spent per command (from
/proc: the workers, the controller, the API server with etcd, the VMs' sshd with the
sessions and commands they ran, Redis, this client): on 2 cores, the sum bounds the rate.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.fixtures import cluster, vm_pool
from bench.harness import Bench, latency_metrics

SCENARIOS = ("throughput",)
IN_FLIGHT = 32
VMS = 10


def run(bench: Bench, wanted: list[str]) -> None:
    fleet = cluster(bench)
    vms = vm_pool(bench, VMS)
    fleet.register(vms)
    total = 300 if bench.quick else 2000
    rounds = bench.rounds(full=1, quick=1)
    # Warm-up: every worker has connected once.
    names = [f"warm-{vm.name}-{uuid.uuid4().hex[:6]}" for vm in vms]
    for name, vm in zip(names, vms, strict=True):
        fleet.create(name, vm=vm.name, command="true")
    fleet.watcher.wait(names, timeout=300)
    fleet.delete_all_commands()

    results: dict[str, list[float]] = {}
    notes = []
    for _ in range(rounds):
        metrics, note = _round(fleet, [vm.name for vm in vms], total)
        for key, value in metrics.items():
            results.setdefault(key, []).append(value)
        notes.append(note)
        fleet.delete_all_commands()
    for metric, values in results.items():
        bench.record("throughput", "vmfleet", metric, values,
                     note=f"{total} commands, {VMS} VMs, {IN_FLIGHT} in flight; {notes[-1]}"
                     if metric == "writes_per_command" else f"{total} commands")


# Which process a CPU second belongs to, by its command line (first match wins).
COMPONENTS = (
    ("worker", "remote_tasks"), ("controller", "kopf"), ("apiserver+etcd", "controlplane"),
    ("sshd (VMs)", "sshd"), ("redis", "redis-server"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system, with reaped children: sshd's sessions and the commands
    they ran) of this benchmark's own processes (it and its descendants), by component."""
    stats: dict[int, tuple[int, float, str]] = {}  # pid: (ppid, seconds, cmdline)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3 of stat): ppid is field 4, utime..cstime 14..17.
        stats[int(proc.name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / CLK_TCK, cmdline)
    me = os.getpid()
    ours = {me}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    out: dict[str, float] = {}
    for pid in ours:
        if pid not in stats:
            continue
        _, seconds, cmdline = stats[pid]
        name = "bench client" if pid == me else next(
            (n for n, pattern in COMPONENTS if pattern in cmdline), "other")
        out[name] = out.get(name, 0.0) + seconds
    return out


def _round(fleet, vm_names: list[str], total: int) -> tuple[dict[str, float], str]:
    tag = uuid.uuid4().hex[:6]
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    phases: Counter[str] = Counter()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            name = f"tp-{tag}-{i}"
            try:
                t0 = fleet.create(name, vm=vm_names[i % len(vm_names)], command="true")
                seen, phase = fleet.watcher.wait([name], timeout=600)[name]
            except BaseException as exc:  # reported after the round
                errors.append(exc)
                return
            with lock:
                latencies.append(seen - t0)
                phases[phase] += 1

    before = fleet.write_requests()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(IN_FLIGHT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu_after = cpu_seconds()
    after = fleet.write_requests()
    if errors:
        raise RuntimeError(f"{len(errors)} commands failed to finish: {errors[0]!r}")
    if phases != Counter({"Succeeded": total}):
        raise RuntimeError(f"not every command Succeeded: {dict(phases)}")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    writes = sum(v for k, v in delta.items() if k.startswith("remotecommands"))
    others = sum(v for k, v in delta.items() if not k.startswith("remotecommands"))
    split = ", ".join(f"{k} {v / total:.2f}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1]))
    split += f" (counted: remotecommands* {writes / total:.2f}; not counted: {others / total:.2f})"
    metrics = {"commands_per_s": total / wall, **latency_metrics(latencies),
               "writes_per_command": writes / total}
    cpu = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
    cpu_split = ", ".join(f"{k} {v / total * 1000:.1f}" for k, v in
                          sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0)
    print(f"  CPU ms per command: {cpu_split} (all: {sum(cpu.values()) / total * 1000:.1f}; "
          f"{os.cpu_count()} cores give {os.cpu_count() * 1000:.0f} CPU ms per second)", flush=True)
    return metrics, f"writes per command: {split}; CPU ms per command: {cpu_split}"
