"""The controller's settings (from the environment) and the parts built from them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client import AppsV1Api, V1DeleteOptions, V1Preconditions

from vmfleet import settings
from vmfleet.api import constants as c
from vmfleet.kube import ApiException, Kube
from vmfleet.state import State, state_url

from . import schedule
from .commands import Commands
from .dispatch import Dispatcher
from .health import HealthMonitor
from .loop import Loop, ReportReader, Writer
from .runtime import DeploymentRuntime, DeploymentSettings, ProcessRuntime, Runtime
from .scaling import QueueDepth
from .tenants import BrokerTenants
from .vms import Fleet, entry_counts, kombu_queue_depths, redis_queue_depths

log = logging.getLogger("controller")

RUNTIME_ENV = settings.env_of("worker_runtime")


@dataclass
class Context:
    kube: Kube
    dispatcher: Dispatcher
    runtime: Runtime
    state: State
    commands: Commands
    fleet: Fleet
    loop: Loop
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    queue_depths: Callable[[list[str]], dict[str, int]] | None = None

    @classmethod
    def from_environment(cls) -> Context:
        """The controller's start: its settings are read here, once (a bad value stops it)."""
        conf = settings.load()
        kube = Kube()
        url = conf.broker_url
        state = State(state_url(url), scope=controller_scope(conf.controller_id))
        runtime, tenants = worker_runtime(conf, kube, state)
        dispatcher = Dispatcher(url)

        def send_probe(task: str, message: dict[str, Any], queue: str, expires: float) -> None:
            # No retries: a probe that cannot be sent now is sent at the next period.
            dispatcher.send_task(task, [message], queue, str(message["namespace"]),
                                 expires=expires, retry=False)

        if url.startswith(("redis://", "rediss://", "unix://")):
            depths = redis_queue_depths(state.client if state.url == url else State(url).client)
        else:
            depths = kombu_queue_depths(QueueDepth(url))
        fleet_box: list[Fleet] = []
        commands = Commands(
            state, dispatcher.send_task,
            get_vm=lambda ns, name: fleet_box[0].get(ns, name),
            list_vms=lambda ns, selector: fleet_box[0].list_vms(ns, selector),
            target_of=lambda obj: fleet_box[0].target_of(obj),
            wake=lambda ns, name: fleet_box[0].wake(ns, name),
            delete=lambda uid, ns, name: delete_expired(kube, uid, ns, name),
            timing=schedule.Timing(lost_after=conf.worker_lost_seconds,
                                   redispatch_after=conf.redispatch_seconds),
        )
        fleet = Fleet(kube, runtime, HealthMonitor(kube, send_probe, scope=state.scope), depths,
                      counts=lambda: entry_counts(commands.tracked()))
        fleet_box.append(fleet)
        writer = Writer(kube, state, commands)
        consumer = os.environ.get("POD_NAME") or socket.gethostname()
        reader = ReportReader(state, commands, consumer, fleet.on_probe)
        ticks = [commands.tick, fleet.tick]
        ensure_transfer_worker = getattr(runtime, "ensure_transfer_worker", None)
        if ensure_transfer_worker is not None:
            ticks.append(ensure_transfer_worker)  # Process runtime: restarted if it died
        refresh = getattr(runtime, "refresh_credentials", None)
        if refresh is not None:
            ticks.append(refresh)  # Process runtime: Secrets created or rotated later
        if tenants is not None:
            ticks.append(tenants.refresh)  # the namespaces' broker users, after a Redis restart
        loop = Loop(writer, reader, ticks)
        namespaces = tuple(n for n in (conf.watch_namespaces or "").split(",") if n) \
            or kopf_namespaces()
        return cls(kube=kube, dispatcher=dispatcher, runtime=runtime, state=state,
                   commands=commands, fleet=fleet, loop=loop, namespaces=namespaces,
                   queue_depths=depths)


def worker_runtime(conf: settings.Settings, kube: Kube,
                   state: State) -> tuple[Runtime, BrokerTenants | None]:
    """The worker runtime of the settings, and (``Process``) the namespaces' broker users."""
    url = conf.broker_url
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    runtime_name = conf.worker_runtime or (
        c.RUNTIME_DEPLOYMENT if in_cluster else c.RUNTIME_PROCESS)
    runtime: Runtime
    tenants: BrokerTenants | None = None
    if runtime_name == c.RUNTIME_PROCESS:
        tenants = BrokerTenants(state, url, conf.state_url, conf.broker_users)
        runtime = ProcessRuntime(url, Path(conf.worker_log_dir), read_secret=kube.read_secret,
                                 worker_urls=tenants.ensure)
    elif runtime_name == c.RUNTIME_DEPLOYMENT:
        runtime = DeploymentRuntime(
            AppsV1Api(kube.api_client),
            DeploymentSettings(
                image=conf.worker_image,
                broker_url=url,
                broker_secret_name=conf.broker_secret_name,
                broker_secret_key=conf.broker_secret_key,
                state_url=conf.state_url,
                **worker_pod_settings(conf),
            ),
            serve=state.serve,
        )
    else:
        raise ValueError(
            f"{RUNTIME_ENV}={runtime_name!r} is not a worker runtime: "
            f"use {c.RUNTIME_PROCESS} or {c.RUNTIME_DEPLOYMENT}"
        )
    return runtime, tenants


def kopf_namespaces(argv: list[str] | None = None) -> tuple[str, ...]:
    """The namespaces (or globs, as kopf takes them) ``kopf run`` was given: none means
    every namespace."""
    args = list(sys.argv if argv is None else argv)
    found = []
    for i, arg in enumerate(args):
        if arg in ("-n", "--namespace") and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--namespace="):
            found.append(arg.split("=", 1)[1])
    return tuple(found)


def controller_scope(configured: str | None, argv: list[str] | None = None) -> str:
    """This controller's scope in Redis: ``VMFLEET_CONTROLLER_ID``, else derived from the
    namespaces ``kopf run`` was given (the same on every restart, different for two
    controllers watching different namespaces)."""
    if configured:
        return configured
    namespaces = kopf_namespaces(argv)
    if not namespaces:
        return "cluster"
    return "ns-" + hashlib.sha256(",".join(sorted(namespaces)).encode()).hexdigest()[:12]


def delete_expired(kube: Kube, uid: str, namespace: str, name: str) -> None:
    """Delete a finished command whose ttlSecondsAfterFinished passed (this very object)."""
    try:
        kube.custom.delete_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, name,
            body=V1DeleteOptions(preconditions=V1Preconditions(uid=uid)),
        )
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise
        return
    log.info("Deleted RemoteCommand %s/%s: ttlSecondsAfterFinished passed", namespace, name)


def worker_pod_settings(conf: settings.Settings) -> dict[str, Any]:
    """The chart's ``image.pullPolicy``, ``hostNetwork`` and ``workers.extraEnv`` for the
    worker Deployments (``VMFLEET_WORKER_EXTRA_ENV`` is a JSON list of env entries)."""
    raw = (conf.worker_extra_env or "").strip()
    try:
        extra = json.loads(raw) if raw else []
    except ValueError as exc:
        raise ValueError(f"VMFLEET_WORKER_EXTRA_ENV is not JSON: {exc}") from exc
    if not isinstance(extra, list) or not all(isinstance(e, dict) and "name" in e for e in extra):
        raise ValueError("VMFLEET_WORKER_EXTRA_ENV must be a JSON list of {name, value} objects")
    return {
        "image_pull_policy": conf.worker_image_pull_policy,
        "host_network": conf.worker_host_network,
        "extra_env": tuple(extra),
    }
