"""fanout1000_loud: 1,000 VMs each printing 256 KiB, one RemoteCommand; its status stays
within the output budget.

1,000 RemoteVMs ``loud1..loud1000`` (QUICK=1: 100), aliases of 50 sshd VMs of the pool
(QUICK=1: 10), all in ``workerPool: loud`` (one worker process). One RemoteCommand with
their label selector prints 256 KiB of stdout on each (``output.maxBytes: 262144``):
256 MiB of output in all, which the workers report and the controller cuts to its one
budget (``vmfleet.api.output``: 1 MiB of tails per status, ~524 bytes per stream per VM
at 1,000 VMs). Wall = create request → the watch sees the terminal phase; then the
object must say ``Succeeded`` with every result exit 0, ``outputTruncated: true``, the
exact ``stdoutBytes``, and the stored object far below etcd's 1.5 MiB limit.

Metrics: ``wall_s``, ``writes_per_vm`` (mutating requests on RemoteCommands over VMs);
the note gives the stored object's size and its tails' total.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from bench.fixtures import NAMESPACE, Alias, cluster, vm_pool
from bench.harness import Bench, record_all
from bench.scenarios.fanout import command_writes
from bench.scenarios.ssh_layer import CommandFailed
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION
from vmfleet.api.output import STATUS_OUTPUT_BUDGET

SCENARIOS = ("fanout1000_loud",)
POOL = "loud"
LABEL = {"bench": "loud"}
OUTPUT_BYTES = 256 * 1024
COMMAND = f"head -c {OUTPUT_BYTES} /dev/zero | tr '\\0' x"
ROUND_TIMEOUT = 1800.0
ETCD_LIMIT = 1536 * 1024


def check(obj: dict[str, Any], targets: int) -> tuple[int, int]:
    """The round's result is what a user must see; returns (object bytes, tails bytes)."""
    status = obj.get("status") or {}
    results = status.get("results") or []
    if status.get("phase") != "Succeeded" or len(results) != targets:
        raise CommandFailed(f"ended {status.get('phase')} with summary {status.get('summary')}")
    bad = [r for r in results if r.get("exitCode") != 0 or r.get("stdoutBytes") != OUTPUT_BYTES
           or r.get("outputTruncated") is not True]
    if bad:
        raise CommandFailed(f"{len(bad)} results not exit 0 / cut / exact bytes: {bad[:2]}")
    tails = sum(len(str(r.get(k) or "").encode()) for r in results for k in ("stdout", "stderr"))
    size = len(json.dumps(obj).encode())
    if tails > STATUS_OUTPUT_BUDGET or size >= ETCD_LIMIT:
        raise CommandFailed(f"status too large: {size} bytes, tails {tails}")
    return size, tails


def run(bench: Bench, wanted: list[str]) -> None:
    targets = 100 if bench.quick else 1000
    sshds = 10 if bench.quick else 50
    n_rounds = bench.rounds(full=3, quick=1)
    print(f"  starting {sshds} sshd VMs, registering {targets} RemoteVMs in pool {POOL} ...",
          flush=True)
    vms = vm_pool(bench, sshds)
    c = cluster(bench)
    aliases = [Alias(f"loud{i + 1}", vms[i % sshds]) for i in range(targets)]
    t0 = time.monotonic()
    c.register(aliases, labels=LABEL, workerPool=POOL)
    print(f"  pool worker ready for {targets} VMs after {time.monotonic() - t0:.0f} s", flush=True)
    walls: list[float] = []
    writes: list[float] = []
    sizes: list[tuple[int, int]] = []
    for n in range(n_rounds):
        name = f"loud-{n}-{uuid.uuid4().hex[:5]}"
        before = command_writes(c)
        start = c.create(name, selector={"matchLabels": LABEL}, command=COMMAND,
                         output={"maxBytes": OUTPUT_BYTES})
        try:
            t_end, _ = c.watcher.wait([name], timeout=ROUND_TIMEOUT)[name]
            walls.append(t_end - start)
            writes.append((command_writes(c) - before) / targets)
            obj: dict[str, Any] = c.kube.custom.get_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, NAMESPACE, COMMAND_PLURAL, name)
            sizes.append(check(obj, targets))
        finally:
            c.kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE,
                                                          COMMAND_PLURAL, name)
        print(f"    round {n + 1}: {walls[-1]:.1f} s, object {sizes[-1][0]} bytes "
              f"(tails {sizes[-1][1]})", flush=True)
    size, tails = max(sizes)
    note = (f"{targets} VMs (aliases of {sshds} sshds) in one workerPool, 256 KiB stdout each; "
            f"stored object {size / 1024:.0f} KiB, tails {tails / 1024:.0f} KiB "
            f"(budget {STATUS_OUTPUT_BUDGET // 1024} KiB), every result outputTruncated")
    record_all(bench, "fanout1000_loud",
               {"vmfleet_pool": {"wall_s": walls, "writes_per_vm": writes}},
               {"vmfleet_pool": note})
