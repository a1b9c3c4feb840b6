"""The ``Process`` runtime: each worker group as local processes of the controller.

One machine (dev and tests): the worker command of a pod (``runtime.worker_argv``), its
environment set as a pod's would be, and its VMs' credentials Secrets written as files
in the layout a pod's mounts have. Each worker's process group is recorded in a PID file
beside its log, so a controller that was killed leaves nothing a successor (or
``vmfleet dev down``) cannot stop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfleet.api import constants as c
from vmfleet.procs import (
    ManagedProcess,
    free_port,
    read_pid_file,
    stop_pid_file,
    write_pid_file,
)

from .runtime import Env, WorkerGroup, worker_argv
from .tenants import WorkerURLs

log = logging.getLogger("controller.runtime")



def local_worker_name(group: WorkerGroup, index: int) -> str:
    """The Process runtime's stand-in for a pod name: which worker process of which group
    (its log is ``<namespace>.<vm|pool-…|transfers>.<index>.log``)."""
    return f"local/{group.deployment}-{index}.{group.namespace}"



SecretReader = Callable[[str, str], dict[str, str]]  # (namespace, name) -> data


@dataclass
class _LocalWorkers:
    fingerprint: str
    processes: list[ManagedProcess] = field(default_factory=list)


class ProcessRuntime:
    """Workers as child processes of the controller (stopped when it stops).

    Like a pod, a local worker reads its VMs' keys from files: the controller writes each
    Secret it needs under ``<state dir>/credentials/<namespace>/<secret>/`` (mode 0600,
    directories 0700), the layout a worker pod's mounts have."""

    name = c.RUNTIME_PROCESS

    def __init__(self, broker_url: str, log_dir: Path, python: str = sys.executable,
                 read_secret: SecretReader | None = None,
                 credentials_dir: Path | None = None, verify_key: str = "",
                 worker_urls: Callable[[str], WorkerURLs] | None = None,
                 transfer_kubeconfig: Callable[[str], Path] | None = None, *,
                 metrics: bool = True) -> None:
        self.broker_url = broker_url
        self.verify_key = verify_key
        # A namespace's URLs (its own broker user): given to its workers, never another's.
        # None: every namespace's workers get the broker alone (no state, no output store).
        self.worker_urls = worker_urls or (lambda _ns: WorkerURLs(broker_url, None, None))
        self.metrics = metrics  # the controller's metrics are on: each worker gets a port
        self.log_dir = log_dir
        self.python = python
        self.read_secret = read_secret
        # namespace -> a kubeconfig as limited as the chart's transfer ServiceAccount
        self.transfer_kubeconfig = transfer_kubeconfig
        self.credentials_dir = credentials_dir or log_dir.parent / "credentials"
        self._lock = threading.Lock()
        self._workers: dict[str, _LocalWorkers] = {}
        self._secrets: dict[str, tuple[str, list[str]]] = {}  # group -> (namespace, secrets)
        self._refreshed = 0.0

    def stop_predecessors(self, grace: float = 15.0) -> list[int]:
        """Stop the workers an earlier controller left in ``log_dir`` (it was killed, so
        they outlived it): a worker of a VM deleted meanwhile would otherwise run for ever,
        and one of a live VM would run beside the one started now. Called when this
        controller starts to lead (a standby must leave the leader's workers alone).

        Each PID file is renamed at once (``<name>.orphan-<pid>.pgid``), so a new worker
        never takes its name, and is removed only once its process is gone: if this
        controller dies too before the stop ends, the next one, ``vmfleet dev down`` or a
        test still find it. The stopping (warm: running tasks get ``grace`` seconds) goes
        on in a thread. Returns the PIDs."""
        left: list[tuple[int, Path]] = []
        for pid_file in sorted(self.log_dir.glob("*.pgid")):
            recorded = read_pid_file(pid_file)
            if recorded is None:
                pid_file.unlink(missing_ok=True)
                continue
            stem = pid_file.name.removesuffix(".pgid").split(".orphan-")[0]
            orphan = pid_file.with_name(f"{stem}.orphan-{recorded[0]}.pgid")
            pid_file.rename(orphan)
            left.append((recorded[0], orphan))
        if not left:
            return []
        log.info("Stopping %d worker process(es) an earlier controller left: %s", len(left),
                 ", ".join(str(pid) for pid, _ in left))
        for pid, orphan in left:
            threading.Thread(target=stop_pid_file, args=(orphan, grace),
                             name=f"vmfleet-stop-{pid}", daemon=True).start()
        return [pid for pid, _ in left]

    def refresh_credentials(self, every: float = 5.0) -> None:
        """Write the running groups' Secrets again (a Secret created or rotated after its
        workers started), at most every ``every`` seconds: what the kubelet does for a
        pod's mounted Secrets."""
        now = time.monotonic()
        if now - self._refreshed < every:
            return
        self._refreshed = now
        with self._lock:
            wanted = list(self._secrets.values())
        for namespace, secrets in wanted:
            self.write_credentials(namespace, secrets)

    def _argv(self, group: WorkerGroup, index: int) -> list[str]:
        node = f"{group.deployment}-{index}.{group.namespace}@%h"
        argv = worker_argv(",".join(group.queues), group.concurrency, node)
        return [self.python, *argv[1:]]

    def _env(self, group: WorkerGroup, urls: WorkerURLs, index: int = 0) -> dict[str, str]:
        env = dict(os.environ)
        env[Env.POD_NAME] = local_worker_name(group, index)
        for name in (Env.STATE_URL, Env.SLOTS_URL, Env.OUTPUT_URL):
            env.pop(name, None)  # the controller's own: never a worker's
        env[Env.BROKER_URL] = urls.broker
        if urls.state:
            env[Env.STATE_URL] = urls.state
        if urls.output:
            env[Env.OUTPUT_URL] = urls.output
        env[Env.NAMESPACE] = group.namespace
        env[Env.CREDENTIALS_DIR] = str(self.credentials_dir / group.namespace)
        env[Env.VERIFY_KEY] = self.verify_key
        env[Env.SERVED] = group.served.encode()
        for name in ("KUBECONFIG", Env.MAX_CONCURRENT, Env.SIGNING_KEY):
            env.pop(name, None)  # a worker holds no Kubernetes credentials, nor the private key...
        if group.transfers and self.transfer_kubeconfig is not None:
            # ...but a transfer worker: its namespace's Secrets and ConfigMaps, `get` only.
            env["KUBECONFIG"] = str(self.transfer_kubeconfig(group.namespace))
        # Local workers share the machine: each its own metrics port, or none if ours is off.
        env[Env.METRICS_PORT] = str(free_port()) if self.metrics else "0"
        return env

    def write_credentials(self, namespace: str, secrets: list[str]) -> None:
        """The Secrets' keys as files, as a pod would have them mounted."""
        if self.read_secret is None:
            return
        for secret in secrets:
            directory = self.credentials_dir / namespace / secret
            try:
                data = self.read_secret(namespace, secret)
            except Exception as exc:  # noqa: BLE001 - the worker reports CredentialsInvalid
                log.warning("Could not read Secret %s/%s for local workers: %s", namespace, secret,
                            getattr(exc, "reason", exc))
                continue
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory.parent, 0o700)
            for key, value in data.items():
                if "/" in key or key.startswith("."):
                    continue
                path = directory / key
                tmp = path.with_name(f".{key}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(value)
                os.replace(tmp, path)

    def current_replicas(self, group: WorkerGroup) -> int:
        with self._lock:
            current = self._workers.get(group.key)
            return sum(1 for p in current.processes if p.running()) if current else 0

    ready_replicas = current_replicas

    def ensure(self, group: WorkerGroup, replicas: int) -> dict[str, Any]:
        """Run ``replicas`` worker processes for the group."""
        # A member joining or leaving a pool changes what its workers serve: they restart;
        # so do new broker credentials.
        urls = self.worker_urls(group.namespace)
        fingerprint = hashlib.sha256(repr((self._argv(group, 0), urls,
                                           group.served.encode())).encode()).hexdigest()
        if replicas:
            self.write_credentials(group.namespace, group.secrets)
        with self._lock:
            if replicas:
                self._secrets[group.key] = (group.namespace, group.secrets)
            else:
                self._secrets.pop(group.key, None)
            current = self._workers.get(group.key)
            if current is not None and current.fingerprint != fingerprint:
                self._stop(current)
                current = None
            if current is None:
                current = self._workers[group.key] = _LocalWorkers(fingerprint)
            current.processes = [p for p in current.processes if p.running()]
            while len(current.processes) < replicas:
                index = len(current.processes)
                who = "transfers" if group.transfers else \
                    f"pool-{group.pool}" if group.pool else group.vms[0].name
                log_path = self.log_dir / f"{group.namespace}.{who}.{index}.log"
                proc = ManagedProcess(f"worker {group.key}#{index}", self._argv(group, index),
                                      log_path, env=self._env(group, urls, index)).start()
                # Recorded so that `vmfleet dev down` can stop workers a killed controller left.
                write_pid_file(proc, log_path.with_suffix(".pgid"))
                log.info("Started worker process %s for %s (queues %s)", proc.pid, group.key,
                         ",".join(group.queues))
                current.processes.append(proc)
            while len(current.processes) > replicas:
                extra = current.processes.pop()
                extra.stop(grace=15)
                stop_pid_file(extra.log_path.with_suffix(".pgid"), grace=0)
            running = len(current.processes)
        return {"runtime": self.name, "queue": ",".join(group.queues), "replicas": replicas,
                "readyReplicas": running}

    def remove(self, group_key: str) -> None:
        with self._lock:
            self._secrets.pop(group_key, None)
            current = self._workers.pop(group_key, None)
            if current is not None:
                self._stop(current)

    def shutdown(self) -> None:
        """Stop every local worker: all are asked to finish at once (warm shutdown), so
        the controller's own grace period covers them together, not one after another."""
        with self._lock:
            self._stop(*self._workers.values())
            self._workers.clear()

    @staticmethod
    def _stop(*groups: _LocalWorkers) -> None:
        processes = [proc for workers in groups for proc in workers.processes]
        for proc in processes:
            proc.signal(signal.SIGTERM)
        for proc in processes:
            proc.stop(grace=15)
            stop_pid_file(proc.log_path.with_suffix(".pgid"), grace=0)
        for workers in groups:
            workers.processes.clear()
