"""What every benchmark scenario shares: the record of a run, statistics and the outputs.

A scenario is a module in ``bench/scenarios/`` with ``SCENARIOS`` (the ids it measures)
and ``run(bench: Bench, wanted: list[str]) -> None`` (``wanted``: the ids asked for); it
measures each system in alternation (round 1 of every system, then round 2, ...) and records one value per round with
``bench.record(scenario, system, metric, values)``. The table shows the median and p95
over the rounds, and the ratio of each system's median to the reference system of that
scenario (vmfleet's, see ``REFERENCE``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

SCENARIOS = (
    "one_vm_seq", "one_vm_conc8", "fanout50_cold", "fanout50_warm", "fanout200_warm",
    "e2e_latency", "throughput", "cancel_latency", "memory", "scale_vms", "airflow_deferred",
    "signing",
    "fanout1000_loud", "fanout1000_warm", "live_latency", "output_1gb",
)
SYSTEMS = (
    "vmfleet", "vmfleet_pool", "vmfleet_ssh", "vmfleet_worker", "vmfleet_controller", "guide_baseline",
    "guide_send_task", "ssh_controlpersist", "asyncssh", "ansible", "parallel_ssh",
    "airflow_sshoperator", "vmfleet_trigger", "vmfleet_triggerer", "vmfleet_task_log",
    "cncf_kubernetes_pod",
    "vmfleet_logs", "ssh", "vmfleet_output_store", "vmfleet_broker",
)
METRICS = ("commands_per_s", "wall_s", "p50_ms", "p95_ms", "p99_ms", "writes_per_command",
           "writes_per_vm", "writes_per_s",
           "rss_mb", "seconds", "api_watches", "api_connections", "cpu_ms", "mb_per_s",
           "slowdown_pct")
# Lower is better for every metric but these.
HIGHER_IS_BETTER = {"commands_per_s", "mb_per_s"}
# The system every other row of a scenario is compared with (ratio = value / reference).
REFERENCE = {
    "one_vm_seq": "vmfleet_ssh", "one_vm_conc8": "vmfleet_ssh",
    "fanout50_cold": "vmfleet", "fanout50_warm": "vmfleet", "fanout200_warm": "vmfleet",
    "fanout1000_warm": "vmfleet_pool",
    "e2e_latency": "vmfleet", "throughput": "vmfleet", "live_latency": "ssh",
}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank: a value that was measured."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_metrics(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of individual operations."""
    return {f"p{q}_ms": percentile(seconds, q) * 1000 for q in (50, 95, 99)}


@dataclass
class Row:
    scenario: str
    system: str
    metric: str
    value: float  # the median over rounds
    p95: float
    rounds: int
    note: str = ""


