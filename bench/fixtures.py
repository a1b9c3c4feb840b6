"""Servers the scenarios share within one run: sshd VMs and a whole vmfleet.

``vm_pool(bench, n)`` gives the first ``n`` of one pool of local sshd VMs (loopback
addresses 127.0.30.x, or 127.<VMFLEET_E2E_LOOPBACK_B>.30.x, started once, grown on
demand). ``cluster(bench)`` starts the local control plane, Redis and the controller
(Process runtime, production timings) once, and registers VMs from the pool as RemoteVMs
on demand. Everything stops at the end of the run.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.harness import Bench
from tests.e2e.fleet import start_controller
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION, Phase
from vmfleet.dev.brokers import RedisServer
from vmfleet.dev.controlplane import ControlPlane
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.proc import ManagedProcess, stop_pid_file, wait_until
from vmfleet.dev.sshd import SshdVM, start_vms, stop_vms
from vmfleet.kube import Kube, load_api_client

REPO = Path(__file__).resolve().parents[1]
# VMFLEET_E2E_LOOPBACK_B, as the e2e suite reads it: runs side by side on one machine keep
# their sshds on addresses of their own (127.<B>.30.x).
SUBNET = f"127.{int(os.environ.get('VMFLEET_E2E_LOOPBACK_B', '0'))}.30"
NAMESPACE = "bench"
TERMINAL = frozenset(Phase.TERMINAL)
# What the controller runs with in production (tests/e2e/fleet.py shortens them for faults).
PRODUCTION = {"VMFLEET_HEARTBEAT_SECONDS": "5", "VMFLEET_WORKER_LOST_SECONDS": "30",
              "VMFLEET_KILL_GRACE_SECONDS": "3"}


def vm_pool(bench: Bench, n: int) -> list[SshdVM]:
    pool: list[SshdVM] = bench.shared("vms", list, stop_vms)
    if len(pool) < n:
        pool.extend(start_vms(n - len(pool), bench.workdir / "vms", subnet=SUBNET,
                              first=len(pool) + 1, prefix="vm"))
    return pool[:n]


class Alias:
    """Another RemoteVM name for an sshd VM of the pool (its own queue and worker)."""

    def __init__(self, name: str, vm: SshdVM) -> None:
        self.name = name
        self._vm = vm

    @property
    def vm(self) -> SshdVM:
        return self._vm

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._vm, attr)


class Watcher:
    """A watch over the namespace's RemoteCommands: the moment each reached a terminal phase."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.finished: dict[str, tuple[float, str]] = {}
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-watch")
        self.thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        rv = ""
        while not self._stop:
            w = watch.Watch()
            try:
                for event in w.stream(self.kube.custom.list_namespaced_custom_object, GROUP, VERSION,
                                      self.namespace, COMMAND_PLURAL, resource_version=rv or None,
                                      timeout_seconds=60, allow_watch_bookmarks=True):
                    now = time.perf_counter()
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] == "BOOKMARK":
                        continue
                    phase = (obj.get("status") or {}).get("phase")
                    if phase in TERMINAL:
                        name = obj["metadata"]["name"]
                        with self.cond:
                            self.finished.setdefault(name, (now, phase))
                            self.cond.notify_all()
            except Exception as exc:  # a 410 Gone or a dropped stream: watch again
                if "410" in str(exc):
                    rv = ""
                time.sleep(0.1)

    def wait(self, names: Iterable[str], timeout: float) -> dict[str, tuple[float, str]]:
        wanted = list(names)
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in self.finished for n in wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in wanted if n not in self.finished]
                    raise TimeoutError(f"{len(missing)} commands not finished in {timeout}s: {missing[:5]}")
                self.cond.wait(left)
            return {n: self.finished[n] for n in wanted}

    def stop(self) -> None:
        self._stop = True


