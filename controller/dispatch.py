"""Send messages to the workers' Celery queues, by task name (the controller never
imports workers).

Every message is signed (``vmfleet.api.signing``) as it is sent: a resend is signed anew,
with a new expiry. On Redis, each namespace's messages go under that namespace's key
prefix (``vmfleet.tenancy``): one Celery app per namespace, made at its first message
and kept.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from vmfleet.api.signing import Signer
from vmfleet.celeryconf import celery_config

SIGNED_REPR = "(<signed message>,)"


class Dispatcher:
    def __init__(self, broker_url: str, signer: Signer) -> None:
        self.broker_url = broker_url
        self.signer = signer
        self._lock = threading.Lock()
        self._apps: dict[str | None, Celery] = {}

    def app(self, namespace: str | None) -> Celery:
        """The sending app of ``namespace`` (None: the legacy shared transfer queue)."""
        with self._lock:
            app = self._apps.get(namespace)
            if app is None:
                app = Celery(f"vmfleet-controller-{namespace or 'shared'}", set_as_current=False)
                app.conf.update(celery_config(self.broker_url, namespace))
                self._apps[namespace] = app
            return app

    def send_task(self, name: str, body: dict[str, Any], queue: str, namespace: str | None,
                  **options: Any) -> None:
        """Sign ``body`` for the task ``name`` and send it, as the task's one argument, to
        ``queue`` under ``namespace``'s key prefix."""
        if not queue.startswith("vmfleet."):
            # Under a namespace's prefix kombu and vmfleet keep keys of their own.
            raise ValueError(f"refusing to send to queue {queue!r}: vmfleet's queues begin "
                             "with 'vmfleet.'")
        # argsrepr/kwargsrepr given: Celery would otherwise walk the signed message to
        # build a repr nobody reads (a third of the send's CPU).
        self.app(namespace).send_task(name, args=[self.signer.sign(name, body)], queue=queue,
                                      argsrepr=SIGNED_REPR, kwargsrepr="{}", **options)

    def close(self) -> None:
        with self._lock:
            apps, self._apps = list(self._apps.values()), {}
        for app in apps:
            app.close()
