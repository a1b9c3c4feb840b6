"""vmfleet.state against a real Redis: the exactly-once claim, cancels, the reports
stream that loses nothing across a controller's death, and heartbeats that go stale."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from vmfleet.dev.brokers import RedisServer
from vmfleet.procs import wait_until
from vmfleet.state import (
    CANCELLED,
    CLAIMED,
    DEFAULT_SCOPE,
    GROUP,
    TAKEN,
    State,
    attempt_member,
    reports_key,
)


@pytest.fixture
def redis_url(make_redis: Callable[..., RedisServer]) -> str:
    """A Redis of the test's own: the reports stream and its consumer group are global."""
    return make_redis().url


@pytest.fixture
def state(redis_url: str) -> Iterator[State]:
    s = State(redis_url)
    yield s
    s.client.close()


def uid() -> str:
    return f"uid-{uuid.uuid4().hex[:8]}"


def test_of_workers_racing_for_one_attempt_exactly_one_wins(redis_url: str) -> None:
    workers = [State(redis_url) for _ in range(8)]  # one client (and connection) each
    for round_ in range(10):
        command = uid()
        start = threading.Barrier(len(workers))
        answers: dict[str, str] = {}

        def claim(index: int, s: State) -> None:
            start.wait(timeout=10)
            answers[f"w{index}"] = s.claim(command, "vm1", 1, f"w{index}")

        threads = [threading.Thread(target=claim, args=(i, s)) for i, s in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        winners = [w for w, answer in answers.items() if answer == CLAIMED]
        assert len(answers) == len(workers), round_
        assert len(winners) == 1, answers
        assert sorted(answers.values()) == [CLAIMED] + [TAKEN] * (len(workers) - 1)
        # The winner is recorded and a redelivery to the winner itself never runs it again.
        assert workers[0].claim(command, "vm1", 1, winners[0]) == TAKEN
        # Another attempt (a retry) or another VM is a separate claim.
        assert workers[0].claim(command, "vm1", 2, "w0") == CLAIMED
        assert workers[0].claim(command, "vm2", 1, "w0") == CLAIMED
    for s in workers:
        s.client.close()


def test_a_cancelled_command_is_never_claimed_and_running_attempts_hear_it(state: State) -> None:
    command = uid()
    assert state.claim(command, "vm1", 1, "w1") == CLAIMED
    state.sent(command)
    heard: list[str] = []
    stop = threading.Event()
    listener = state.listen_cancels(heard.append, stop)
    def cancel_and_hear() -> bool:
        state.cancel(command)  # published again until the listener (subscribing in its
        return command in heard  # own thread) has heard it once

    try:
        wait_until(cancel_and_hear, timeout=10, what="the cancel to be published to listeners")
    finally:
        stop.set()
        listener.join(timeout=5)
    assert state.cancelled(command)
    assert state.heartbeat(command, "vm1", 1) is True  # the running attempt ends at its tick
    assert state.claim(command, "vm2", 1, "w2") == CANCELLED
    assert state.claim(command, "vm1", 2, "w1") == CANCELLED  # no retry either
    assert command not in state.live()
    other = uid()
    assert not state.cancelled(other) and state.claim(other, "vm1", 1, "w1") == CLAIMED


def test_a_report_a_dead_controller_read_is_picked_up_by_the_next_one(redis_url: str) -> None:
    worker, first = State(redis_url), State(redis_url)
    first.ensure_group()
    first.ensure_group()  # idempotent: a restarted controller creates it again
    ids = [worker.report({"kind": "attempt", "event": "finished", "uid": "u", "vm": f"vm{i}"})
           for i in range(3)]
    read = first.read_reports("controller-a", block_ms=1000)
    assert [r.id for r in read] == ids
    assert [r.body["vm"] for r in read] == ["vm0", "vm1", "vm2"]
    first.ack([ids[0]])  # its write landed; the other two were still being written...
    first.client.close()  # ...when controller-a died

    second = State(redis_url)
    second.ensure_group()
    assert second.read_reports("controller-b", block_ms=100) == []  # nothing new
    pending = list(second.pending_reports("controller-b"))
    assert [r.id for r in pending] == ids[1:]
    assert [r.body for r in pending] == [{"kind": "attempt", "event": "finished", "uid": "u",
                                          "vm": f"vm{i}"} for i in (1, 2)]
    second.ack([r.id for r in pending])
    assert list(second.pending_reports("controller-b")) == []
    stream = reports_key(DEFAULT_SCOPE)
    assert second.client.xlen(stream) == 0  # acknowledged reports are deleted
    assert second.client.xpending(stream, GROUP)["pending"] == 0
    worker.client.close()
    second.client.close()


def test_heartbeats_go_stale_unless_renewed_and_end_with_the_attempt(state: State) -> None:
    command = uid()
    member = attempt_member(command, "vm1", 1)
    assert state.claim(command, "vm1", 1, "w1") == CLAIMED  # the claim is the first beat
    assert member not in state.stale_heartbeats(60)
    wait_until(lambda: member in state.stale_heartbeats(0.3), timeout=10,
               what="the heartbeat to be older than 0.3s")
    assert state.heartbeat(command, "vm1", 1) is False  # renewed; not cancelled
    assert member not in state.stale_heartbeats(0.3)
    state.release(command, "vm1", 1)
    assert state.heartbeat(command, "vm1", 1) is False  # a released attempt is not re-added
    assert member not in state.stale_heartbeats(0)
    # The controller forgets a member it declared lost.
    lost = uid()
    state.claim(lost, "vm1", 1, "w1")
    wait_until(lambda: attempt_member(lost, "vm1", 1) in state.stale_heartbeats(0.2), timeout=10,
               what="the second heartbeat to go stale")
    state.forget_heartbeat(attempt_member(lost, "vm1", 1))
    assert attempt_member(lost, "vm1", 1) not in state.stale_heartbeats(0)


def test_live_commands_are_those_sent_and_not_finished(state: State) -> None:
    running, done = uid(), uid()
    state.sent(running)
    state.sent(done)
    state.finished(done)
    assert state.live() == {running}


def test_controllers_sharing_one_redis_keep_their_reports_and_heartbeats_apart(redis_url: str) -> None:
    a, b, worker = State(redis_url, scope="a"), State(redis_url, scope="b"), State(redis_url)
    a.ensure_group()
    b.ensure_group()
    command = uid()
    assert worker.claim(command, "vm1", 1, "w1", scope="b") == CLAIMED
    worker.report({"kind": "attempt", "uid": command}, scope="b")
    assert a.read_reports("controller-a", block_ms=100) == []
    assert [r.body["uid"] for r in b.read_reports("controller-b", block_ms=1000)] == [command]
    member = attempt_member(command, "vm1", 1)
    assert member not in a.stale_heartbeats(0)  # not a's attempt: never declared lost by a
    assert member in b.stale_heartbeats(0)
    a.sent(command)
    assert b.live() == set() and a.live() == {command}
    for s in (a, b, worker):
        s.client.close()


def test_a_heartbeat_set_lost_in_redis_is_refilled_by_live_attempts_only(state: State) -> None:
    live, dead = uid(), uid()
    assert state.claim(live, "vm1", 1, "w1") == CLAIMED
    assert state.claim(dead, "vm1", 1, "w2") == CLAIMED
    members = [attempt_member(live, "vm1", 1), attempt_member(dead, "vm1", 1)]
    assert state.absent_heartbeats(members) == set()
    state.client.delete(f"vmfleet:heartbeats:{DEFAULT_SCOPE}")  # Redis lost the set
    assert state.absent_heartbeats(members) == set(members)
    state.heartbeat(live, "vm1", 1)  # the live worker's next beat adds it back
    assert state.absent_heartbeats(members) == {attempt_member(dead, "vm1", 1)}
    state.release(live, "vm1", 1)
    assert state.claim(live, "vm1", 1, "w3") == TAKEN  # the claim still holds after release
    state.heartbeat(live, "vm1", 1)  # a beat racing the release
    assert state.absent_heartbeats([attempt_member(live, "vm1", 1)]) == {attempt_member(live, "vm1", 1)}
