"""Celery tasks: thin wrappers that take an envelope and call plain code."""

from __future__ import annotations

import functools
import socket
import threading
from pathlib import Path
from typing import Any

from celery import Task, signals

from vmfleet import settings
from vmfleet.api.constants import (
    TASK_CHECK_VM,
    TASK_EXECUTE,
    TASK_TERMINATE,
    TASK_TRANSFER,
    TASK_TRANSFER_CLEANUP,
)
from vmfleet.api.envelope import Envelope, Target
from vmfleet.celeryconf import broker_url

from . import probes
from .app import app
from .execute import CommandExecutor
from .health import HealthChecker
from .slots import vm_slot
from .transfer import TransferExecutor


_stop = threading.Event()
_not_ready = threading.Event()


@functools.cache
def executor() -> CommandExecutor:
    """One executor (Redis and the SSH pool) per worker process, shared by its threads;
    it listens for cancels from the start."""
    found = CommandExecutor.from_environment()
    found.listen_for_cancels(_stop)
    return found


@signals.worker_ready.connect
def _start_listening(**_: Any) -> None:
    found = executor()  # cancels reach a worker that has not run anything yet
    directory = settings.current().probe_dir
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


@app.task(name=TASK_EXECUTE, bind=True, acks_late=True)
def execute_on_vm(self: Task, envelope: dict[str, Any]) -> str:
    worker = self.request.hostname or socket.gethostname()
    message = Envelope.from_message(envelope)
    # One of the VM's maxConcurrentCommands slots, across all its worker replicas.
    limit = message.target.max_concurrent if message.target else None
    with vm_slot(broker_url(), message.namespace, message.vm, worker, limit):
        return executor().execute(message, worker)


@app.task(name=TASK_TERMINATE, acks_late=True)
def terminate_attempt(target: dict[str, Any], pgid: int, marker: str | None = None,
                      become_user: str | None = None) -> bool:
    """End the remote process group of an attempt whose worker was lost (through sudo as
    ``become_user`` when the attempt ran as that user)."""
    return executor().terminate_attempt(Target.from_message(target), int(pgid), marker,
                                        become_user)


@functools.cache
def health_checker() -> HealthChecker:
    return HealthChecker(executor())


@app.task(name=TASK_CHECK_VM, bind=True, acks_late=False, ignore_result=True)
def check_vm_status(self: Task, message: dict[str, Any]) -> str:
    """Probe the VM (hard timeout) and report status.lastProbe, facts and hostKey."""
    worker = self.request.hostname or socket.gethostname()
    return health_checker().check(message, worker)


@functools.cache
def transfers() -> TransferExecutor:
    """Transfers share the executor's Redis and SSH pool; the controller sends retries."""
    return TransferExecutor(executor())


@app.task(name=TASK_TRANSFER, bind=True, acks_late=True)
def transfer_file(self: Task, envelope: dict[str, Any]) -> str:
    worker = self.request.hostname or socket.gethostname()
    return transfers().execute(Envelope.from_message(envelope), worker)


@app.task(name=TASK_TRANSFER_CLEANUP, acks_late=True)
def clean_transfer(envelope: dict[str, Any]) -> int:
    """Remove the temporary files a lost transfer attempt left on one destination."""
    return transfers().clean(Envelope.from_message(envelope))
