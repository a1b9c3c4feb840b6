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
    Report,
    State,
    attempt_member,
    heartbeats_key,
    reports_key,
)

NS = "ns1"  # the workers' namespace: they connect as its own ACL user


@pytest.fixture
def server(make_redis: Callable[..., RedisServer]) -> RedisServer:
    """A Redis of the test's own: the reports streams and their groups are global."""
    return make_redis()


@pytest.fixture
def redis_url(server: RedisServer) -> str:
    """The controller's user."""
    return server.url


@pytest.fixture
def worker_url(server: RedisServer) -> str:
    """Namespace ns1's user: what its workers hold."""
    return server.namespace_url(NS)


@pytest.fixture
def state(redis_url: str) -> Iterator[State]:
    s = State(redis_url)
    s.serve(NS)
    yield s
    s.client.close()


@pytest.fixture
def worker(worker_url: str) -> Iterator[State]:
    s = State(worker_url)
    yield s
    s.client.close()


def uid() -> str:
    return f"uid-{uuid.uuid4().hex[:8]}"


def test_of_workers_racing_for_one_attempt_exactly_one_wins(worker_url: str) -> None:
    workers = [State(worker_url) for _ in range(8)]  # one client (and connection) each
    for round_ in range(10):
        command = uid()
        start = threading.Barrier(len(workers))
        answers: dict[str, str] = {}

        def claim(index: int, s: State, start: threading.Barrier = start, command: str = command,
                  answers: dict[str, str] = answers) -> None:
            start.wait(timeout=10)
            answers[f"w{index}"] = s.claim(command, "vm1", 1, f"w{index}", namespace=NS)

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
        assert workers[0].claim(command, "vm1", 1, winners[0], namespace=NS) == TAKEN
        # Another attempt (a retry) or another VM is a separate claim.
        assert workers[0].claim(command, "vm1", 2, "w0", namespace=NS) == CLAIMED
        assert workers[0].claim(command, "vm2", 1, "w0", namespace=NS) == CLAIMED
    for s in workers:
        s.client.close()


def test_a_cancelled_command_is_never_claimed_and_running_attempts_hear_it(
        state: State, worker: State) -> None:
    command = uid()
    assert worker.claim(command, "vm1", 1, "w1", namespace=NS) == CLAIMED
    state.sent(command, NS)
    heard: list[str] = []
    stop = threading.Event()
    listener = worker.listen_cancels(heard.append, stop, NS)
    def cancel_and_hear() -> bool:
        state.cancel(command, NS)  # published again until the listener (subscribing in its
        return command in heard  # own thread) has heard it once

    try:
        wait_until(cancel_and_hear, timeout=10, what="the cancel to be published to listeners")
    finally:
        stop.set()
        listener.join(timeout=5)
    assert worker.cancelled(command, namespace=NS)
    assert worker.heartbeat(command, "vm1", 1, namespace=NS) is True  # ends at its tick
    assert worker.claim(command, "vm2", 1, "w2", namespace=NS) == CANCELLED
    assert worker.claim(command, "vm1", 2, "w1", namespace=NS) == CANCELLED  # no retry either
    assert (NS, command) not in state.live()
    other = uid()
    assert not worker.cancelled(other, namespace=NS)
    assert worker.claim(other, "vm1", 1, "w1", namespace=NS) == CLAIMED


