"""Retry policy of RemoteCommands: which ended attempts run again, and when.

Pure functions of the controller, which alone decides whether an attempt runs again: an
attempt a worker reported ended (``controller.reports``) or one whose worker was lost
(``controller.schedule``). Workers only report.
"""

from __future__ import annotations

from typing import Any

from vmfleet.api.constants import Reason
from vmfleet.api.models import RemoteCommandSpec

# Attempts that never reached (or lost) the VM: retried within retries.limit.
TRANSPORT_REASONS = frozenset({Reason.TRANSPORT_ERROR, Reason.AUTH_FAILED, Reason.WORKER_LOST})
MAX_BACKOFF_SECONDS = 3600


def should_retry(spec: RemoteCommandSpec, attempt: int, reason: str, exit_code: int | None) -> bool:
    """True when attempt ``attempt`` ended with ``reason`` and the spec allows another one.

    Transport errors (connect, auth, broken connection, lost worker) are retried within
    ``retries.limit``; a command that ran and exited only for an exit code listed in
    ``retries.onExitCodes``. Timeouts, host key mismatches and cancellations never are.
    """
    if attempt > spec.retries.limit:
        return False
    if reason in TRANSPORT_REASONS:
        return True
    return reason == Reason.EXIT_CODE and exit_code in spec.retries.on_exit_codes


def counted_attempt(spec: RemoteCommandSpec, entry: dict[str, Any]) -> int:
    """The entry's attempt number as ``retries.limit`` counts it: attempts lost to planned
    disruptions (``disruptions``) do not count unless ``retries.countDisruptions``."""
    attempt = int(entry.get("attempt") or 1)
    if spec.retries.count_disruptions:
        return attempt
    return max(1, attempt - int(entry.get("disruptions") or 0))


def backoff_seconds(spec: RemoteCommandSpec, attempt: int) -> float:
    """Wait before attempt ``attempt + 1``: backoffSeconds doubled per attempt, capped at 1h."""
    base = spec.retries.backoff_seconds
    return float(min(base * 2 ** max(attempt - 1, 0), MAX_BACKOFF_SECONDS))
