"""What the controller does next with a RemoteCommand's result entries (pure).

``plan(...)`` looks at the entries and returns the changes to make — each guarded by the
entry's expected phase and attempt, so a worker writing at the same time wins cleanly —
plus the attempts to dispatch and the remote process groups to terminate:

- start Pending entries (first attempts, and retries whose ``retryAfter`` passed) while
  fewer than ``maxParallel`` run (a number, or a percentage of the targets);
- stop starting new VMs once ``maxFailures`` have failed (the rest end Cancelled);
- fail entries that did not start before ``activeDeadlineSeconds``;
- end attempts whose worker stopped heartbeating (``lost``: their heartbeat in Redis is
  stale) as ``WorkerLost``, or a retry when the spec allows, and terminate their
  process groups;
- resend dispatches that no worker claimed for a long time (the claim makes it safe).

The controller applies the changes to its own copy of the status (it is the only
writer) and writes them with the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from controller.policy import backoff_seconds, counted_attempt, should_retry
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.counts import describe_count, resolve_count
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import F
from vmfleet.api.times import parse_rfc3339, rfc3339


@dataclass(frozen=True)
class Timing:
    lost_after: float = 30.0  # seconds without a heartbeat before a running attempt is lost
    redispatch_after: float = 300.0  # seconds a Queued attempt waits before it is sent again


@dataclass
class Change:
    index: int
    vm: str
    set: dict[str, Any]
    remove: tuple[str, ...] = ()


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    dispatch: list[tuple[str, int]] = field(default_factory=list)  # (vm, attempt)
    terminate: list[tuple[str, int, str | None]] = field(default_factory=list)  # (vm, pgid, marker)

    def __bool__(self) -> bool:
        return bool(self.changes or self.dispatch or self.terminate)


def _ended(entry: dict[str, Any], phase: str, reason: str, message: str, now: datetime) -> dict[str, Any]:
    return {"phase": phase, "reason": reason, "message": message, F.COMPLETION_TIME: rfc3339(now)}


def _present(entry: dict[str, Any], *keys: str) -> tuple[str, ...]:
    return tuple(key for key in keys if entry.get(key) is not None)


def plan(
    spec: RemoteCommandSpec,
    status: dict[str, Any],
    now: datetime,
    *,
    queues: dict[str, str | None],
    timing: Timing = Timing(),
    paused: frozenset[str] = frozenset(),
    lost: frozenset[str] = frozenset(),
    open_wave: int | None = None,
    refused: dict[str, str] | None = None,
) -> Plan:
    """The next step for ``status.results``. ``queues`` maps VM names to their queue
    (None: the RemoteVM no longer exists); ``paused`` VMs get nothing dispatched;
    ``lost`` VMs' running attempts stopped heartbeating; with ``open_wave`` (a rollout),
    entries of later waves are not dispatched yet; ``refused`` VMs (name -> why) are
    RemoteVMs the controller does not serve: what waits for them fails at once."""
    step = _Step(spec, now, [dict(e) for e in status.get("results") or []])
    started = parse_rfc3339(status[F.START_TIME]) if status.get(F.START_TIME) else now
    deadline_passed = bool(
        spec.active_deadline_seconds
        and now >= started + timedelta(seconds=spec.active_deadline_seconds)
    )
    for index, entry in enumerate(step.results):
        phase = entry.get("phase", Phase.PENDING)
        if phase == Phase.RUNNING and entry["vm"] in lost:
            _end_lost(step, index, entry, retry=not deadline_passed)
        elif phase in (Phase.PENDING, Phase.QUEUED):
            _end_unrunnable(step, index, entry, queues, deadline_passed, refused or {})
    _cancel_after_max_failures(step)
    _dispatch_ready(step, queues, paused, timing, open_wave)
    return step.out


@dataclass
class _Step:
    """``plan``'s working copy of the entries, and the plan made so far."""

    spec: RemoteCommandSpec
    now: datetime
    results: list[dict[str, Any]]
    out: Plan = field(default_factory=Plan)

    def change(self, index: int, entry: dict[str, Any], new: dict[str, Any],
               remove: tuple[str, ...] = ()) -> None:
        self.out.changes.append(Change(index, entry["vm"], new, remove))
        entry.update(new)
        for key in remove:
            entry.pop(key, None)

    def count(self, *phases: str) -> int:
        return sum(1 for e in self.results if e.get("phase") in phases)


