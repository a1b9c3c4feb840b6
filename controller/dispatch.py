"""Send attempts to the VMs' Celery queues, by task name (the controller never imports workers)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from vmfleet.api.constants import TASK_EXECUTE
from vmfleet.api.envelope import Envelope
from vmfleet.celeryconf import celery_config


class Dispatcher:
    def __init__(self, broker_url: str) -> None:
        self.app = Celery("vmfleet-controller", set_as_current=False)
        self.app.conf.update(celery_config(broker_url))

    def send(self, envelope: Envelope, queue: str) -> None:
        self.send_task(TASK_EXECUTE, [envelope.to_message()], queue)

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        self.app.send_task(name, args=args, queue=queue)

    def close(self) -> None:
        self.app.close()
