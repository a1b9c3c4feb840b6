"""RemoteCronCommand: what to do next, by CronJob's rules (pure, with the clock passed in).

``plan(cron, runs, now, replacing)`` looks at a RemoteCronCommand and the RemoteCommands it
owns and returns a ``CronStep``: the run to create (named ``<name>-<minutes since the
epoch>`` of its scheduled time, so no run is ever created twice), the runs to cancel and
to delete, the Events to post and the new status. Point by point as the CronJob
controller (pkg/controller/cronjob, v2):

- scheduled times are looked for after ``lastScheduleTime`` (else the creation time), but
  never before ``now - startingDeadlineSeconds``; more than 100 missed → a Warning Event
  ``TooManyMissedTimes``, and only the most recent is considered;
- the most recent one is started unless it is too late (``startingDeadlineSeconds``
  passed: Event ``MissSchedule``), the cron is suspended, or a run is active and the policy
  is ``Forbid`` (then it is retried until its deadline, as CronJob does);
- ``Replace`` cancels the active runs (annotated ``vmfleet.io/replaced-by-schedule``;
  their processes are killed on every VM) and starts the new run once their results say
  the processes are gone; the cancelled runs are then deleted. After
  ``startingDeadlineSeconds`` (default 60) it deletes them anyway and says in a Warning
  Event what state they were in;
- finished runs beyond ``successfulHistoryLimit`` / ``failedHistoryLimit`` are deleted,
  oldest first; ``lastSuccessfulTime`` is the completion of the latest successful run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from vmfleet.api import constants as c
from vmfleet.api.constants import Phase
from vmfleet.api.cronexpr import parse
from vmfleet.api.kinds import RemoteCronCommandSpec
from vmfleet.api.times import parse_rfc3339, rfc3339

MAX_MISSED: Final = 100
REPLACE_WAIT_SECONDS: Final = 60
ANNOTATION_SCHEDULED: Final = f"{c.GROUP}/scheduled-at"
ANNOTATION_REPLACED: Final = f"{c.GROUP}/replaced-by-schedule"
LABEL_CRON: Final = f"{c.GROUP}/cron"


@dataclass(frozen=True)
class Run:
    """A RemoteCommand a RemoteCronCommand owns, as the watch last saw it."""

    name: str
    uid: str
    scheduled: datetime | None
    phase: str | None
    completion_time: str | None = None
    summary: str = ""  # e.g. "Running on vm1, vm2" for Events
    replaced: bool = False  # cancelled by Replace (annotated): deleted once it has finished

    @property
    def finished(self) -> bool:
        return self.phase in Phase.TERMINAL


@dataclass
class CronStep:
    create: tuple[str, datetime] | None = None  # (name, scheduled time)
    cancel: list[Run] = field(default_factory=list)
    delete: list[Run] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    status: dict[str, Any] = field(default_factory=dict)


def run_name(cron: str, scheduled: datetime) -> str:
    """``<name>-<minutes since the epoch>`` (CronJob's naming)."""
    return f"{cron}-{int(scheduled.timestamp()) // 60}"


def _history(runs: list[Run], spec: RemoteCronCommandSpec) -> list[Run]:
    """Finished runs past the history limits, oldest first."""
    def key(run: Run) -> str:
        return run.scheduled.isoformat() if run.scheduled else (run.completion_time or "")

    good = sorted((r for r in runs if r.finished and r.phase in (Phase.SUCCEEDED, Phase.DRY_RUN)),
                  key=key)
    bad = sorted((r for r in runs if r.finished and r.phase not in (Phase.SUCCEEDED, Phase.DRY_RUN)),
                 key=key)
    return (good[:max(len(good) - spec.successful_history_limit, 0)]
            + bad[:max(len(bad) - spec.failed_history_limit, 0)])


def _status(previous: dict[str, Any], runs: list[Run], last_schedule: str | None) -> dict[str, Any]:
    active = sorted((r for r in runs if not r.finished), key=lambda r: r.name)
    success = [r.completion_time for r in runs if r.phase == Phase.SUCCEEDED and r.completion_time]
    last_ok = max([t for t in (*success, previous.get("lastSuccessfulTime")) if t],
                  key=lambda t: parse_rfc3339(t), default=None)
    status: dict[str, Any] = {"active": [{"name": r.name, "uid": r.uid} for r in active] or None,
                              "activeCount": len(active)}
    if last_schedule:
        status["lastScheduleTime"] = last_schedule
    if last_ok:
        status["lastSuccessfulTime"] = last_ok
    return status


def plan(name: str, spec: RemoteCronCommandSpec, status: dict[str, Any], created: datetime,
         runs: list[Run], now: datetime) -> CronStep:
    """The next step for one RemoteCronCommand (see the module's docstring)."""
    step = CronStep()
    gone = [r for r in runs if r.finished and r.replaced]
    runs = [r for r in runs if r not in gone]
    step.delete = gone + _history(runs, spec)
    last = status.get("lastScheduleTime")
    step.status = _status(status, runs, last)
    if spec.suspend:
        return step
    schedule = parse(spec.schedule, spec.time_zone)
    earliest = parse_rfc3339(last) if last else created
    deadline = spec.starting_deadline_seconds
    active = [r for r in runs if not r.finished]
    replacing = spec.concurrency_policy == "Replace" and bool(active)
    if deadline is not None and not replacing:
        # (Replace waits up to startingDeadlineSeconds for the running one to stop.)
        earliest = max(earliest, now - timedelta(seconds=deadline))
    times, count = schedule.times_between(earliest, now, MAX_MISSED)
    if not times:
        return step
    if count > MAX_MISSED:
        step.events.append(("Warning", "TooManyMissedTimes",
                            (f"too many missed start times ({count}); set or decrease "
                             "startingDeadlineSeconds or check clock skew; considering only "
                             f"the latest, {rfc3339(times[-1])}")))
    scheduled = times[-1]
    if deadline is not None and now > scheduled + timedelta(seconds=deadline) and not replacing:
        step.events.append(("Warning", "MissSchedule",
                            (f"missed the scheduled time {rfc3339(scheduled)}: its "
                             f"startingDeadlineSeconds ({deadline}s) passed")))
        return step
    if active and spec.concurrency_policy == "Forbid":
        step.events.append(("Normal", "AlreadyActive",
                            (f"not starting the run of {rfc3339(scheduled)}: "
                             f"{', '.join(r.name for r in active)} is still running "
                             "(concurrencyPolicy Forbid)")))
        return step
    if replacing:
        step.cancel = active
        wait = deadline if deadline is not None else REPLACE_WAIT_SECONDS
        if now < scheduled + timedelta(seconds=wait):
            return step  # its processes are being killed; the next tick looks again
        step.delete += active
        step.events.append(("Warning", "ReplacedRunning",
                            f"started the run of {rfc3339(scheduled)} although "
                            + "; ".join(f"{r.name} was not yet stopped ({r.summary or r.phase})"
                                        for r in active)
                            + f" after {wait}s (concurrencyPolicy Replace)"))
    step.create = (run_name(name, scheduled), scheduled)
    step.status["lastScheduleTime"] = rfc3339(scheduled)
    return step
