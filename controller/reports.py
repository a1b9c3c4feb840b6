"""What a worker's report does to a result entry (pure).

Reports may arrive twice (a redelivery after a controller restart) and out of order (a
claim after its own result): each applies only to the entry's current attempt and only
moves it forward — Queued → Running → an end state (or Pending for the next attempt, the
one retry policy of ``vmfleet.policy``) — so applying one again changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from vmfleet.api.constants import Phase
from vmfleet.api.envelope import rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.policy import backoff_seconds, counted_attempt, should_retry

CLAIMED = "claimed"
PROGRESS = "progress"
FINISHED = "finished"

# Fields of an entry that belong to one running attempt and go when it ends.
ATTEMPT_FIELDS = ("pgid", "processMarker", "heartbeatTime", "lostPgid", "lostMarker", "retryAfter",
                  "disruption")


def apply_attempt_report(spec: RemoteCommandSpec, entry: dict[str, Any], report: dict[str, Any],
                         now: datetime) -> dict[str, Any] | None:
    """The entry after ``report``, or None when the report is stale or already applied."""
    if int(report.get("attempt") or 0) != int(entry.get("attempt") or 1):
        return None
    phase = entry.get("phase")
    fields = dict(report.get("fields") or {})
    event = report.get("event")
    if event == CLAIMED:
        if phase not in (Phase.QUEUED, Phase.PENDING):
            return None
        new = {k: v for k, v in entry.items() if k not in ("lostPgid", "lostMarker", "retryAfter")}
        new.update(fields, phase=Phase.RUNNING)
        for key in ("reason", "message", "exitCode", "completionTime"):
            new.pop(key, None)  # a previous attempt's
        return new
    if event == PROGRESS:
        if phase != Phase.RUNNING:
            return None
        new = dict(entry)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(new.get(key), dict):
                new[key] = {**new[key], **value}
            else:
                new[key] = value
        return new if new != entry else None
    if event == FINISHED:
        if phase in Phase.TERMINAL:
            return None
        return finished_entry(spec, entry, fields, now)
    return None


def finished_entry(spec: RemoteCommandSpec, entry: dict[str, Any], fields: dict[str, Any],
                   now: datetime) -> dict[str, Any]:
    """The entry once its attempt ended as ``fields`` say; a retry when the spec allows."""
    new = {k: v for k, v in entry.items() if k not in ATTEMPT_FIELDS}
    for key in ("exitCode", "signal", "message", "reason"):
        new.pop(key, None)
    new.update(fields)
    attempt = int(entry.get("attempt") or 1)
    if new.get("phase") == Phase.FAILED and should_retry(
            spec, counted_attempt(spec, entry), str(new.get("reason")), new.get("exitCode")):
        delay = backoff_seconds(spec, attempt)
        new.update(
            phase=Phase.PENDING, attempt=attempt + 1,
            retryAfter=rfc3339(now + timedelta(seconds=delay)),
            message=f"attempt {attempt} failed ({new.get('reason')}): "
                    f"{new.get('message') or new.get('reason')}; next attempt after {delay:.0f}s",
        )
        new.pop("completionTime", None)
    return new


__all__ = ["ATTEMPT_FIELDS", "CLAIMED", "FINISHED", "PROGRESS", "apply_attempt_report",
           "finished_entry"]
