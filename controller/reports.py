"""What a worker's report does to a result entry (pure).

Reports may arrive twice (a redelivery after a controller restart) and out of order (a
claim after its own result): each applies only to the entry's current attempt and only
moves it forward — Queued → Running → an end state (or Pending for the next attempt, the
one retry policy of ``controller.policy``) — so applying one again changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from controller.policy import backoff_seconds, counted_attempt, should_retry
from vmfleet.api.constants import Phase
from vmfleet.api.envelope import rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import AttemptReport, Event, F

# Fields of an entry that belong to one running attempt and go when it ends.
ATTEMPT_FIELDS = (F.PGID, F.PROCESS_MARKER, F.HEARTBEAT_TIME, F.LOST_PGID, F.LOST_MARKER,
                  F.RETRY_AFTER, F.DISRUPTION)


def apply_attempt_report(spec: RemoteCommandSpec, entry: dict[str, Any], report: AttemptReport,
                         now: datetime) -> dict[str, Any] | None:
    """The entry after ``report``, or None when the report is stale or already applied."""
    if report.attempt != int(entry.get(F.ATTEMPT) or 1):
        return None
    phase = entry.get(F.PHASE)
    fields = report.fields.wire()
    event = report.event
    if event == Event.CLAIMED:
        if phase not in (Phase.QUEUED, Phase.PENDING):
            return None
        new = {k: v for k, v in entry.items() if k not in (F.LOST_PGID, F.LOST_MARKER, F.RETRY_AFTER)}
        new.update(fields, phase=Phase.RUNNING)
        for key in (F.REASON, F.MESSAGE, F.EXIT_CODE, F.COMPLETION_TIME):
            new.pop(key, None)  # a previous attempt's
        return new
    if event == Event.PROGRESS:
        if phase != Phase.RUNNING:
            return None
        new = dict(entry)
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(new.get(key), dict):
                new[key] = {**new[key], **value}
            else:
                new[key] = value
        return new if new != entry else None
    if event == Event.FINISHED:
        if phase in Phase.TERMINAL:
            return None
        return finished_entry(spec, entry, fields, now)
    return None


def finished_entry(spec: RemoteCommandSpec, entry: dict[str, Any], fields: dict[str, Any],
                   now: datetime) -> dict[str, Any]:
    """The entry once its attempt ended as ``fields`` say; a retry when the spec allows."""
    new = {k: v for k, v in entry.items() if k not in ATTEMPT_FIELDS}
    for key in (F.EXIT_CODE, F.SIGNAL, F.MESSAGE, F.REASON):
        new.pop(key, None)
    new.update(fields)
    attempt = int(entry.get(F.ATTEMPT) or 1)
    if new.get(F.PHASE) == Phase.FAILED and should_retry(
            spec, counted_attempt(spec, entry), str(new.get(F.REASON)), new.get(F.EXIT_CODE)):
        delay = backoff_seconds(spec, attempt)
        new.update(
            phase=Phase.PENDING, attempt=attempt + 1,
            retryAfter=rfc3339(now + timedelta(seconds=delay)),
            message=f"attempt {attempt} failed ({new.get('reason')}): "
                    f"{new.get('message') or new.get('reason')}; next attempt after {delay:.0f}s",
        )
        new.pop(F.COMPLETION_TIME, None)
    return new


__all__ = ["ATTEMPT_FIELDS", "apply_attempt_report", "finished_entry"]
