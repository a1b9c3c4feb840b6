"""Send messages to the workers' Celery queues, by task name (the controller never
imports workers).

Every message is signed (``vmfleet.api.signing``) as it is sent: a resend is signed anew,
with a new expiry. On Redis, each namespace's messages go under that namespace's key
prefix (``vmfleet.tenancy``): one Celery app per namespace, made at its first message
and kept.

A fan-out's messages go out together (``batch``): on Redis one pipelined round trip for
all of them instead of one per VM (200 signed sends: 0.27-0.77 s one by one, 0.17-0.21 s
batched, on a loaded machine; bench/README.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
        self._local = threading.local()  # this thread's open batch: (namespace, producer)

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
        batch = getattr(self._local, "batch", None)
        if batch is not None and batch[0] == namespace:
            options["producer"] = batch[1]
        # argsrepr/kwargsrepr given: Celery would otherwise walk the signed message to
        # build a repr nobody reads (a third of the send's CPU).
        self.app(namespace).send_task(name, args=[self.signer.sign(name, body)], queue=queue,
                                      argsrepr=SIGNED_REPR, kwargsrepr="{}", **options)

    @contextmanager
    def batch(self, namespace: str | None) -> Iterator[None]:
        """What this thread sends to ``namespace`` within the block goes to the broker when
        the block ends, together (Redis: one pipeline; AMQP: each at once, as kombu does).
        A failed flush raises from the block's end: then none of them counts as sent (some
        may have been: a resend is safe, the claim runs an attempt once). Nested: the
        outermost block sends."""
        if getattr(self._local, "batch", None) is not None:
            yield
            return
        with self.app(namespace).producer_or_acquire() as producer:
            self._local.batch = (namespace, producer)
            try:
                with producer.batch():
                    yield
            finally:
                self._local.batch = None

    def close(self) -> None:
        with self._lock:
            apps, self._apps = list(self._apps.values()), {}
        for app in apps:
            app.close()
