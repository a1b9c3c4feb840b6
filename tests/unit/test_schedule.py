"""The controller's scheduling of attempts (pure) and the retry policy."""

import pytest

from controller.policy import backoff_seconds, should_retry
from controller.schedule import Timing, plan
from tests.fakes import NOW, entries, queues, spec, status, ts


def test_first_attempts_start_up_to_max_parallel():
    p = plan(spec(maxParallel=3), status(entries(*["Pending"] * 5)), NOW, queues=queues(5))
    assert p.dispatch == [("vm0", 1), ("vm1", 1), ("vm2", 1)]
    assert [c.set["phase"] for c in p.changes] == ["Queued"] * 3


def test_running_ones_count_against_max_parallel():
    results = entries("Running", "Queued", "Succeeded", "Pending", "Pending")
    p = plan(spec(maxParallel=3), status(results), NOW, queues=queues(5))
    assert p.dispatch == [("vm3", 1)]


def test_without_max_parallel_everything_starts():
    p = plan(spec(), status(entries(*["Pending"] * 4)), NOW, queues=queues(4))
    assert len(p.dispatch) == 4


def test_max_failures_cancels_what_has_not_started():
    results = entries("Failed", "Running", "Pending", "Pending")
    results[3]["attempt"] = 2  # a retry of a started VM continues
    p = plan(spec(maxFailures=1), status(results), NOW, queues=queues(4))
    cancelled = {c.vm: c.set for c in p.changes if c.set.get("phase") == "Cancelled"}
    assert list(cancelled) == ["vm2"]
    assert cancelled["vm2"]["reason"] == "MaxFailuresReached"
    assert cancelled["vm2"]["message"] == "not started: 1 VMs failed (maxFailures 1)"
    assert p.dispatch == [("vm3", 2)]


def test_retry_waits_for_retry_after():
    results = entries("Pending", "Pending")
    results[0].update(attempt=2, retryAfter=ts(-10))  # 10 s in the future
    results[1].update(attempt=2, retryAfter=ts(1), lostPgid=77)
    p = plan(spec(), status(results), NOW, queues=queues(2))
    assert p.dispatch == [("vm1", 2)]
    (change,) = p.changes
    assert change.remove == ("retryAfter",)  # lostPgid stays for the next attempt to terminate


def test_lost_worker_is_retried_when_allowed_and_its_group_terminated():
    results = entries("Running", pgid=4242, processMarker="abc", heartbeatTime=ts(60), worker="w1")
    p = plan(spec(retries={"limit": 1, "backoffSeconds": 5}), status(results), NOW,
             queues=queues(1), lost=frozenset({"vm0"}))
    assert p.terminate == [("vm0", 4242, "abc")]
    (change,) = p.changes
    assert change.set["phase"] == "Pending" and change.set["attempt"] == 2
    assert change.set["reason"] == "WorkerLost"
    assert change.set["message"] == ("w1 stopped reporting during attempt 1; process group 4242 "
                                     "is terminated; next attempt after 5s")
    assert (change.set["lostPgid"], change.set["lostMarker"]) == (4242, "abc")
    assert change.set["retryAfter"] == ts(-5)
    assert set(change.remove) == {"pgid", "processMarker", "heartbeatTime"}
    assert p.dispatch == []  # the retry waits for its retryAfter


def test_lost_worker_without_retries_fails():
    results = entries("Running", pgid=9)
    p = plan(spec(), status(results), NOW, queues=queues(1), lost=frozenset({"vm0"}))
    (change,) = p.changes
    assert (change.set["phase"], change.set["reason"]) == ("Failed", "WorkerLost")
    assert "process group 9 is terminated" in change.set["message"]
    assert p.terminate == [("vm0", 9, None)]


def test_a_lost_attempt_past_the_deadline_is_not_retried():
    results = entries("Running", pgid=9)
    p = plan(spec(retries={"limit": 3}, activeDeadlineSeconds=10), status(results, started=11),
             NOW, queues=queues(1), lost=frozenset({"vm0"}))
    (change,) = p.changes
    assert (change.set["phase"], change.set["reason"]) == ("Failed", "WorkerLost")


def test_only_the_lost_vms_attempts_end():
    """A heartbeat's age is Redis's business now: a Running entry not named lost stays,
    however old the heartbeatTime it carries."""
    results = entries("Running", "Running", pgid=9, heartbeatTime=ts(3600))
    p = plan(spec(), status(results), NOW, queues=queues(2), lost=frozenset({"vm1"}))
    assert [c.vm for c in p.changes] == ["vm1"]
    assert not plan(spec(), status(results), NOW, queues=queues(2))


def test_deadline_fails_what_did_not_start():
    results = entries("Pending", "Queued", "Running", heartbeatTime=ts(1))
    p = plan(spec(activeDeadlineSeconds=10), status(results, started=11), NOW, queues=queues(3))
    assert {c.vm: c.set["reason"] for c in p.changes} == {"vm0": "DeadlineExceeded",
                                                           "vm1": "DeadlineExceeded"}
    assert p.dispatch == []


def test_paused_and_missing_vms_get_nothing_dispatched():
    p = plan(spec(), status(entries("Pending", "Pending")), NOW,
             queues={"vm0": "q0", "vm1": None}, paused=frozenset({"vm0"}))
    assert p.dispatch == []
    (change,) = p.changes
    assert (change.vm, change.set["reason"]) == ("vm1", "VMNotFound")


def test_unclaimed_dispatch_is_sent_again():
    results = entries("Queued", "Queued")
    results[0]["dispatchTime"] = ts(400)
    results[1]["dispatchTime"] = ts(10)
    p = plan(spec(), status(results), NOW, queues=queues(2), timing=Timing(redispatch_after=300))
    assert p.dispatch == [("vm0", 1)]


@pytest.mark.parametrize(
    ("retries", "attempt", "reason", "exit_code", "expected"),
    [
        ({"limit": 0}, 1, "TransportError", None, False),
        ({"limit": 1}, 1, "TransportError", None, True),
        ({"limit": 1}, 2, "TransportError", None, False),
        ({"limit": 3}, 1, "AuthFailed", None, True),
        ({"limit": 3}, 1, "WorkerLost", None, True),
        ({"limit": 3}, 1, "HostKeyMismatch", None, False),
        ({"limit": 3}, 1, "Timeout", None, False),
        ({"limit": 3}, 1, "ExitCode", 3, False),
        ({"limit": 3, "onExitCodes": [3]}, 1, "ExitCode", 3, True),
        ({"limit": 3, "onExitCodes": [3]}, 4, "ExitCode", 3, False),
    ],
)
def test_should_retry(retries, attempt, reason, exit_code, expected):
    assert should_retry(spec(retries=retries), attempt, reason, exit_code) is expected


def test_backoff_doubles_and_is_capped():
    s = spec(retries={"limit": 20, "backoffSeconds": 10})
    assert [backoff_seconds(s, n) for n in (1, 2, 3)] == [10, 20, 40]
    assert backoff_seconds(s, 15) == 3600
    assert backoff_seconds(spec(retries={"backoffSeconds": 0}), 3) == 0
