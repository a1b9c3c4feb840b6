"""cancel_latency: delete a running RemoteCommand; how long until its remote process is gone.

One RemoteVM ``cancelvm`` (an alias of the pool's vm1 sshd with its own queue and worker,
``maxConcurrentCommands: 4``, so the worker has 4 threads) on ``fixtures.cluster``. Each
cancel: create ``sleep <S>`` (S unique per cancel), wait until a process with that
command line runs on the VM (the VM's process list: the descendants of its sshd, read
from /proc every 5 ms), then time from just before the ``DELETE`` request until no such
process is left. The deleted object must be gone at once (no finalizer). Two cases:

- *slots free*: the command is the only one on the VM;
- *every slot busy*: 3 other ``sleep`` commands hold the VM's other 3 slots (and the
  worker's other 3 threads) throughout, so the cancel cannot wait for a free thread.

N cancels per case (50; quick: 25). Metrics: p50/p95/p99 ms per case (target p99 ≤ 1 s,
issue 17). A cancel whose process is still there after 30 s counts as 30 s (noted).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.fixtures import NAMESPACE, Alias, Cluster, cluster, vm_pool
from bench.harness import Bench, latency_metrics
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION

SCENARIOS = ("cancel_latency",)
SLOTS = 4
GONE_TIMEOUT = 30.0
START_TIMEOUT = 60.0


class VMProcesses:
    """The processes of one local sshd VM, by command line."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm

    def matching(self, needle: str, among: list[int] | None = None, exact: bool = False
                 ) -> list[int]:
        """Processes whose command line contains ``needle`` (``exact``: is ``needle``)."""
        return [pid for pid, args in self.vm.commands(among).items()
                if (args == needle if exact else needle in args)]

    def wait(self, needle: str, present: bool, timeout: float, interval: float = 0.005) -> float:
        """perf_counter time when the command itself runs (a process whose command line is
        ``needle``: the go was given, the attempt claimed), or when every process that
        names it (the wrapper shells too) is gone; only those are polled then (a scan of
        the VM's processes takes milliseconds)."""
        deadline = time.perf_counter() + timeout
        among = None if present else self.matching(needle)
        while True:
            now = time.perf_counter()
            if bool(self.matching(needle, among, exact=present)) == present:
                return now
            if now > deadline:
                raise TimeoutError(f"`{needle}` {'not started' if present else 'still running'} "
                                   f"after {timeout:.0f} s")
            time.sleep(interval)


def _delete(fleet: Cluster, name: str) -> None:
    fleet.kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, COMMAND_PLURAL,
                                                      name)


def _gone(fleet: Cluster, name: str, timeout: float = 10.0) -> bool:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fleet.kube.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE,
                                                           COMMAND_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        time.sleep(0.05)
    return False


def cancels(fleet: Cluster, procs: VMProcesses, vm: str, n: int, base: int, tag: str
            ) -> tuple[list[float], int, int]:
    """n cancels; (seconds each, timed out, objects not gone at once)."""
    seconds, timed_out, lingering = [], 0, 0
    for i in range(n):
        needle = f"sleep {base + i}"
        name = f"cancel-{tag}-{base + i}"
        fleet.create(name, vm=vm, command=needle)
        procs.wait(needle, present=True, timeout=START_TIMEOUT)
        t0 = time.perf_counter()
        _delete(fleet, name)
        try:
            seconds.append(procs.wait(needle, present=False, timeout=GONE_TIMEOUT) - t0)
        except TimeoutError:
            seconds.append(GONE_TIMEOUT)
            timed_out += 1
        if not _gone(fleet, name):
            lingering += 1
    return seconds, timed_out, lingering


def run(bench: Bench, wanted: list[str]) -> None:
    fleet = cluster(bench)
    sshd = vm_pool(bench, 1)[0]
    vm = Alias("cancelvm", sshd)
    fleet.register([vm], maxConcurrentCommands=SLOTS)
    procs = VMProcesses(sshd)
    n = 25 if bench.quick else 50
    tag = uuid.uuid4().hex[:5]
    # Warm-up: the worker's connection is open.
    cancels(fleet, procs, vm.name, 2, 5000, tag)

    free, free_out, free_left = cancels(fleet, procs, vm.name, n, 6000, tag)

    holders = [f"sleep {8000 + j}" for j in range(SLOTS - 1)]
    names = [f"cancel-{tag}-hold-{j}" for j in range(SLOTS - 1)]
    for name, needle in zip(names, holders, strict=True):
        fleet.create(name, vm=vm.name, command=needle)
    for needle in holders:
        procs.wait(needle, present=True, timeout=START_TIMEOUT)
    try:
        busy, busy_out, busy_left = cancels(fleet, procs, vm.name, n, 7000, tag)
        still = [needle for needle in holders if not procs.matching(needle)]
        if still:
            raise RuntimeError(f"the slot holders ended during the busy case: {still}")
    finally:
        for name in names:
            _delete(fleet, name)
        for needle in holders:
            procs.wait(needle, present=False, timeout=GONE_TIMEOUT)

    for label, values, out, left in (
            (f"slots free (1 of {SLOTS} busy)", free, free_out, free_left),
            (f"every slot busy ({SLOTS} of {SLOTS}: {SLOTS - 1} other sleeps)", busy, busy_out,
             busy_left)):
        metrics = latency_metrics(values)
        note = (f"{label}: DELETE of a running `sleep` → its process gone on the VM; {n} "
                f"cancels; max {max(values) * 1000:.0f} ms")
        if out:
            note += f"; {out} still running after {GONE_TIMEOUT:.0f} s (counted as that)"
        if left:
            note += f"; {left} objects not gone within 10 s"
        print(f"  cancel_latency {label}: p50 {metrics['p50_ms']:.0f} ms, p99 "
              f"{metrics['p99_ms']:.0f} ms, max {max(values) * 1000:.0f} ms", flush=True)
        for metric, value in metrics.items():
            bench.record("cancel_latency", "vmfleet", metric, [value], note=note)
