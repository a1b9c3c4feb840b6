"""Worker runtimes: where a VM's Celery workers run. One sizing logic, two runtimes.

- ``Deployment`` (``controller.deployment_runtime``): a Deployment
  ``vmfleet-worker-<vm>`` owned by the RemoteVM (or ``vmfleet-pool-<pool>`` for the VMs
  of a ``workerPool``), with only those VMs' credentials Secrets mounted (read-only) and
  no Kubernetes credentials at all.
- ``Process`` (``controller.process_runtime``): the same worker command as local
  processes of the controller (one machine, dev and tests), the single-machine setup of
  the original guide without systemd.

This module holds what both share: the worker groups (``VMRef``, ``WorkerGroup``), the
``Runtime`` protocol, the worker command (``worker_argv``), the environment names a
worker reads, its labels and its owners.

Each namespace with RemoteVMs also has a transfer worker group (``transfer_group``):
Deployment ``vmfleet-transfers`` consuming ``vmfleet.<namespace>:transfers``, mounting
the credentials Secrets of that namespace's VMs, scaled to zero when idle and woken by a
dispatch. It is the one worker with a Kubernetes token: the chart's per-namespace
ServiceAccount, allowed to ``get`` Secrets and ConfigMaps of its namespace (transfer
sources). ``check_mounts`` refuses a worker body that would mount anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from vmfleet import settings
from vmfleet.api import constants as c
from vmfleet.api.models import DEFAULT_WORKER_GRACE_SECONDS, Autoscale, RemoteVMSpec, WorkersSpec
from vmfleet.api.served import Served
from vmfleet.celeryconf import BROKER_URL_ENV
from vmfleet.metrics import PORT_ENV as METRICS_PORT_ENV


class Env:
    """The environment a worker reads (both runtimes set it), and the controller's own
    that a local worker must not inherit."""

    BROKER_URL = BROKER_URL_ENV
    STATE_URL = settings.env_of("state_url")
    SLOTS_URL = settings.env_of("slots_url")
    OUTPUT_URL = settings.env_of("output_url")
    NAMESPACE = settings.env_of("namespace")
    POD_NAME = settings.env_of("pod_name")
    CREDENTIALS_DIR = settings.env_of("credentials_dir")
    VERIFY_KEY = settings.env_of("verify_key")
    SERVED = settings.env_of("served_vms")
    PROBE_DIR = settings.env_of("probe_dir")
    METRICS_PORT = METRICS_PORT_ENV
    # The controller's: the VM's maxConcurrentCommands (a semaphore in the broker), and
    # the private key that signs messages.
    MAX_CONCURRENT = settings.env_of("max_concurrent_commands")
    SIGNING_KEY = settings.env_of("signing_key_file")


def desired_replicas(workers: WorkersSpec | None) -> int:
    """Worker count before backlog scaling: fixed replicas, else the autoscale floor (>= 1)."""
    if workers is None:
        return 1
    if workers.replicas is not None:
        return workers.replicas
    if workers.autoscale is not None:
        return max(1, workers.autoscale.min_replicas)
    return 1


def worker_argv(queue: str, concurrency: int, node_name: str) -> list[str]:
    """The worker command, the same in both runtimes (the Process runtime runs it with its
    own interpreter): ``remote_tasks.worker``, Celery's worker without Celery's command
    line; no worker-heartbeat events (events are off) nor gossip and mingle."""
    return [
        "python", "-m", "remote_tasks.worker",
        "-Q", queue,
        "--pool", "threads",
        "--concurrency", str(concurrency),
        "-n", node_name,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "INFO",
    ]


TRANSFER_CONCURRENCY = 4  # transfers one transfer worker runs at once
# A namespace's transfer workers: none while idle, one (woken by a dispatch) while there
# are transfers, stopped a minute after the last one.
TRANSFER_WORKERS = WorkersSpec(autoscale=Autoscale(
    min_replicas=0, max_replicas=1, target_backlog_per_replica=TRANSFER_CONCURRENCY,
    scale_down_delay_seconds=60))
TRANSFERS_GROUP = ":transfers"  # a group key's name part: never a VM's name nor a pool's
LABEL_TRANSFERS = f"{c.GROUP}/transfers"


def transfer_group_key(namespace: str) -> str:
    return f"{namespace}/{TRANSFERS_GROUP}"


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

    @property
    def group(self) -> str:
        """The worker group's key: its pool, else the VM itself."""
        if self.spec.worker_pool:
            return f"{self.namespace}/pool:{self.spec.worker_pool}"
        return self.key


