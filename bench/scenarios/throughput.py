"""throughput: many RemoteCommands over 10 VMs, 32 in flight at any time.

Each command is ``true`` on one of 10 VMs (round robin). A window of 32 threads each
creates a command, waits (one shared watch) until it is finished, checks it Succeeded and
creates the next, until N commands are done (2,000; QUICK=1: 300). Metrics:

* ``commands_per_s``: N over the wall time from the first create to the last finish;
* ``p50_ms``/``p95_ms``/``p99_ms``: create → terminal phase seen, per command, under load;
* ``writes_per_command``: mutating requests (POST, PUT, PATCH, DELETE) the API server
  counted during the window (its own ``apiserver_request_total``), over N. The create
  itself is one of them. The note says how they split by resource.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

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
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(IN_FLIGHT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = fleet.write_requests()
    if errors:
        raise RuntimeError(f"{len(errors)} commands failed to finish: {errors[0]!r}")
    if phases != Counter({"Succeeded": total}):
        raise RuntimeError(f"not every command Succeeded: {dict(phases)}")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    writes = sum(delta.values())
    split = ", ".join(f"{k} {v / total:.2f}" for k, v in sorted(delta.items(), key=lambda kv: -kv[1]))
    metrics = {"commands_per_s": total / wall, **latency_metrics(latencies),
               "writes_per_command": writes / total}
    return metrics, f"per command: {split}"
