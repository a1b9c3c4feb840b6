"""The controller's settings (from the environment) and the clients built from them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import AppsV1Api

from vmfleet.api import constants as c
from vmfleet.celeryconf import broker_url
from vmfleet.kube import Kube

from .dispatch import Dispatcher
from .runtime import DeploymentRuntime, DeploymentSettings, ProcessRuntime, Runtime

RUNTIME_ENV = "VMFLEET_WORKER_RUNTIME"


class VMCache:
    """RemoteVMs as the controller's own watch last saw them.

    Dispatching reads a command's VM from here instead of a GET per command; a VM the
    watch has not brought yet is read from the API (and kept).
    """

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._vms: dict[tuple[str, str], dict[str, Any]] = {}

    def seen(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self._vms[(meta["namespace"], meta["name"])] = obj

    def gone(self, namespace: str, name: str) -> None:
        self._vms.pop((namespace, name), None)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._vms.get((namespace, name))
        if obj is None:
            obj = self.kube.get_vm(namespace, name)
            if obj is not None:
                self._vms.setdefault((namespace, name), obj)
        return obj


@dataclass
class Context:
    kube: Kube
    dispatcher: Dispatcher
    runtime: Runtime
    vms: VMCache = field(init=False)
    # When each running fan-out's fold was last written (commands.FOLD_INTERVAL).
    fold_written: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vms = VMCache(self.kube)

    @classmethod
    def from_environment(cls) -> Context:
        kube = Kube()
        url = broker_url()
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        runtime_name = os.environ.get(
            RUNTIME_ENV, c.RUNTIME_DEPLOYMENT if in_cluster else c.RUNTIME_PROCESS
        )
        runtime: Runtime
        if runtime_name == c.RUNTIME_PROCESS:
            log_dir = Path(os.environ.get("VMFLEET_WORKER_LOG_DIR", ".vmfleet/workers"))
            runtime = ProcessRuntime(url, log_dir)
        elif runtime_name == c.RUNTIME_DEPLOYMENT:
            runtime = DeploymentRuntime(
                AppsV1Api(kube.api_client),
                DeploymentSettings(
                    image=os.environ.get("VMFLEET_WORKER_IMAGE", "vmfleet:0.1.0"),
                    broker_url=url,
                    broker_secret_name=os.environ.get("VMFLEET_BROKER_SECRET_NAME") or None,
                    broker_secret_key=os.environ.get("VMFLEET_BROKER_SECRET_KEY", "url"),
                    service_account=os.environ.get(
                        "VMFLEET_WORKER_SERVICE_ACCOUNT", c.WORKER_SERVICE_ACCOUNT
                    ),
                    **worker_pod_settings(),
                ),
            )
        else:
            raise ValueError(
                f"{RUNTIME_ENV}={runtime_name!r} is not a worker runtime: "
                f"use {c.RUNTIME_PROCESS} or {c.RUNTIME_DEPLOYMENT}"
            )
        return cls(kube=kube, dispatcher=Dispatcher(url), runtime=runtime)


def worker_pod_settings() -> dict[str, Any]:
    """The chart's ``image.pullPolicy``, ``hostNetwork`` and ``workers.extraEnv`` for the
    worker Deployments (``VMFLEET_WORKER_IMAGE_PULL_POLICY``,
    ``VMFLEET_WORKER_HOST_NETWORK``, ``VMFLEET_WORKER_EXTRA_ENV`` as a JSON list)."""
    raw = os.environ.get("VMFLEET_WORKER_EXTRA_ENV", "").strip()
    extra = json.loads(raw) if raw else []
    if not isinstance(extra, list) or not all(isinstance(e, dict) and "name" in e for e in extra):
        raise ValueError("VMFLEET_WORKER_EXTRA_ENV must be a JSON list of {name, value} objects")
    policy = os.environ.get("VMFLEET_WORKER_IMAGE_PULL_POLICY", "").strip() or "IfNotPresent"
    if policy not in ("Always", "IfNotPresent", "Never"):
        raise ValueError(f"VMFLEET_WORKER_IMAGE_PULL_POLICY={policy!r} is not an image pull policy")
    return {
        "image_pull_policy": policy,
        "host_network": os.environ.get("VMFLEET_WORKER_HOST_NETWORK", "").lower() == "true",
        "extra_env": tuple(extra),
    }
