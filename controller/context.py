"""The controller's settings (from the environment) and the parts built from them."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes.client import V1DeleteOptions, V1Preconditions

from vmfleet import settings
from vmfleet.api import constants as c
from vmfleet.api.signing import PUBLIC_KEY_FILE, Signer, public_pem, read_private_key
from vmfleet.kube import ApiException, Kube, context_namespace, load_api_client
from vmfleet.settings import Settings
from vmfleet.state import State, state_url

from . import schedule
from .audit import Layout, RunRecords, layout_of
from .backlog import entry_counts, kombu_queue_depths, redis_queue_depths
from .commands import Commands
from .crons import Crons
from .deployment_runtime import DeploymentRuntime, DeploymentSettings
from .dispatch import Dispatcher
from .health import HealthMonitor, Thresholds
from .isolate import Recorder
from .leader import Elector, KubeLeaseStore, Leadership, Timing
from .loop import Loop, ReportReader, Writer
from .process_runtime import ProcessRuntime
from .runtime import Runtime
from .scaling import QueueDepth
from .tenants import BrokerTenants
from .transfer_access import TransferAccess
from .vms import Fleet
from .watch import CommandWatch

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
    crons: Crons | None = None
    leadership: Leadership = field(default_factory=Leadership)
    synced: threading.Event = field(default_factory=threading.Event)  # start-up lists done
    recorder: Recorder = field(default_factory=Recorder)  # per-object failures (``isolate``)
    queue_depths: Callable[[list[str]], dict[str, int]] | None = None
    # The controller's settings, read once at start; its parts get them from here.
    settings: Settings = field(default_factory=Settings)
    # The leader's list and watch of RemoteCommands (``controller.watch``); None: the
    # caller lists them (tests drive ``handlers.command_event`` themselves).
    command_watch: CommandWatch | None = None

    @classmethod
    def from_environment(cls) -> Context:
        """The controller's start: its settings are read here, once (a bad value stops it).

        Long on purpose: the composition root, where every part is built and wired to
        the others in one place."""
        conf = settings.load()
        signer = signer_of(conf)
        verify_key = public_pem(signer.public_key)
        kube = Kube(load_api_client(conf.api_connections))
        if conf.verify_key_configmap:
            publish_verify_key(kube, conf.verify_key_configmap,
                               os.environ.get("POD_NAMESPACE") or "default", verify_key)
        url = conf.broker_url
        state = State(state_url(conf), scope=controller_scope(conf.controller_id))
        # Unset in the environment: settings.in_cluster() picked it (Deployment in a pod).
        runtime_name = conf.worker_runtime
        runtime: Runtime
        tenants: BrokerTenants | None = None
        if runtime_name == c.RUNTIME_PROCESS:
            output_client = None
            if conf.output_url and conf.broker_users == "Derived":
                import redis

                output_client = redis.Redis.from_url(conf.output_url, socket_timeout=10)
            tenants = BrokerTenants(state, url, conf.state_url, conf.broker_users,
                                    output_url=conf.output_url, output_client=output_client)
            log_dir = Path(conf.worker_log_dir)
            access = TransferAccess(kube, log_dir.parent / "transfer-access")
            runtime = ProcessRuntime(url, log_dir, read_secret=kube.read_secret,
                                     verify_key=verify_key, worker_urls=tenants.ensure,
                                     transfer_kubeconfig=access.kubeconfig,
                                     metrics=conf.metrics_port != 0)
        elif runtime_name == c.RUNTIME_DEPLOYMENT:
            runtime = DeploymentRuntime(
                kube.raw,
                DeploymentSettings(
                    image=conf.worker_image,
                    broker_url=url,
                    broker_secret_name=conf.broker_secret_name,
                    broker_secret_key=conf.broker_secret_key,
                    state_url=conf.state_url,
                    output_url=conf.output_url,
                    verify_key=verify_key,
                    transfer_service_account=conf.transfer_service_account,
                    **worker_pod_settings(conf),
                ),
                serve=state.serve,
            )
        else:
            raise ValueError(
                f"{RUNTIME_ENV}={runtime_name!r} is not a worker runtime: "
                f"use {c.RUNTIME_PROCESS} or {c.RUNTIME_DEPLOYMENT}"
            )
        dispatcher = Dispatcher(url, signer)
        recorder = Recorder(kube.raw)

        def send_probe(task: str, message: dict[str, Any], queue: str, expires: float) -> None:
            # No retries: a probe that cannot be sent now is sent at the next period.
            dispatcher.send_task(task, message, queue, str(message["namespace"]),
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
            get_template=kube.get_template, get_config_map=kube.get_config_map_data,
            probe=lambda ns, name: fleet_box[0].probe_now(ns, name),
            refused=lambda ns, name: fleet_box[0].problem(ns, name),
            recorder=recorder,
            output_budget=conf.status_output_budget_bytes,
            protected_secrets=lambda ns: fleet_box[0].credentials_secrets(ns),
            wake_transfers=lambda ns: fleet_box[0].wake_transfers(ns),
            batch=dispatcher.batch,
        )
        health = HealthMonitor(kube, send_probe, Thresholds.from_settings(conf), scope=state.scope)
        fleet = Fleet(kube, runtime, health, depths,
                      counts=lambda: entry_counts(commands.tracked()))
        fleet_box.append(fleet)
        leadership = Leadership(elector(conf, kube, state.scope))
        consumer = os.environ.get("POD_NAME") or socket.gethostname()
        commands.records = RunRecords(kube.raw, state.ack, consumer,
                                      lookup=lambda ns, name, uid: command_layout(kube, ns, name, uid))
        writer = Writer(kube, state, commands, gate=leadership.leading)
        reader = ReportReader(state, commands, consumer, fleet.on_probe)
        crons = Crons(kube, commands, leading=leadership.leading)  # schedules only while leading
        ticks = [commands.tick, fleet.tick, crons.tick]
        refresh = getattr(runtime, "refresh_credentials", None)
        if refresh is not None:
            ticks.append(refresh)  # Process runtime: Secrets created or rotated later
        if tenants is not None:
            ticks.append(tenants.refresh)  # the namespaces' broker users, after a Redis restart
        loop = Loop(writer, reader, ticks, gate=leadership.leading)
        namespaces = tuple(n for n in (conf.watch_namespaces or "").split(",") if n) \
            or kopf_namespaces()
        return cls(kube=kube, dispatcher=dispatcher, runtime=runtime, state=state,
                   commands=commands, fleet=fleet, loop=loop, namespaces=namespaces,
                   crons=crons, leadership=leadership, recorder=recorder,
                   queue_depths=depths, settings=conf)


def command_layout(kube: Kube, namespace: str, name: str, uid: str) -> Layout | None:
    """A RemoteCommand's result entries as stored (None: it is gone, or another object
    of that name): where a record read again after a restart belongs."""
    obj = kube.get_command(namespace, name)
    if obj is None or obj["metadata"].get("uid") != uid:
        return None
    return layout_of(obj.get("status"))


def signer_of(conf: settings.Settings) -> Signer:
    """The signer of every message to the workers, from ``VMFLEET_SIGNING_KEY_FILE``
    (required: a controller that cannot sign could not be obeyed)."""
    if not conf.signing_key_file:
        raise ValueError(f"{settings.env_of('signing_key_file')} is not set: the controller signs "
                         "every message to the workers with an Ed25519 private key (PEM); "
                         "`openssl genpkey -algorithm ed25519` makes one")
    ttl = conf.message_ttl_seconds or conf.redispatch_seconds + 60.0
    return Signer(read_private_key(conf.signing_key_file), ttl)


def publish_verify_key(kube: Kube, name: str, namespace: str, pem: str) -> None:
    """Write the public key into the ConfigMap the chart's transfer worker mounts (it is
    no secret; the private key never leaves the controller)."""
    data = {PUBLIC_KEY_FILE: pem}
    body = {"apiVersion": "v1", "kind": "ConfigMap", "data": data,
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {c.LABEL_MANAGED_BY: c.MANAGED_BY}}}
    try:
        kube.raw.create_namespaced_config_map(namespace, cast(Any, body))
    except ApiException as exc:
        if exc.status != 409:
            raise
        kube.raw.patch_namespaced_config_map(name, namespace, {"data": data})
    log.info("Published the verify key in ConfigMap %s/%s", namespace, name)


def elector(conf: settings.Settings, kube: Kube, scope: str) -> Elector | None:
    """The Lease candidate when leader election is on (``VMFLEET_LEADER_ELECTION``):
    identity ``<pod or host>_<random>``, as client-go makes it, so a restarted process
    never mistakes its predecessor's Lease for its own."""
    if not conf.leader_election:
        return None
    timing = Timing(conf.lease_duration_seconds, conf.renew_deadline_seconds,
                    conf.retry_period_seconds)
    namespace = conf.leader_election_namespace or context_namespace()
    name = conf.leader_election_name or f"vmfleet-controller-{lease_suffix(scope)}"
    identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    return Elector(KubeLeaseStore(kube.api_client, namespace, name), identity, timing,
                   name=f"{namespace}/{name}")


def lease_suffix(scope: str) -> str:
    """A controller scope as a name segment (lower case, dashes, at most 40 characters)."""
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in scope.lower()).strip("-")
    return cleaned[:40].strip("-") or "default"


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
    worker Deployments (``VMFLEET_WORKER_EXTRA_ENV``, read by the settings parser)."""
    return {
        "image_pull_policy": conf.worker_image_pull_policy,
        "host_network": conf.worker_host_network,
        "extra_env": conf.worker_extra_env,
    }
