"""The Celery app of the workers (``python -m remote_tasks.worker -Q <queue>``, or
``celery -A remote_tasks worker -Q <queue> --pool threads``)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals

from vmfleet import metrics, settings
from vmfleet.celeryconf import celery_config

log = logging.getLogger("remote_tasks")

INTAKE_TRANSPORT = "remote_tasks.intake:Transport"

# The worker's settings, read once at start (a bad VMFLEET_* value stops it here, named)
# and handed to what needs them (remote_tasks.tasks builds the executor and guard from it).
# Its keys are under its namespace's prefix (VMFLEET_NAMESPACE): all its broker user reaches.
worker_settings = settings.load()
app = Celery("remote_tasks")
app.conf.update(celery_config(worker_settings.broker_url, worker_settings.namespace))
if worker_settings.broker_url.startswith("redis://"):
    # All the messages waiting on the worker's queues per broker round trip, not one
    # (remote_tasks.intake). rediss:// keeps kombu's transport: kombu derives its TLS
    # defaults from the scheme only when the transport is not named.
    app.conf.broker_transport = INTAKE_TRANSPORT


@signals.worker_ready.connect
def serve_metrics(**_: Any) -> None:
    """The worker's /metrics (VMFLEET_METRICS_PORT, default 9808, 0 = off), once its
    logging is set up (worker_init comes before it, and the log line would be lost)."""
    metrics.start_worker_metrics(worker_settings)


def _quiet_prefetch_failures(args: threading.ExceptHookArgs) -> None:
    """paramiko reads SFTP files ahead in a thread of its own; when a VM's connection
    drops mid-transfer that thread dies with an OSError while the transfer itself fails
    over to a retry. Say so in one line; any other thread's exception keeps its traceback."""
    if (
        args.thread is not None
        and "_prefetch_thread" in args.thread.name
        and isinstance(args.exc_value, OSError | EOFError)
    ):
        log.warning("SFTP read-ahead stopped: %s (the transfer attempt reports the error)",
                    args.exc_value)
        return
    _default_excepthook(args)


class _TransportTracebacks(logging.Filter):
    """paramiko's transport thread logs a failed connection as one line ("Exception
    (client): ...") and then its traceback, a record per line, at ERROR. The attempt or
    probe reports that error itself (TransportError), so the line stays and the
    traceback goes: a worker's log holds no Traceback for a VM that reset a connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or record.getMessage().startswith("Exception")


logging.getLogger("paramiko.transport").addFilter(_TransportTracebacks())

_default_excepthook = threading.excepthook
threading.excepthook = _quiet_prefetch_failures
