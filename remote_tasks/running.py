"""The attempts running in this worker process, so a cancel can reach one at once.

A listener thread (a cancel published through the broker) calls
``RunningAttempts.terminate(key, reason)``; the thread running the attempt passed the
``AttemptControl`` from ``track(key)`` to ``Connection.run``. The kill is sent from the
caller's thread over a new channel of the attempt's own connection (TERM to the process
group and to every process carrying the attempt's marker), while the command's channel
stays open and its output is still read.

A cancel for an attempt this process has not started yet is remembered for a while
(``forget_after`` seconds), so one that starts later never runs its command.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from .ssh import AttemptControl


class RunningAttempts:
    def __init__(self, forget_after: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, AttemptControl] = {}
        self._cancelled: dict[Hashable, tuple[float, str]] = {}  # not started yet
        self._forget_after = forget_after
        self._clock = clock

    @contextmanager
    def track(self, key: Hashable) -> Iterator[AttemptControl]:
        """The control of the attempt ``key`` while it runs (already ended if a cancel for
        it came first)."""
        control = AttemptControl()
        with self._lock:
            self._expire()
            early = self._cancelled.pop(key, None)
            self._running[key] = control
        if early is not None:
            control.terminate(early[1])  # not attached yet: it only records the reason
        try:
            yield control
        finally:
            with self._lock:
                if self._running.get(key) is control:
                    del self._running[key]

    def terminate(self, key: Hashable, reason: str) -> bool:
        """End attempt ``key`` now if it runs here (True), else remember the cancel."""
        with self._lock:
            control = self._running.get(key)
            if control is None:
                self._expire()
                self._cancelled[key] = (self._clock(), reason)
                return False
        control.terminate(reason)
        return True

    def _expire(self) -> None:
        horizon = self._clock() - self._forget_after
        for key in [k for k, (at, _) in self._cancelled.items() if at < horizon]:
            del self._cancelled[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._running)


__all__ = ["RunningAttempts"]