def _end_lost(step: _Step, index: int, entry: dict[str, Any], *, retry: bool) -> None:
    """A running attempt whose worker stopped heartbeating: its process group is
    terminated, and it is retried (the lost group remembered) or ends WorkerLost. An
    attempt whose worker said it was being stopped (``disruption``: a drain, a rollout)
    is retried at once without counting against ``retries.limit``, unless the spec
    counts disruptions."""
    spec, now = step.spec, step.now
    attempt = int(entry.get("attempt", 1))
    pgid = entry.get("pgid")
    marker = entry.get("processMarker")
    if pgid:
        step.out.terminate.append((entry["vm"], int(pgid), marker))
    worker = entry.get("worker", "its worker")
    disruption = entry.get("disruption")
    if disruption:
        message = (f"{worker} was stopped during attempt {attempt} and its grace period ran "
                   f"out ({disruption})")
    else:
        message = f"{worker} stopped reporting during attempt {attempt}"
    if pgid:
        message += f"; process group {pgid} is terminated"
    remove = _present(entry, "pgid", "processMarker", "heartbeatTime", "disruption")
    uncounted = bool(disruption) and not spec.retries.count_disruptions
    if retry and (uncounted or should_retry(spec, counted_attempt(spec, entry),
                                            Reason.WORKER_LOST, None)):
        delay = 0.0 if uncounted else backoff_seconds(spec, counted_attempt(spec, entry))
        new = {"phase": Phase.PENDING, "attempt": attempt + 1, "reason": Reason.WORKER_LOST,
               "message": f"{message}; next attempt after {delay:.0f}s"
                          + (" (a disruption: not counted against retries.limit)"
                             if uncounted else ""),
               "retryAfter": rfc3339(now + timedelta(seconds=delay))}
        if uncounted:
            new["disruptions"] = int(entry.get("disruptions") or 0) + 1
        if pgid:
            new["lostPgid"] = int(pgid)
            if marker:
                new["lostMarker"] = marker
        step.change(index, entry, new, remove)
    else:
        step.change(index, entry, _ended(entry, Phase.FAILED, Reason.WORKER_LOST, message, now), remove)


def _end_unrunnable(step: _Step, index: int, entry: dict[str, Any],
                    queues: dict[str, str | None], deadline_passed: bool,
                    refused: dict[str, str]) -> None:
    """An entry not yet running that never can: its deadline passed, its VM is gone or
    refused."""
    remove = _present(entry, "retryAfter", "lostPgid", "lostMarker")
    if deadline_passed:
        step.change(index, entry, _ended(entry, Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                                         f"activeDeadlineSeconds ({step.spec.active_deadline_seconds}s) "
                                         "passed before it ran", step.now), remove)
    elif entry["vm"] in queues and queues[entry["vm"]] is None:
        step.change(index, entry, _ended(entry, Phase.FAILED, Reason.VM_NOT_FOUND,
                                         f"RemoteVM {entry['vm']} does not exist in this namespace",
                                         step.now), remove)
    elif entry["vm"] in refused:
        step.change(index, entry, _ended(entry, Phase.FAILED, Reason.INVALID_SPEC,
                                         f"RemoteVM {entry['vm']} is refused: {refused[entry['vm']]}",
                                         step.now), remove)


def _cancel_after_max_failures(step: _Step) -> None:
    """Once ``maxFailures`` VMs failed, the first attempts not started never start."""
    given = step.spec.max_failures
    if given is None:
        return
    total = len(step.results)
    limit = resolve_count(given, total)
    failed = step.count(Phase.FAILED)
    if not failed or failed < limit:
        return
    for index, entry in enumerate(step.results):
        if entry.get("phase") == Phase.PENDING and int(entry.get("attempt", 1)) == 1:
            step.change(index, entry, _ended(entry, Phase.CANCELLED, Reason.MAX_FAILURES,
                                             f"not started: {failed} VMs failed "
                                             f"(maxFailures {describe_count(given, total)})",
                                             step.now))


def _dispatch_ready(step: _Step, queues: dict[str, str | None], paused: frozenset[str],
                    timing: Timing, open_wave: int | None = None) -> None:
    """Send Pending entries whose retry time came, within ``maxParallel``; resend Queued
    ones nobody claimed for ``timing.redispatch_after``."""
    now, given = step.now, step.spec.max_parallel
    capacity = (resolve_count(given, len(step.results)) - step.count(Phase.QUEUED, Phase.RUNNING)) \
        if given is not None else len(step.results)
    for index, entry in enumerate(step.results):
        phase = entry.get("phase")
        vm = entry["vm"]
        attempt = int(entry.get("attempt", 1))
        if open_wave is not None and int(entry.get("wave") or 0) > open_wave:
            continue
        if phase == Phase.PENDING and capacity > 0 and vm not in paused and queues.get(vm):
            after = entry.get("retryAfter")
            if after and parse_rfc3339(after) > now:
                continue
            step.change(index, entry, {"phase": Phase.QUEUED, "dispatchTime": rfc3339(now)},
                        _present(entry, "retryAfter"))
            step.out.dispatch.append((vm, attempt))
            capacity -= 1
        elif phase == Phase.QUEUED and queues.get(vm) and vm not in paused:
            sent = entry.get("dispatchTime")
            if sent and now - parse_rfc3339(sent) > timedelta(seconds=timing.redispatch_after):
                step.change(index, entry, {"dispatchTime": rfc3339(now)})
                step.out.dispatch.append((vm, attempt))


def pending_vms(status: dict[str, Any]) -> set[str]:
    """VMs whose entries may be dispatched now (their queue must be looked up)."""
    return {e["vm"] for e in status.get("results") or [] if e.get("phase") in (Phase.PENDING, Phase.QUEUED)}
