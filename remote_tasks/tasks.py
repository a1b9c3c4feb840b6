"""Celery tasks: thin wrappers that take an envelope and call plain code."""

from __future__ import annotations

import functools
import socket
from typing import Any

from celery import Task

from vmfleet.api.constants import TASK_EXECUTE
from vmfleet.api.envelope import Envelope

from .app import app
from .execute import CommandExecutor


@functools.cache
def executor() -> CommandExecutor:
    """One executor (API client and SSH pool) per worker process, shared by its threads."""
    return CommandExecutor.from_environment()


@app.task(name=TASK_EXECUTE, bind=True, acks_late=True)
def execute_on_vm(self: Task, envelope: dict[str, Any]) -> str:
    worker = self.request.hostname or socket.gethostname()
    return executor().execute(Envelope.from_message(envelope), worker)
