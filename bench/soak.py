"""Soak: many RemoteCommands over 20 VMs while a chaos loop injects faults.

Starts everything for real on this machine (``vmfleet.dev``): a control plane, Redis, 20
sshd VMs and the controller (Process runtime). It then keeps ``--in-flight`` commands
going until ``--commands`` were created, while a chaos loop, every ``--fault-every``
seconds, does one of: SIGKILL a random worker, restart the controller, restart the broker,
restart a random VM's sshd, stop it for a while, or freeze it (SIGSTOP of sshd and its
sessions) for a while. Each command appends its own name to a file on its VM, so that the
executions can be counted on the VMs afterwards. Finished commands are recorded and
deleted (etcd stays small). At the end it prints:

* commands: created, and their terminal phases and reasons;
* faults injected, by kind;
* lost: a command that Succeeded but never ran on its VM, or that vanished;
* duplicated: a command that ran more often than the attempts its status reports
  (a retry is an attempt: retries are allowed to run again, nothing else is);
* stuck: a command not in a terminal phase when the run ended (``--drain-timeout``).

Exit status 0 only when lost, duplicated and stuck are all 0. Not part of ``make test``:

    make soak                                   # 10,000 commands (about an hour here)
    .venv/bin/python bench/soak.py --commands 500 --fault-every 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubernetes.client.exceptions import ApiException  # noqa: E402

from tests.e2e.fleet import start_controller  # noqa: E402
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION, Phase  # noqa: E402
from vmfleet.dev.brokers import RedisServer  # noqa: E402
from vmfleet.dev.controlplane import ControlPlane  # noqa: E402
from vmfleet.dev.manifests import vm_manifests  # noqa: E402
from vmfleet.dev.proc import ManagedProcess, stop_pid_file, wait_until  # noqa: E402
from vmfleet.dev.sshd import SshdVM, start_vms, stop_vms  # noqa: E402
from vmfleet.kube import Kube, load_api_client  # noqa: E402

RUNS_FILE = "/tmp/vmfleet-soak-runs"
# Faster fault handling, as in the e2e fault tests.
FAST = {"VMFLEET_REDISPATCH_SECONDS": "10"}
HANG_SECONDS = 10.0  # how long a stopped or frozen VM stays away
TERMINAL = set(Phase.TERMINAL)


class Fleet:
    """The running system, with the faults the chaos loop can inject."""

    def __init__(self, workdir: Path, vms: int, namespace: str) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.cp = ControlPlane(workdir / "controlplane", exit_with_parent=True)
        self.redis = RedisServer(workdir / "redis")
        self.vms: list[SshdVM] = []
        self.vm_count = vms
        self.controller: ManagedProcess | None = None
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.pending: list[threading.Thread] = []  # VMs stopped or frozen, coming back

    def start(self) -> Fleet:
        print("starting the control plane, Redis and", self.vm_count, "VMs ...", flush=True)
        (self.workdir / "controller").mkdir(parents=True, exist_ok=True)
        self.cp.start()
        os.environ["KUBECONFIG"] = str(self.cp.kubeconfig)
        self.kubectl("apply", "-f", str(REPO / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd/remotevms.vmfleet.io",
                     "crd/remotecommands.vmfleet.io", "--timeout=60s")
        self.redis.start()
        self.vms = start_vms(self.vm_count, self.workdir / "vms", subnet="127.0.240", prefix="soak")
        self.kubectl("create", "namespace", self.namespace)
        objects = [obj for vm in self.vms for obj in vm_manifests(vm, self.namespace)]
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                            "items": objects}))
        self.start_controller()
        return self

    def kubectl(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run([str(self.cp.kubectl), f"--kubeconfig={self.cp.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def start_controller(self) -> None:
        self.controller = start_controller(self.cp.kubeconfig, self.redis.url,
                                           self.workdir / "controller", [self.namespace],
                                           extra_env=FAST)

    def stop(self) -> None:
        """Stop everything this run started (each step even if an earlier one failed)."""
        steps = [lambda: self.stop_controller() if self.controller else None,
                 lambda: stop_vms(self.vms), self.redis.stop, self.cp.stop]
        for step in steps:
            try:
                step()
            except Exception as exc:
                print(f"  cleanup: {exc}", flush=True)

    # ---------------------------------------------------------------- faults

    def kill_worker(self) -> str:
        pid_files = sorted((self.workdir / "controller" / "workers").glob("*.pgid"))
        if not pid_files:
            return "no worker to kill"
        victim = random.choice(pid_files)
        stop_pid_file(victim, grace=0)
        return f"killed worker {victim.stem}"

    def stop_controller(self) -> None:
        """Stop the controller, then any worker it did not stop in time.

        The Process runtime stops its workers one after the other (up to 15 s each) when
        the controller exits; one killed before it is done leaves the rest running."""
        assert self.controller is not None
        self.controller.stop(grace=60)
        for pid_file in (self.workdir / "controller" / "workers").glob("*.pgid"):
            stop_pid_file(pid_file, grace=5)

    def restart_controller(self) -> str:
        self.stop_controller()
        self.start_controller()
        return "restarted the controller"

    def restart_broker(self) -> str:
        self.redis.restart()
        return "restarted Redis"

    def restart_sshd(self) -> str:
        vm = random.choice(self.vms)
        vm.restart()
        return f"restarted sshd of {vm.name}"

    def stop_sshd(self) -> str:
        """The VM goes away for a while (every session ends), then comes back."""
        vm = random.choice(self.vms)
        vm.stop()
        self._later(HANG_SECONDS, vm.start)
        return f"stopped sshd of {vm.name} for {HANG_SECONDS:g}s"

    def hang_sshd(self) -> str:
        """The VM freezes: sshd and every session stopped (SIGSTOP), then resumed."""
        vm = random.choice(self.vms)
        pids = vm.processes()
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        self._later(HANG_SECONDS, lambda: [_signal(pid, signal.SIGCONT) for pid in pids])
        return f"froze {vm.name} ({len(pids)} processes) for {HANG_SECONDS:g}s"

    def _later(self, seconds: float, action: Any) -> None:
        def run() -> None:
            time.sleep(seconds)
            with self.lock:
                action()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.pending.append(thread)

    def settle(self) -> None:
        """Wait for the VMs stopped or frozen to come back."""
        for thread in self.pending:
            thread.join()

    def inject(self, rng: random.Random) -> None:
        faults = {"worker": self.kill_worker, "controller": self.restart_controller,
                  "broker": self.restart_broker, "sshd-restart": self.restart_sshd,
                  "sshd-stop": self.stop_sshd, "sshd-hang": self.hang_sshd}
        kind = rng.choices(list(faults), weights=[4, 1, 1, 1, 1, 1])[0]
        with self.lock:
            what = faults[kind]()
            self.faults[kind] += 1
        print(f"  chaos: {what}", flush=True)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def command_body(namespace: str, name: str, vm: str, sleep: float) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RemoteCommand",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"vm": vm, "command": f"sleep {sleep}; echo {name} >> {RUNS_FILE}",
                 # Transport errors (a restarted sshd) are retried; each retry is an attempt.
                 "retries": {"limit": 5, "backoffSeconds": 1}, "timeoutSeconds": 120},
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commands", type=int, default=10000)
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--in-flight", type=int, default=300, help="unfinished commands at once")
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds each command sleeps")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="seconds to wait for the last commands after the chaos stops")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # SIGTERM (e.g. from `timeout`) stops everything started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)

    run_id = uuid.uuid4().hex[:6]
    workdir = REPO / ".vmfleet" / f"soak-{run_id}"
    workdir.mkdir(parents=True)
    namespace = f"soak-{run_id}"
    fleet = Fleet(workdir, args.vms, namespace)
    stop_chaos = threading.Event()
    records: dict[str, dict[str, Any]] = {}   # name -> final phase, reason, attempt, vm
    created: dict[str, str] = {}             # name -> vm
    started = time.monotonic()
    try:
        fleet.start()
        kube = Kube(load_api_client())

        def chaos() -> None:
            while not stop_chaos.wait(args.fault_every):
                try:
                    fleet.inject(rng)
                except Exception as exc:  # a fault that failed to inject is reported, not fatal
                    print(f"  chaos: could not inject a fault: {exc}", flush=True)

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        print(f"running {args.commands} commands over {args.vms} VMs "
              f"(at most {args.in_flight} in flight; a fault every {args.fault_every:g}s)", flush=True)

        def harvest() -> int:
            """Record and delete finished commands; return how many are unfinished."""
            unfinished = 0
            for item in kube.list_commands(namespace):
                name = item["metadata"]["name"]
                status = item.get("status") or {}
                if status.get("phase") in TERMINAL and name not in records:
                    result = (status.get("results") or [{}])[0]
                    records[name] = {"phase": status["phase"], "reason": result.get("reason"),
                                     "attempt": result.get("attempt", 1), "vm": created.get(name),
                                     "exit_code": result.get("exitCode"),
                                     "message": (result.get("message") or "")[:160]}
                    kube.delete_command(namespace, name)
                elif name not in records:
                    unfinished += 1
            return unfinished

        next_report = time.monotonic() + 30
        index = 0
        while index < args.commands:
            unfinished = harvest()
            room = min(args.in_flight - unfinished, args.commands - index)
            for _ in range(max(room, 0)):
                name = f"s{index:05d}"
                vm = fleet.vms[index % len(fleet.vms)].name
                try:
                    kube.custom.create_namespaced_custom_object(
                        GROUP, VERSION, namespace, COMMAND_PLURAL,
                        command_body(namespace, name, vm, args.sleep))
                except ApiException as exc:
                    print(f"  create {name}: {exc.status} {exc.reason}; trying again", flush=True)
                    break
                created[name] = vm
                index += 1
            if time.monotonic() >= next_report:
                print(f"  {time.monotonic() - started:6.0f}s: created {len(created)}, "
                      f"finished {len(records)}, faults {sum(fleet.faults.values())}", flush=True)
                next_report += 30
            time.sleep(1)
        # The chaos goes on until 90% have finished; the rest show that the system converges.
        print("all commands created; draining under chaos to 90% ...", flush=True)
        chaos_until = time.monotonic() + args.drain_timeout
        while len(records) < 0.9 * len(created) and time.monotonic() < chaos_until:
            harvest()
            if time.monotonic() >= next_report:
                print(f"  {time.monotonic() - started:6.0f}s: finished {len(records)}, "
                      f"faults {sum(fleet.faults.values())}", flush=True)
                next_report += 30
            time.sleep(1)
        print("the chaos stops; draining ...", flush=True)
        stop_chaos.set()
        chaos_thread.join()
        fleet.settle()
        with fleet.lock:
            assert fleet.controller is not None
            fleet.controller.check_running()
        try:
            wait_until(lambda: harvest() == 0 and len(records) >= len(created),
                       timeout=args.drain_timeout, interval=2, what="every command to finish")
        except Exception as exc:  # reported below as stuck
            print(f"  {exc}", flush=True)
        elapsed = time.monotonic() - started

        # What ran on the VMs (as root each VM has a private /tmp; else they share one file).
        runs: Counter[str] = Counter()
        for path in {vm.host_path(RUNS_FILE) for vm in fleet.vms}:
            if path.exists():
                runs.update(path.read_text().split())
        remaining = {item["metadata"]["name"] for item in kube.list_commands(namespace)}
        stuck = sorted(set(created) - set(records))
        lost = sorted(n for n, r in records.items() if r["phase"] == "Succeeded" and runs[n] == 0)
        vanished = sorted(n for n in stuck if n not in remaining)
        duplicated = sorted(n for n, r in records.items() if runs[n] > max(int(r["attempt"] or 1), 1))
        never_created_ran = sorted(set(runs) - set(created))
        phases = Counter(r["phase"] for r in records.values())
        reasons = Counter(f'{r["phase"]}/{r["reason"]}' for r in records.values())
        retried = sum(1 for r in records.values() if int(r["attempt"] or 1) > 1)

        print()
        print(f"soak: {len(created)} commands over {args.vms} VMs in {elapsed:.0f}s "
              f"({len(created) / elapsed:.1f}/s)")
        print(f"  phases:     {dict(phases)}")
        print(f"  reasons:    {dict(reasons)}")
        print(f"  retried:    {retried} commands needed more than one attempt")
        print(f"  faults:     {sum(fleet.faults.values())} injected {dict(fleet.faults)}")
        print(f"  executions: {sum(runs.values())} on the VMs")
        print(f"  lost:       {len(lost) + len(vanished)} {(lost + vanished)[:10]}")
        print(f"  duplicated: {len(duplicated)} {duplicated[:10]}")
        print(f"  stuck:      {len(stuck) - len(vanished)} {[n for n in stuck if n in remaining][:10]}")
        for name, r in sorted(records.items()):
            if r["phase"] != "Succeeded":  # under chaos, e.g. a session an sshd restart ended
                print(f"  {name} on {r['vm']}: {r['phase']} {r['reason']} exit {r['exit_code']} "
                      f"attempt {r['attempt']} ran {runs[name]}x {r['message']}")
        if never_created_ran:
            print(f"  ran but never created: {never_created_ran[:10]}")
        ok = not (lost or vanished or duplicated or stuck or never_created_ran)
        print("  result:    ", "OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        stop_chaos.set()
        fleet.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
