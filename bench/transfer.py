"""Benchmark: vmfleet's VM-to-VM transfer engine side by side with OpenSSH ``scp -3``.

Starts three local sshd "VMs" (``vmfleet.dev.sshd``; as root each has a private /tmp),
writes a random file on vm1 and copies it to vm2 (and to vm2 + vm3) with

* ``vmfleet``: ``remote_tasks.transfer.TransferExecutor`` — the code the transfer worker
  runs (pooled paramiko connections, windowed prefetch, pipelined writes, sha256 while
  streaming, temp file + rename) — with the Kubernetes status writes stubbed out;
* ``scp -3``: OpenSSH's scp relaying through this machine (its default SFTP protocol),
  once per destination.

Every copy is checked byte for byte (sha256). Prints a table; not a test.

    .venv/bin/python bench/transfer.py [--size-mib 256] [--repeat 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from remote_tasks.ssh import ConnectionPool  # noqa: E402
from remote_tasks.sshtarget import SSHTarget  # noqa: E402
from remote_tasks.transfer import TransferExecutor  # noqa: E402
from vmfleet.api.envelope import Envelope  # noqa: E402
from vmfleet.api.models import RemoteCommandSpec  # noqa: E402
from vmfleet.dev.sshd import SshdVM, start_vms, stop_vms  # noqa: E402

MiB = 1024 * 1024


class NoKube:
    """Status writes go nowhere: the benchmark measures the copy, not the API server."""

    def patch_command_status(self, *_: Any) -> dict[str, Any]:
        return {}


class LocalCommands:
    """What TransferExecutor needs from CommandExecutor: the API, the pool, the targets."""

    def __init__(self, vms: dict[str, SshdVM]) -> None:
        self.kube = NoKube()
        self.pool = ConnectionPool()
        self.vms = vms

    def resolve_target(self, namespace: str, vm: str) -> SSHTarget:
        sshd = self.vms[vm]
        return SSHTarget(host=sshd.host, port=sshd.port, user=sshd.user,
                         private_key=sshd.user_private_key_pem,
                         host_keys=tuple(sshd.host_public_keys))


def rss(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its children (scp runs two ssh processes)."""
    total = rss(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(tree_rss(int(child)) for child in children)


class Peak:
    def __init__(self) -> None:
        self.start = self.peak = rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> Peak:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def make_source(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def run_vmfleet(commands: LocalCommands, dests: list[str], run: int) -> tuple[float, int]:
    executor = TransferExecutor(commands)  # type: ignore[arg-type]
    spec = RemoteCommandSpec.model_validate({"transfer": {
        "from": {"vm": "vm1", "path": "/tmp/bench/src.bin"},
        "to": [{"vm": vm, "path": f"/tmp/bench/vmfleet-{run}.bin"} for vm in dests]}})
    envelope = Envelope("bench", "bench", f"uid-{run}", dests[0], 1, "", spec.wire())
    claimed = [(i, {"vm": vm, "attempt": 1}) for i, vm in enumerate(dests)]
    with Peak() as peak:
        started = time.perf_counter()
        outcome = executor.run(envelope, "bench", spec, claimed)
        seconds = time.perf_counter() - started
    if outcome != "Succeeded":
        raise RuntimeError(f"vmfleet transfer ended {outcome}")
    commands.pool.close_all()
    return seconds, peak.peak - peak.start


def run_scp(vms: dict[str, SshdVM], dests: list[str], run: int, known_hosts: Path,
            legacy: bool) -> tuple[float, int]:
    src = vms["vm1"]
    peak = 0
    started = time.perf_counter()
    for vm in dests:
        dst = vms[vm]
        argv = ["scp", "-3", "-q", "-B", *(["-O"] if legacy else []),
                "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-i", str(src.user_key_path), "-i", str(dst.user_key_path),
                f"scp://{src.user}@{src.host}:{src.port}//tmp/bench/src.bin",
                f"scp://{dst.user}@{dst.host}:{dst.port}//tmp/bench/scp-{run}.bin"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)
        if proc.returncode != 0:
            raise RuntimeError(f"scp exited {proc.returncode}")
    seconds = time.perf_counter() - started
    return seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the best is shown")
    args = parser.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="vmfleet-bench-") as tmp:
        started = start_vms(3, Path(tmp), subnet="127.0.12")
        try:
            vms = {vm.name: vm for vm in started}
            expected = make_source(vms["vm1"].host_path("/tmp/bench/src.bin"), size)
            for vm in ("vm2", "vm3"):
                vms[vm].host_path("/tmp/bench").mkdir(parents=True, exist_ok=True)
            known_hosts = Path(tmp) / "known_hosts"
            known_hosts.write_text("".join(
                f"[{vm.host}]:{vm.port} {key}\n" for vm in started for key in vm.host_public_keys))
            commands = LocalCommands(vms)
            rows = []
            run = 0
            for label, dests in (("1 (vm2)", ["vm2"]), ("2 (vm2+vm3)", ["vm2", "vm3"])):
                for tool in ("vmfleet", "scp -3", "scp -3 -O"):
                    best: tuple[float, int] | None = None
                    for _ in range(args.repeat):
                        run += 1
                        if tool == "vmfleet":
                            result = run_vmfleet(commands, dests, run)
                            name = f"vmfleet-{run}.bin"
                        else:
                            result = run_scp(vms, dests, run, known_hosts, legacy=tool.endswith("-O"))
                            name = f"scp-{run}.bin"
                        for vm in dests:
                            copy = vms[vm].host_path(f"/tmp/bench/{name}")
                            if sha256_file(copy) != expected:
                                raise RuntimeError(f"{tool}: the copy on {vm} differs")
                            copy.unlink()
                        best = result if best is None or result[0] < best[0] else best
                    assert best is not None
                    seconds, memory = best
                    rows.append([tool, label, f"{args.size_mib}", f"{seconds:.2f}",
                                 f"{args.size_mib / seconds:.1f}",
                                 f"{args.size_mib * len(dests) / seconds:.1f}",
                                 f"+{memory / MiB:.1f}" if tool == "vmfleet"
                                 else f"{memory / MiB:.1f} (peak)"])
        finally:
            stop_vms(started)
    header = ["TOOL", "DESTINATIONS", "MiB", "SECONDS", "MiB/s (file)", "MiB/s (written)",
              "MEMORY MiB"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{args.size_mib} MiB, {os.cpu_count()} cores, best of {args.repeat}; "
          "each copy verified by sha256\n")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
