"""vmfleet benchmarks, side by side with the peers users would pick instead.

    make bench            # every scenario, full size (see bench/README.md)
    make bench QUICK=1    # fewer rounds and commands (fanout200_warm still starts 400 workers)
    .venv/bin/python bench/run.py --only one_vm_seq,one_vm_conc8 --quick

Starts real sshd VMs on loopback addresses (and the local control plane, Redis and the
controller for the end-to-end scenarios), runs each scenario for vmfleet and its peers in
alternation, prints a markdown table (median and p95 over rounds, ratio to vmfleet) and
writes ``bench/results/latest.json``, ``latest.md`` and ``performance.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    RESULTS,
    SCENARIOS,
    Bench,
    Row,
    collect_versions,
    markdown_table,
    write_outputs,
)

# Scenario modules, in the order they run, and the scenario ids each measures.
MODULES = {
    "bench.scenarios.signing": ("signing",),
    "bench.scenarios.ssh_layer": ("one_vm_seq", "one_vm_conc8"),
    "bench.scenarios.fanout": ("fanout50_cold", "fanout50_warm"),
    "bench.scenarios.latency": ("e2e_latency",),
    "bench.scenarios.throughput": ("throughput",),
    "bench.scenarios.cancel": ("cancel_latency",),
    "bench.scenarios.memory": ("memory",),
    "bench.scenarios.scale": ("scale_vms",),
    "bench.scenarios.airflow_deferred": ("airflow_deferred",),
    "bench.scenarios.fanout_loud": ("fanout1000_loud",),
    "bench.scenarios.fanout1000": ("fanout1000_warm",),
    "bench.scenarios.live_output": ("live_latency", "output_1gb"),
    # Last: its 200 worker processes (per-VM mode) stay until the run ends.
    "bench.scenarios.fanout200": ("fanout200_warm",),
}


def previous_rows(out: Path) -> list[Row]:
    """The rows of an earlier run's latest.json (a quick run's notes say so)."""
    try:
        doc = json.loads((out / "latest.json").read_text())
    except (OSError, ValueError):
        return []
    rows = []
    for r in doc.get("rows", []):
        note = r.get("note", "")
        if doc.get("quick") and not note.startswith("QUICK"):
            note = f"QUICK run {doc.get('date', '')}; {note}"
        rows.append(Row(r["scenario"], r["system"], r["metric"], r["value"], r["p95"], r["rounds"], note))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1",
                        help="fewer rounds and commands (make bench QUICK=1)")
    parser.add_argument("--only", default="", help=f"comma-separated scenario ids of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.json/.md/.png go")
    parser.add_argument("--workdir", type=Path, default=None, help="servers' files (default: a temp dir)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other scenarios' rows of the existing latest.json "
                             "(re-run some scenarios, one table)")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmfleet-bench-"))
    bench = Bench(quick=args.quick, workdir=workdir)
    bench.versions = collect_versions()
    bench._shared["loadavg"] = os.getloadavg()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    print(f"vmfleet bench{' (quick)' if args.quick else ''}: workdir {workdir}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        for name, ids in MODULES.items():
            wanted = [s for s in ids if not only or s in only]
            if not wanted:
                continue
            module = importlib.import_module(name)
            print(f"\n== {', '.join(wanted)} ({name})", flush=True)
            module.run(bench, wanted)
    finally:
        bench.close()
    if args.update:
        ran = {row.scenario for row in bench.rows}
        for row in previous_rows(args.out):
            if row.scenario not in ran:
                bench.rows.append(row)
    path = write_outputs(bench, started, args.out)
    print(f"\n{markdown_table(bench.rows)}\n")
    for scenario, system, why in bench.skipped:
        print(f"skipped {scenario} / {system}: {why}")
    print(f"{path} and latest.json written; {time.monotonic() - t0:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and every server stopped. Skip the interpreter's finalization:
    # the peers' native threads (parallel-ssh's libssh2 clients) can abort it, which would
    # turn a finished run into a failed `make bench` (seen once with QUICK=1).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
