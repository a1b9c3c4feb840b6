"""Planned disruptions lose nothing: a stopping worker tells its running attempts
(``disruption``); an attempt its grace period could not cover ends WorkerLost naming
the disruption and is retried at once without counting against ``retries.limit``
(unless ``retries.countDisruptions``); worker pods get the RemoteVM's grace period and,
with several replicas or a pool, a PodDisruptionBudget."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controller.budgets import wants_budget, worker_budget
from controller.deployment_runtime import DeploymentSettings, worker_deployment
from controller.reports import apply_attempt_report
from controller.runtime import VMRef, WorkerGroup
from controller.schedule import plan
from remote_tasks.attempt import TRANSFER, Attempt, Cancels
from tests.fakes import ENVELOPE, NOW, AttemptState, entries, queues, spec, status
from vmfleet.api.envelope import Envelope
from vmfleet.api.models import DEFAULT_WORKER_GRACE_SECONDS, RemoteVMSpec
from vmfleet.api.reports import AttemptReport, Event, ResultFields

DISRUPTION = "worker w1 received SIGTERM: it finishes what it runs"


def lost(entry_fields: dict[str, Any], **spec_fields: Any) -> dict[str, Any]:
    entry = entries("Running", worker="w1", pgid=42, processMarker="m", **entry_fields)
    step = plan(spec(**spec_fields), status(entry), NOW, queues=queues(1),
                lost=frozenset({"vm0"}))
    assert step.terminate == [("vm0", 42, "m")]
    first = step.changes[0]  # the lost attempt's end (a retry due now is queued after it)
    return {k: v for k, v in {**entry[0], **first.set}.items() if k not in first.remove}


def test_an_attempt_lost_to_a_disruption_is_retried_at_once_without_counting():
    new = lost({"disruption": DISRUPTION})  # retries.limit 0
    assert (new["phase"], new["attempt"], new["reason"], new["disruptions"]) == (
        "Pending", 2, "WorkerLost", 1)
    assert new["message"].startswith(
        f"w1 was stopped during attempt 1 and its grace period ran out ({DISRUPTION})")
    assert "not counted against retries.limit" in new["message"]
    assert new["retryAfter"] == NOW.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert "disruption" not in new


def test_a_spec_that_counts_disruptions_fails_within_its_limit():
    new = lost({"disruption": DISRUPTION}, retries={"limit": 0, "countDisruptions": True})
    assert (new["phase"], new["reason"]) == ("Failed", "WorkerLost")
    assert DISRUPTION in new["message"]


def test_a_plain_lost_worker_still_counts():
    new = lost({})
    assert (new["phase"], new["reason"]) == ("Failed", "WorkerLost")
    assert new["message"].startswith("w1 stopped reporting during attempt 1")


def report(event: Event, attempt: int, **fields: Any) -> AttemptReport:
    return AttemptReport(event, "ops", "c", "u1", "vm0", attempt, "w1", "t", ResultFields(**fields))


def test_uncounted_disruptions_leave_the_limit_to_real_failures():
    # Attempt 3 after two disruptions is, for retries.limit 1, the first attempt: one retry left.
    new = lost({"attempt": 3, "disruptions": 2}, retries={"limit": 1, "backoffSeconds": 0})
    assert (new["phase"], new["attempt"]) == ("Pending", 4)
    ended = apply_attempt_report(
        spec(retries={"limit": 1, "backoffSeconds": 0}),
        {"vm": "vm0", "phase": "Running", "attempt": 3, "disruptions": 2},
        report(Event.FINISHED, 3, phase="Failed", reason="TransportError"),
        datetime.now(UTC))
    assert ended is not None and (ended["phase"], ended["attempt"]) == ("Pending", 4)


def test_the_disruption_report_marks_the_running_entry_and_goes_with_the_attempt():
    running = {"vm": "vm0", "phase": "Running", "attempt": 1, "worker": "w1"}
    marked = apply_attempt_report(spec(), running, report(Event.PROGRESS, 1, disruption=DISRUPTION),
                                  datetime.now(UTC))
    assert marked is not None and marked["disruption"] == DISRUPTION
    done = apply_attempt_report(spec(), marked, report(Event.FINISHED, 1, phase="Succeeded", reason="Completed",
                                                       exit_code=0), datetime.now(UTC))
    assert done is not None and "disruption" not in done and done["phase"] == "Succeeded"


def test_a_stopping_worker_tells_each_claimed_attempt():
    """Commands and transfers alike (one attempt protocol): every entry a running attempt
    claimed reports the disruption; an attempt that has claimed nothing reports nothing."""
    state = AttemptState()
    cancels = Cancels()
    running = Attempt(state, ENVELOPE, "w1")  # type: ignore[arg-type]
    waiting = Attempt(state, Envelope("ns", "d", "uid-2", "vm1", 1, "", {}), "w1")  # type: ignore[arg-type]
    copying = Attempt(state, Envelope("ns", "copy", "uid-3", "vm2", 1, "", {}), "w1",  # type: ignore[arg-type]
                      words=TRANSFER)
    assert running.take() and copying.take() and copying.take("vm3")
    with cancels.running(running), cancels.running(waiting), cancels.running(copying):
        assert cancels.draining(DISRUPTION) == 3
    assert [(r["uid"], r["vm"], r["event"], r["fields"]) for r in state.reports] == [
        ("uid-1", "vm1", "progress", {"disruption": DISRUPTION}),
        ("uid-3", "vm2", "progress", {"disruption": DISRUPTION}),
        ("uid-3", "vm3", "progress", {"disruption": DISRUPTION}),
    ]


def ref(name: str, **spec_fields: Any) -> VMRef:
    body = {"host": "10.0.0.1", "user": "u", "credentialsSecretRef": {"name": f"{name}-ssh"},
            **spec_fields}
    return VMRef("ops", name, f"u-{name}", RemoteVMSpec.model_validate(body))


@pytest.mark.parametrize("workers,grace", [
    (None, DEFAULT_WORKER_GRACE_SECONDS),
    ({"replicas": 1, "terminationGracePeriodSeconds": 45}, 45),
])
def test_worker_pods_get_the_vms_grace_period(workers, grace):
    vm = ref("vm1", **({"workers": workers} if workers else {}))
    body = worker_deployment(WorkerGroup("ops", [vm]), DeploymentSettings("img:1", "redis://b"), 1)
    assert body["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace


def test_a_pool_takes_its_vms_largest_grace():
    pool = WorkerGroup("ops", [ref("a", workers={"replicas": 1, "terminationGracePeriodSeconds": 30},
                                   workerPool="p"),
                               ref("b", workers={"replicas": 1, "terminationGracePeriodSeconds": 600},
                                   workerPool="p")], pool="p")
    assert pool.termination_grace == 600


@pytest.mark.parametrize("workers,pool,wanted", [
    (None, None, False),
    ({"replicas": 1}, None, False),
    ({"replicas": 2}, None, True),
    ({"autoscale": {"minReplicas": 0, "maxReplicas": 3}}, None, True),
    ({"autoscale": {"minReplicas": 0, "maxReplicas": 1}}, None, False),
    (None, "p", True),
])
def test_budgets_for_several_replicas_and_pools(workers, pool, wanted):
    fields: dict[str, Any] = {"workers": workers} if workers else {}
    if pool:
        fields["workerPool"] = pool
    group = WorkerGroup("ops", [ref("vm1", **fields)], pool=pool)
    assert wants_budget(group) is wanted


def test_the_budget_lets_one_pod_go_at_a_time():
    group = WorkerGroup("ops", [ref("vm1", workers={"replicas": 2})])
    labels = {"vmfleet.io/vm": "vm1"}
    body = worker_budget(group, labels, [{"kind": "RemoteVM", "name": "vm1"}])
    assert body["kind"] == "PodDisruptionBudget" and body["apiVersion"] == "policy/v1"
    assert body["metadata"]["name"] == group.deployment
    assert body["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
