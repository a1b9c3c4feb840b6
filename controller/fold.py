"""Fold the per-VM results of a RemoteCommand into its phase, summary and conditions.

Pure: ``fold(results, previous_status, now)`` returns the command-level status fields.
Only the controller writes them (the one writer of status): workers report through
Redis, ``controller.reports`` applies each report to the command's results, and this fold
turns the results into the command-level fields of the same status write.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from vmfleet.api.constants import Condition, Phase, Reason
from vmfleet.api.reports import F

Status = dict[str, Any]


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str, now: str
) -> list[dict[str, Any]]:
    """Return ``conditions`` with one condition set; its transition time moves only on change."""
    out = []
    found = False
    for condition in conditions:
        if condition.get("type") == type_:
            found = True
            changed = condition.get("status") != status
            condition = {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now if changed else condition.get("lastTransitionTime", now),
            }
        out.append(condition)
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now})
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, int]:
    phases = Counter(entry.get("phase", Phase.PENDING) for entry in results)
    return {
        "targets": len(results),
        "pending": phases[Phase.PENDING] + phases[Phase.QUEUED],
        "running": phases[Phase.RUNNING],
        "succeeded": phases[Phase.SUCCEEDED],
        "failed": phases[Phase.FAILED],
        "cancelled": phases[Phase.CANCELLED],
    }


def overall_phase(results: list[dict[str, Any]]) -> str:
    phases = [entry.get("phase", Phase.PENDING) for entry in results]
    if not phases:
        return Phase.FAILED
    if all(phase in Phase.TERMINAL for phase in phases):
        if all(phase == Phase.SUCCEEDED for phase in phases):
            return Phase.SUCCEEDED
        if any(phase == Phase.FAILED for phase in phases):
            return Phase.FAILED
        return Phase.CANCELLED
    if any(phase not in (Phase.PENDING, Phase.QUEUED) for phase in phases):
        return Phase.RUNNING
    return Phase.PENDING


def _failure_message(results: list[dict[str, Any]]) -> tuple[str, str]:
    failed = [entry for entry in results if entry.get("phase") == Phase.FAILED]
    if not results:
        return Reason.NO_TARGETS, "no RemoteVM matched the target"
    first = failed[0]
    detail = first.get("message") or first.get("reason") or "failed"
    prefix = f"{len(failed)} of {len(results)} VMs failed; " if len(results) > 1 else ""
    return first.get("reason") or Reason.FAILED, f"{prefix}{first['vm']}: {detail}"


def fold(results: list[dict[str, Any]], previous: Status | None, now: str) -> Status:
    """The controller-owned status fields for these results."""
    previous = previous or {}
    summary = summarize(results)
    phase = overall_phase(results)
    conditions: list[dict[str, Any]] = list(previous.get("conditions") or [])
    status: Status = {
        "phase": phase,
        "summary": summary,
        "completions": f"{summary['succeeded']}/{summary['targets']}",
    }
    if phase in Phase.TERMINAL:
        if phase == Phase.SUCCEEDED:
            n = summary["targets"]
            message = f"succeeded on {n} VM{'s' if n != 1 else ''}"
            conditions = set_condition(conditions, Condition.COMPLETE, "True", Reason.COMPLETED,
                                       message, now)
        elif phase == Phase.FAILED:
            reason, message = _failure_message(results)
            conditions = set_condition(conditions, Condition.FAILED, "True", reason, message, now)
        else:
            reason, message = Reason.CANCELLED, "cancelled"
        conditions = set_condition(conditions, Condition.FINISHED, "True", phase, message, now)
        times = [entry[F.COMPLETION_TIME] for entry in results if entry.get(F.COMPLETION_TIME)]
        status[F.COMPLETION_TIME] = previous.get(F.COMPLETION_TIME) or (max(times) if times else now)
    status["conditions"] = conditions
    return status


def changed(previous: Status | None, folded: Status) -> bool:
    previous = previous or {}
    return any(previous.get(key) != value for key, value in folded.items())
