"""RemoteVMs the controller refuses (controller.vmcheck): a queue outside the namespace,
a reserved or shared queue, a spec that does not parse. The VM says why (Ready=False,
InvalidSpec, a Warning Event), gets no worker, and commands aimed at it fail at once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from controller import schedule, vmcheck
from tests.fakes import command_object, controller_parts, vm_object
from vmfleet.api.constants import Phase, Reason, transfer_queue
from vmfleet.api.models import RemoteCommandSpec


@pytest.mark.parametrize("queue, fragment", [
    ("vmfleet.other.db", "outside namespace ns"),
    ("celery", "must start with 'vmfleet.ns.'"),
    ("vmfleet.ns", "must start with 'vmfleet.ns.'"),
    ("vmfleet.ns.", "needs a name"),
    ("vmfleet.ns.a:b", "':' is reserved"),
    (transfer_queue("ns"), "must start with 'vmfleet.ns.'"),
    ("vmfleet.nsx.db", "outside namespace ns"),
])
def test_a_queue_outside_the_namespace_prefix_is_refused(queue: str, fragment: str) -> None:
    problem = vmcheck.queue_problem("ns", queue)
    assert problem is not None and "spec.queue" in problem and fragment in problem


@pytest.mark.parametrize("queue", ["vmfleet.ns.db", "vmfleet.ns.a.b", "vmfleet.ns.transfers"])
def test_a_queue_under_the_prefix_is_served(queue: str) -> None:
    assert vmcheck.queue_problem("ns", queue) is None


def test_two_vms_never_share_a_queue_the_later_one_is_refused_naming_the_other() -> None:
    first = vm_object("b-first", created="2026-12-06T10:00:00Z", queue="vmfleet.ns.shared")
    later = vm_object("a-later", created="2026-12-06T11:00:00Z", queue="vmfleet.ns.shared")
    pooled = [vm_object(n, workerPool="p", queue="vmfleet.ns.p") for n in ("p1", "p2")]
    other_ns = vm_object("x", namespace="other", queue="vmfleet.other.shared")
    found = vmcheck.problems([later, first, *pooled, other_ns])
    assert set(found) == {("ns", "a-later"), ("ns", "p2")}
    assert "RemoteVM b-first" in found[("ns", "a-later")]
    assert "RemoteVM p1" in found[("ns", "p2")]  # pool members each need their own queue
    # The default queue of a VM named like a taken queue's tail collides too.
    named = vm_object("shared", created="2026-12-06T12:00:00Z")
    assert "RemoteVM b-first" in vmcheck.problems([first, named])[("ns", "shared")]


def test_an_unparsable_spec_is_refused_naming_its_field() -> None:
    both = vm_object("vm1", workers={"replicas": 1, "autoscale": {"maxReplicas": 2}})
    assert vmcheck.problems([both])[("ns", "vm1")].startswith("spec.workers")


def test_a_refused_vm_says_why_once_gets_no_worker_and_its_commands_fail_at_once() -> None:
    parts = controller_parts()
    good = vm_object("vm1")
    foreign = vm_object("vm2", queue="vmfleet.other.vm1")
    parts.kube.vms.extend([good, foreign])
    for obj in (good, foreign):
        parts.fleet.seen(obj)
    parts.fleet.tick(force=True)
    parts.fleet.tick()
    ready = parts.kube.conditions("vm2")["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", Reason.INVALID_SPEC)
    assert "spec.queue 'vmfleet.other.vm1'" in ready["message"]
    (event,) = parts.kube.events  # posted once, not at every tick
    assert (event["type"], event["reason"]) == ("Warning", Reason.INVALID_SPEC)
    assert event["involvedObject"]["name"] == "vm2"
    assert set(parts.runtime.applied) == {"ns/vm1", "ns/:transfers"}  # no worker for vm2
    parts.commands.observe(command_object("c2", vm="vm2"))
    parts.commands.observe(command_object("c1", vm="vm1"))
    two, one = parts.commands.get("uid-ns-c2"), parts.commands.get("uid-ns-c1")
    assert two is not None and one is not None
    (entry,) = two.status["results"]
    assert (entry["phase"], entry["reason"]) == (Phase.FAILED, Reason.INVALID_SPEC)
    assert "RemoteVM vm2 is refused: spec.queue" in entry["message"]
    assert two.status["phase"] == Phase.FAILED
    assert [q for _, _, q in parts.sent] == ["vmfleet.ns.vm1"]  # nothing went to vm2's queue
    assert one.status["results"][0]["phase"] == Phase.QUEUED


def test_a_vm_refused_after_a_change_loses_its_workers_and_is_served_again_when_fixed() -> None:
    parts = controller_parts()
    obj = vm_object("vm1")
    parts.fleet.seen(obj)
    assert parts.runtime.applied == {"ns/vm1": 1}
    moved = {**obj, "metadata": {**obj["metadata"], "generation": 2},
             "spec": {**obj["spec"], "queue": "vmfleet.kube-system.x"}}
    parts.fleet.seen(moved)
    assert parts.runtime.removed == ["ns/vm1"] and parts.runtime.applied == {}
    fixed = {**moved, "metadata": {**obj["metadata"], "generation": 3},
             "spec": {**obj["spec"], "queue": "vmfleet.ns.mine"}}
    parts.fleet.seen(fixed)
    assert parts.runtime.applied == {"ns/vm1": 1} and parts.fleet.problem("ns", "vm1") is None


def test_plan_fails_what_waits_for_a_refused_vm() -> None:
    spec = RemoteCommandSpec.model_validate({"command": "true", "vm": "vm1"})
    status = {"startTime": "2026-12-06T10:00:00Z",
              "results": [{"vm": "vm1", "phase": Phase.PENDING, "attempt": 1}]}
    step = schedule.plan(spec, status, datetime.now(UTC), queues={"vm1": "vmfleet.other.q"},
                         refused={"vm1": "spec.queue ... outside"})
    assert not step.dispatch
    (change,) = step.changes
    assert (change.set["phase"], change.set["reason"]) == (Phase.FAILED, Reason.INVALID_SPEC)
