"""The worker side: the Celery app, its tasks and the SSH layer.

Run a worker for one VM's queue with
``celery -A remote_tasks worker -Q vmfleet.<namespace>.<vm> --pool threads``.
"""

from . import tasks as tasks  # registers the tasks with the app
from .app import app

__all__ = ["app"]
