"""Worker runtimes: where a VM's Celery workers run. One sizing logic, two runtimes.

- ``Deployment``: a Deployment ``vmfleet-worker-<vm>`` owned by the RemoteVM, with only
  that VM's credentials Secret mounted (read-only).
- ``Process``: the same worker command as local processes of the controller (one machine,
  dev and tests), the single-machine setup of the original guide without systemd.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes.client import AppsV1Api
from kubernetes.client.exceptions import ApiException

from vmfleet.api import constants as c
from vmfleet.api.models import RemoteVMSpec
from vmfleet.celeryconf import BROKER_URL_ENV
from vmfleet.dev.proc import ManagedProcess, free_port, stop_pid_file, write_pid_file
from vmfleet.metrics import PORT_ENV as METRICS_PORT_ENV

log = logging.getLogger("controller.runtime")

# The VM's maxConcurrentCommands, shared by all its workers (a semaphore in the broker).
MAX_CONCURRENT_ENV = "VMFLEET_MAX_CONCURRENT_COMMANDS"
# A proxyJump bastion's Secret: beside the VM's own (the worker reads "<dir>-bastion").
BASTION_CREDENTIALS_MOUNT_PATH = f"{c.CREDENTIALS_MOUNT_PATH}-bastion"


def desired_replicas(spec: RemoteVMSpec) -> int:
    """Worker count before backlog scaling: fixed replicas, else the autoscale floor (>= 1)."""
    workers = spec.workers
    if workers is None:
        return 1
    if workers.replicas is not None:
        return workers.replicas
    if workers.autoscale is not None:
        return max(1, workers.autoscale.min_replicas)
    return 1


def worker_argv(queue: str, concurrency: int, node_name: str) -> list[str]:
    """The worker command, the same in both runtimes."""
    return [
        "celery", "-A", "remote_tasks", "worker",
        "-Q", queue,
        "--pool", "threads",
        "--concurrency", str(concurrency),
        "-n", node_name,
        "--without-gossip", "--without-mingle",
        "--loglevel", "INFO",
    ]


TRANSFER_CONCURRENCY = 4
TRANSFER_NODE = "vmfleet-transfers"


def transfer_worker_argv(concurrency: int = TRANSFER_CONCURRENCY,
                         node_name: str = f"{TRANSFER_NODE}@%h") -> list[str]:
    """The shared transfer worker (queue ``vmfleet.transfers``): every VM's transfers."""
    return worker_argv(c.TRANSFER_QUEUE, concurrency, node_name)


def label_value(value: str) -> str:
    """A label value (max 63 characters) that still identifies ``value``."""
    if len(value) <= 63:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[:54].rstrip('-.')}-{digest}"


@dataclass
class VMRef:
    namespace: str
    name: str
    uid: str
    spec: RemoteVMSpec
    # proxyJump: the bastion RemoteVM's credentials Secret, mounted beside the VM's own.
    bastion_secret: str | None = None

    @property
    def queue(self) -> str:
        return self.spec.queue or c.default_queue(self.namespace, self.name)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Runtime(Protocol):
    name: str

    def ensure(self, vm: VMRef, replicas: int | None = None) -> dict[str, Any]: ...

    def current_replicas(self, vm: VMRef) -> int: ...

    def remove(self, namespace: str, name: str) -> None: ...

    def shutdown(self) -> None: ...


# --------------------------------------------------------------------------- Deployment


@dataclass(frozen=True)
class DeploymentSettings:
    image: str
    broker_url: str
    broker_secret_name: str | None = None
    broker_secret_key: str = "url"
    service_account: str = c.WORKER_SERVICE_ACCOUNT
    image_pull_policy: str = "IfNotPresent"
    # The chart's `hostNetwork` and `workers.extraEnv` (pod_extras applies them).
    host_network: bool = False
    extra_env: tuple[dict[str, Any], ...] = ()


def pod_extras(settings: DeploymentSettings, pod_spec: dict[str, Any],
               container: dict[str, Any]) -> None:
    """Apply the settings' host network and extra environment to a worker pod."""
    if settings.host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if settings.extra_env:
        container["env"] = [*container["env"], *settings.extra_env]


#: The image's numeric user and group (Dockerfile: USER 10001:10001).
WORKER_UID = 10001


