"""controller.loop.Writer: reports are acknowledged only once the write carrying them
landed; a failed write keeps them and is tried again; a command written in an end state
(or gone) is let go."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from controller.loop import SPACED_TARGETS, Writer
from tests.fakes import FakeKube, FakeState, Fleet, command, finished, report, writer_parts
from vmfleet.kube import ApiException


def test_the_first_write_is_whole_and_the_next_carries_only_what_changed() -> None:
    kube = FakeKube()
    state, commands, writer, tracked = writer_parts(kube)
    writer.write(tracked)
    ((ns, name, first),) = kube.patches
    assert (ns, name) == ("ns", "c") and first == {"status": tracked.status}
    commands.apply(report("claimed", "vm2", phase="Running", worker="w1"), "1-0")
    writer.write(tracked)
    second = kube.patches[-1][2]
    assert isinstance(second, list)
    assert {op["path"] for op in second} >= {"/status/results/1"}
    assert "/status/results/0" not in {op["path"] for op in second}
    assert state.acked == ["1-0"]


def test_reports_are_acknowledged_only_after_the_write_landed() -> None:
    kube = FakeKube(None, ApiException(status=500, reason="Internal Server Error"))
    state, commands, writer, tracked = writer_parts(kube)
    writer.write(tracked)
    commands.apply(report("claimed", "vm1", phase="Running", worker="w1"), "1-0")
    writer.write(tracked)  # the 500
    assert state.acked == [] and tracked.acks == ["1-0"]
    assert tracked.due is not None  # tried again later
    commands.apply(finished("vm1"), "2-0")
    writer.write(tracked)
    assert state.acked == ["1-0", "2-0"] and tracked.acks == []
    assert tracked.written == tracked.status


def test_an_unreachable_api_server_keeps_the_acks_too() -> None:
    kube = FakeKube(ConnectionRefusedError("connection refused"))
    state, commands, writer, tracked = writer_parts(kube)
    commands.apply(report("claimed", "vm1", phase="Running"), "1-0")
    writer.write(tracked)
    assert state.acked == [] and tracked.acks == ["1-0"] and tracked.written is None
    assert tracked.due is not None


def test_a_command_deleted_meanwhile_acks_and_is_forgotten() -> None:
    kube = FakeKube(ApiException(status=404, reason="Not Found"))
    state, commands, writer, tracked = writer_parts(kube)
    commands.apply(report("claimed", "vm1", phase="Running"), "1-0")
    writer.write(tracked)
    assert state.acked == ["1-0"]
    assert commands.get("c-uid") is None
    assert state.cancelled == ["c-uid"]  # its running attempt stops


def test_a_command_written_in_its_end_state_is_let_go() -> None:
    kube = FakeKube()
    state, commands, writer, tracked = writer_parts(kube)
    commands.apply(finished("vm1"), "1-0")
    writer.write(tracked)
    assert commands.get("c-uid") is tracked  # vm2 still runs
    commands.apply(finished("vm2"), "2-0")
    writer.write(tracked)
    assert {"op": "add", "path": "/status/phase", "value": "Succeeded"} in kube.patches[-1][2]
    assert tracked.written is not None and tracked.written["phase"] == "Succeeded"
    assert state.acked == ["1-0", "2-0"]
    assert commands.get("c-uid") is None and state.live() == set()


def test_flush_writes_only_what_is_due() -> None:
    kube = FakeKube()
    _, commands, writer, tracked = writer_parts(kube)
    assert tracked.due is not None
    assert writer.flush(now=tracked.due - 1) == tracked.due and kube.patches == []
    writer.flush(now=tracked.due)
    assert len(kube.patches) == 1 and tracked.due is None
    writer.close()


@pytest.mark.parametrize("corrupt", [
    {"bogusField": 1},  # a field the CRD does not have (UnknownField)
    {"exitCode": "three"},  # a value its model refuses (pydantic's ValidationError)
])
def test_a_status_that_fails_validation_fails_the_command_with_internal_error(
        corrupt: dict[str, Any]) -> None:
    kube = FakeKube()
    state, commands, writer, tracked = writer_parts(kube)
    writer.write(tracked)
    commands.apply(report("claimed", "vm1", phase="Running", worker="w1", pgid=7), "1-0")
    tracked.status["results"][0].update(corrupt)  # a bug somewhere in the controller
    errors = REGISTRY.get_sample_value("vmfleet_status_write_errors_total",
                                       {"kind": "RemoteCommand"}) or 0
    writer.write(tracked)
    assert len(kube.patches) == 1  # the refused status was not sent...
    assert state.acked == [] and tracked.acks == ["1-0"]  # ...nor treated as written
    assert state.cancelled == ["c-uid"]  # the running attempt's processes are killed
    assert REGISTRY.get_sample_value("vmfleet_status_write_errors_total",
                                     {"kind": "RemoteCommand"}) == errors + 1
    assert tracked.due is not None  # the failure is written next
    writer.write(tracked)
    (_, _, patch) = kube.patches[-1]
    status = patch["status"]  # written whole
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InternalError" and "bogusField" in failed["message"] \
        or "exitCode" in failed["message"]
    vm1, vm2 = status["results"]
    assert (vm1["phase"], vm1["reason"]) == ("Failed", "InternalError")
    assert "bogusField" not in vm1 and "pgid" not in vm1
    assert (vm2["phase"], vm2["reason"]) == ("Failed", "InternalError")
    assert state.acked == ["1-0"]  # acknowledged once the failure landed
    assert commands.get("c-uid") is None  # finished: let go


def test_a_change_made_while_the_writer_goes_to_sleep_is_written_at_once() -> None:
    """The writer's thread flushes, then waits to be told of a change: a change made (and
    told) between the two is still seen, not left for the wait's half-second timeout."""
    import threading
    import time

    from controller.loop import Loop

    kube = FakeKube()
    _, commands, writer, tracked = writer_parts(kube)
    writer.flush(now=float("inf"))  # the first write: nothing is due now
    assert len(kube.patches) == 1 and tracked.due is None
    flush = writer.flush
    changed_at: list[float] = []

    def flush_then_change(now: float | None = None) -> float | None:
        soonest = flush(now)
        if not changed_at:  # a report lands right after the flush, before the wait
            commands.apply(report("claimed", "vm1", phase="Running", worker="w1"), "1-0")
            with commands.changed:
                commands.changed.notify_all()
            changed_at.append(time.monotonic())
        return soonest

    writer.flush = flush_then_change  # type: ignore[method-assign]
    loop = Loop(writer, None, [], tick_seconds=60)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop._write, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while len(kube.patches) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(kube.patches) == 2
        assert time.monotonic() - changed_at[0] < 0.3  # not the 0.5 s timeout
    finally:
        loop.stop.set()
        thread.join(timeout=5)
        writer.close()


