"""fanout1000_warm: `true` on 1,000 VMs at once through one worker pool, warm, beside
parallel-ssh and ``ansible -f 200`` on the same VMs.

1,000 RemoteVMs ``fan1k1..fan1k1000`` (``--quick``: 200), aliases of 50 sshd VMs of the
pool (``--quick``: 20), as ``fanout1000_loud`` makes them. Systems, in alternation, each
warm (a fan-out just ran, untimed):

- ``vmfleet_pool``: the 1,000 RemoteVMs in ``workerPool: fan1k`` (one worker process),
  one RemoteCommand with their label selector; wall = create request → the watch sees
  the terminal phase; checked as ``fanout50`` checks (``Succeeded``, every result exit 0
  on attempt 1). The worker's pooled connections are per sshd (aliases share their
  host, port, user and key), so it holds 50 connections and runs 20 channels on each.
- ``parallel_ssh``: ``ParallelSSHClient`` over the 1,000 host entries, ``pool_size``
  1,000 (a connection per entry, no host key checking).
- ``ansible``: ``ansible all -m raw -a true -f 200`` over the 1,000 inventory names,
  host keys checked, ControlPersist (aliases of one sshd share its master).

Metrics: ``wall_s``; for vmfleet also ``writes_per_vm`` (mutating requests on
RemoteCommands over VMs) and ``cpu_ms``: CPU milliseconds of the whole of vmfleet (controller,
pool worker, Redis, API server with etcd; sshd and the bench client apart, in the note)
per round. Targets (issue 26): vmfleet's wall ≤ 3× parallel-ssh's and ≤ 0.1× Ansible's.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.fixtures import Alias, cluster, vm_pool
from bench.harness import Bench, alternate, close_systems, record_all, start_systems
from bench.scenarios.fanout import Ansible, ParallelSSH, Vmfleet
from bench.scenarios.throughput import cpu_seconds

SCENARIOS = ("fanout1000_warm",)
POOL = "fan1k"
LABEL = {"fanout1000": "pool"}
FORKS = 200
# The components that are vmfleet (throughput.COMPONENTS names them by command line).
VMFLEET = ("worker", "controller", "redis", "apiserver+etcd")


class PoolFleet(Vmfleet):
    """``Vmfleet`` with the CPU seconds of each round, by component."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu: list[dict[str, float]] = []

    def round(self, cold: bool) -> dict[str, float]:
        before = cpu_seconds()
        got = super().round(cold)
        after = cpu_seconds()
        spent = {k: after[k] - before.get(k, 0.0) for k in after}
        self.cpu.append(spent)
        got["cpu_ms"] = 1000 * sum(spent.get(k, 0.0) for k in VMFLEET)
        print(f"    vmfleet_pool: {got['wall_s']:.2f} s wall, CPU s "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                          if v >= 0.005)
              + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
        return got

    def warm_up(self) -> None:
        Vmfleet.round(self, cold=False)


def run(bench: Bench, wanted: list[str]) -> None:
    targets = 200 if bench.quick else 1000
    sshds = 20 if bench.quick else 50
    n_rounds = bench.rounds(full=5, quick=3)
    scenario = "fanout1000_warm"
    print(f"  starting {sshds} sshd VMs for {targets} RemoteVMs (aliases) ...", flush=True)
    vms = vm_pool(bench, sshds)
    aliases = [Alias(f"fan1k{i + 1}", vms[i % sshds]) for i in range(targets)]
    workdir = bench.workdir / "fanout1000"
    workdir.mkdir(parents=True, exist_ok=True)
    cluster(bench)
    per = f"{targets} VMs (aliases of {sshds} sshds)"
    notes = {
        "vmfleet_pool": f"end to end, {per} in one workerPool: one worker process",
        "parallel_ssh": f"ParallelSSHClient over {per}, pool_size={targets} (no host key checking)",
        "ansible": f"ansible -m raw -f {FORKS} over {per}, host keys checked, ControlPersist=60s",
    }

    def pool() -> PoolFleet:
        system = PoolFleet(bench, aliases, label=LABEL, prefix="fanout1000", workerPool=POOL)
        notes["vmfleet_pool"] += f"; ready {system.ready_seconds:.0f} s after register"
        return system

    def ansible() -> Ansible:
        system = Ansible(aliases, workdir)  # type: ignore[arg-type]
        system.forks = FORKS
        return system

    makers: dict[str, Callable[[], Any]] = {
        "vmfleet_pool": pool,
        "parallel_ssh": lambda: ParallelSSH(aliases),  # type: ignore[arg-type]
        "ansible": ansible,
    }
    systems: dict[str, Any] = {}
    try:
        start_systems(bench, scenario, makers, systems)

        def measure(system: Any) -> Callable[[], dict[str, float]]:
            return lambda: system.round(False)

        print(f"  {scenario}: {n_rounds} rounds, `true` on {targets} VMs; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        t0 = time.monotonic()
        measured = alternate(n_rounds, {name: measure(s) for name, s in systems.items()})
        print(f"  {scenario}: rounds took {time.monotonic() - t0:.0f} s", flush=True)
        walls = measured.get("vmfleet_pool", {}).get("wall_s")
        if walls:
            mine = statistics.median(walls)
            for peer in ("parallel_ssh", "ansible"):
                theirs = measured.get(peer, {}).get("wall_s")
                if theirs:
                    notes["vmfleet_pool"] += f"; {mine / statistics.median(theirs):.2f}× {peer}"
        fleet = systems.get("vmfleet_pool")
        if fleet is not None and fleet.cpu:
            keys = sorted({k for spent in fleet.cpu for k in spent})
            split = {k: statistics.median(spent.get(k, 0.0) for spent in fleet.cpu) for k in keys}
            notes["vmfleet_pool"] += "; CPU s per round (median): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v >= 0.005)
        notes["vmfleet_pool"] += f"; load average {os.getloadavg()[0]:.1f} at the end"
        record_all(bench, scenario, measured, notes)
    finally:
        close_systems(systems)