def worker_labels(vm_name: str) -> dict[str, str]:
    return {
        c.LABEL_NAME: "vmfleet",
        c.LABEL_COMPONENT: "worker",
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_VM: label_value(vm_name),
    }


def worker_deployment(vm: VMRef, settings: DeploymentSettings, replicas: int) -> dict[str, Any]:
    """The Deployment of one VM's workers (pure; applied with server-side apply)."""
    name = c.worker_deployment_name(vm.name)
    labels = worker_labels(vm.name)
    if settings.broker_secret_name:
        broker_env: dict[str, Any] = {
            "name": BROKER_URL_ENV,
            "valueFrom": {"secretKeyRef": {"name": settings.broker_secret_name,
                                           "key": settings.broker_secret_key}},
        }
    else:
        broker_env = {"name": BROKER_URL_ENV, "value": settings.broker_url}
    container: dict[str, Any] = {
        "name": "worker",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": worker_argv(vm.queue, vm.spec.max_concurrent_commands, f"{name}@%h"),
        "env": [
            broker_env,
            {"name": "VMFLEET_CREDENTIALS_DIR", "value": c.CREDENTIALS_MOUNT_PATH},
            {"name": "VMFLEET_VM", "value": vm.key},
            {"name": MAX_CONCURRENT_ENV, "value": str(vm.spec.max_concurrent_commands)},
        ],
        "volumeMounts": [
            {"name": "ssh-credentials", "mountPath": c.CREDENTIALS_MOUNT_PATH, "readOnly": True}
        ] + ([{"name": "bastion-ssh-credentials", "mountPath": BASTION_CREDENTIALS_MOUNT_PATH,
               "readOnly": True}] if vm.bastion_secret else []),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if vm.spec.workers is not None and vm.spec.workers.resources:
        container["resources"] = vm.spec.workers.resources
    pod_spec: dict[str, Any] = {
        "serviceAccountName": settings.service_account,
        # The image's user (Dockerfile): the mounted key is group-readable by fsGroup.
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                            "fsGroup": WORKER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{
            "name": "ssh-credentials",
            "secret": {"secretName": vm.spec.credentials_secret_ref.name,
                       "defaultMode": 0o440},
        }] + ([{
            "name": "bastion-ssh-credentials",
            "secret": {"secretName": vm.bastion_secret, "defaultMode": 0o440},
        }] if vm.bastion_secret else []),
    }
    pod_extras(settings, pod_spec, container)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": vm.namespace,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": c.API_VERSION,
                "kind": c.VM_KIND,
                "name": vm.name,
                "uid": vm.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": pod_spec,
            },
        },
    }


