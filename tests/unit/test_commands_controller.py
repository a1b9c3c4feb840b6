"""controller.commands: the controller's in-memory RemoteCommands, with hand fakes for
Redis (State), the Celery sender and the RemoteVM cache."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from controller.commands import Commands
from controller.status import status_patch
from controller.tracked import Tracked
from tests.fakes import FakeState, Fleet, command, finished, report
from vmfleet.api.constants import TASK_EXECUTE, TASK_TERMINATE
from vmfleet.api.envelope import Envelope, Target


def phases(tracked: Tracked) -> dict[str, str]:
    return {e["vm"]: e["phase"] for e in tracked.status["results"]}


@pytest.fixture
def state() -> FakeState:
    return FakeState()


def test_a_new_command_gets_its_entries_queued_and_its_attempt_dispatched(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    tracked = commands.get("c-uid")
    assert tracked is not None
    (entry,) = tracked.status["results"]
    assert (entry["vm"], entry["phase"], entry["attempt"], entry["host"]) == ("vm1", "Queued", 1,
                                                                               "10.0.0.1")
    assert entry["dispatchTime"]
    assert tracked.status["target"] == "vm1" and tracked.status["startTime"]
    assert tracked.written is None and tracked.due is not None  # to be written, whole
    (envelope,) = fleet.envelopes()
    assert (envelope.uid, envelope.vm, envelope.attempt) == ("c-uid", "vm1", 1)
    assert envelope.target is not None and envelope.target.secret == "vm1-ssh"
    assert envelope.command_start == tracked.status["startTime"]
    assert fleet.sent[0][2] == "vmfleet.ns.vm1"
    assert state.live() == {("ns", "c-uid")} and fleet.woken == ["vm1"]
    assert state.namespaces == {"ns"}  # the command's namespace's keys, no other
    # What the writer will send is accepted by the status models.
    assert status_patch(None, tracked.status) == {"status": tracked.status}


def test_an_echo_of_our_own_write_changes_nothing(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    tracked = commands.get("c-uid")
    assert tracked is not None
    commands.observe({**command(vm="vm1"), "status": {"phase": "Pending"}})
    assert commands.get("c-uid") is tracked and len(fleet.sent) == 1


def test_a_missing_vm_fails_its_entry_and_sends_nothing(state: FakeState) -> None:
    fleet = Fleet()
    commands = fleet.commands(state)
    commands.observe(command(vm="ghost"))
    tracked = commands.get("c-uid")
    assert tracked is not None
    assert tracked.status["results"][0]["reason"] == "VMNotFound"
    assert tracked.status["phase"] == "Failed" and fleet.sent == []


def test_max_parallel_holds_and_a_result_frees_the_next_vm(state: FakeState) -> None:
    fleet = Fleet("vm1", "vm2", "vm3")
    commands = fleet.commands(state)
    commands.observe(command(selector={}, maxParallel=1))
    tracked = commands.get("c-uid")
    assert tracked is not None
    assert phases(tracked) == {"vm1": "Queued", "vm2": "Pending", "vm3": "Pending"}
    assert [e.vm for e in fleet.envelopes()] == ["vm1"]
    assert commands.apply(report("claimed", "vm1", phase="Running", startTime="t1"), "1-0")
    assert [e.vm for e in fleet.envelopes()] == ["vm1"]  # still one at a time
    assert commands.apply(finished("vm1"), "2-0")
    assert phases(tracked) == {"vm1": "Succeeded", "vm2": "Queued", "vm3": "Pending"}
    assert [e.vm for e in fleet.envelopes()] == ["vm1", "vm2"]
    assert tracked.acks == ["1-0", "2-0"]  # acknowledged once the write lands
    assert tracked.status["completions"] == "1/3" and tracked.status["phase"] == "Running"


def test_a_stale_or_repeated_report_is_acknowledged_at_once(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    assert commands.apply(finished("vm1"), "1-0") is True
    assert commands.apply(finished("vm1"), "2-0") is False  # the same result again
    assert commands.apply(report("claimed", "vm1", 1, phase="Running"), "3-0") is False
    assert commands.apply(finished("vm9"), "4-0") is False  # no such entry
    tracked = commands.get("c-uid")
    assert tracked is not None and tracked.acks == ["1-0"]


def test_deleting_a_running_command_cancels_it_through_redis(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    commands.apply(report("claimed", "vm1", phase="Running", pgid=42), "1-0")
    acks = commands.deleted(command())
    assert acks == ["1-0"] and state.cancelled == ["c-uid"]
    assert commands.get("c-uid") is None


def test_deleting_a_finished_command_cancels_nothing(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    commands.apply(finished("vm1"), "1-0")
    commands.deleted(command())
    assert state.cancelled == [] and state.live() == set()
    assert commands.deleted(command()) == []  # a second DELETED event: nothing held


def test_a_claim_for_an_unknown_command_cancels_it(state: FakeState) -> None:
    commands = Fleet("vm1").commands(state)
    assert commands.apply(report("claimed", "vm1", uid="gone", phase="Running"), "1-0") is False
    assert state.cancelled == ["gone"]
    assert commands.apply(dataclasses.replace(finished("vm1"), uid="gone2"), "2-0") is False
    assert state.cancelled == ["gone"]  # a result needs no cancel: nothing runs


def test_a_lost_worker_fails_the_attempt_without_retries(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    commands.apply(report("claimed", "vm1", phase="Running", worker="w1", pgid=42,
                          processMarker="m"), "1-0")
    state.stale = {"c-uid/vm1/1"}
    commands.tick()
    tracked = commands.get("c-uid")
    assert tracked is not None
    (entry,) = tracked.status["results"]
    assert (entry["phase"], entry["reason"]) == ("Failed", "WorkerLost")
    assert entry["message"] == "w1 stopped reporting during attempt 1; process group 42 is terminated"
    assert tracked.status["phase"] == "Failed"
    terminate = [((body["namespace"], body["pgid"], body["marker"], body["become_user"]), queue)
                 for task, body, queue in fleet.sent if task == TASK_TERMINATE]
    assert terminate == [(("ns", 42, "m", None), "vmfleet.ns.vm1")]  # no become: a plain kill
    assert state.forgotten == ["c-uid/vm1/1"]


def test_a_lost_worker_is_retried_with_the_lost_process_group(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1", retries={"limit": 1, "backoffSeconds": 0}))
    commands.apply(report("claimed", "vm1", phase="Running", pgid=42, processMarker="m"), "1-0")
    state.stale = {"c-uid/vm1/1"}
    commands.tick()
    tracked = commands.get("c-uid")
    assert tracked is not None
    (entry,) = tracked.status["results"]
    assert (entry["phase"], entry["attempt"], entry["reason"]) == ("Pending", 2, "WorkerLost")
    assert [e.attempt for e in fleet.envelopes()] == [1]
    commands.tick()  # the next loop turn sends the retry (its backoff is 0)
    assert (entry["phase"], entry["attempt"], entry["lostPgid"]) == ("Queued", 2, 42)
    retry = fleet.envelopes()[-1]
    assert (retry.attempt, retry.lost_pgid, retry.lost_marker) == (2, 42, "m")


def test_a_live_heartbeat_is_left_alone(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    commands.apply(report("claimed", "vm1", phase="Running", pgid=42), "1-0")
    state.stale = {"other-uid/vm1/1"}  # another command's: not ours to end
    commands.tick()
    tracked = commands.get("c-uid")
    assert tracked is not None and phases(tracked) == {"vm1": "Running"}


def test_a_finished_command_is_forgotten_and_expires_after_its_ttl(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1", ttlSecondsAfterFinished=0))
    commands.apply(finished("vm1", completionTime="2026-01-01T00:00:00.000Z"), "1-0")
    tracked = commands.get("c-uid")
    assert tracked is not None and tracked.finished
    commands.forget(tracked)
    assert commands.get("c-uid") is None and state.live() == set()
    assert commands.expiring() == 1
    commands.tick()
    assert fleet.deleted == [("c-uid", "ns", "c")]
    assert commands.expiring() == 0


def test_an_earlier_write_echoed_after_the_command_finished_does_not_track_it_again(
    state: FakeState
) -> None:
    """The watch may bring the claim's write (an entry Running) after the result was
    written and the command forgotten: that must not hold it as running again (the
    workers of its VM would count it for ever and never scale to zero)."""
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1"))
    tracked = commands.get("c-uid")
    assert tracked is not None
    claimed = copy.deepcopy(tracked.status)
    claimed["results"][0].update(phase="Running", pgid=42)
    commands.apply(finished("vm1"), "1-0")
    commands.forget(tracked)
    commands.observe({**command(vm="vm1"), "status": claimed})
    assert commands.get("c-uid") is None and commands.tracked() == []
    assert len(fleet.envelopes()) == 1 and state.live() == set()
    # Deleted, then created again under a new uid: a new command as any other.
    commands.deleted(command(vm="vm1"))
    commands.observe(command("c-uid-2", vm="vm1"))
    assert commands.get("c-uid-2") is not None


def test_an_invalid_spec_is_failed_once_without_dispatching(state: FakeState) -> None:
    fleet = Fleet("vm1")
    commands = fleet.commands(state)
    commands.observe(command(vm="vm1", timeoutSeconds=-5))
    tracked = commands.get("c-uid")
    assert tracked is not None and tracked.status["phase"] == "Failed"
    (failed,) = [c for c in tracked.status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "InvalidSpec" and fleet.sent == []


def test_a_transfer_goes_to_its_namespaces_queue_with_the_secrets_it_must_not_copy(
        state: FakeState) -> None:
    fleet = Fleet("vm1", "vm2")
    woken: list[str] = []
    commands = Commands(
        state, fleet.send,  # type: ignore[arg-type]
        get_vm=lambda ns, name: fleet.vms.get(name), list_vms=lambda ns, selector: [],
        target_of=lambda obj: Target(obj["metadata"]["name"], obj["spec"]["host"], 22, "u",
                                     obj["spec"]["credentialsSecretRef"]["name"]),
        wake=lambda ns, name: fleet.woken.append(name), delete=lambda uid, ns, name: None,
        protected_secrets=lambda ns: [f"{ns}-a-key", f"{ns}-b-key"], wake_transfers=woken.append)
    body = command(transfer={"from": {"secretKeyRef": {"name": "tok", "key": "k"}},
                             "to": [{"vm": "vm2", "path": "/tmp/tok"}]})
    del body["spec"]["command"]
    commands.observe(body)
    ((task, body, queue),) = fleet.sent
    assert (task, queue) == ("remote_tasks.transfer_file", "vmfleet.ns:transfers")
    envelope = Envelope.from_message(body)
    assert envelope.protected_secrets == ("ns-a-key", "ns-b-key")
    assert woken == ["ns"] and fleet.woken == []  # the transfer worker, not vm2's


def test_a_secret_transfer_reads_the_namespaces_vms_from_the_api_before_it_protects_keys(
        state: FakeState) -> None:
    """A RemoteVM created just before the transfer, not yet brought by the watch: the
    controller lists the namespace's RemoteVMs (its cache learns them) before it names the
    Secrets the transfer must not copy, so that VM's key is among them."""
    fleet = Fleet("vm1", "vm2")
    known = {"ns-a-key"}
    listed: list[tuple[str, str]] = []

    def list_vms(ns: str, selector: str) -> list[dict[str, object]]:
        listed.append((ns, selector))
        known.add("ns-late-key")  # what the API held and the watch had not brought yet
        return []

    commands = Commands(
        state, fleet.send,  # type: ignore[arg-type]
        get_vm=lambda ns, name: fleet.vms.get(name), list_vms=list_vms,
        target_of=lambda obj: Target(obj["metadata"]["name"], obj["spec"]["host"], 22, "u",
                                     obj["spec"]["credentialsSecretRef"]["name"]),
        wake=lambda ns, name: None, delete=lambda uid, ns, name: None,
        protected_secrets=lambda ns: sorted(known), wake_transfers=lambda ns: None)
    body = command(transfer={"from": {"secretKeyRef": {"name": "tok", "key": "k"}},
                             "to": [{"vm": "vm2", "path": "/tmp/tok"}]})
    del body["spec"]["command"]
    commands.observe(body)
    ((_, message, _),) = fleet.sent
    assert listed == [("ns", "")]
    assert "ns-late-key" in Envelope.from_message(message).protected_secrets
