"""The worker side: the Celery app, its tasks and the SSH layer.

Run a worker for one VM's queue with
``python -m remote_tasks.worker -Q vmfleet.<namespace>.<vm> --pool threads``
(``remote_tasks.worker``; ``celery -A remote_tasks worker ...`` starts the same worker).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType


class _Deferred(importlib.abc.MetaPathFinder):
    """Load the named modules only when one of their attributes is first used
    (``importlib.util.LazyLoader``)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


# paramiko imports invoke (with unittest.mock: ~2.5 MiB of a worker's memory) only to run
# the `Match exec` lines of an OpenSSH client config, which a worker never reads: it stays
# unloaded until something uses it.
if "invoke" not in sys.modules:
    sys.meta_path.insert(0, _Deferred(frozenset({"invoke"})))

from . import tasks as tasks  # noqa: E402 - registers the tasks with the app
from .app import app  # noqa: E402

__all__ = ["app"]
