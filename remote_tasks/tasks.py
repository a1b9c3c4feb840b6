"""Celery tasks: thin wrappers that take an envelope and call plain code."""

from __future__ import annotations

import functools
import socket
from typing import Any

from celery import Task

from vmfleet.api.constants import (
    TASK_CHECK_VM,
    TASK_EXECUTE,
    TASK_TERMINATE,
    TASK_TRANSFER,
    TASK_TRANSFER_CLEANUP,
    TRANSFER_QUEUE,
)
from vmfleet.api.envelope import Envelope
from vmfleet.celeryconf import broker_url

from .app import app
from .execute import CommandExecutor
from .health import HealthChecker
from .slots import vm_slot
from .transfer import TransferExecutor


@functools.cache
def executor() -> CommandExecutor:
    """One executor (API client and SSH pool) per worker process, shared by its threads."""
    return CommandExecutor.from_environment()


@app.task(name=TASK_EXECUTE, bind=True, acks_late=True)
def execute_on_vm(self: Task, envelope: dict[str, Any]) -> str:
    worker = self.request.hostname or socket.gethostname()
    message = Envelope.from_message(envelope)
    # One of the VM's maxConcurrentCommands slots, across all its worker replicas.
    with vm_slot(broker_url(), message.namespace, message.vm, worker):
        return executor().execute(message, worker)


@app.task(name=TASK_TERMINATE, acks_late=True)
def terminate_attempt(namespace: str, vm: str, pgid: int, marker: str | None = None) -> bool:
    """End the remote process group of an attempt whose worker was lost or cancelled."""
    return executor().terminate_attempt(namespace, vm, int(pgid), marker)


@functools.cache
def health_checker() -> HealthChecker:
    return HealthChecker(executor())


@app.task(name=TASK_CHECK_VM, bind=True, acks_late=False, ignore_result=True)
def check_vm_status(self: Task, message: dict[str, Any]) -> str:
    """Probe the VM (hard timeout) and write status.lastProbe, facts and hostKey."""
    worker = self.request.hostname or socket.gethostname()
    return health_checker().check(message, worker)


def _requeue_transfer(envelope: Envelope, countdown: float | None) -> None:
    app.send_task(TASK_TRANSFER, args=[envelope.to_message()], queue=TRANSFER_QUEUE,
                  countdown=countdown)


@functools.cache
def transfers() -> TransferExecutor:
    return TransferExecutor(executor(), requeue=_requeue_transfer)


@app.task(name=TASK_TRANSFER, bind=True, acks_late=True)
def transfer_file(self: Task, envelope: dict[str, Any]) -> str:
    worker = self.request.hostname or socket.gethostname()
    return transfers().execute(Envelope.from_message(envelope), worker)


@app.task(name=TASK_TRANSFER_CLEANUP, acks_late=True)
def clean_transfer(envelope: dict[str, Any]) -> int:
    """Remove the temporary files a lost transfer attempt left on one destination."""
    return transfers().clean(Envelope.from_message(envelope))