def test_a_dispatch_that_could_not_be_sent_is_sent_again_at_the_next_tick(state: FakeState) -> None:
    """The broker restarting while the controller dispatches: the send fails, the entry
    stays Pending (not Queued, which would wait VMFLEET_REDISPATCH_SECONDS), and the
    next tick sends it; the other VM's dispatch is not held up by the failure."""
    fleet = Fleet("vm1", "vm2")
    failures = [ConnectionError("Error 111 connecting to the broker")]

    def send(task: str, body: dict[str, Any], queue: str, namespace: str | None) -> None:
        if task == TASK_EXECUTE and Envelope.from_message(body).vm == "vm1" and failures:
            raise failures.pop()
        fleet.send(task, body, queue, namespace)

    base = fleet.commands(state)
    commands = Commands(state, send, base.get_vm, base.list_vms, base.target_of,  # type: ignore[arg-type]
                        base.wake, base.expiries.delete)
    commands.observe(command(selector={"matchLabels": {}}))  # the error is logged
    tracked = commands.get("c-uid")
    assert tracked is not None
    assert phases(tracked) == {"vm1": "Pending", "vm2": "Queued"}
    assert "dispatchTime" not in tracked.status["results"][0]
    assert [e.vm for e in fleet.envelopes()] == ["vm2"]
    commands.tick()
    assert phases(tracked) == {"vm1": "Queued", "vm2": "Queued"}
    assert sorted(e.vm for e in fleet.envelopes()) == ["vm1", "vm2"]


