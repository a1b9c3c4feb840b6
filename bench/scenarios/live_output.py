"""Watching commands: how fast a VM's line reaches the screen, and what 1 GB of output costs.

Its own control plane, broker, output store and controller with the output API (the
shared cluster of the other scenarios has none), on the shared sshd VMs.

* ``live_latency``: after 2 s (the reader is connected by then) the VM prints a line
  with its own clock (``date +%s.%N``) every 0.2 s; the reader takes its clock when
  the line arrives on its stdout (one machine, one clock). ``vmfleet_logs``:
  ``vmfleet logs -f`` (a process, as a user runs it: through the API server's
  aggregation layer to the controller, which follows the output store); ``ssh``:
  ``ssh host cmd`` (OpenSSH, pinned host key), the floor. p50/p99 ms.
* ``output_1gb``: one RemoteCommand prints 1 GiB (1 KiB lines, ``yes | head -c``) at
  full speed while ``vmfleet logs -f`` follows it. ``vmfleet``: wall seconds and MB/s of
  the noisy command (the worker reads every byte; the store keeps the first 16 MiB);
  past a burst of a second's worth, the worker reads a command's output at most
  ``VMFLEET_OUTPUT_READ_RATE_BYTES`` (4 MiB/s) fast and SSH flow control holds it back:
  its MB/s is about that limit. ``rss_mb`` of each component: its peak during the run
  minus its idle RSS before (worker, controller, output store, broker, the ``vmfleet
  logs`` reader); ``slowdown_pct``: how much longer ``seq 1 300000`` (a second command on the
  same worker, 1.9 MB of output) takes, created to ``Succeeded``, while the loud one
  prints than while it is paused: ``PAIRS`` (6) pairs of runs a second apart, one with the loud
  command's ``yes`` stopped on the VM (SIGSTOP; its channel drained), one printing again,
  from 1 s after it started. Pairs, because the machine's load (other work on it) drifts
  over minutes far more than 10 %; the runs alone before and after the loud command (5
  each) are in the note, with each run's parts (to the worker's claim, the worker's run,
  to the status read) and the load average; ``vmfleet_worker`` ``slowdown_pct``: the
  worker's part alone. The end is polled every 10 ms (at 50 ms the poll's step was most
  of a 60 ms command). ``cpu_ms``: CPU of each component while the loud command ran, ms
  per second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from bench.fixtures import NAMESPACE, Cluster, vm_pool
from bench.harness import Bench, percentile
from bench.scenarios.memory import Sampler, group_pids, group_rss_mb
from bench.scenarios.ssh_layer import openssh_argv
from vmfleet.api.times import parse_rfc3339
from vmfleet.dev import logsapi
from vmfleet.dev.brokers import RedisServer, output_store
from vmfleet.dev.sshd import SshdVM
from vmfleet.procs import free_port, read_pid_file, wait_until

SCENARIOS = ("live_latency", "output_1gb")
VMFLEET = str(Path(sys.executable).with_name("vmfleet"))
ONE_GIB = 1024 * 1024 * 1024
# Each run of the second command prints 1.9 MB, which the output store keeps too: its RSS
# over idle holds the pairs' output (6 pairs: 23 MB) beside the loud command's 16 MiB.
PAIRS = 6


class LiveCluster(Cluster):
    """The bench's cluster with the output store and the output API."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.output: RedisServer = output_store(workdir / "output")

    def start_controller(self, extra_env: dict[str, str] | None = None) -> None:
        self.output.start()
        ca, serving = logsapi.serving_pki(self.workdir / "logs-api")
        port = free_port()
        super().start_controller({
            "VMFLEET_OUTPUT_URL": self.output.url, "VMFLEET_LOGS_API_PORT": str(port),
            "VMFLEET_LOGS_API_CERT_FILE": str(serving.cert),
            "VMFLEET_LOGS_API_KEY_FILE": str(serving.key), **(extra_env or {})})
        logsapi.register(self.cp.kubectl_run, port, ca.cert.read_bytes())
        logsapi.wait_available(self.cp.kubectl_run, timeout=120)

    def stop(self) -> None:
        super().stop()
        self.output.stop()

    def env(self) -> dict[str, str]:
        env = self.cp.env()
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
        return env

    def finished(self, name: str, timeout: float = 600, interval: float = 0.05
                 ) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def done() -> bool:
            obj = self.kube.get_command(NAMESPACE, name) or {}
            found.update(obj)
            return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled")

        wait_until(done, timeout=timeout, interval=interval, what=f"RemoteCommand {name}")
        return found


