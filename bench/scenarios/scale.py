"""scale_vms: how long the controller takes to reconcile 1,000 RemoteVMs (Deployment runtime).

A control plane of its own (``BigFleet``, shared with ``memory``): kube-apiserver, etcd,
kube-controller-manager and Redis, no kube-scheduler and no kubelet, so the worker
Deployments are created (and their ReplicaSets and Pods) but no pod ever runs — what the
controller does is the same. The RemoteVMs point at loopback addresses where nothing
answers (health probes go to queues without a worker: never consumed).

- **cold**: the RemoteVMs (and Secrets) exist, no Deployment yet; the controller starts.
  Timed from its start until every RemoteVM has ``status.observedGeneration ==
  metadata.generation`` and ``status.workers.deployment`` (what ``vm_changed`` writes).
- **restart** (the issue's "Deployments exist" case): the controller stops, those two
  status fields are removed (while it is down, so it has to write them again), it starts
  again and is timed until every RemoteVM has them back. ``on.resume`` re-applies each
  Deployment (server-side apply, unchanged) and rewrites the status.

Both are measured when the fleet is first built, before ``memory`` adds its finished
RemoteCommands, so they are the same whichever scenario asks for the fleet first.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

from bench.harness import Bench
from tests.e2e.fleet import start_controller
from vmfleet.api import constants as c
from vmfleet.dev.brokers import RedisServer
from vmfleet.dev.controlplane import ControlPlane
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.proc import ManagedProcess, wait_until
from vmfleet.kube import Kube

SCENARIOS = ("scale_vms",)
REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "bigfleet"
THREADS = 16
FULL_VMS, QUICK_VMS = 1000, 100
# What the controller runs with in production (as bench.fixtures.PRODUCTION).
PRODUCTION = {"VMFLEET_HEARTBEAT_SECONDS": "5", "VMFLEET_WORKER_LOST_SECONDS": "30",
              "VMFLEET_KILL_GRACE_SECONDS": "3", "VMFLEET_WORKER_IMAGE": "vmfleet:bench"}


class FakeVM:
    """A VM that is never reached: enough for vm_manifests (a real key, a fake address)."""

    def __init__(self, index: int, private_pem: str, host_key: str) -> None:
        self.name = f"vm{index:04d}"
        self.host = f"127.0.{40 + index // 250}.{1 + index % 250}"
        self.port = 22
        self.user = "bench"
        self.key_passphrase = None
        self.host_public_keys = [host_key]
        self.user_private_key_pem = private_pem


def _keys() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    user = ed25519.Ed25519PrivateKey.generate()
    pem = user.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()
    host = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return pem, host


def api_client(kubeconfig: Path) -> Any:
    """A client of this control plane with a connection pool for THREADS threads."""
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = THREADS * 2
    return client.ApiClient(cfg)


def parallel(fn: Callable[[Any], object], items: Iterable[Any], threads: int = THREADS) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass


class BigFleet:
    """A control plane with ``n`` RemoteVMs and a controller with the Deployment runtime."""

    def __init__(self, workdir: Path, n: int) -> None:
        self.workdir = workdir
        self.n = n
        self.cp = ControlPlane(workdir / "controlplane", exit_with_parent=True)
        self.redis = RedisServer(workdir / "redis")
        self.controller: ManagedProcess | None = None
        self.names: list[str] = []
        self.cold_seconds: float | None = None
        self.restart_seconds: list[float] = []
        self.cold_left = 0  # RemoteVMs not reconciled when the cold wait gave up
        self.limit = 300.0 if n < FULL_VMS else 1800.0  # seconds per reconcile wait
        self.kube: Kube

    @cached_property
    def kubectl_base(self) -> list[str]:
        return [str(self.cp.kubectl), f"--kubeconfig={self.cp.kubeconfig}"]

    def kubectl(self, *args: str) -> str:
        proc = subprocess.run([*self.kubectl_base, *args], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def start(self, restart_rounds: int) -> BigFleet:
        print(f"  big fleet: a control plane of its own and {self.n} RemoteVMs ...", flush=True)
        self.cp.start()
        # Our own kubeconfig for this process's clients; the other control plane (bench
        # fixtures) keeps $KUBECONFIG.
        self.kubectl("apply", "-f", str(REPO / "crds"))
        self.kubectl("wait", "--for=condition=Established", "crd/remotevms.vmfleet.io",
                     "crd/remotecommands.vmfleet.io", "--timeout=60s")
        self.redis.start()
        self.kubectl("create", "namespace", NAMESPACE)
        self.kube = Kube(api_client(self.cp.kubeconfig))
        self.create_vms()
        before = self.requests()
        t0 = time.monotonic()
        self.start_controller()
        try:
            self.wait_reconciled(t0, timeout=self.limit)
        except TimeoutError:
            self.cold_left = self.unreconciled()
            self.cold_seconds = time.monotonic() - t0
            print(f"  cold reconcile: {self.cold_left} of {self.n} RemoteVMs not reconciled "
                  f"after {self.cold_seconds:.0f} s; no restart rounds", flush=True)
            self.show_requests(before, "the cold reconcile")
            return self
        self.cold_seconds = time.monotonic() - t0
        print(f"  cold reconcile of {self.n} RemoteVMs: {self.cold_seconds:.1f} s", flush=True)
        self.show_requests(before, "the cold reconcile")
        for _ in range(restart_rounds):
            try:
                self.restart_seconds.append(self.restart())
            except TimeoutError as exc:
                print(f"  restart reconcile: {exc}", flush=True)
                break
            print(f"  restart reconcile: {self.restart_seconds[-1]:.1f} s", flush=True)
        return self

    def create_vms(self) -> None:
        pem, host_key = _keys()
        vms = [FakeVM(i, pem, host_key) for i in range(self.n)]
        self.names = [vm.name for vm in vms]
        core = self.kube.core
        t0 = time.monotonic()

        def create(vm: FakeVM) -> None:
            secret, rvm = vm_manifests(vm, NAMESPACE)
            core.create_namespaced_secret(NAMESPACE, secret)
            self.kube.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, NAMESPACE,
                                                             c.VM_PLURAL, rvm)

        parallel(create, vms)
        print(f"  created {self.n} RemoteVMs + Secrets in {time.monotonic() - t0:.1f} s", flush=True)

    def start_controller(self) -> None:
        log_dir = self.workdir / f"controller-{int(time.time() * 1000)}"
        self.controller = start_controller(self.cp.kubeconfig, self.redis.url, log_dir,
                                           [NAMESPACE], runtime=c.RUNTIME_DEPLOYMENT,
                                           extra_env=PRODUCTION)

    def stop_controller(self) -> None:
        if self.controller is not None:
            self.controller.stop(grace=60)
            self.controller = None

    def vms(self) -> list[dict[str, Any]]:
        return self.kube.custom.list_namespaced_custom_object(c.GROUP, c.VERSION, NAMESPACE,
                                                              c.VM_PLURAL)["items"]

    def unreconciled(self) -> int:
        left = 0
        for vm in self.vms():
            status = vm.get("status") or {}
            if not (status.get("observedGeneration") == vm["metadata"].get("generation")
                    and (status.get("workers") or {}).get("deployment")):
                left += 1
        return left

    def wait_reconciled(self, t0: float, timeout: float = 1200) -> None:
        shown = [t0]

        def done() -> bool:
            assert self.controller is not None
            self.controller.check_running()
            left = self.unreconciled()
            if left and time.monotonic() - shown[0] > 15:
                shown[0] = time.monotonic()
                print(f"    {time.monotonic() - t0:.0f} s: {left} RemoteVMs not reconciled yet",
                      flush=True)
            return left == 0

        wait_until(done, timeout=timeout, interval=0.5,
                   what=f"{self.n} RemoteVMs reconciled by the controller")

    def clear_status(self) -> None:
        """Remove what vm_changed writes (observedGeneration, workers) from every RemoteVM."""
        def clear(name: str) -> None:
            self.kube.custom.patch_namespaced_custom_object_status(
                c.GROUP, c.VERSION, NAMESPACE, c.VM_PLURAL, name,
                {"status": {"observedGeneration": None, "workers": None}})

        parallel(clear, self.names)
        left = self.n - self.unreconciled()
        assert left == 0, f"{left} RemoteVMs still look reconciled"

    def restart(self) -> float:
        """Stop the controller, clear the status, start it; seconds until all re-reconciled."""
        self.stop_controller()
        self.clear_status()
        before = self.requests()
        t0 = time.monotonic()
        self.start_controller()
        self.wait_reconciled(t0, timeout=self.limit)
        seconds = time.monotonic() - t0
        self.show_requests(before, "the restart")
        return seconds

    def requests(self) -> dict[str, float]:
        """API requests served so far, by verb and resource (the API server's /metrics)."""
        totals: dict[str, float] = {}
        for line in self.kubectl("get", "--raw", "/metrics").splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, value = line.rsplit(" ", 1)
            fields = dict(part.split("=", 1) for part in labels[24:-1].split(",") if "=" in part)
            if fields.get("component", '"apiserver"') != '"apiserver"':
                continue
            resource = fields.get("resource", "").strip('"')
            sub = fields.get("subresource", "").strip('"')
            key = f"{fields.get('verb', '').strip(chr(34))} {resource}{'/' + sub if sub else ''}"
            totals[key] = totals.get(key, 0.0) + float(value)
        return totals

    def show_requests(self, before: dict[str, float], what: str) -> None:
        after = self.requests()
        delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
        top = sorted(((v, k) for k, v in delta.items() if v >= self.n / 2), reverse=True)[:8]
        print(f"    API requests during {what}: "
              + ", ".join(f"{k} {v:.0f}" for v, k in top), flush=True)

    def deployments(self) -> int:
        out = self.kubectl("get", "deployments", "-n", NAMESPACE, "-o", "name")
        return len(out.split())

    def stop(self) -> None:
        for step in (self.stop_controller, self.redis.stop, self.cp.stop):
            try:
                step()
            except Exception as exc:
                print(f"  cleanup: {exc!r}", flush=True)


def big_fleet(bench: Bench) -> BigFleet:
    n = QUICK_VMS if bench.quick else FULL_VMS
    return bench.shared(
        "bigfleet",
        lambda: BigFleet(bench.workdir / "bigfleet", n).start(bench.rounds(3, 1)),
        lambda f: f.stop())


def size_note(fleet: BigFleet) -> str:
    return f"{fleet.n} RemoteVMs{' (quick)' if fleet.n != FULL_VMS else ''}"


def run(bench: Bench, wanted: list[str]) -> None:
    fleet = big_fleet(bench)
    assert fleet.cold_seconds is not None
    deployments = fleet.deployments()
    if fleet.cold_left:
        bench.record("scale_vms", "vmfleet_controller", "seconds", [fleet.cold_seconds],
                     note=f"cold: NOT finished, {fleet.cold_left} of {size_note(fleet)} not "
                          f"reconciled at this limit ({deployments} Deployments exist)")
        bench.skip("scale_vms", "vmfleet_controller", "restart not measured: the cold "
                   "reconcile did not finish")
        return
    bench.record("scale_vms", "vmfleet_controller", "seconds", [fleet.cold_seconds],
                 note=f"cold: {size_note(fleet)}, Deployments created ({deployments} exist)")
    if fleet.restart_seconds:
        bench.record("scale_vms", "vmfleet_controller", "seconds", fleet.restart_seconds,
                     note=f"restart: {size_note(fleet)}, Deployments exist")
    else:
        bench.skip("scale_vms", "vmfleet_controller", "restart failed (see the log above)")


__all__ = ["BigFleet", "SCENARIOS", "big_fleet", "run"]
