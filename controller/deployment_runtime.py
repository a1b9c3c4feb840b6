"""The ``Deployment`` runtime: each worker group as a Deployment (server-side apply).

``worker_deployment`` renders a group's Deployment (pure): a pod holding no Kubernetes
credentials (the transfer worker excepted: its namespace's ServiceAccount), mounting only
its VMs' credentials Secrets (``check_mounts``). ``DeploymentRuntime`` applies it when
the Deployment watch (``DeploymentCache``) shows something else, and the group's
PodDisruptionBudget beside it (``controller.budgets``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmfleet import tenancy, workerprobes
from vmfleet.api import constants as c
from vmfleet.kube import RawApi

from .budgets import Budgets
from .runtime import Env, WorkerGroup, owner_references, worker_argv, worker_labels

#: The key of a namespace's output store URL in its broker Secret (chart: `outputStore`).
OUTPUT_SECRET_KEY = "output-url"


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


SPEC_HASH_ANNOTATION = f"{c.GROUP}/spec-hash"


def worker_env(namespace: str, settings: DeploymentSettings) -> list[dict[str, Any]]:
    """A worker pod's connection strings, each from the namespace's broker Secret
    (``secretKeyRef``: never a literal URL in a pod spec), and its namespace."""
    if not settings.broker_secret_name:
        raise ValueError("the Deployment runtime needs VMFLEET_BROKER_SECRET_NAME: worker pods "
                         "take their broker URL from a Secret in their namespace, never a literal")
    env: list[dict[str, Any]] = [
        {"name": Env.BROKER_URL, "valueFrom": {"secretKeyRef": {
            "name": settings.broker_secret_name, "key": settings.broker_secret_key}}},
        {"name": Env.NAMESPACE, "value": namespace},
    ]
    if settings.state_url:
        env.append({"name": Env.STATE_URL, "valueFrom": {"secretKeyRef": {
            "name": settings.broker_secret_name, "key": tenancy.STATE_SECRET_KEY}}})
    if settings.output_url:
        env.append({"name": Env.OUTPUT_URL, "valueFrom": {"secretKeyRef": {
            "name": settings.broker_secret_name, "key": OUTPUT_SECRET_KEY}}})
    return env


def worker_deployment(group: WorkerGroup, settings: DeploymentSettings, replicas: int) -> dict[str, Any]:
    """The Deployment of one worker group (pure; applied with server-side apply), with
    the hash of what its pods run (``SPEC_HASH_ANNOTATION``)."""
    labels = worker_labels(group)
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": group.deployment,
            "namespace": group.namespace,
            "labels": labels,
            # Owned by its VMs: garbage collected with the last of them.
            "ownerReferences": owner_references(group),
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": worker_pod_spec(group, settings, labels)},
        },
    }
    digest = hashlib.sha256(repr(sorted(_flatten(body["metadata"]["ownerReferences"]))).encode()
                            + repr(body["spec"]["template"]).encode()).hexdigest()[:16]
    body["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
    return body


def worker_pod_spec(group: WorkerGroup, settings: DeploymentSettings,
                    labels: dict[str, str]) -> dict[str, Any]:
    """A worker pod (pure). It holds no Kubernetes credentials
    (``automountServiceAccountToken: false``) but a transfer worker's, and mounts only its
    VMs' credentials Secrets, each at ``<mount>/<secret name>`` (``check_mounts``)."""
    container = _worker_container(group, settings)
    # A transfer worker's VMs may name a Secret not created yet: it must not stop the
    # namespace's transfers (that VM's attempts fail CredentialsInvalid).
    volumes = [{"name": _volume(secret), "secret": {"secretName": secret, "defaultMode": 0o440,
                                                     **({"optional": True} if group.transfers else {})}}
               for secret in group.secrets]
    volumes.append({"name": "probes", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    account = settings.transfer_service_account if group.transfers else None
    pod_spec: dict[str, Any] = {
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
    pod_extras(settings, pod_spec, container)
    check_mounts(group, pod_spec)
    return pod_spec


def _worker_container(group: WorkerGroup, settings: DeploymentSettings) -> dict[str, Any]:
    """The worker container: the worker command on the group's queues, its environment,
    its VMs' keys read-only and the probe files (the root filesystem is read-only)."""
    env = [*worker_env(group.namespace, settings),
           {"name": Env.CREDENTIALS_DIR, "value": c.CREDENTIALS_MOUNT_PATH},
           {"name": Env.VERIFY_KEY, "value": settings.verify_key},
           {"name": Env.SERVED, "value": group.served.encode()},
           {"name": Env.PROBE_DIR, "value": workerprobes.PROBE_DIR},
           # The pod that runs an attempt is named in its result, Event and audit line.
           {"name": Env.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    mounts = [{"name": _volume(secret), "mountPath": f"{c.CREDENTIALS_MOUNT_PATH}/{secret}",
               "readOnly": True} for secret in group.secrets]
    # The probe files: a small emptyDir in memory.
    mounts.append({"name": "probes", "mountPath": workerprobes.PROBE_DIR})
    container: dict[str, Any] = {
        "name": "worker",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": worker_argv(",".join(group.queues), group.concurrency, f"{group.deployment}@%h"),
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
    return container


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

    def __init__(self, apps: RawApi, settings: DeploymentSettings,
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
            applied = self.apps.apply_deployment(group.namespace, group.deployment, body,
                                                 field_manager="vmfleet-controller")
            ready = int((applied.get("status") or {}).get("readyReplicas") or 0)
            self.cache.seen(applied)
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
