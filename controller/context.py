"""The controller's settings (from the environment) and the clients built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import AppsV1Api

from vmfleet import settings
from vmfleet.api import constants as c
from vmfleet.kube import Kube

from .dispatch import Dispatcher
from .runtime import DeploymentRuntime, DeploymentSettings, ProcessRuntime, Runtime

RUNTIME_ENV = settings.env_of("worker_runtime")


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
        """The controller's start: its settings are read here, once (a bad value stops it)."""
        conf = settings.load()
        kube = Kube()
        url = conf.broker_url
        runtime_name = conf.worker_runtime or c.RUNTIME_PROCESS
        runtime: Runtime
        if runtime_name == c.RUNTIME_PROCESS:
            runtime = ProcessRuntime(url, Path(conf.worker_log_dir))
        elif runtime_name == c.RUNTIME_DEPLOYMENT:
            runtime = DeploymentRuntime(
                AppsV1Api(kube.api_client),
                DeploymentSettings(
                    image=conf.worker_image,
                    broker_url=url,
                    broker_secret_name=conf.broker_secret_name,
                    broker_secret_key=conf.broker_secret_key,
                    service_account=conf.worker_service_account,
                ),
            )
        else:
            raise ValueError(
                f"{RUNTIME_ENV}={runtime_name!r} is not a worker runtime: "
                f"use {c.RUNTIME_PROCESS} or {c.RUNTIME_DEPLOYMENT}"
            )
        return cls(kube=kube, dispatcher=Dispatcher(url), runtime=runtime)
