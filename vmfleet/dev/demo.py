"""The original guide's flow, on the local environment, through RemoteCommands.

Health of every VM, a command on each VM, three commands in parallel, then cleanup;
prints what each VM answered.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from vmfleet.api import constants as c
from vmfleet.api.constants import Phase
from vmfleet.api.reports import F
from vmfleet.kube import Kube


@dataclass
class Step:
    title: str
    name: str
    spec: dict[str, Any]


def _create(kube: Kube, namespace: str, step: Step) -> None:
    kube.custom.create_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL,
        {"apiVersion": c.API_VERSION, "kind": c.COMMAND_KIND,
         "metadata": {"name": step.name, "labels": {"app.kubernetes.io/part-of": "vmfleet-demo"}},
         "spec": step.spec},
    )


def _wait(kube: Kube, namespace: str, names: list[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    done: dict[str, Any] = {}
    while len(done) < len(names):
        for name in names:
            if name in done:
                continue
            obj = kube.get_command(namespace, name)
            if obj and (obj.get("status") or {}).get("phase") in Phase.TERMINAL:
                done[name] = obj
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(set(names) - set(done)))
            raise TimeoutError(f"RemoteCommands not finished after {timeout:.0f}s: {missing}")
        time.sleep(0.2)
    return done


def _rows(title: str, obj: dict[str, Any]) -> list[list[str]]:
    rows = []
    for result in obj["status"].get("results", []):
        lines = (result.get("stdout") or result.get("message") or "").strip().splitlines()
        if result.get("transfer") and result["phase"] == Phase.SUCCEEDED:
            t = result["transfer"]
            lines = [f"{t['bytes']} bytes to {t['path']}, sha256 {t['sha256'][:12]}"
                     f"{', verified' if t.get('verified') else ''}"]
        output = " | ".join(" ".join(line.split()) for line in lines)
        if len(output) > 90:
            output = output[:87] + "..."
        rows.append([title, result["vm"], result["phase"],
                     str(result.get("exitCode", "-")), _duration(result), output])
    return rows


def _duration(result: dict[str, Any]) -> str:
    from vmfleet.api.times import parse_rfc3339

    if not (result.get(F.DISPATCH_TIME) and result.get(F.COMPLETION_TIME)):
        return "-"
    seconds = (parse_rfc3339(result[F.COMPLETION_TIME]) - parse_rfc3339(result[F.DISPATCH_TIME]))
    return f"{seconds.total_seconds() * 1000:.0f} ms"


_DEMO_DIR = "/tmp/vmfleet-demo"


def print_table(rows: list[list[str]]) -> None:
    header = ["STEP", "VM", "PHASE", "EXIT", "TIME", "OUTPUT"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def health_rows(vms: list[dict[str, Any]]) -> list[list[str]]:
    """One row per RemoteVM from its status (the health probes' facts and conditions)."""
    rows = []
    for vm in vms:
        status = vm.get("status") or {}
        facts = status.get("facts") or {}
        ready = next((cond.get("status", "?") for cond in status.get("conditions") or []
                      if cond.get("type") == "Ready"), "?")
        mem = facts.get("memoryAvailableBytes")
        disk, total = facts.get("rootDiskUsedBytes"), facts.get("rootDiskTotalBytes")
        rows.append([
            vm["metadata"]["name"], ready, str(facts.get("hostname", "-")),
            str(facts.get("load1", "-")),
            f"{mem / 2**30:.1f} GiB" if mem is not None else "-",
            f"{disk / total:.0%}" if disk is not None and total else "-",
            f"{facts['uptimeSeconds'] / 3600:.1f} h" if facts.get("uptimeSeconds") else "-",
        ])
    return rows


def print_health(rows: list[list[str]]) -> None:
    header = ["VM", "READY", "HOSTNAME", "LOAD1", "MEM FREE", "DISK USED", "UPTIME"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run(namespace: str = "default", vms: list[str] | None = None) -> int:
    kube = Kube()
    vm_names = vms or sorted(item["metadata"]["name"] for item in kube.list_vms(namespace))
    if not vm_names:
        print(f"No RemoteVMs in namespace {namespace}: run `vmfleet dev up` first.")
        return 1
    run_id = uuid.uuid4().hex[:5]
    first, second, third = (vm_names * 3)[:3]
    stages: list[list[Step]] = [
        [Step("health", f"demo-{run_id}-health",
              {"selector": {}, "script": "hostname\nuptime\n"})],
        [Step("hostname && uptime", f"demo-{run_id}-uptime", {"vm": first, "command": "hostname && uptime"}),
         Step("df -h /", f"demo-{run_id}-df", {"vm": second, "argv": ["df", "-h", "/"]}),
         Step("free -m", f"demo-{run_id}-free", {"vm": third, "argv": ["free", "-m"]})],
        [Step("parallel: hostname && date", f"demo-{run_id}-p1", {"vm": first, "command": "hostname && date"}),
         Step("parallel: df -h", f"demo-{run_id}-p2", {"vm": second, "argv": ["df", "-h"]}),
         Step("parallel: ps aux | wc -l", f"demo-{run_id}-p3", {"vm": third, "command": "ps aux | wc -l"})],
        # The guide's file transfer, as a RemoteCommand: over SFTP, no shell, verified.
        [Step("create a file on " + first, f"demo-{run_id}-mkfile",
              {"vm": first, "script": f"mkdir -p {_DEMO_DIR}\n"
               f"echo \"written on $(hostname) at $(date -u +%FT%TZ)\" > {_DEMO_DIR}/hello.txt\n"})],
        [Step(f"transfer {first} -> {second}", f"demo-{run_id}-transfer",
              {"transfer": {"from": {"vm": first, "path": f"{_DEMO_DIR}/hello.txt"},
                            "to": [{"vm": second, "path": f"{_DEMO_DIR}/hello-copy.txt"}],
                            "createDirs": True, "verify": True}})],
        [Step("read it back on " + second, f"demo-{run_id}-readback",
              {"vm": second, "argv": ["cat", f"{_DEMO_DIR}/hello-copy.txt"]})],
        [Step("clean up", f"demo-{run_id}-cleanup1", {"vm": first, "argv": ["rm", "-rf", _DEMO_DIR]}),
         *([Step("clean up", f"demo-{run_id}-cleanup2",
                 {"vm": second, "argv": ["rm", "-rf", _DEMO_DIR]})] if second != first else [])],
    ]
    rows: list[list[str]] = []
    failed = 0
    started = time.monotonic()
    try:
        for stage in stages:
            for step in stage:
                _create(kube, namespace, step)
            done = _wait(kube, namespace, [step.name for step in stage])
            for step in stage:
                obj = done[step.name]
                failed += obj["status"]["phase"] != Phase.SUCCEEDED
                rows.extend(_rows(step.title, obj))
    finally:
        for stage in stages:
            for step in stage:
                try:
                    kube.custom.delete_namespaced_custom_object(
                        c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, step.name)
                except Exception:  # noqa: BLE001 - best-effort cleanup of demo objects
                    pass
    print()
    print("Health, from each RemoteVM's status (kubectl get rvm):")
    print_health(health_rows([item for item in kube.list_vms(namespace)
                              if item["metadata"]["name"] in vm_names]))
    print()
    print_table(rows)
    print()
    print(f"{len(rows)} results from {len(vm_names)} VMs in {time.monotonic() - started:.1f}s; "
          f"{failed} failed. The demo's RemoteCommands were deleted.")
    return 1 if failed else 0
