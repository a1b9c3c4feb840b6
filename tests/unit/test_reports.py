"""What a worker's report does to a result entry (controller.reports, pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from controller.reports import apply_attempt_report
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import AttemptReport

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
SPEC = RemoteCommandSpec.model_validate({"vm": "vm1", "command": "true"})


def report(event: str, attempt: int = 1, **fields: Any) -> AttemptReport:
    return AttemptReport.from_message({
        "kind": "attempt", "event": event, "namespace": "ns", "name": "c", "uid": "u",
        "vm": "vm1", "attempt": attempt, "worker": "w1", "fields": fields})


def queued(attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"vm": "vm1", "host": "h", "phase": "Queued", "attempt": attempt, "dispatchTime": "t0",
            **extra}


CLAIM = report("claimed", phase="Running", startTime="t1", worker="w1", pgid=42, processMarker="m")
DONE = report("finished", phase="Succeeded", reason="Completed", exitCode=0, completionTime="t2")


def test_a_claim_makes_the_entry_running_with_its_process_group() -> None:
    new = apply_attempt_report(SPEC, queued(), CLAIM, NOW)
    assert new == {"vm": "vm1", "host": "h", "phase": "Running", "attempt": 1, "dispatchTime": "t0",
                   "startTime": "t1", "worker": "w1", "pgid": 42, "processMarker": "m"}


def test_a_retry_claim_drops_the_previous_attempts_result_and_lost_group() -> None:
    entry = queued(2, reason="WorkerLost", message="lost", lostPgid=7, lostMarker="x")
    new = apply_attempt_report(SPEC, entry, report("claimed", 2, phase="Running"), NOW)
    assert new is not None
    assert not {"reason", "message", "lostPgid", "lostMarker"} & set(new)


def test_a_stale_attempts_report_is_ignored() -> None:
    entry = queued(2)
    assert apply_attempt_report(SPEC, entry, CLAIM, NOW) is None  # attempt 1's claim
    assert apply_attempt_report(SPEC, entry, DONE, NOW) is None


def test_a_claim_that_arrives_after_the_result_is_ignored() -> None:
    done = apply_attempt_report(SPEC, queued(), DONE, NOW)
    assert done is not None and done["phase"] == "Succeeded"
    assert apply_attempt_report(SPEC, done, CLAIM, NOW) is None


def test_a_result_applied_twice_changes_nothing() -> None:
    running = apply_attempt_report(SPEC, queued(), CLAIM, NOW)
    assert running is not None
    done = apply_attempt_report(SPEC, running, DONE, NOW)
    assert done is not None
    assert (done["phase"], done["exitCode"], done["completionTime"]) == ("Succeeded", 0, "t2")
    assert not {"pgid", "processMarker", "heartbeatTime"} & set(done)  # the attempt's own
    assert apply_attempt_report(SPEC, done, DONE, NOW) is None


def test_progress_merges_into_a_running_entry_only() -> None:
    running = apply_attempt_report(SPEC, queued(), CLAIM, NOW)
    assert running is not None
    running["transfer"] = {"bytes": 1, "totalBytes": 10}
    step = report("progress", transfer={"bytes": 5}, heartbeatTime="t3")
    new = apply_attempt_report(SPEC, running, step, NOW)
    assert new is not None and new["transfer"] == {"bytes": 5, "totalBytes": 10}
    assert apply_attempt_report(SPEC, new, step, NOW) is None  # nothing new
    assert apply_attempt_report(SPEC, queued(), step, NOW) is None


def test_a_failure_the_spec_retries_becomes_the_next_attempt_pending() -> None:
    spec = RemoteCommandSpec.model_validate({"vm": "vm1", "command": "x",
                                             "retries": {"limit": 2, "backoffSeconds": 10}})
    running = apply_attempt_report(spec, queued(), CLAIM, NOW)
    assert running is not None
    failed = report("finished", phase="Failed", reason="TransportError", message="refused",
                    completionTime="t2")
    new = apply_attempt_report(spec, running, failed, NOW)
    assert new is not None
    assert (new["phase"], new["attempt"], new["reason"]) == ("Pending", 2, "TransportError")
    assert new["retryAfter"] == "2026-11-23T12:00:10.000Z"
    assert new["message"] == "attempt 1 failed (TransportError): refused; next attempt after 10s"
    assert "completionTime" not in new and "pgid" not in new


def test_exit_codes_are_retried_only_when_listed_and_within_the_limit() -> None:
    spec = RemoteCommandSpec.model_validate({"vm": "vm1", "command": "x",
                                             "retries": {"limit": 1, "onExitCodes": [3]}})
    for code, attempt, phase in ((3, 1, "Pending"), (4, 1, "Failed"), (3, 2, "Failed")):
        entry = {"vm": "vm1", "phase": "Running", "attempt": attempt}
        ended = report("finished", attempt, phase="Failed", reason="ExitCode", exitCode=code,
                       completionTime="t2")
        new = apply_attempt_report(spec, entry, ended, NOW)
        assert new is not None and new["phase"] == phase, (code, attempt)


def test_a_timeout_is_never_retried() -> None:
    spec = RemoteCommandSpec.model_validate({"vm": "vm1", "command": "x", "retries": {"limit": 5}})
    entry = {"vm": "vm1", "phase": "Running", "attempt": 1}
    new = apply_attempt_report(spec, entry, report("finished", phase="Failed", reason="Timeout"), NOW)
    assert new is not None and (new["phase"], new["attempt"]) == ("Failed", 1)