class Cluster:
    """A control plane, Redis and the vmfleet controller (Process runtime) on this machine."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cp = ControlPlane(workdir / "controlplane", exit_with_parent=True)
        self.redis = RedisServer(workdir / "redis")
        self.controller: ManagedProcess | None = None
        self.registered: set[str] = set()
        self.kube: Kube
        self.watcher: Watcher

    def start(self) -> Cluster:
        print("  starting the control plane, Redis and the controller ...", flush=True)
        self.cp.start()
        os.environ["KUBECONFIG"] = str(self.cp.kubeconfig)
        self.kubectl("apply", "-f", str(REPO / "crds"))
        # Right after apply, `kubectl wait` can fail before the CRDs have a status: retry it.
        def established() -> bool:
            try:
                self.kubectl("wait", "--for=condition=Established", "crd/remotevms.vmfleet.io",
                             "crd/remotecommands.vmfleet.io", "--timeout=60s")
            except RuntimeError:
                return False
            return True

        wait_until(established, timeout=120, interval=1, what="the CRDs to be established")
        self.redis.start()
        self.kubectl("create", "namespace", NAMESPACE)
        self.kube = Kube(load_api_client())
        self.start_controller()
        self.watcher = Watcher(self.kube, NAMESPACE)
        return self

    def start_controller(self, extra_env: dict[str, str] | None = None) -> None:
        self.controller = start_controller(self.cp.kubeconfig, self.redis.url,
                                           self.workdir / "controller", [NAMESPACE],
                                           extra_env={**PRODUCTION, **(extra_env or {})})

    @property
    def worker_dir(self) -> Path:
        return self.workdir / "controller" / "workers"

    def stop(self) -> None:
        for step in (self._stop_controller, self.redis.stop, self.cp.stop):
            try:
                step()
            except Exception as exc:
                print(f"  cleanup: {exc!r}", flush=True)
        if hasattr(self, "watcher"):
            self.watcher.stop()

    def _stop_controller(self) -> None:
        if self.controller is not None:
            self.controller.stop(grace=60)
        for pid_file in self.worker_dir.glob("*.pgid"):
            stop_pid_file(pid_file, grace=5)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run([str(self.cp.kubectl), f"--kubeconfig={self.cp.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def register(self, vms: Sequence[Any], labels: dict[str, str] | None = None,
                 **spec: Any) -> None:
        """RemoteVMs (and their Secrets) for ``vms``; waits until each has a ready worker."""
        new = [vm for vm in vms if vm.name not in self.registered]
        if new:
            objects = [o for vm in new for o in vm_manifests(vm, NAMESPACE, labels=labels, **spec)]
            self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                "items": objects}))
            self.registered.update(vm.name for vm in new)
        self.wait_workers_ready([vm.name for vm in vms])

    def wait_workers_ready(self, names: Sequence[str], timeout: float = 300) -> None:
        def ready() -> bool:
            items = self.kube.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE,
                                                                   "remotevms")["items"]
            by_name = {i["metadata"]["name"]: i for i in items}
            return all(
                ((by_name.get(n) or {}).get("status") or {}).get("workers", {}).get("readyReplicas", 0) >= 1
                for n in names
            )

        wait_until(ready, timeout=timeout, interval=0.5, what=f"workers of {len(names)} VMs ready")

    def command_body(self, name: str, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RemoteCommand",
                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}

    def create(self, name: str, **spec: Any) -> float:
        """Create a RemoteCommand; returns the perf_counter time just before the request."""
        start = time.perf_counter()
        self.kube.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, COMMAND_PLURAL,
                                                         self.command_body(name, **spec))
        return start

    def delete_all_commands(self) -> None:
        self.kube.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NAMESPACE,
                                                                    COMMAND_PLURAL)

        def gone() -> bool:
            return not self.kube.custom.list_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, COMMAND_PLURAL, limit=1)["items"]

        wait_until(gone, timeout=300, interval=0.5, what="RemoteCommands deleted")

    def apiserver_metrics(self) -> str:
        """The API server's own /metrics (Prometheus text)."""
        ctx = ssl.create_default_context(cafile=str(self.cp.ca_file))
        req = urllib.request.Request(f"{self.cp.server}/metrics",
                                     headers={"Authorization": f"Bearer {self.cp.token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.read().decode()

    def write_requests(self) -> dict[str, float]:
        """Mutating requests the API server has served, by resource (for writes/command)."""
        totals: dict[str, float] = {}
        for line in self.apiserver_metrics().splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, value = line.rsplit(" ", 1)
            fields = dict(
                part.split("=", 1) for part in labels[len("apiserver_request_total{"):-1].split(",")
                if "=" in part
            )
            verb = fields.get("verb", "").strip('"')
            if verb not in ("POST", "PUT", "PATCH", "DELETE", "APPLY", "CREATE", "UPDATE"):
                continue
            resource = fields.get("resource", "").strip('"')
            sub = fields.get("subresource", "").strip('"')
            key = f"{resource}/{sub}" if sub else resource
            totals[key] = totals.get(key, 0.0) + float(value)
        return totals


def cluster(bench: Bench) -> Cluster:
    return bench.shared("cluster", lambda: Cluster(bench.workdir / "cluster").start(),
                        lambda c: c.stop())
