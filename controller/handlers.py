"""kopf handlers: watches only. No timer, no finalizer, no per-object handler state.

At start the controller lists the VMs and worker Deployments it watches into its caches
(``warm``). Once it leads (at once without leader election, else when it holds the Lease:
``controller.leader``) it lists the commands, removes the finalizer older versions put on
every object, cancels the commands deleted while no controller ran, and starts its loop
(``lead``, ``controller.loop``). Watch events keep the caches current; a standby's only
fill them. Everything else happens in the leader's loop.

RemoteCommands are not watched through kopf: the leader lists and watches them itself
(``controller.watch``), so that finished commands cost no per-object record and each
event goes straight to ``command_event``'s logic. Once started (and again once leading),
the heap is collected and frozen (``gc.freeze``): the long-lived objects of the imports
and caches are never scanned again by the collector, whose full passes over them were
the stalls of tens of milliseconds in the latency tail.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import kopf
from kubernetes.client import VersionApi

from vmfleet import metrics
from vmfleet.api import constants as c
from vmfleet.kube import ApiException

from . import heap
from .context import Context
from .logsapi import serve_logs_api
from .readiness import serve_readiness
from .watch import CommandWatch

log = logging.getLogger("controller")

VMS = (c.GROUP, c.VERSION, c.VM_PLURAL)
CRONS = (c.GROUP, c.VERSION, c.CRON_PLURAL)
WORKER_LABELS = {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_COMPONENT: "worker"}

heap.limit_arenas()  # before kopf starts its threads (``controller.heap``)
TRIMMING = threading.Event()  # set: the heap-trimming thread ends


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 270
    settings.watching.chunk_size = 500  # a RemoteVM list in pages, as ours (``_paged``)
    ctx = Context.from_environment()
    ctx.command_watch = CommandWatch(
        ctx.kube, _scopes(ctx), lambda namespace: _watched(ctx, namespace),
        apply=lambda kind, obj: on_command(ctx, kind, obj),
        gone=lambda scope, listed: commands_gone(ctx, scope, listed),
        server_timeout=int(settings.watching.server_timeout))
    warm(ctx)
    memo.ctx = ctx  # only a started controller says it is alive (``alive``)
    ctx.leadership.start(on_started=lambda: lead(ctx), on_lost=lambda: lost(ctx))
    metrics.start_controller_metrics(ctx.settings, sizer=ctx.queue_depths,
                                     memory_info=lambda: ctx.state.client.info("memory"))
    start_readiness(ctx)
    start_logs_api(ctx)
    freeze_heap()
    heap.start_trimming(TRIMMING)


def freeze_heap() -> None:
    """``controller.heap.freeze``: the start's objects frozen, the free heap trimmed."""
    heap.freeze()


def start_logs_api(ctx: Context) -> None:
    """The output API (``logs.vmfleet.io``), on every replica, when a port is set."""
    conf = ctx.settings
    if not conf.logs_api_port:
        return
    if not (conf.logs_api_cert_file and conf.logs_api_key_file):
        raise ValueError("VMFLEET_LOGS_API_PORT needs VMFLEET_LOGS_API_CERT_FILE and "
                         "VMFLEET_LOGS_API_KEY_FILE (the serving certificate the APIService "
                         "v1alpha1.logs.vmfleet.io trusts)")
    store = None
    if conf.output_url:
        import redis

        store = redis.Redis.from_url(conf.output_url, socket_timeout=30,
                                     socket_connect_timeout=5, health_check_interval=30)
    serve_logs_api(ctx.kube, store, conf.logs_api_port, conf.logs_api_address or "127.0.0.1",
                   conf.logs_api_cert_file, conf.logs_api_key_file)


@kopf.on.probe(id="controller")
def alive(memo: kopf.Memo, **_: Any) -> str:
    """The liveness and readiness endpoint's answer (``--liveness``; the chart probes it):
    kopf serves it only once the start-up handlers succeeded, and this raises (HTTP 500)
    while the controller has no started context or the loop it started (a leader's; a
    standby has none yet) has stopped."""
    ctx: Context | None = getattr(memo, "ctx", None)
    if ctx is None:
        raise RuntimeError("the controller has not started")
    if not ctx.leadership.leading():
        return "standing by"
    if not ctx.loop.alive():
        raise RuntimeError("the controller loop has stopped")
    return "serving"


def start(ctx: Context) -> None:
    """Warm caches and lead at once (one controller, no election)."""
    warm(ctx)
    lead(ctx)


def warm(ctx: Context) -> None:
    """The caches a standby keeps too: every watched RemoteVM and worker Deployment,
    listed once (the watches keep them current). Nothing is written. What fails for one
    object is recorded on that object (``isolate``) and the rest go on; only a failure to
    list at all (the API server away) fails the start, which kopf retries while the probe
    says not alive."""
    guard = ctx.recorder.guard
    for obj in _list(ctx, c.VM_PLURAL):
        with guard(c.VM_KIND, obj, "read the RemoteVM at start"):
            ctx.state.serve(obj["metadata"]["namespace"])  # its reports are read from the start
            ctx.fleet.seen(obj, reconcile=False)
    cache = getattr(ctx.runtime, "cache", None)
    if cache is not None:
        for dep in _list_deployments(ctx):
            with guard("Deployment", None, f"read Deployment {dep['metadata'].get('name')}"):
                cache.seen(dep)
    ctx.synced.set()


