"""Celery settings shared by the controller (which only sends) and the workers."""

from __future__ import annotations

from typing import Any

from vmfleet import settings
from vmfleet.settings import DEFAULT_BROKER_URL

BROKER_URL_ENV = settings.env_of("broker_url")

__all__ = ["BROKER_URL_ENV", "DEFAULT_BROKER_URL", "broker_url", "celery_config"]


def broker_url() -> str:
    return settings.current().broker_url


def celery_config(url: str | None = None) -> dict[str, Any]:
    return {
        "broker_url": url or broker_url(),
        "broker_connection_retry_on_startup": True,
        # Results live in the RemoteCommand's status, not in a result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        # A message is acknowledged after the task ran: a worker killed mid-command leaves
        # it to be redelivered, and the claim in the status makes the redelivery a no-op.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_transport_options": {"visibility_timeout": 3600},
        # AMQP: notice a dead broker connection in seconds, not minutes (default 120 s).
        "broker_heartbeat": 10,
        "task_create_missing_queues": True,
    }
