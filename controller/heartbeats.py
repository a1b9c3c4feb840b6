"""Lost workers: which running attempts have no live worker any more.

A worker beats for each attempt it runs (``vmfleet.state``). An attempt is lost when its
beat is older than ``lost_after`` (``State.stale_heartbeats``), or when it has had no
beat at all for ``lost_after`` seconds as this controller saw it: if Redis lost the
heartbeat set, a live worker adds its attempt back at its next beat and a dead one never
does. Without the second rule, an attempt whose heartbeat vanished with its worker would
stay Running for ever. A Redis that cannot be read declares nobody lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from vmfleet.api.constants import Phase
from vmfleet.state import State, attempt_member

from . import schedule
from .tracked import Tracked

log = logging.getLogger("controller.heartbeats")

Member = tuple[str, str]  # (namespace, attempt member)


def running_attempts(tracked: Iterable[Tracked]) -> list[Member]:
    """The attempts the controller's copy shows Running."""
    running: list[Member] = []
    for command in tracked:
        with command.lock:
            running.extend((command.namespace,
                            attempt_member(command.uid, e["vm"], int(e.get("attempt") or 1)))
                           for e in command.status.get("results") or []
                           if e.get("phase") == Phase.RUNNING)
    return running


class LostAttempts:
    """The attempts to declare lost at this tick (stale, or silent for too long)."""

    def __init__(self, state: State, timing: schedule.Timing, clock: Callable[[], float]) -> None:
        self.state = state
        self.timing = timing
        self.clock = clock
        self._absent_since: dict[Member, float] = {}  # first seen without a beat

    def find(self, running: list[Member]) -> set[Member]:
        return self._stale() | self._silent(running)

    def _silent(self, running: list[Member]) -> set[Member]:
        try:
            absent = self.state.absent_heartbeats(running)
        except Exception as exc:  # noqa: BLE001 - Redis restarting: nobody is declared lost
            log.warning("Could not read heartbeats: %s", exc)
            return set()
        now = self.clock()
        for member in list(self._absent_since):
            if member not in absent:
                del self._absent_since[member]
        silent = set()
        for member in absent:
            since = self._absent_since.setdefault(member, now)
            if now - since >= self.timing.lost_after:
                silent.add(member)
                del self._absent_since[member]
        return silent

    def _stale(self) -> set[Member]:
        try:
            return self.state.stale_heartbeats(self.timing.lost_after)
        except Exception as exc:  # noqa: BLE001 - Redis restarting: nobody is declared lost
            log.warning("Could not read heartbeats: %s", exc)
            return set()


__all__ = ["LostAttempts", "Member", "running_attempts"]
