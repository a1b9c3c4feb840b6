"""controller.leader: one Lease holder at a time, on a fake clock and a fake API server.

The key property: a leader that cannot renew stops leading (the writers' gate closes)
before any candidate can take the Lease, whatever the partition, so there are never two
writers. The simulation steps a shared fake clock by 50 ms; each candidate runs a round
every retry period, as ``Elector.run`` does."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from controller.leader import Conflict, Elector, Leadership, Timing
from controller.loop import ReportReader, Writer
from tests.fakes import FakeKube, writer_parts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Server:
    """An API server's Lease: optimistic concurrency on resourceVersion."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.writes: list[tuple[str, str]] = []  # (holder, renewTime)

    def _store(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.lease = {"metadata": {"resourceVersion": str(self.version)}, "spec": dict(spec)}
        self.writes.append((spec.get("holderIdentity") or "", spec.get("renewTime") or ""))
        return dict(self.lease)


class Link:
    """One candidate's connection to the server; ``cut`` makes every call fail."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.cut = False

    def _check(self) -> None:
        if self.cut:
            raise ConnectionError("network is unreachable")

    def get(self) -> dict[str, Any] | None:
        self._check()
        return None if self.server.lease is None else dict(self.server.lease)

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._check()
        if self.server.lease is not None:
            raise Conflict("exists")
        return self.server._store(spec)

    def update(self, resource_version: str, spec: dict[str, Any]) -> dict[str, Any]:
        self._check()
        assert self.server.lease is not None
        if self.server.lease["metadata"]["resourceVersion"] != resource_version:
            raise Conflict("changed")
        return self.server._store(spec)


TIMING = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


def candidates(n: int, clock: Clock) -> tuple[Server, list[Link], list[Elector]]:
    server = Server()
    links = [Link(server) for _ in range(n)]
    electors = [Elector(link, f"c{i}", TIMING, clock=clock, wall=lambda: f"t{clock.now:.2f}")
                for i, link in enumerate(links)]
    return server, links, electors


def simulate(clock: Clock, electors: list[Elector], seconds: float,
             offsets: list[float] | None = None) -> list[tuple[float, set[int]]]:
    """Step the clock; each elector tries every retry period (staggered by ``offsets``).
    Returns (time, who leads) at every step and asserts never two at once."""
    offsets = offsets or [0.1 * i for i in range(len(electors))]
    next_round = [clock.now + o for o in offsets]
    seen: list[tuple[float, set[int]]] = []
    end = clock.now + seconds
    while clock.now < end:
        for i, elector in enumerate(electors):
            if clock.now >= next_round[i]:
                elector.try_acquire_or_renew()
                next_round[i] = clock.now + TIMING.retry_period
        leaders = {i for i, e in enumerate(electors) if e.leading()}
        assert len(leaders) <= 1, f"two leaders at t={clock.now:.2f}: {leaders}"
        seen.append((clock.now, leaders))
        clock.now = round(clock.now + 0.05, 4)
    return seen


def first_time(seen: list[tuple[float, set[int]]], who: int, after: float = 0.0) -> float:
    return next(t for t, leaders in seen if who in leaders and t >= after)


def last_time(seen: list[tuple[float, set[int]]], who: int) -> float:
    return max(t for t, leaders in seen if who in leaders)


def test_one_candidate_takes_a_free_lease_and_keeps_it() -> None:
    clock = Clock()
    server, _, (a, b) = candidates(2, clock)
    seen = simulate(clock, [a, b], 60)
    assert all(leaders == {0} for _, leaders in seen)
    assert server.lease is not None and server.lease["spec"]["holderIdentity"] == "c0"
    assert server.lease["spec"]["leaseDurationSeconds"] == 15


def test_a_partitioned_leader_stops_before_the_standby_takes_over() -> None:
    clock = Clock()
    _, links, (a, b) = candidates(2, clock)
    simulate(clock, [a, b], 10)
    cut_at = clock.now
    links[0].cut = True  # the leader can no longer reach the API server
    seen = simulate(clock, [a, b], 40)
    a_stopped = last_time(seen, 0)
    b_started = first_time(seen, 1)
    # The leader's gate closed within the renew deadline of its last renewal ...
    assert a_stopped - cut_at <= TIMING.renew_deadline
    # ... and the standby waited a whole lease duration after it last saw a change.
    assert b_started - a_stopped >= TIMING.lease_duration - TIMING.renew_deadline - TIMING.retry_period
    assert b_started - cut_at <= TIMING.lease_duration + TIMING.retry_period + 0.1
    # Healed, the old leader does not come back: it lost for good (its process restarts).
    links[0].cut = False
    seen = simulate(clock, [a, b], 30)
    assert all(leaders == {1} for _, leaders in seen)


@pytest.mark.parametrize("cut_after", [0.0, 0.3, 1.0, 1.9])
def test_no_two_leaders_whenever_the_partition_starts(cut_after: float) -> None:
    clock = Clock()
    _, links, electors = candidates(3, clock)
    simulate(clock, electors, 6 + cut_after, offsets=[0.0, 0.7, 1.3])
    leader = next(i for i, e in enumerate(electors) if e.leading())
    links[leader].cut = True
    seen = simulate(clock, electors, 40, offsets=[0.0, 0.7, 1.3])  # asserts one at a time
    assert seen[-1][1] and leader not in seen[-1][1]


def test_a_released_lease_is_taken_at_the_next_retry() -> None:
    clock = Clock()
    server, _, (a, b) = candidates(2, clock)
    simulate(clock, [a, b], 10)
    released_at = clock.now
    assert a.release()
    assert not a.leading()
    assert server.lease is not None and server.lease["spec"]["holderIdentity"] == ""
    seen = simulate(clock, [a, b], 10)
    assert first_time(seen, 1) - released_at <= TIMING.retry_period + 0.1
    assert not a.release()  # not the holder any more


def test_a_restarted_process_waits_for_its_predecessors_lease() -> None:
    clock = Clock()
    server, links, (a,) = candidates(1, clock)
    simulate(clock, [a], 4)
    restarted = Elector(links[0], "c0-new", TIMING, clock=clock)
    seen = simulate(clock, [restarted], 30)
    assert first_time(seen, 0) - 4 >= TIMING.lease_duration - 4.1
    assert server.lease is not None and server.lease["spec"]["leaseTransitions"] == 1


def test_the_timings_must_nest() -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)


def test_leadership_without_an_elector_leads_at_once() -> None:
    started: list[bool] = []
    leadership = Leadership()
    leadership.start(on_started=lambda: started.append(True), on_lost=lambda: None)
    assert started == [True] and leadership.leading()


def test_the_writer_does_not_write_while_not_leading() -> None:
    kube = FakeKube()
    state, commands, _, tracked = writer_parts(kube)
    leading = [False]
    writer = Writer(kube, state, commands, threads=1, gate=lambda: leading[0])  # type: ignore[arg-type]
    writer.write(tracked)
    assert kube.patches == [] and tracked.due is not None  # kept for the next leader
    leading[0] = True
    writer.write(tracked)
    assert len(kube.patches) == 1


def test_a_standby_reads_no_report() -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"a standby called State.{name}")

    reader = ReportReader(Untouchable(), None, "standby", lambda _: True)  # type: ignore[arg-type]
    reader.run(threading.Event(), gate=lambda: False)  # returns without touching Redis


def test_loop_gate_is_checked_before_each_tick() -> None:
    from controller.loop import Loop

    ticks: list[str] = []
    kube = FakeKube()
    state, commands, writer, _ = writer_parts(kube)
    reader = ReportReader(state, commands, "x", lambda _: True)  # type: ignore[arg-type]
    loop = Loop(writer, reader, [lambda: ticks.append("tick")], tick_seconds=0.01,
                gate=lambda: False)
    thread = threading.Thread(target=loop._tick)
    thread.start()
    threading.Event().wait(0.1)
    loop.stop.set()
    thread.join()
    assert ticks == []




def test_a_leader_that_cannot_start_gives_the_lease_up() -> None:
    clock = Clock()
    server, _, (a,) = candidates(1, clock)
    stopped: list[bool] = []

    def broken() -> None:
        raise RuntimeError("the API server refused the start-up list")

    a.run(threading.Event(), on_started=broken, on_stopped=lambda: stopped.append(True))
    assert stopped == [True] and not a.leading()
    assert server.lease is not None and server.lease["spec"]["holderIdentity"] == ""
