"""Celery tasks: thin wrappers that take an envelope and call plain code."""

from __future__ import annotations

import functools
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task, signals
from celery.exceptions import Reject

from vmfleet.api.constants import (
    TASK_CHECK_VM,
    TASK_EXECUTE,
    TASK_TERMINATE,
    TASK_TRANSFER,
    TASK_TRANSFER_CLEANUP,
)
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.signing import Refusal, Refused

from . import probes
from .app import app, worker_settings
from .execute import CommandExecutor
from .guard import Guard
from .health import HealthChecker
from .slots import vm_slot

if TYPE_CHECKING:
    from .transfer import TransferExecutor

_stop = threading.Event()
_not_ready = threading.Event()


@functools.cache
def executor() -> CommandExecutor:
    """One executor (Redis and the SSH pool) per worker process, shared by its threads;
    it listens for cancels from the start."""
    found = CommandExecutor.from_settings(worker_settings)
    found.listen_for_cancels(_stop)
    return found


@signals.worker_ready.connect
def _start_listening(**_: Any) -> None:
    found = executor()  # cancels reach a worker that has not run anything yet
    directory = worker_settings.probe_dir
    if directory:
        probes.start(found.state.client.ping, _not_ready, Path(directory))


@signals.worker_shutting_down.connect
def _draining(sender: Any = None, sig: Any = None, how: Any = None, **_: Any) -> None:
    """SIGTERM (a drain, a rollout, a scale-down): Celery's warm shutdown takes no new task
    and lets the running ones finish. Each running attempt reports that its worker is
    stopping, from a thread of its own (not from the signal handler)."""
    _not_ready.set()  # a stopping worker takes nothing new: not Ready
    if how != "Warm":
        return
    why = (f"worker {sender or socket.gethostname()} received {sig or 'SIGTERM'}: it finishes "
           "what it runs within its termination grace period and takes nothing new")
    threading.Thread(target=executor().cancels.draining, args=(why,), name="vmfleet-draining",
                     daemon=True).start()


@signals.worker_shutdown.connect
def _stop_listening(**_: Any) -> None:
    _stop.set()


_guard: list[tuple[Guard, float]] = []
_guard_lock = threading.Lock()


def guard() -> Guard:
    """The verify key and the served VMs, read once per worker process; while there is no
    key (the chart's transfer worker mounts the one the controller publishes, which may
    arrive later) it is read again at most every 5 seconds."""
    with _guard_lock:
        now = time.monotonic()
        if not _guard or (_guard[0][0].verifier.key is None and now - _guard[0][1] > 5.0):
            _guard[:] = [(Guard.from_settings(worker_settings), now)]
        return _guard[0][0]


def _open(task: str, message: Any) -> dict[str, Any]:
    """The verified body (raises Refused). A worker that has no key yet (the chart's
    transfer worker before the controller's ConfigMap reached its mount) leaves the
    message on its queue instead of dropping it."""
    try:
        return guard().open(message, task)
    except Refused as refused:
        if refused.reason == Refusal.NO_KEY:
            time.sleep(1.0)
            raise Reject(str(refused), requeue=True) from None
        raise


def _envelope(task: str, message: Any) -> Envelope:
    """The verified envelope of a command or transfer message (raises Refused)."""
    return Envelope.from_message(_open(task, message))


def _refuse(envelope: Envelope, worker: str, refused: Refused) -> str:
    """End a refused attempt ``Failed`` (``MessageRefused``) so it is not sent again, when
    it is one of this worker's namespaces; another namespace's attempt is not this worker's
    to report (its broker user cannot reach those keys): it is dropped, logged and counted
    by the guard, and stays ``Queued`` for its own worker."""
    if not guard().served.serves_namespace(envelope.namespace):
        return "refused"
    return executor().refuse(envelope, worker, refused)


def worker_name(hostname: str | None) -> str:
    """Who runs an attempt, as its result, Event and audit line name it: the worker's pod
    (``VMFLEET_POD_NAME``, from the downward API), else Celery's node name."""
    return worker_settings.pod_name or hostname or socket.gethostname()


@app.task(name=TASK_EXECUTE, bind=True, acks_late=True)
def execute_on_vm(self: Task, message: dict[str, Any]) -> str:
    worker = worker_name(self.request.hostname)
    try:
        envelope = _envelope(TASK_EXECUTE, message)
    except Refused:
        return "refused"  # not trusted: not even its uid is reported
    try:
        guard().check_envelope(TASK_EXECUTE, envelope)
    except Refused as refused:
        return _refuse(envelope, worker, refused)
    # One of the VM's maxConcurrentCommands slots, across all its worker replicas.
    limit = envelope.target.max_concurrent if envelope.target else None
    with vm_slot(worker_settings, envelope.namespace, envelope.vm, worker, limit):
        return executor().execute(envelope, worker)


@app.task(name=TASK_TERMINATE, acks_late=True)
def terminate_attempt(message: dict[str, Any]) -> bool:
    """End the remote process group of an attempt whose worker was lost (through sudo as
    ``become_user`` when the attempt ran as that user)."""
    try:
        body = _open(TASK_TERMINATE, message)
        target = Target.from_message(dict(body["target"]))
        guard().check_target(TASK_TERMINATE, str(body["namespace"]), target)
    except Refused:
        return False
    marker, become = body.get("marker"), body.get("become_user")
    return executor().terminate_attempt(target, int(body["pgid"]),
                                        str(marker) if marker else None,
                                        str(become) if become else None)


@functools.cache
def health_checker() -> HealthChecker:
    return HealthChecker(executor())


@app.task(name=TASK_CHECK_VM, bind=True, acks_late=False, ignore_result=True)
def check_vm_status(self: Task, message: dict[str, Any]) -> str:
    """Probe the VM (hard timeout) and report status.lastProbe, facts and hostKey."""
    worker = worker_name(self.request.hostname)
    try:
        body = guard().open(message, TASK_CHECK_VM)
        namespace = str(body["namespace"])
        guard().check_vm(TASK_CHECK_VM, namespace, str(body["vm"]))
        if body.get("target"):
            guard().check_target(TASK_CHECK_VM, namespace, Target.from_message(dict(body["target"])))
    except Refused:
        return "refused"
    return health_checker().check(body, worker)


@functools.cache
def transfers() -> TransferExecutor:
    """Transfers share the executor's Redis and SSH pool; the controller sends retries.
    Imported on the first transfer: a VM's worker (commands only) never loads them."""
    from .transfer import TransferExecutor

    return TransferExecutor(executor())


@app.task(name=TASK_TRANSFER, bind=True, acks_late=True)
def transfer_file(self: Task, message: dict[str, Any]) -> str:
    worker = worker_name(self.request.hostname)
    try:
        envelope = _envelope(TASK_TRANSFER, message)
    except Refused:
        return "refused"
    try:
        guard().check_envelope(TASK_TRANSFER, envelope)
    except Refused as refused:
        return _refuse(envelope, worker, refused)
    return transfers().execute(envelope, worker)


@app.task(name=TASK_TRANSFER_CLEANUP, acks_late=True)
def clean_transfer(message: dict[str, Any]) -> int:
    """Remove the temporary files a lost transfer attempt left on one destination."""
    try:
        envelope = _envelope(TASK_TRANSFER_CLEANUP, message)
        guard().check_envelope(TASK_TRANSFER_CLEANUP, envelope)
    except Refused:
        return 0
    return transfers().clean(envelope)