def test_a_report_a_dead_controller_read_is_picked_up_by_the_next_one(
        redis_url: str, worker: State) -> None:
    first = State(redis_url)
    first.serve(NS)
    first.ensure_group()
    first.ensure_group()  # idempotent: a restarted controller creates it again
    ids = [f"{NS}/" + worker.report({"kind": "attempt", "event": "finished", "uid": "u",
                                     "vm": f"vm{i}", "namespace": NS})
           for i in range(3)]
    read = first.read_reports("controller-a", block_ms=1000)
    assert [r.id for r in read] == ids
    assert [r.body["vm"] for r in read] == ["vm0", "vm1", "vm2"]
    first.ack([ids[0]])  # its write landed; the other two were still being written...
    first.client.close()  # ...when controller-a died

    second = State(redis_url)
    second.serve(NS)
    second.ensure_group()
    assert second.read_reports("controller-b", block_ms=100) == []  # nothing new
    pending = list(second.pending_reports("controller-b"))
    assert [r.id for r in pending] == ids[1:]
    assert [r.body for r in pending] == [{"kind": "attempt", "event": "finished", "uid": "u",
                                          "vm": f"vm{i}", "namespace": NS} for i in (1, 2)]
    second.ack([r.id for r in pending])
    assert list(second.pending_reports("controller-b")) == []
    stream = reports_key(NS, DEFAULT_SCOPE)
    assert second.client.xlen(stream) == 0  # acknowledged reports are deleted
    assert second.client.xpending(stream, GROUP)["pending"] == 0
    second.client.close()


def test_one_read_takes_the_reports_of_every_namespace_served_and_drops_strays(
        server: RedisServer, state: State, worker: State) -> None:
    other = State(server.namespace_url("ns2"))
    state.serve("ns2")
    worker.report({"kind": "attempt", "uid": "a", "namespace": NS})
    other.report({"kind": "attempt", "uid": "b", "namespace": "ns2"})
    # A report written into ns1's stream (all ns1's credentials reach) about ns2's command:
    worker.report({"kind": "attempt", "uid": "forged", "namespace": "ns2"}, namespace=NS)
    read: list[Report] = []
    wait_until(lambda: read.extend(state.read_reports("c", block_ms=200)) or len(read) >= 3,
               timeout=10, what="the three reports")
    assert sorted((r.id.split("/")[0], r.body.get("uid", "")) for r in read) == [
        (NS, ""), (NS, "a"), ("ns2", "b")]  # the stray is read (to be acknowledged), empty
    state.ack([r.id for r in read])
    assert state.client.xlen(reports_key(NS, DEFAULT_SCOPE)) == 0
    other.client.close()


def test_heartbeats_go_stale_unless_renewed_and_end_with_the_attempt(
        state: State, worker: State) -> None:
    command = uid()
    member = (NS, attempt_member(command, "vm1", 1))
    assert worker.claim(command, "vm1", 1, "w1", namespace=NS) == CLAIMED  # the first beat
    assert member not in state.stale_heartbeats(60)
    wait_until(lambda: member in state.stale_heartbeats(0.3), timeout=10,
               what="the heartbeat to be older than 0.3s")
    assert worker.heartbeat(command, "vm1", 1, namespace=NS) is False  # renewed; not cancelled
    assert member not in state.stale_heartbeats(0.3)
    worker.release(command, "vm1", 1, namespace=NS)
    # A released attempt is not re-added.
    assert worker.heartbeat(command, "vm1", 1, namespace=NS) is False
    assert member not in state.stale_heartbeats(0)
    # The controller forgets a member it declared lost.
    lost = uid()
    worker.claim(lost, "vm1", 1, "w1", namespace=NS)
    wait_until(lambda: (NS, attempt_member(lost, "vm1", 1)) in state.stale_heartbeats(0.2),
               timeout=10, what="the second heartbeat to go stale")
    state.forget_heartbeat(NS, attempt_member(lost, "vm1", 1))
    assert (NS, attempt_member(lost, "vm1", 1)) not in state.stale_heartbeats(0)


def test_live_commands_are_those_sent_and_not_finished(state: State) -> None:
    running, done = uid(), uid()
    state.sent(running, NS)
    state.sent(done, NS)
    state.finished(done, NS)
    assert state.live() == {(NS, running)}


