"""The Celery app of the workers: ``celery -A remote_tasks worker -Q <queue> --pool threads``."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from vmfleet import metrics
from vmfleet.celeryconf import celery_config

app = Celery("remote_tasks")
app.conf.update(celery_config())


@signals.worker_ready.connect
def serve_metrics(**_: Any) -> None:
    """The worker's /metrics (VMFLEET_METRICS_PORT, default 9808, 0 = off), once its
    logging is set up (worker_init comes before it, and the log line would be lost)."""
    metrics.start_worker_metrics()