def _arrivals(argv: list[str], env: dict[str, str] | None, n: int) -> list[float]:
    """Run ``argv`` (it prints ``n`` lines of VM clock); the delay of each line, s."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            bufsize=0)
    assert proc.stdout is not None
    delays = []
    pending = b""
    while len(delays) < n:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.time()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                delays.append(now - float(line.strip()))
    proc.wait(timeout=60)
    return delays


def _ssh_argv(vm: SshdVM) -> list[str]:
    """``ssh host`` as a person runs it (a connection of its own, pinned host key)."""
    argv = openssh_argv(vm, Path("/nonexistent"))
    keep: list[str] = []
    skip = False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "-o" and argv[index + 1].startswith("Control"):
            skip = True
            continue
        keep.append(arg)
    return keep


def _ticker(n: int) -> str:
    # The first second is quiet: the reader (a process that starts, reaches the API
    # server and follows) is there before the first line, so each line is seen live.
    return f"sleep 2; for i in $(seq 1 {n}); do date +%s.%N; sleep 0.2; done"


def live_latency(bench: Bench, fleet: LiveCluster, vm: SshdVM) -> None:
    n = 50 if bench.quick else 200
    rounds = bench.rounds(full=3, quick=1)
    ours: list[float] = []
    floor: list[float] = []
    for _ in range(rounds):
        name = f"tick-{uuid.uuid4().hex[:6]}"
        fleet.create(name, vm=vm.name, command=_ticker(n))
        ours += _arrivals([VMFLEET, "logs", "-f", "-n", NAMESPACE, name], fleet.env(), n)
        fleet.finished(name)
        floor += _arrivals([*_ssh_argv(vm), _ticker(n)], None, n)
    for system, delays in (("vmfleet_logs", ours), ("ssh", floor)):
        ms = [d * 1000 for d in delays]
        bench.record("live_latency", system, "p50_ms", [percentile(ms, 50)],
                     f"{len(ms)} lines, one every 0.2 s; VM clock to the reader's stdout")
        bench.record("live_latency", system, "p99_ms", [percentile(ms, 99)])


def _pgid(path: Path) -> int | None:
    recorded = read_pid_file(path)
    return recorded[0] if recorded else None


class Timed(NamedTuple):
    """One run of the second command, s: created to ``Succeeded`` seen, and its parts from
    the result's times: to the worker's claim (``startTime``: the controller's dispatch,
    the broker, the worker taking it), the worker's run (claim to ``completionTime``), and
    from there to the status read (the report, the controller's write, the poll)."""

    total: float
    dispatch: float
    run: float
    report: float


def _timed_command(fleet: LiveCluster, vm: SshdVM, command: str) -> Timed:
    name = f"probe-{uuid.uuid4().hex[:6]}"
    started, wall = time.perf_counter(), time.time()
    fleet.create(name, vm=vm.name, command=command)
    obj = fleet.finished(name, interval=0.01)
    total = time.perf_counter() - started
    result = ((obj.get("status") or {}).get("results") or [{}])[0]
    assert result.get("phase") == "Succeeded", f"the timed command {command!r}: {result}"
    claimed = parse_rfc3339(result["startTime"]).timestamp() - wall
    ended = parse_rfc3339(result["completionTime"]).timestamp() - wall
    return Timed(total, claimed, ended - claimed, total - ended)


def _ms(seconds: list[float]) -> str:
    return "/".join(f"{s * 1000:.0f}" for s in seconds)


def _parts(runs: list[Timed]) -> str:
    return ", ".join(f"{part} {statistics.median(getattr(r, part) for r in runs) * 1000:.0f}"
                     for part in ("dispatch", "run", "report"))


def _cpu_s(pgid: int) -> float:
    """CPU seconds of a process group's processes (and the children they waited for)."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _paused(vm: SshdVM, line: str) -> Iterator[None]:
    """The loud command's ``yes`` stopped on the VM (SIGSTOP) for the block, if it runs."""
    pids = [pid for pid, argv in vm.commands().items() if argv.startswith(f"yes {line}")]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def output_1gb(bench: Bench, fleet: LiveCluster, vm: SshdVM) -> None:
    size = ONE_GIB // 4 if bench.quick else ONE_GIB
    second = "seq 1 300000"
    alone = [_timed_command(fleet, vm, second) for _ in range(5)]
    groups: dict[str, int] = {}
    workers = sorted(fleet.worker_dir.glob("*.pgid"))
    if workers and (pgid := _pgid(workers[0])) is not None:
        groups["vmfleet_worker"] = pgid
    if fleet.controller is not None:
        groups["vmfleet_controller"] = os.getpgid(fleet.controller.pid)
    for system, server in (("vmfleet_output_store", fleet.output),
                           ("vmfleet_broker", fleet.redis)):
        if (pgid := _pgid(server.pid_file)) is not None:
            groups[system] = pgid
    idle = {system: group_rss_mb(pgid) for system, pgid in groups.items()}
    samplers = {system: Sampler(pgid, interval=0.2) for system, pgid in groups.items()}

    name = f"loud-{uuid.uuid4().hex[:6]}"
    line = "x" * 1023
    load_before = os.getloadavg()[0]
    cpu_before = {system: _cpu_s(pgid) for system, pgid in groups.items()}
    started = time.perf_counter()
    fleet.create(name, vm=vm.name, command=f"yes {line} | head -c {size}")
    reader = subprocess.Popen([VMFLEET, "logs", "-f", "-n", NAMESPACE, name],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=fleet.env(), start_new_session=True)
    reader_sampler = Sampler(reader.pid, interval=0.2)
    during: list[Timed] = []
    paused: list[Timed] = []
    stop = threading.Event()

    def probe() -> None:
        time.sleep(1.0)  # the loud command prints by then
        while not stop.is_set() and len(during) < PAIRS:
            # A pair, a second apart: the loud command paused (its `yes` stopped on the VM;
            # its channel drains in 0.5 s at the read rate), then printing again.
            with _paused(vm, line):
                stop.wait(1.0)
                if not stop.is_set():
                    paused.append(_timed_command(fleet, vm, second))
            stop.wait(0.5)
            if not stop.is_set():
                during.append(_timed_command(fleet, vm, second))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    obj = fleet.finished(name, timeout=3600)
    wall = time.perf_counter() - started
    cpu = {system: _cpu_s(pgid) - cpu_before[system] for system, pgid in groups.items()}
    stop.set()
    prober.join(timeout=120)
    reader.wait(timeout=120)
    for sampler in (*samplers.values(), reader_sampler):
        sampler.stop()
    alone += [_timed_command(fleet, vm, second) for _ in range(5)]
    result = ((obj.get("status") or {}).get("results") or [{}])[0]
    printed = int(result.get("stdoutBytes") or 0)
    note = f"{printed / 2**20:.0f} MiB printed, {result.get('phase')}"
    bench.record("output_1gb", "vmfleet", "wall_s", [wall], note)
    bench.record("output_1gb", "vmfleet", "mb_per_s", [printed / 2**20 / wall])
    if during and paused:
        quiet = statistics.median(r.total for r in paused)
        loaded = statistics.median(r.total for r in during)
        apart = statistics.median(r.total for r in alone)
        bench.record("output_1gb", "vmfleet", "slowdown_pct", [(loaded / quiet - 1) * 100],
                     f"`{second}` on the same worker, {len(during)} pairs a second apart: "
                     f"{quiet * 1000:.0f} ms with the loud command paused, {loaded * 1000:.0f} "
                     f"ms while it prints (ms paused {_ms([r.total for r in paused])}, printing "
                     f"{_ms([r.total for r in during])}; median ms paused: {_parts(paused)}; "
                     f"printing: {_parts(during)}); before and after it, alone: "
                     f"{apart * 1000:.0f} ms ({_ms([r.total for r in alone])}); load average "
                     f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        worker_run = statistics.median(r.run for r in during) / statistics.median(
            r.run for r in paused)
        bench.record("output_1gb", "vmfleet_worker", "slowdown_pct", [(worker_run - 1) * 100],
                     "the same pairs, the worker's part only (claim to completionTime)")
    for system, seconds in cpu.items():
        bench.record("output_1gb", system, "cpu_ms", [seconds / wall * 1000],
                     "CPU ms per second while the loud command ran (10: 1 % of a core)")
    for system, sampler in samplers.items():
        bench.record("output_1gb", system, "rss_mb", [sampler.peak() - idle[system]],
                     f"peak over idle ({idle[system]:.0f} MiB idle)")
    bench.record("output_1gb", "vmfleet_logs", "rss_mb", [reader_sampler.peak()],
                 "the `vmfleet logs -f` process, peak")


def run(bench: Bench, wanted: list[str]) -> None:
    fleet: LiveCluster = bench.shared("live-cluster",
                                      lambda: LiveCluster(bench.workdir / "live-cluster").start(),
                                      lambda c: c.stop())
    vm = vm_pool(bench, 1)[0]
    fleet.register([vm], maxConcurrentCommands=4)
    if "live_latency" in wanted:
        live_latency(bench, fleet, vm)
    if "output_1gb" in wanted:
        output_1gb(bench, fleet, vm)