def lead(ctx: Context) -> None:
    """The leader's start: the commands listed and taken over, then the loop (one odd
    object is recorded on itself, as in ``warm``)."""
    guard = ctx.recorder.guard
    stop_predecessors = getattr(ctx.runtime, "stop_predecessors", None)
    if stop_predecessors is not None:
        stop_predecessors()  # Process runtime: the workers a killed leader left behind
    for obj in _list(ctx, c.VM_PLURAL):  # in the cache already (``warm`` and the watch)
        with guard(c.VM_KIND, obj, "drop the RemoteVM's old finalizer"):
            _drop_finalizer(ctx, c.VM_PLURAL, obj)
    known = set()
    watch = ctx.command_watch
    for obj in (_list(ctx, c.COMMAND_PLURAL) if watch is None else watch.list_all()):
        known.add(obj["metadata"]["uid"])
        with guard(c.COMMAND_KIND, obj, "read the RemoteCommand at start"):
            _drop_finalizer(ctx, c.COMMAND_PLURAL, obj)
            ctx.state.serve(obj["metadata"]["namespace"])
            ctx.commands.observe(obj)
            if ctx.crons is not None:
                ctx.crons.command_seen(obj)  # a cron's runs are known before it schedules
    if ctx.crons is not None:
        try:
            for obj in _list(ctx, c.CRON_PLURAL):
                with guard(c.CRON_KIND, obj, "read the RemoteCronCommand at start"):
                    ctx.crons.seen(obj)
        except ApiException as exc:  # the CRD is not installed (yet): the watch brings them
            log.warning("Could not list RemoteCronCommands: %s %s", exc.status, exc.reason)
    for namespace, uid in ctx.state.live():
        if uid in known:
            continue
        ctx.state.cancel(uid, namespace)  # deleted while no controller ran
        log.info("Cancelled the attempts of RemoteCommand uid %s in %s: it was deleted while "
                 "the controller was not running", uid, namespace)
    try:
        ctx.fleet.tick(force=True)  # every group's workers applied once (unchanged: no write)
    except Exception:  # noqa: BLE001 - the loop ticks again in a second
        log.exception("The first tick of the fleet failed; the loop tries again")
    ctx.loop.start()
    if watch is not None:
        watch.start()  # from the list's resourceVersion: nothing between is missed
    freeze_heap()


def lost(ctx: Context) -> None:
    """The Lease was lost: writing stopped already (the gate); the loop halts and the
    process ends (as controller-runtime's managers do), to start again as a standby
    with fresh caches."""
    if ctx.command_watch is not None:
        ctx.command_watch.close()
    ctx.loop.halt()
    os.kill(os.getpid(), signal.SIGTERM)


def start_readiness(ctx: Context) -> None:
    conf = ctx.settings
    if conf.health_port:
        serve_readiness(conf.health_port, lambda: ready(ctx), conf.metrics_address or "127.0.0.1")


def ready(ctx: Context) -> tuple[bool, str]:
    """Ready = can do its work: caches synced, the broker and the API server answer.
    Leadership does not count: a warm standby is Ready (a Service selecting the
    controllers needs no leader-only readiness)."""
    if not ctx.synced.is_set():
        return False, "caches not synced yet"
    try:
        ctx.state.client.ping()
    except Exception as exc:  # noqa: BLE001
        return False, f"the broker does not answer: {exc}"
    try:
        VersionApi(ctx.kube.api_client).get_code(_request_timeout=3)
    except Exception as exc:  # noqa: BLE001
        return False, f"the API server does not answer: {exc}"
    role = "leader" if ctx.leadership.leading() else "standby"
    return True, f"ready ({role})"


def _watched(ctx: Context, namespace: str) -> bool:
    return not ctx.namespaces or any(fnmatch.fnmatchcase(namespace, p) for p in ctx.namespaces)


def _scopes(ctx: Context) -> tuple[str | None, ...]:
    """Where to list: each watched namespace, or the whole cluster (then filtered) when
    the controller watches every namespace or namespaces by glob."""
    if ctx.namespaces and not any(ch in p for p in ctx.namespaces for ch in "*?["):
        return ctx.namespaces
    return (None,)


def _list(ctx: Context, plural: str) -> Iterator[dict[str, Any]]:
    """Every watched RemoteVM or RemoteCommand."""

    def fetch(namespace: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        if namespace is None:
            return cast(dict[str, Any], ctx.kube.custom.list_cluster_custom_object(
                c.GROUP, c.VERSION, plural, **kwargs))
        return cast(dict[str, Any], ctx.kube.custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, plural, **kwargs))

    return _paged(ctx, fetch)


