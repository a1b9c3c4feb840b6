"""Backlog-driven worker scaling: pure recommendation, stabilization, wake on dispatch."""

from __future__ import annotations

import pytest

from controller.backlog import entry_counts
from controller.scaling import Autoscaler, prune, recommend, stabilize
from vmfleet.api.models import WorkersSpec


def auto(min_=0, max_=3, target=4, delay=10):
    return WorkersSpec.model_validate({"autoscale": {
        "minReplicas": min_, "maxReplicas": max_, "targetBacklogPerReplica": target,
        "scaleDownDelaySeconds": delay}})


@pytest.mark.parametrize("workers, backlog, expected", [
    (None, 0, 1),
    (WorkersSpec(replicas=3), 100, 3),
    (WorkersSpec(replicas=0), 5, 0),
    (auto(), 0, 0),
    (auto(), 1, 1),
    (auto(), 4, 1),
    (auto(), 5, 2),
    (auto(), 50, 3),          # clamped to maxReplicas
    (auto(min_=2), 0, 2),     # clamped to minReplicas
    (auto(target=1, max_=10), 7, 7),
    (auto(), -3, 0),
])
def test_recommend(workers, backlog, expected):
    assert recommend(workers, backlog) == expected


@pytest.mark.parametrize("history, now, delay, expected", [
    ([], 0, 10, 0),
    ([(0, 3)], 100, 10, 3),                    # the newest counts whatever its age
    ([(0, 3), (5, 0)], 6, 10, 3),              # within the delay: keep 3
    ([(0, 3), (5, 0), (11, 0)], 11, 10, 0),    # the 3 is older than the delay
    ([(0, 0), (1, 2)], 1, 10, 2),              # scale up at once
    ([(0, 1), (4, 3), (8, 2)], 9, 10, 3),
])
def test_stabilize(history, now, delay, expected):
    assert stabilize(history, now, delay) == expected


def test_prune_keeps_the_newest():
    assert prune([(0, 1), (1, 2)], 100, 10) == [(1, 2)]
    assert prune([(0, 1), (95, 2)], 100, 10) == [(95, 2)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_autoscaler_scales_up_at_once_and_down_after_the_delay():
    clock = Clock()
    scaler = Autoscaler(clock)
    workers = auto(delay=10)
    assert scaler.decide("ns/vm", workers, 0, 0, current=0).replicas == 0
    clock.t += 1
    d = scaler.decide("ns/vm", workers, 49, 1, current=0)
    assert (d.replicas, d.backlog, d.queue_depth, d.running) == (3, 50, 49, 1)
    clock.t += 5
    assert scaler.decide("ns/vm", workers, 0, 2, current=3).replicas == 3  # within the delay
    clock.t += 11
    assert scaler.decide("ns/vm", workers, 0, 2, current=3).replicas == 1  # 2 running: 1 worker
    clock.t += 11
    assert scaler.decide("ns/vm", workers, 0, 0, current=1).replicas == 0
    assert scaler.last("ns/vm") == 0


def test_after_a_restart_what_runs_is_kept_for_one_delay():
    clock = Clock()
    scaler = Autoscaler(clock)
    assert scaler.decide("ns/vm", auto(delay=10), 0, 0, current=2).replicas == 2
    clock.t += 11
    assert scaler.decide("ns/vm", auto(delay=10), 0, 0, current=2).replicas == 0


def test_wake_gives_a_worker_now_and_keeps_it_for_the_delay():
    clock = Clock()
    scaler = Autoscaler(clock)
    workers = auto(delay=10)
    assert scaler.decide("ns/vm", workers, 0, 0, current=0).replicas == 0
    assert scaler.wake("ns/vm", workers) == 1
    clock.t += 2
    assert scaler.decide("ns/vm", workers, 0, 0, current=1).replicas == 1
    clock.t += 10
    assert scaler.decide("ns/vm", workers, 0, 0, current=1).replicas == 0


def test_fixed_replicas_ignore_the_backlog():
    scaler = Autoscaler(Clock())
    assert scaler.decide("ns/vm", WorkersSpec(replicas=2), 100, 5, current=0).replicas == 2
    assert scaler.decide("ns/vm", None, 100, 5, current=0).replicas == 1


def test_entry_counts_are_queued_and_running_entries_per_vm():
    """The backlog the autoscaler sees: from the controller's own copy of the commands."""
    from types import SimpleNamespace

    run, copy = SimpleNamespace(transfer=None), SimpleNamespace(transfer=object())
    commands = [
        SimpleNamespace(namespace="ns", spec=run,
                        status={"results": [{"vm": "vm1", "phase": "Running"},
                                            {"vm": "vm2", "phase": "Running"}]}),
        SimpleNamespace(namespace="ns", spec=run,
                        status={"results": [{"vm": "vm1", "phase": "Queued"},
                                            {"vm": "vm1", "phase": "Succeeded"}]}),
        SimpleNamespace(namespace="other", spec=run,
                        status={"results": [{"vm": "vm1", "phase": "Queued"}]}),
        SimpleNamespace(namespace="ns", spec=run, status={}),
        # Transfers run on the namespace's transfer worker: its backlog, not their VMs'.
        SimpleNamespace(namespace="ns", spec=copy,
                        status={"results": [{"vm": "vm2", "phase": "Queued"},
                                            {"vm": "vm3", "phase": "Running"}]}),
    ]
    counts = entry_counts(commands)
    assert counts[("ns", "vm1")] == (1, 1)
    assert counts[("ns", "vm2")] == (0, 1)
    assert counts[("other", "vm1")] == (1, 0)
    assert counts[("ns", ":transfers")] == (1, 1)
    assert ("ns", "vm3") not in counts
