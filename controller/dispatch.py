"""Send messages to the workers' Celery queues, by task name (the controller never
imports workers). Every message is signed (``vmfleet.api.signing``) as it is sent: a
resend is signed anew, with a new expiry."""

from __future__ import annotations

from typing import Any

from celery import Celery

from vmfleet.api.signing import Signer
from vmfleet.celeryconf import celery_config


class Dispatcher:
    def __init__(self, broker_url: str, signer: Signer) -> None:
        self.app = Celery("vmfleet-controller", set_as_current=False)
        self.app.conf.update(celery_config(broker_url))
        self.signer = signer

    def send_task(self, name: str, body: dict[str, Any], queue: str, **options: Any) -> None:
        """Sign ``body`` for the task ``name`` and send it as the task's one argument."""
        self.app.send_task(name, args=[self.signer.sign(name, body)], queue=queue, **options)

    def close(self) -> None:
        self.app.close()