class SlowKube(FakeKube):
    """An API server whose status writes take ``seconds`` each (a loaded one)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def patch_command_status(self, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        time.sleep(self.seconds)
        return super().patch_command_status(namespace, name, patch)


@pytest.mark.parametrize("targets", [60, 10])
def test_a_big_fan_out_is_written_again_only_after_twice_its_last_write_took_until_it_ends(
        targets: int) -> None:
    kube = SlowKube(0.2)
    state = FakeState()
    names = [f"vm{i}" for i in range(targets)]
    commands = Fleet(*names).commands(state)
    commands.observe(command(selector={}))
    tracked = commands.get("c-uid")
    assert tracked is not None
    writer = Writer(kube, state, commands, threads=1)  # type: ignore[arg-type]
    writer.flush(now=float("inf"))  # the first write: every entry Queued
    assert writer.due(time.monotonic()) == ([], None)  # nothing due: its spacing is kept
    commands.apply(report("claimed", "vm0", phase="Running", worker="w1"), "1-0")
    assert tracked.due is not None
    ready, soonest = writer.due(tracked.due)
    if targets < SPACED_TARGETS:  # a small command: due as before
        assert ready == [tracked]
        return
    # A big one: held for twice the 0.2 s its last write took (its claim wanted 0.1 s).
    assert ready == [] and soonest is not None and soonest - tracked.due >= 0.25
    time.sleep(0.45)
    assert writer.due(time.monotonic())[0] == [tracked]
    # The report that ends it is written at once, held or not.
    writer.flush(now=float("inf"))
    for i, name in enumerate(names):
        commands.apply(finished(name), f"{i + 2}-0")
    assert tracked.finished
    assert writer.due(tracked.due or 0.0)[0] == [tracked]
    writer.flush(now=float("inf"))
    assert kube.patches[-1][2] and tracked.uid not in writer.spaced
    writer.close()
