"""A RemoteCommand as the controller holds it while it runs (``Tracked``), and how soon a
change to it must be written (``Urgency``). ``controller.commands`` changes the copy;
``controller.loop.Writer`` writes it.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vmfleet.api.constants import Phase
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.plan import Plan
from vmfleet.api.planning import plan_of

from .audit import Pending


@dataclass(frozen=True)
class Urgency:
    """How soon a change must be written (seconds)."""

    start: float = 0.05  # initial entries: a quick command's claim and result join them
    claimed: float = 0.1
    progress: float = 2.0
    finished: float = 0.0
    per_target: float = 0.002  # a fan-out's results wait this much longer per VM (capped)
    fan_out_cap: float = 0.25


@dataclass
class Tracked:
    """One unfinished RemoteCommand: its status as wanted now and as last written."""

    namespace: str
    name: str
    uid: str
    spec: RemoteCommandSpec
    status: dict[str, Any]
    written: dict[str, Any] | None
    ttl: int | None = None
    due: float | None = None  # monotonic time by which ``status`` must be written
    acks: list[str] = field(default_factory=list)  # reports carried by the next write
    failures: int = 0
    refusals: int = 0  # wanted statuses that failed validation (InternalError)
    lock: threading.RLock = field(default_factory=threading.RLock)
    template: dict[str, Any] | None = None  # status.template of a templateRef command
    # Ended attempts whose records (Event, audit line) go out once the write carrying
    # their end landed (``controller.audit``).
    records: list[Pending] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def finished(self) -> bool:
        return self.status.get("phase") in Phase.TERMINAL

    @functools.cached_property
    def plan(self) -> Plan:
        """What a worker runs (the spec is immutable: made once, sent with every dispatch)."""
        return plan_of(self.spec)

    @functools.cached_property
    def spec_wire(self) -> dict[str, Any]:
        """The spec as the previous release's workers read it (sent beside the plan)."""
        return self.spec.wire()

    def want(self, delay: float, now: float | None = None) -> None:
        at = (time.monotonic() if now is None else now) + delay
        self.due = at if self.due is None else min(self.due, at)


__all__ = ["Tracked", "Urgency"]