@dataclass
class Bench:
    """One run: its settings, the shared servers, and the rows recorded so far."""

    quick: bool
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # scenario, system, why
    versions: dict[str, str] = field(default_factory=dict)
    _cleanups: list[Callable[[], None]] = field(default_factory=list)
    _shared: dict[str, Any] = field(default_factory=dict)

    def record(self, scenario: str, system: str, metric: str, values: Iterable[float],
               note: str = "") -> None:
        assert scenario in SCENARIOS, scenario
        assert system in SYSTEMS, system
        assert metric in METRICS, metric
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError(f"{scenario}/{system}/{metric}: no values")
        row = Row(scenario, system, metric, statistics.median(vals), percentile(vals, 95),
                  len(vals), note)
        self.rows.append(row)
        print(f"  {scenario:15} {system:20} {metric:18} {_fmt(row.value):>10}"
              f"  (p95 {_fmt(row.p95)}, {row.rounds} rounds){'  ' + note if note else ''}",
              flush=True)

    def skip(self, scenario: str, system: str, why: str) -> None:
        self.skipped.append((scenario, system, why))
        print(f"  {scenario:15} {system:20} SKIPPED: {why}", flush=True)

    def rounds(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def shared(self, key: str, make: Callable[[], Any], cleanup: Callable[[Any], None] | None = None) -> Any:
        """A server or fixture started once per run (VMs, control plane, brokers)."""
        if key not in self._shared:
            value = make()
            self._shared[key] = value
            if cleanup is not None:
                self._cleanups.append(lambda: cleanup(value))
        return self._shared[key]

    def close(self) -> None:
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup failed: {exc!r}", file=sys.stderr)


def alternate(rounds: int, systems: dict[str, Callable[[], dict[str, float]]],
              ) -> dict[str, dict[str, list[float]]]:
    """Run each system once per round, in turn; returns ``{system: {metric: [values]}}``.

    A system that raises is reported and dropped from the remaining rounds.
    """
    out: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    live = dict(systems)
    for round_no in range(rounds):
        for name, measure in list(live.items()):
            try:
                metrics = measure()
            except Exception as exc:
                print(f"  {name}: round {round_no + 1} failed: {exc!r}", file=sys.stderr, flush=True)
                del live[name]
                out[name]["error"] = [0.0]
                continue
            for metric, value in metrics.items():
                out[name].setdefault(metric, []).append(value)
    return out


def start_systems(bench: Bench, scenario: str, makers: dict[str, Callable[[], Any]],
                  systems: dict[str, Any]) -> None:
    """Make each system into ``systems`` and warm it up (its connections open); one that
    fails either is skipped with the reason, and the others go on."""
    for name, make in makers.items():
        try:
            systems[name] = make()
        except Exception as exc:
            print(f"  {name}: setup failed: {exc!r}", file=sys.stderr, flush=True)
            bench.skip(scenario, name, f"setup failed: {exc!r}"[:500])
    for name, system in list(systems.items()):
        try:
            system.warm_up()
        except Exception as exc:
            print(f"  {name}: warm-up failed: {exc!r}", file=sys.stderr, flush=True)
            bench.skip(scenario, name, f"warm-up failed: {exc!r}"[:500])
            del systems[name]


def close_systems(systems: dict[str, Any]) -> None:
    """Close every system, whatever the others do."""
    for system in systems.values():
        try:
            system.close()
        except Exception as exc:
            print(f"  cleanup: {exc!r}", flush=True)


def record_all(bench: Bench, scenario: str, measured: dict[str, dict[str, list[float]]],
               notes: dict[str, str] | None = None) -> None:
    for system, metrics in measured.items():
        if "error" in metrics:
            bench.skip(scenario, system, "failed (see the log above)")
            metrics = {k: v for k, v in metrics.items() if k != "error"}
        for metric, values in metrics.items():
            bench.record(scenario, system, metric, values, (notes or {}).get(system, ""))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- outputs


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def ratio(row: Row, rows: Sequence[Row]) -> float | None:
    ref = REFERENCE.get(row.scenario)
    if ref is None or row.system == ref:
        return None
    for other in rows:
        if (other.scenario, other.system, other.metric) == (row.scenario, ref, row.metric):
            return row.value / other.value if other.value else None
    return None


def markdown_table(rows: Sequence[Row]) -> str:
    order = {s: i for i, s in enumerate(SCENARIOS)}
    sysorder = {s: i for i, s in enumerate(SYSTEMS)}
    metorder = {m: i for i, m in enumerate(METRICS)}
    lines = ["| scenario | system | metric | median | p95 | rounds | × vmfleet | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: (order[r.scenario], metorder[r.metric], sysorder[r.system])):
        r = ratio(row, rows)
        note = row.note.replace("|", "/")
        lines.append(
            f"| {row.scenario} | {row.system} | {row.metric} | {_fmt(row.value)} | {_fmt(row.p95)} "
            f"| {row.rounds} | {'' if r is None else f'{r:.2f}'} | {note} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def collect_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("vmfleet", "kopf", "kubernetes", "paramiko", "celery", "kombu", "redis",
                 "asyncssh", "parallel-ssh", "ansible-core"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    for name, argv in (("openssh", ["ssh", "-V"]), ("redis-server", ["redis-server", "--version"])):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            out[name] = (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return out


def write_outputs(bench: Bench, started: datetime, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": started.astimezone(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_at_start": bench._shared.get("loadavg"),
        "quick": bench.quick,
        "versions": bench.versions,
        "rows": [asdict(r) for r in bench.rows],
        "skipped": [{"scenario": s, "system": y, "why": w} for s, y, w in bench.skipped],
    }
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown_table(bench.rows)
    header = (f"Measured {doc['date']} on {doc['machine']}"
              f"{' (QUICK=1: fewer rounds and commands)' if bench.quick else ''}.\n\n")
    skipped = "".join(f"- skipped {s} / {y}: {w}\n" for s, y, w in bench.skipped)
    (out_dir / "latest.md").write_text(header + table + "\n" + ("\n" + skipped if skipped else ""))
    try:
        plot(bench.rows, out_dir / "performance.png", doc["date"])
    except ImportError:
        print("matplotlib is missing: no plot (make bench-setup)", file=sys.stderr)
    return out_dir / "latest.md"


# The headline figures in the plot: (scenario, metric, title).
HEADLINES = (
    ("one_vm_seq", "commands_per_s", "one VM, sequential `true`\ncommands/s (higher is better)"),
    ("one_vm_conc8", "commands_per_s", "one VM, 8 at once\ncommands/s (higher is better)"),
    ("fanout50_warm", "wall_s", "fan-out to 50 VMs, warm\nwall seconds (lower is better)"),
    ("fanout50_cold", "wall_s", "fan-out to 50 VMs, cold\nwall seconds (lower is better)"),
    ("fanout200_warm", "wall_s", "fan-out to 200 VMs, warm\nwall seconds (lower is better)"),
    ("e2e_latency", "p50_ms", "create → Succeeded seen\np50 ms (lower is better)"),
    ("throughput", "commands_per_s", "throughput, 10 VMs\ncommands/s (higher is better)"),
)


def plot(rows: Sequence[Row], path: Path, date: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, m, t) for s, m, t in HEADLINES if any((r.scenario, r.metric) == (s, m) for r in rows)]
    if not panels:
        return
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (scenario, metric, title) in zip(axes.flat, panels, strict=False):
        mine = [r for r in rows if (r.scenario, r.metric) == (scenario, metric)]
        mine.sort(key=lambda r: SYSTEMS.index(r.system))
        colors = ["tab:blue" if r.system.startswith("vmfleet") else "tab:gray" for r in mine]
        ax.barh([r.system for r in mine], [r.value for r in mine], color=colors)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        if max(r.value for r in mine) / max(min(r.value for r in mine), 1e-9) > 50:
            ax.set_xscale("log")
    fig.suptitle(f"vmfleet benchmarks, {date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
