"""``ttlSecondsAfterFinished``: finished RemoteCommands deleted once their time is up.

``Expiries`` keeps a heap of (deletion time, command) in memory, fed by the commands
this controller finished and by those the watch brings already finished (a restarted
controller schedules them again); ``expire`` deletes what is due (the controller loop
calls it at every tick).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Any

from vmfleet.api.reports import F
from vmfleet.api.times import now_rfc3339, parse_rfc3339

Delete = Callable[[str, str, str], None]  # (uid, namespace, name): ttlSecondsAfterFinished


class Expiries:
    """Commands waiting for their ``ttlSecondsAfterFinished`` to pass."""

    def __init__(self, delete: Delete) -> None:
        self.delete = delete
        self._lock = threading.Lock()
        self._expiries: list[tuple[float, str, str, str]] = []  # (wall time, uid, ns, name)
        self._expiring: set[str] = set()

    def later(self, uid: str, namespace: str, name: str, spec: dict[str, Any],
              status: dict[str, Any]) -> None:
        """A command the watch brought finished: deleted when its spec's TTL is up."""
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        finished = status.get(F.COMPLETION_TIME) or now_rfc3339()
        self.schedule(uid, namespace, name, finished, int(ttl))

    def schedule(self, uid: str, namespace: str, name: str, finished: str, ttl: int) -> None:
        at = parse_rfc3339(finished).timestamp() + ttl
        with self._lock:
            if uid in self._expiring:
                return
            self._expiring.add(uid)
            heapq.heappush(self._expiries, (at, uid, namespace, name))

    def discard(self, uid: str) -> None:
        """The command is gone: a later schedule of its uid is taken again."""
        with self._lock:
            self._expiring.discard(uid)

    def count(self) -> int:
        with self._lock:
            return len(self._expiries)

    def expire(self) -> None:
        now = time.time()
        due: list[tuple[float, str, str, str]] = []
        with self._lock:
            while self._expiries and self._expiries[0][0] <= now:
                item = heapq.heappop(self._expiries)
                self._expiring.discard(item[1])
                due.append(item)
        for _, uid, namespace, name in due:
            self.delete(uid, namespace, name)


__all__ = ["Delete", "Expiries"]