def test_controllers_sharing_one_redis_keep_their_reports_and_heartbeats_apart(
        redis_url: str, worker: State) -> None:
    a, b = State(redis_url, scope="a"), State(redis_url, scope="b")
    for s in (a, b):
        s.serve(NS)
        s.ensure_group()
    command = uid()
    assert worker.claim(command, "vm1", 1, "w1", scope="b", namespace=NS) == CLAIMED
    worker.report({"kind": "attempt", "uid": command, "namespace": NS}, scope="b")
    assert a.read_reports("controller-a", block_ms=100) == []
    assert [r.body["uid"] for r in b.read_reports("controller-b", block_ms=1000)] == [command]
    member = (NS, attempt_member(command, "vm1", 1))
    assert member not in a.stale_heartbeats(0)  # not a's attempt: never declared lost by a
    assert member in b.stale_heartbeats(0)
    a.sent(command, NS)
    assert b.live() == set() and a.live() == {(NS, command)}
    for s in (a, b):
        s.client.close()


def test_a_heartbeat_set_lost_in_redis_is_refilled_by_live_attempts_only(state: State) -> None:
    live, dead = uid(), uid()
    assert state.claim(live, "vm1", 1, "w1", namespace=NS) == CLAIMED
    assert state.claim(dead, "vm1", 1, "w2", namespace=NS) == CLAIMED
    members = [(NS, attempt_member(live, "vm1", 1)), (NS, attempt_member(dead, "vm1", 1))]
    assert state.absent_heartbeats(members) == set()
    state.client.delete(heartbeats_key(NS, DEFAULT_SCOPE))  # Redis lost the set
    assert state.absent_heartbeats(members) == set(members)
    state.heartbeat(live, "vm1", 1, namespace=NS)  # the live worker's next beat adds it back
    assert state.absent_heartbeats(members) == {(NS, attempt_member(dead, "vm1", 1))}
    state.release(live, "vm1", 1, namespace=NS)
    assert state.claim(live, "vm1", 1, "w3", namespace=NS) == TAKEN  # the claim holds after release
    state.heartbeat(live, "vm1", 1, namespace=NS)  # a beat racing the release
    assert state.absent_heartbeats([(NS, attempt_member(live, "vm1", 1))]) == {
        (NS, attempt_member(live, "vm1", 1))}


def test_the_same_delivery_claiming_again_wins_again_and_no_other_delivery_does(worker: State) -> None:
    """A claim retried across a Redis restart (its first reply lost) must not lose the
    attempt to itself; a redelivery (another token) still finds it taken."""
    command = uid()
    assert worker.claim(command, "vm1", 1, "w1", namespace=NS, delivery="d1") == CLAIMED
    assert worker.claim(command, "vm1", 1, "w1", namespace=NS, delivery="d1") == CLAIMED
    assert worker.claim(command, "vm1", 1, "w1", namespace=NS, delivery="d2") == TAKEN
    assert worker.claim(command, "vm1", 1, "w1 d1", namespace=NS) == TAKEN  # no token: no retry
    worker.release(command, "vm1", 1, namespace=NS)
    assert worker.claim(command, "vm1", 1, "w1", namespace=NS, delivery="d1") == TAKEN


def test_a_worker_s_claim_report_and_release_wait_for_a_restarting_redis(
        server: RedisServer, state: State, worker: State) -> None:
    """Redis stopped (its append-only file kept) and started again 2 s later: the
    worker's writes made meanwhile land once it is back, none is lost."""
    import redis

    command = uid()
    admin = redis.Redis.from_url(server.admin_url)
    admin.execute_command("ACL", "SAVE")  # the namespace's user, as the chart's ACL file has it
    admin.close()
    server.stop()
    restart = threading.Timer(2.0, server.start)
    restart.start()
    try:
        assert worker.claim(command, "vm1", 1, "w1", namespace=NS, delivery="d1") == CLAIMED
        worker.report({"uid": command, "namespace": NS, "vm": "vm1", "attempt": 1, "event": "finished"})
        worker.release(command, "vm1", 1, namespace=NS)
    finally:
        restart.join(timeout=60)
    reports = state.read_reports("c1", block_ms=1000)
    assert [r.body["uid"] for r in reports] == [command]
    assert worker.claim(command, "vm1", 1, "w2", namespace=NS, delivery="d2") == TAKEN