class DeploymentRuntime:
    name = c.RUNTIME_DEPLOYMENT

    def __init__(self, apps: AppsV1Api, settings: DeploymentSettings) -> None:
        self.apps = apps
        self.settings = settings

    def ensure(self, vm: VMRef, replicas: int | None = None) -> dict[str, Any]:
        """Apply the Deployment with ``replicas`` (from the autoscaler; default: the spec's)."""
        replicas = desired_replicas(vm.spec) if replicas is None else replicas
        body = worker_deployment(vm, self.settings, replicas)
        applied = self.apps.patch_namespaced_deployment(
            body["metadata"]["name"], vm.namespace, body,
            field_manager="vmfleet-controller", force=True,
            _content_type="application/apply-patch+yaml",
        )
        return {
            "runtime": self.name,
            "deployment": body["metadata"]["name"],
            "queue": vm.queue,
            "replicas": replicas,
            "readyReplicas": (applied.status.ready_replicas or 0) if applied.status else 0,
        }

    def current_replicas(self, vm: VMRef) -> int:
        try:
            dep = self.apps.read_namespaced_deployment(c.worker_deployment_name(vm.name),
                                                       vm.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return 0
            raise
        return int(dep.spec.replicas or 0) if dep.spec else 0

    def remove(self, namespace: str, name: str) -> None:
        """Nothing to do: the Deployment is owned by the RemoteVM and garbage collected."""

    def ensure_transfer_worker(self) -> None:
        """Nothing to do: the Helm chart runs the transfer worker (``transfer_worker_argv``)."""

    def shutdown(self) -> None:
        """Deployments outlive the controller."""


# --------------------------------------------------------------------------- Process


_TRANSFERS_KEY = "*transfers"  # never a namespace/name key


@dataclass
class _LocalWorkers:
    fingerprint: str
    processes: list[ManagedProcess] = field(default_factory=list)


class ProcessRuntime:
    """Workers as child processes of the controller (stopped when it stops)."""

    name = c.RUNTIME_PROCESS

    def __init__(self, broker_url: str, log_dir: Path, python: str = sys.executable) -> None:
        self.broker_url = broker_url
        self.log_dir = log_dir
        self.python = python
        self._lock = threading.Lock()
        self._workers: dict[str, _LocalWorkers] = {}

    def _argv(self, vm: VMRef, index: int) -> list[str]:
        node = f"{c.worker_deployment_name(vm.name)}-{index}.{vm.namespace}@%h"
        argv = worker_argv(vm.queue, vm.spec.max_concurrent_commands, node)
        return [self.python, "-m", *argv]

    def _env(self, vm: VMRef) -> dict[str, str]:
        env = dict(os.environ)
        env[BROKER_URL_ENV] = self.broker_url
        env["VMFLEET_VM"] = vm.key
        env[MAX_CONCURRENT_ENV] = str(vm.spec.max_concurrent_commands)
        env.pop("VMFLEET_CREDENTIALS_DIR", None)  # read the VM's own Secret through the API
        # Local workers share the machine: each its own metrics port, or none if ours is off.
        env[METRICS_PORT_ENV] = str(free_port()) if os.environ.get(METRICS_PORT_ENV) != "0" else "0"
        return env

    def current_replicas(self, vm: VMRef) -> int:
        with self._lock:
            current = self._workers.get(vm.key)
            return sum(1 for p in current.processes if p.running()) if current else 0

    def ensure(self, vm: VMRef, replicas: int | None = None) -> dict[str, Any]:
        """Run ``replicas`` worker processes (from the autoscaler; default: the spec's)."""
        replicas = desired_replicas(vm.spec) if replicas is None else replicas
        fingerprint = hashlib.sha256(repr((self._argv(vm, 0), self.broker_url)).encode()).hexdigest()
        with self._lock:
            current = self._workers.get(vm.key)
            if current is not None and current.fingerprint != fingerprint:
                self._stop(current)
                current = None
            if current is None:
                current = self._workers[vm.key] = _LocalWorkers(fingerprint)
            current.processes = [p for p in current.processes if p.running()]
            while len(current.processes) < replicas:
                index = len(current.processes)
                log_path = self.log_dir / f"{vm.namespace}.{vm.name}.{index}.log"
                proc = ManagedProcess(f"worker {vm.key}#{index}", self._argv(vm, index), log_path,
                                      env=self._env(vm)).start()
                # Recorded so that `vmfleet dev down` can stop workers a killed controller left.
                write_pid_file(proc, log_path.with_suffix(".pgid"))
                log.info("Started worker process %s for RemoteVM %s (queue %s)", proc.pid, vm.key,
                         vm.queue)
                current.processes.append(proc)
            while len(current.processes) > replicas:
                extra = current.processes.pop()
                extra.stop(grace=15)
                stop_pid_file(extra.log_path.with_suffix(".pgid"), grace=0)
            running = len(current.processes)
        return {"runtime": self.name, "queue": vm.queue, "replicas": replicas,
                "readyReplicas": running}

    def ensure_transfer_worker(self, concurrency: int = TRANSFER_CONCURRENCY) -> int:
        """Run the shared transfer worker (restarted if it died); returns its pid."""
        argv = [self.python, "-m", *transfer_worker_argv(concurrency, f"{TRANSFER_NODE}-0@%h")]
        with self._lock:
            current = self._workers.setdefault(_TRANSFERS_KEY, _LocalWorkers("transfers"))
            current.processes = [p for p in current.processes if p.running()]
            if not current.processes:
                log_path = self.log_dir / "transfers.0.log"
                env = dict(os.environ)
                env[BROKER_URL_ENV] = self.broker_url
                env.pop("VMFLEET_CREDENTIALS_DIR", None)  # it reaches every VM: keys via the API
                proc = ManagedProcess("transfer worker", argv, log_path, env=env).start()
                write_pid_file(proc, log_path.with_suffix(".pgid"))
                log.info("Started transfer worker process %s (queue %s)", proc.pid,
                         c.TRANSFER_QUEUE)
                current.processes.append(proc)
            return current.processes[0].pid

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            current = self._workers.pop(f"{namespace}/{name}", None)
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