@dataclass
class WorkerGroup:
    """The VMs one worker Deployment serves: one VM, or every VM of a pool."""

    namespace: str
    vms: list[VMRef]
    pool: str | None = None
    # The namespace's transfer worker: ``vms`` are every RemoteVM of the namespace.
    transfers: bool = False

    @property
    def key(self) -> str:
        if self.transfers:
            return transfer_group_key(self.namespace)
        return f"{self.namespace}/pool:{self.pool}" if self.pool else self.vms[0].key

    @property
    def deployment(self) -> str:
        if self.transfers:
            return c.TRANSFER_DEPLOYMENT
        return c.pool_deployment_name(self.pool) if self.pool else c.worker_deployment_name(self.vms[0].name)

    @property
    def queues(self) -> list[str]:
        if self.transfers:
            return [c.transfer_queue(self.namespace)]
        return sorted({vm.queue for vm in self.vms})

    @property
    def concurrency(self) -> int:
        """Threads: every VM's maxConcurrentCommands (the slots hold each VM's limit)."""
        if self.transfers:
            return TRANSFER_CONCURRENCY
        return max(1, min(256, sum(vm.spec.max_concurrent_commands for vm in self.vms)))

    @property
    def served(self) -> Served:
        """What the group's workers may run: its VMs and their bastions, each with its
        credentials Secret (``VMFLEET_SERVED_VMS``)."""
        pairs = {(vm.name, vm.spec.credentials_secret_ref.name) for vm in self.vms}
        pairs |= {(vm.spec.proxy_jump.vm, vm.bastion_secret) for vm in self.vms
                  if vm.spec.proxy_jump is not None and vm.bastion_secret}
        return Served.of(self.namespace, pairs)

    @property
    def termination_grace(self) -> int:
        """Seconds a stopping worker pod has to finish what it runs (the VMs' largest)."""
        return max(vm.spec.workers.termination_grace_period_seconds if vm.spec.workers
                   else DEFAULT_WORKER_GRACE_SECONDS for vm in self.vms)

    @property
    def secrets(self) -> list[str]:
        names = {vm.spec.credentials_secret_ref.name for vm in self.vms}
        names |= {vm.bastion_secret for vm in self.vms if vm.bastion_secret}
        return sorted(names)

    @property
    def workers(self) -> WorkersSpec | None:
        """The pool's sizing from its VMs' ``workers`` (the largest floor and ceiling)."""
        if self.transfers:
            return TRANSFER_WORKERS
        specs = [vm.spec.workers for vm in self.vms if vm.spec.workers is not None]
        if not specs:
            return None
        resources = next((w.resources for w in specs if w.resources is not None), None)
        fixed = [w.replicas for w in specs if w.replicas is not None]
        autos = [w.autoscale for w in specs if w.autoscale is not None]
        if not autos:
            # ``workers: {}`` or only ``resources``: the default of one replica.
            return WorkersSpec(replicas=max(fixed) if fixed else None, resources=resources)
        return WorkersSpec(autoscale=Autoscale(
            min_replicas=max([a.min_replicas for a in autos] + fixed),
            max_replicas=max([a.max_replicas for a in autos] + fixed),
            target_backlog_per_replica=min(a.target_backlog_per_replica for a in autos),
            scale_down_delay_seconds=max(a.scale_down_delay_seconds for a in autos),
        ), resources=resources)


def single(vm: VMRef) -> WorkerGroup:
    return WorkerGroup(vm.namespace, [vm], vm.spec.worker_pool)


def transfer_group(namespace: str, vms: list[VMRef]) -> WorkerGroup:
    """The namespace's transfer worker: it reaches (and mounts the keys of) all its VMs."""
    return WorkerGroup(namespace, sorted(vms, key=lambda v: v.name), transfers=True)


class Runtime(Protocol):
    name: str

    def ensure(self, group: WorkerGroup, replicas: int) -> dict[str, Any]: ...

    def current_replicas(self, group: WorkerGroup) -> int: ...

    def remove(self, group_key: str) -> None: ...

    def shutdown(self) -> None: ...



def worker_labels(group: WorkerGroup) -> dict[str, str]:
    labels = {
        c.LABEL_NAME: "vmfleet",
        c.LABEL_COMPONENT: "worker",
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
    }
    if group.transfers:
        labels[LABEL_TRANSFERS] = "true"
    elif group.pool:
        labels[c.LABEL_POOL] = label_value(group.pool)
    else:
        labels[c.LABEL_VM] = label_value(group.vms[0].name)
    return labels



def owner_references(group: WorkerGroup) -> list[dict[str, Any]]:
    """The group's RemoteVMs as owners (the controller only for a single VM's workers)."""
    return [{
        "apiVersion": c.API_VERSION,
        "kind": c.VM_KIND,
        "name": vm.name,
        "uid": vm.uid,
        "controller": group.pool is None and not group.transfers,
        "blockOwnerDeletion": False,
    } for vm in sorted(group.vms, key=lambda v: v.name)]