def test_a_fan_outs_dispatches_leave_in_one_batch_and_a_failed_batch_is_sent_again(
        state: FakeState) -> None:
    """The controller sends a fan-out's messages together (one round trip to Redis), and
    says the command is live once, not once per VM. When the batch cannot be sent (the
    broker restarting), no entry of it counts as sent: all stay Pending and the next tick
    sends them again."""
    import contextlib
    from collections.abc import Iterator

    fleet = Fleet("vm1", "vm2", "vm3")
    flushed: list[list[str]] = []
    pending: list[str] = []
    failures = [ConnectionError("Error 111 connecting to the broker")]

    def send(task: str, body: dict[str, Any], queue: str, namespace: str | None) -> None:
        pending.append(Envelope.from_message(body).vm)
        fleet.send(task, body, queue, namespace)

    @contextlib.contextmanager
    def batch(namespace: str) -> Iterator[None]:
        assert namespace == "ns" and not pending
        yield
        if failures:
            pending.clear()
            raise failures.pop()
        flushed.append(list(pending))
        pending.clear()

    sent_calls: list[str] = []
    original = state.sent

    def sent(uid: str, namespace: str) -> None:
        sent_calls.append(uid)
        original(uid, namespace)

    state.sent = sent  # type: ignore[method-assign]
    base = fleet.commands(state)
    commands = Commands(state, send, base.get_vm, base.list_vms, base.target_of,  # type: ignore[arg-type]
                        base.wake, lambda uid, ns, name: fleet.deleted.append((uid, ns, name)),
                        batch=batch)
    commands.observe(command(selector={"matchLabels": {}}))  # the error is logged
    tracked = commands.get("c-uid")
    assert tracked is not None
    assert phases(tracked) == {"vm1": "Pending", "vm2": "Pending", "vm3": "Pending"}
    assert not any("dispatchTime" in e for e in tracked.status["results"])
    commands.tick()
    assert phases(tracked) == {"vm1": "Queued", "vm2": "Queued", "vm3": "Queued"}
    assert flushed == [["vm1", "vm2", "vm3"]]
    assert sent_calls == ["c-uid", "c-uid"]  # once per step (the failed one and the resend)
