"""A running attempt whose heartbeat vanished (Redis lost the heartbeat set) and whose
worker is gone ends lost after ``lost_after``, as a stale one does: it is never left
Running for ever. One that is missing only for a moment (a live worker adds it back at
its next beat) is left alone."""

from __future__ import annotations

from controller import schedule
from controller.commands import Commands
from tests.fakes import FakeState, Fleet, command, report


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def running(state: FakeState, clock: Clock, **spec: object) -> tuple[Commands, Fleet]:
    fleet = Fleet("vm1")
    base = fleet.commands(state)
    commands = Commands(state, base.send, base.get_vm, base.list_vms, base.target_of, base.wake,
                        base.expiries.delete, timing=schedule.Timing(lost_after=30), clock=clock)
    commands.observe(command(vm="vm1", **spec))
    commands.apply(report("claimed", "vm1", phase="Running", worker="w1", pgid=42,
                          processMarker="m"), "1-0")
    return commands, fleet


def entry_of(commands: Commands) -> dict[str, object]:
    tracked = commands.get("c-uid")
    assert tracked is not None
    (entry,) = tracked.status["results"]
    return entry


def test_an_attempt_without_any_heartbeat_for_lost_after_is_lost() -> None:
    state, clock = FakeState(), Clock()
    commands, _ = running(state, clock)
    state.absent = {"c-uid/vm1/1"}  # the heartbeat set is gone, and so is the worker
    commands.tick()
    clock.now += 29
    commands.tick()
    assert entry_of(commands)["phase"] == "Running"
    clock.now += 1
    commands.tick()
    entry = entry_of(commands)
    assert (entry["phase"], entry["reason"]) == ("Failed", "WorkerLost")
    assert entry["message"] == "w1 stopped reporting during attempt 1; process group 42 is terminated"


def test_a_lost_silent_attempt_is_retried_when_the_spec_allows() -> None:
    state, clock = FakeState(), Clock()
    commands, _ = running(state, clock, retries={"limit": 1, "backoffSeconds": 0})
    state.absent = {"c-uid/vm1/1"}
    commands.tick()
    clock.now += 31
    commands.tick()
    entry = entry_of(commands)
    assert (entry["phase"], entry["attempt"], entry["reason"]) == ("Pending", 2, "WorkerLost")


def test_a_heartbeat_that_comes_back_resets_the_count() -> None:
    state, clock = FakeState(), Clock()
    commands, _ = running(state, clock)
    state.absent = {"c-uid/vm1/1"}
    commands.tick()
    clock.now += 20
    state.absent = set()  # the live worker's next beat added it back
    commands.tick()
    clock.now += 5
    state.absent = {"c-uid/vm1/1"}  # lost again (say, another flush)
    commands.tick()
    clock.now += 20
    commands.tick()
    assert entry_of(commands)["phase"] == "Running"  # 20 s silent, not 45
