"""Worker runtimes: where a VM's Celery workers run. One sizing logic, two runtimes.

- ``Deployment``: a Deployment ``vmfleet-worker-<vm>`` owned by the RemoteVM (or
  ``vmfleet-pool-<pool>`` for the VMs of a ``workerPool``), with only those VMs'
  credentials Secrets mounted (read-only) and no Kubernetes credentials at all.
- ``Process``: the same worker command as local processes of the controller (one machine,
  dev and tests), the single-machine setup of the original guide without systemd.

Each namespace with RemoteVMs also has a transfer worker group (``transfer_group``):
Deployment ``vmfleet-transfers`` consuming ``vmfleet.<namespace>:transfers``, mounting
the credentials Secrets of that namespace's VMs, scaled to zero when idle and woken by a
dispatch. It is the one worker with a Kubernetes token: the chart's per-namespace
ServiceAccount, allowed to ``get`` Secrets and ConfigMaps of its namespace (transfer
sources). ``check_mounts`` refuses a worker body that would mount anything else.
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
from typing import Any, Protocol

from kubernetes.client import AppsV1Api

from vmfleet import settings, tenancy, workerprobes
from vmfleet.api import constants as c
from vmfleet.api.models import DEFAULT_WORKER_GRACE_SECONDS, Autoscale, RemoteVMSpec, WorkersSpec
from vmfleet.api.served import Served
from vmfleet.celeryconf import BROKER_URL_ENV
from vmfleet.metrics import PORT_ENV as METRICS_PORT_ENV
from vmfleet.procs import (
    ManagedProcess,
    free_port,
    read_pid_file,
    stop_pid_file,
    write_pid_file,
)

from .budgets import Budgets
from .tenants import WorkerURLs

log = logging.getLogger("controller.runtime")

# The VM's maxConcurrentCommands, shared by all its workers (a semaphore in the broker).
MAX_CONCURRENT_ENV = settings.env_of("max_concurrent_commands")
CREDENTIALS_DIR_ENV = settings.env_of("credentials_dir")
STATE_URL_ENV = settings.env_of("state_url")
VERIFY_KEY_ENV = settings.env_of("verify_key")
SERVED_ENV = settings.env_of("served_vms")
SIGNING_KEY_ENV = settings.env_of("signing_key_file")
SLOTS_URL_ENV = settings.env_of("slots_url")
OUTPUT_URL_ENV = settings.env_of("output_url")
#: The key of a namespace's output store URL in its broker Secret (chart: `outputStore`).
OUTPUT_SECRET_KEY = "output-url"
NAMESPACE_ENV = settings.env_of("namespace")
POD_NAME_ENV = settings.env_of("pod_name")


def local_worker_name(group: WorkerGroup, index: int) -> str:
    """The Process runtime's stand-in for a pod name: which worker process of which group
    (its log is ``<namespace>.<vm|pool-…|transfers>.<index>.log``)."""
    return f"local/{group.deployment}-{index}.{group.namespace}"


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


# --------------------------------------------------------------------------- Deployment


@dataclass(frozen=True)
class DeploymentSettings:
    image: str
    broker_url: str
    broker_secret_name: str = tenancy.BROKER_SECRET_NAME
    broker_secret_key: str = "url"
    state_url: str | None = None
    # The output store: each namespace's URL is in its broker Secret (`output-url`).
    output_url: str | None = None
    image_pull_policy: str = "IfNotPresent"
    # The chart's `hostNetwork` and `workers.extraEnv` (pod_extras applies them).
    host_network: bool = False
    extra_env: tuple[dict[str, Any], ...] = ()
    # The controller's public key (not a secret): the workers verify every message with it.
    verify_key: str = ""
    # The chart's per-namespace ServiceAccount of the transfer workers (None: no token).
    transfer_service_account: str | None = None


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


SPEC_HASH_ANNOTATION = f"{c.GROUP}/spec-hash"
PROBE_DIR_ENV = settings.env_of("probe_dir")


def worker_env(namespace: str, settings: DeploymentSettings) -> list[dict[str, Any]]:
    """A worker pod's connection strings, each from the namespace's broker Secret
    (``secretKeyRef``: never a literal URL in a pod spec), and its namespace."""
    if not settings.broker_secret_name:
        raise ValueError("the Deployment runtime needs VMFLEET_BROKER_SECRET_NAME: worker pods "
                         "take their broker URL from a Secret in their namespace, never a literal")
    env: list[dict[str, Any]] = [
        {"name": BROKER_URL_ENV, "valueFrom": {"secretKeyRef": {
            "name": settings.broker_secret_name, "key": settings.broker_secret_key}}},
        {"name": NAMESPACE_ENV, "value": namespace},
    ]
    if settings.state_url:
        env.append({"name": STATE_URL_ENV, "valueFrom": {"secretKeyRef": {
            "name": settings.broker_secret_name, "key": tenancy.STATE_SECRET_KEY}}})
    if settings.output_url:
        env.append({"name": OUTPUT_URL_ENV, "valueFrom": {"secretKeyRef": {
            "name": settings.broker_secret_name, "key": OUTPUT_SECRET_KEY}}})
    return env


def worker_deployment(group: WorkerGroup, settings: DeploymentSettings, replicas: int) -> dict[str, Any]:
    """The Deployment of one worker group (pure; applied with server-side apply).

    The pods hold no Kubernetes credentials (``automountServiceAccountToken: false``):
    they mount only their VMs' credentials Secrets, each at ``<mount>/<secret name>``."""
    name = group.deployment
    labels = worker_labels(group)
    env = [*worker_env(group.namespace, settings),
           {"name": CREDENTIALS_DIR_ENV, "value": c.CREDENTIALS_MOUNT_PATH},
           {"name": VERIFY_KEY_ENV, "value": settings.verify_key},
           {"name": SERVED_ENV, "value": group.served.encode()},
           {"name": PROBE_DIR_ENV, "value": workerprobes.PROBE_DIR},
           # The pod that runs an attempt is named in its result, Event and audit line.
           {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    mounts = [{"name": _volume(secret), "mountPath": f"{c.CREDENTIALS_MOUNT_PATH}/{secret}",
               "readOnly": True} for secret in group.secrets]
    # A transfer worker's VMs may name a Secret not created yet: it must not stop the
    # namespace's transfers (that VM's attempts fail CredentialsInvalid).
    volumes = [{"name": _volume(secret), "secret": {"secretName": secret, "defaultMode": 0o440,
                                                     **({"optional": True} if group.transfers else {})}}
               for secret in group.secrets]
    # The probe files (the root filesystem is read-only): a small emptyDir in memory.
    mounts.append({"name": "probes", "mountPath": workerprobes.PROBE_DIR})
    volumes.append({"name": "probes", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    container: dict[str, Any] = {
        "name": "worker",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": worker_argv(",".join(group.queues), group.concurrency, f"{name}@%h"),
        "env": env,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    workers = group.workers
    container.update(workerprobes.probes_and_resources(
        workers.resources.wire() if workers is not None and workers.resources else None))
    account = settings.transfer_service_account if group.transfers else None
    template_spec: dict[str, Any] = {
        # SIGTERM starts Celery's warm shutdown: no new task, the running ones finish.
        "terminationGracePeriodSeconds": group.termination_grace,
        # Only a transfer worker holds a token: its namespace's Secrets and ConfigMaps.
        **({"serviceAccountName": account} if account else {}),
        "automountServiceAccountToken": bool(account),
        "enableServiceLinks": False,
        # The image's user (Dockerfile): the mounted keys are group-readable by fsGroup.
        "securityContext": {"runAsNonRoot": True, "runAsUser": WORKER_UID,
                            "runAsGroup": WORKER_UID, "fsGroup": WORKER_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        # Replicas prefer distinct nodes (a lost node takes only its share); a preference,
        # so a one-node cluster still runs them all.
        # Counted per revision (pod-template-hash): during a rollout the old pods would
        # otherwise push the new ones together.
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": dict(labels)},
            "matchLabelKeys": ["pod-template-hash"],
        }],
    }
    pod_extras(settings, template_spec, container)
    check_mounts(group, template_spec)
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": group.namespace,
            "labels": labels,
            # Owned by its VMs: garbage collected with the last of them.
            "ownerReferences": owner_references(group),
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": template_spec},
        },
    }
    digest = hashlib.sha256(repr(sorted(_flatten(body["metadata"]["ownerReferences"]))).encode()
                            + repr(body["spec"]["template"]).encode()).hexdigest()[:16]
    body["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
    return body


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


def allowed_secrets(group: WorkerGroup) -> set[str]:
    """The Secrets a group's pods may mount: its VMs' credentials and their bastions'."""
    names = {vm.spec.credentials_secret_ref.name for vm in group.vms}
    return names | {vm.bastion_secret for vm in group.vms if vm.bastion_secret}


def check_mounts(group: WorkerGroup, pod_spec: dict[str, Any]) -> None:
    """Refuse a worker pod that mounts anything but its VMs' credentials Secrets (or an
    emptyDir), or serves a VM of another namespace. The chart's admission policy checks
    volume kinds; which Secret a worker may mount only the controller can tell."""
    strangers = sorted(vm.key for vm in group.vms if vm.namespace != group.namespace)
    if strangers:
        raise ValueError(f"worker group {group.key} holds RemoteVMs of another namespace: "
                         f"{', '.join(strangers)}")
    allowed = allowed_secrets(group)
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if kinds == {"emptyDir"}:
            continue
        secret = (volume.get("secret") or {}).get("secretName")
        if kinds != {"secret"} or secret not in allowed:
            raise ValueError(f"worker group {group.key} may mount only its RemoteVMs' "
                             f"credentials Secrets, not volume {volume.get('name')} ({volume})")


def _flatten(refs: list[dict[str, Any]]) -> list[str]:
    return [f"{r['name']}:{r['uid']}" for r in refs]


def _volume(secret: str) -> str:
    return "ssh-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass
class ObservedDeployment:
    replicas: int
    ready: int
    spec_hash: str | None


class DeploymentCache:
    """The worker Deployments as the controller's watch last saw them (no reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], ObservedDeployment] = {}

    def seen(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        observed = ObservedDeployment(
            replicas=int(spec.get("replicas") or 0),
            ready=int(status.get("readyReplicas") or 0),
            spec_hash=(meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION),
        )
        with self._lock:
            self._items[(meta["namespace"], meta["name"])] = observed

    def gone(self, namespace: str, name: str) -> None:
        with self._lock:
            self._items.pop((namespace, name), None)

    def get(self, namespace: str, name: str) -> ObservedDeployment | None:
        with self._lock:
            return self._items.get((namespace, name))


class DeploymentRuntime:
    name = c.RUNTIME_DEPLOYMENT

    def __init__(self, apps: AppsV1Api, settings: DeploymentSettings,
                 cache: DeploymentCache | None = None, budgets: Budgets | None = None,
                 serve: Callable[[str], None] | None = None) -> None:
        self.apps = apps
        self.settings = settings
        self.cache = cache or DeploymentCache()
        self.budgets = budgets or Budgets(apps.api_client)
        self.serve = serve  # the namespace's reports are read from now on

    def ensure(self, group: WorkerGroup, replicas: int) -> dict[str, Any]:
        """Apply the group's Deployment with ``replicas``, unless the watch shows it as
        wanted already (a restarted controller writes nothing)."""
        body = worker_deployment(group, self.settings, replicas)
        if self.serve is not None:
            self.serve(group.namespace)
        seen = self.cache.get(group.namespace, group.deployment)
        wanted_hash = body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        ready = seen.ready if seen is not None else 0
        if seen is None or seen.replicas != replicas or seen.spec_hash != wanted_hash:
            applied = self.apps.patch_namespaced_deployment(
                group.deployment, group.namespace, body,
                field_manager="vmfleet-controller", force=True,
                _content_type="application/apply-patch+yaml",
            )
            ready = (applied.status.ready_replicas or 0) if applied.status else 0
            self.cache.seen(self.apps.api_client.sanitize_for_serialization(applied))
        self.budgets.ensure(group, worker_labels(group))
        return {
            "runtime": self.name,
            "deployment": group.deployment,
            "queue": ",".join(group.queues),
            "replicas": replicas,
            "readyReplicas": ready,
        }

    def current_replicas(self, group: WorkerGroup) -> int:
        seen = self.cache.get(group.namespace, group.deployment)
        return seen.replicas if seen is not None else 0

    def ready_replicas(self, group: WorkerGroup) -> int:
        seen = self.cache.get(group.namespace, group.deployment)
        return seen.ready if seen is not None else 0

    def remove(self, group_key: str) -> None:
        """Nothing to do: the Deployment is owned by its RemoteVMs and garbage collected."""

    def shutdown(self) -> None:
        """Deployments outlive the controller."""


# --------------------------------------------------------------------------- Process


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
                 transfer_kubeconfig: Callable[[str], Path] | None = None) -> None:
        self.broker_url = broker_url
        self.verify_key = verify_key
        # A namespace's URLs (its own broker user): given to its workers, never another's.
        self.worker_urls = worker_urls or (
            lambda _ns: WorkerURLs(broker_url, settings.current().state_url,
                                   settings.current().output_url))
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
        env[POD_NAME_ENV] = local_worker_name(group, index)
        for name in (STATE_URL_ENV, SLOTS_URL_ENV, OUTPUT_URL_ENV):
            env.pop(name, None)  # the controller's own: never a worker's
        env[BROKER_URL_ENV] = urls.broker
        if urls.state:
            env[STATE_URL_ENV] = urls.state
        if urls.output:
            env[OUTPUT_URL_ENV] = urls.output
        env[NAMESPACE_ENV] = group.namespace
        env[CREDENTIALS_DIR_ENV] = str(self.credentials_dir / group.namespace)
        env[VERIFY_KEY_ENV] = self.verify_key
        env[SERVED_ENV] = group.served.encode()
        for name in ("KUBECONFIG", MAX_CONCURRENT_ENV, SIGNING_KEY_ENV):
            env.pop(name, None)  # a worker holds no Kubernetes credentials, nor the private key...
        if group.transfers and self.transfer_kubeconfig is not None:
            # ...but a transfer worker: its namespace's Secrets and ConfigMaps, `get` only.
            env["KUBECONFIG"] = str(self.transfer_kubeconfig(group.namespace))
        # Local workers share the machine: each its own metrics port, or none if ours is off.
        metrics_on = settings.current().metrics_port != 0
        env[METRICS_PORT_ENV] = str(free_port()) if metrics_on else "0"
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