def _list_deployments(ctx: Context) -> Iterator[dict[str, Any]]:
    """The worker Deployments, as plain dicts (no typed models)."""
    selector = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())

    def fetch(namespace: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return ctx.kube.raw.list_deployments(namespace, selector, kwargs["limit"],
                                             kwargs.get("_continue"))

    return _paged(ctx, fetch)


def _paged(ctx: Context, fetch: Callable[[str | None, dict[str, Any]], dict[str, Any]]
           ) -> Iterator[dict[str, Any]]:
    """The watched items of ``fetch(namespace, kwargs)`` in every scope, a page of 500 at
    a time (10,000 finished commands are never held at once: the start-up's peak memory)."""
    for namespace in _scopes(ctx):
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": 500}
            if token:
                kwargs["_continue"] = token
            page = fetch(namespace, kwargs)
            token = (page.get("metadata") or {}).get("continue")
            items = page.get("items") or []
            del page
            yield from (i for i in items if _watched(ctx, i["metadata"]["namespace"]))
            if not token:
                break


def _drop_finalizer(ctx: Context, plural: str, obj: dict[str, Any]) -> None:
    """Versions before 0.2 put a finalizer on every object; nothing needs it now."""
    finalizers = obj["metadata"].get("finalizers") or []
    if c.FINALIZER not in finalizers:
        return
    index = finalizers.index(c.FINALIZER)
    try:
        ctx.kube.custom.patch_namespaced_custom_object(
            c.GROUP, c.VERSION, obj["metadata"]["namespace"], plural, obj["metadata"]["name"],
            [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": c.FINALIZER},
             {"op": "remove", "path": f"/metadata/finalizers/{index}"}],
            _content_type="application/json-patch+json",
        )
    except ApiException as exc:
        if exc.status not in (404, 409, 422):
            raise


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_: Any) -> None:
    TRIMMING.set()
    ctx: Context | None = getattr(memo, "ctx", None)
    if ctx is not None:
        if ctx.command_watch is not None:
            ctx.command_watch.close()  # nothing new is started while the last writes go out
        ctx.leadership.stop()
        ctx.loop.close()  # the last writes, while still leading
        ctx.leadership.release()  # a standby takes over at its next retry
        ctx.runtime.shutdown()
        ctx.dispatcher.close()


@kopf.on.event(*VMS)
def vm_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    obj = event.get("object")
    ctx: Context = memo.ctx
    if not obj:
        return
    leading = ctx.leadership.leading()  # a standby only keeps its cache
    with ctx.recorder.guard(c.VM_KIND, dict(obj), "handle a RemoteVM event"):
        if event["type"] == "DELETED":
            ctx.fleet.gone(dict(obj), reconcile=leading)
        else:
            ctx.fleet.seen(dict(obj), reconcile=leading)


def command_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A RemoteCommand event in kopf's shape (what ``controller.watch`` hands to
    ``on_command``; kept for callers that hold a memo)."""
    obj = event.get("object")
    if obj:
        on_command(memo.ctx, str(event["type"]), dict(obj))


def on_command(ctx: Context, kind: str, obj: dict[str, Any]) -> None:
    """A RemoteCommand event of the leader's watch (``controller.watch``)."""
    if not ctx.leadership.leading():
        return  # a standby: the leader it replaces lists the commands when it takes over
    crons = ctx.crons
    with ctx.recorder.guard(c.COMMAND_KIND, obj, "handle a RemoteCommand event"):
        if kind == "DELETED":
            ctx.state.ack(ctx.commands.deleted(obj))
            if crons is not None:
                crons.command_gone(obj)
            return
        ctx.commands.observe(obj)
        if crons is not None:
            crons.command_seen(obj)


def commands_gone(ctx: Context, scope: str | None, listed: set[str]) -> None:
    """A list taken again (the watch expired): the commands held that it lacks were
    deleted meanwhile."""
    for tracked in ctx.commands.tracked():
        if (scope is None or tracked.namespace == scope) and tracked.uid not in listed:
            on_command(ctx, "DELETED", {"metadata": {
                "namespace": tracked.namespace, "name": tracked.name, "uid": tracked.uid}})
    if ctx.crons is not None:  # finished runs are not tracked: their crons let them go here
        ctx.crons.commands_listed(scope, listed)


@kopf.on.event(*CRONS)
@metrics.counts_errors(c.CRON_KIND)
def cron_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """RemoteCronCommands: cached here, scheduled by the controller's loop (crons.py)."""
    obj = event.get("object")
    if not obj or memo.ctx.crons is None:
        return
    if event["type"] == "DELETED":
        memo.ctx.crons.gone(dict(obj))
    else:
        memo.ctx.crons.seen(dict(obj))


@kopf.on.event("apps", "v1", "deployments", labels=WORKER_LABELS)
def deployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    cache = getattr(memo.ctx.runtime, "cache", None)
    obj = event.get("object")
    if cache is None or not obj:
        return
    if event["type"] == "DELETED":
        cache.gone(obj["metadata"]["namespace"], obj["metadata"]["name"])
    else:
        cache.seen(dict(obj))
