"""Worker scaling: desired replicas from the VM queue's backlog. One logic, both runtimes.

Pure part: ``recommend`` (backlog -> replicas, clamped to minReplicas..maxReplicas) and
``stabilize`` (scale up at once; scale down only to the highest recommendation of the
last ``scaleDownDelaySeconds``, as the HorizontalPodAutoscaler's stabilization window
does). ``Autoscaler`` keeps the recent recommendations per VM in memory; after a
controller restart it starts from the current replica count, so nothing is scaled down
before a full delay has passed.

Backlog is queue depth (``vmfleet.queues.QueueDepth``, through kombu, so Redis and
RabbitMQ both work) plus the
commands running on the VM. A dispatch to a VM at zero replicas wakes it at once
(``Autoscaler.wake``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmfleet.api.models import WorkersSpec
from vmfleet.queues import QueueDepth  # re-exported: the autoscaler's backlog source

log = logging.getLogger("controller.scaling")


# --------------------------------------------------------------------------- pure


def recommend(workers: WorkersSpec | None, backlog: int) -> int:
    """Replicas for this backlog: fixed ``replicas``; else ceil(backlog / target), clamped."""
    if workers is None:
        return 1
    if workers.replicas is not None:
        return workers.replicas
    auto = workers.autoscale
    if auto is None:
        return 1
    wanted = math.ceil(max(0, backlog) / auto.target_backlog_per_replica)
    return max(auto.min_replicas, min(auto.max_replicas, wanted))


def stabilize(history: list[tuple[float, int]], now: float, delay: float) -> int:
    """The highest recommendation within ``delay`` seconds before ``now``.

    ``history`` holds ``(time, replicas)`` pairs, the newest last; the newest counts
    whatever its age, so an increase applies at once and a decrease only after ``delay``.
    """
    if not history:
        return 0
    newest = history[-1][1]
    window = [n for t, n in history if now - t <= delay]
    return max([newest, *window])


def prune(history: list[tuple[float, int]], now: float, delay: float) -> list[tuple[float, int]]:
    """Drop recommendations older than the window, keeping the newest one."""
    kept = [(t, n) for t, n in history if now - t <= delay]
    return kept if kept else history[-1:]


@dataclass(frozen=True)
class Decision:
    replicas: int
    recommended: int
    backlog: int
    queue_depth: int
    running: int


# --------------------------------------------------------------------------- state


@dataclass
class _VMState:
    history: list[tuple[float, int]] = field(default_factory=list)
    last: int | None = None  # the replicas last decided


class Autoscaler:
    """Per-VM recommendation history (in memory) around the pure functions."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._vms: dict[str, _VMState] = {}

    def decide(
        self, key: str, workers: WorkersSpec | None, queue_depth: int, running: int, current: int
    ) -> Decision:
        now = self.clock()
        backlog = queue_depth + running
        recommended = recommend(workers, backlog)
        if workers is None or workers.autoscale is None:
            return Decision(recommended, recommended, backlog, queue_depth, running)
        delay = float(workers.autoscale.scale_down_delay_seconds)
        with self._lock:
            state = self._vms.setdefault(key, _VMState())
            if not state.history:
                # First look (or after a restart): what runs now is kept for one delay.
                state.history.append((now, current))
            state.history.append((now, recommended))
            state.history = prune(state.history, now, delay)
            replicas = stabilize(state.history, now, delay)
        auto = workers.autoscale
        replicas = max(auto.min_replicas, min(auto.max_replicas, replicas))
        with self._lock:
            state.last = replicas
        return Decision(replicas, recommended, backlog, queue_depth, running)

    def wake(self, key: str, workers: WorkersSpec | None) -> int:
        """A command was dispatched: at least one worker, now (and for one delay)."""
        if workers is None or workers.autoscale is None:
            return recommend(workers, 1)
        floor = max(1, min(workers.autoscale.max_replicas, workers.autoscale.min_replicas or 1))
        with self._lock:
            state = self._vms.setdefault(key, _VMState())
            state.history.append((self.clock(), floor))
            state.last = floor
        return floor

    def last(self, key: str) -> int | None:
        """The replicas last decided for this VM (None: not seen yet)."""
        with self._lock:
            state = self._vms.get(key)
            return state.last if state is not None else None

    def forget(self, key: str) -> None:
        with self._lock:
            self._vms.pop(key, None)


__all__ = ["Autoscaler", "Decision", "QueueDepth", "prune", "recommend",
           "stabilize"]
