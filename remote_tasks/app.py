"""The Celery app of the workers: ``celery -A remote_tasks worker -Q <queue> --pool threads``."""

from __future__ import annotations

from celery import Celery

from vmfleet.celeryconf import celery_config

app = Celery("remote_tasks")
app.conf.update(celery_config())
