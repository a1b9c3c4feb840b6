"""An attempt claims in Redis at the gate and reports only what it owns (no Kubernetes)."""

from __future__ import annotations

from typing import Any

from remote_tasks import execute
from remote_tasks.execute import Attempt
from tests.fakes import ENVELOPE, AttemptState
from vmfleet import settings
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.reports import ResultFields
from vmfleet.state import CANCELLED, TAKEN

FAST_HEARTBEATS = settings.Settings(heartbeat_seconds=0)


def attempt(state: AttemptState) -> Attempt:
    return Attempt(state, ENVELOPE, "w1", interval=0)  # type: ignore[arg-type]


def test_the_claim_is_taken_once_in_redis_and_reported_with_the_process_group() -> None:
    state = AttemptState()
    a = attempt(state)
    assert a.claim(4242, "n0") is True
    assert state.claims == [("uid-1", "vm1", 2, "w1")]
    (report,) = state.reports
    assert {k: report[k] for k in ("kind", "event", "namespace", "name", "uid", "vm", "attempt",
                                   "worker")} == {
        "kind": "attempt", "event": "claimed", "namespace": "ns", "name": "c", "uid": "uid-1",
        "vm": "vm1", "attempt": 2, "worker": "w1"}
    fields = report["fields"]
    assert (fields["phase"], fields["pgid"], fields["processMarker"], fields["worker"]) == (
        "Running", 4242, "n0", "w1")
    assert fields["startTime"] == fields["heartbeatTime"]


def test_no_process_group_means_no_marker_in_the_report() -> None:
    state = AttemptState()
    attempt(state).claim(None, "n0")
    assert "pgid" not in state.reports[0]["fields"]
    assert "processMarker" not in state.reports[0]["fields"]


def test_a_claim_taken_by_another_delivery_runs_nothing_and_reports_nothing() -> None:
    state = AttemptState(claim=TAKEN)
    a = attempt(state)
    assert a.claim(4242, "n0") is False
    assert (a.claim_lost, a.claimed, a.cancelled) == (True, False, False)
    assert a.finish(ResultFields.from_wire({"phase": "Failed", "reason": "TransportError"})) is False
    assert state.reports == [] and state.released == []


def test_a_deleted_command_is_never_started() -> None:
    state = AttemptState(claim=CANCELLED)
    a = attempt(state)
    assert a.claim(4242, "n0") is False
    assert (a.claim_lost, a.cancelled) == (True, True)
    assert state.reports == []


def test_the_outcome_is_reported_and_the_heartbeat_released() -> None:
    state = AttemptState()
    a = attempt(state)
    a.claim(4242, "n0")
    assert a.finish(ResultFields.from_wire({"phase": "Succeeded", "reason": "Completed",
                                            "exitCode": 0, "completionTime": "t9",
                                            "message": None})) is True
    claimed, finished = state.reports[-2:]
    assert finished["event"] == "finished"
    # The outcome repeats the claim's start: a record of the attempt needs no other report.
    assert finished["fields"] == {"worker": "w1", "phase": "Succeeded", "reason": "Completed",
                                  "exitCode": 0, "completionTime": "t9",
                                  "startTime": claimed["fields"]["startTime"]}  # no nulls
    assert state.claims == [("uid-1", "vm1", 2, "w1")]  # not claimed again
    assert state.released == [("uid-1", "vm1", 2)]
    assert state.scopes == {"release-a"}  # claim, reports and release: the sender's scope
    assert state.namespaces == {"ns"}  # ...under the command's namespace's keys only


def test_an_attempt_that_ended_before_it_started_claims_first_and_gets_a_start_time() -> None:
    state = AttemptState()
    a = attempt(state)
    ended = ResultFields.from_wire({"phase": "Failed", "reason": "TransportError", "completionTime": "t3"})
    assert a.finish(ended) is True
    assert len(state.claims) == 1
    (finished,) = state.reports  # no separate claim report
    assert finished["fields"]["startTime"] == "t3"


def test_a_heartbeat_that_finds_the_command_cancelled_ends_the_attempt() -> None:
    state = AttemptState(cancelled_at_beat=True)
    a = attempt(state)
    assert a.tick() is None  # not claimed yet: nothing to renew
    assert state.beats == 0
    a.claim(4242, "n0")
    assert a.tick() == "Cancelled"
    assert state.beats == 1


def test_a_live_command_keeps_beating() -> None:
    state = AttemptState()
    a = attempt(state)
    a.claim(4242, "n0")
    assert [a.tick(), a.tick()] == [None, None]
    assert state.beats == 2


def test_a_published_cancel_marks_the_running_attempts_of_that_command() -> None:
    cancels = execute.Cancels()
    a, b = attempt(AttemptState()), Attempt(AttemptState(), Envelope(  # type: ignore[arg-type]
        "ns", "d", "uid-2", "vm1", 1, "", {}), "w1")
    with cancels.running(a), cancels.running(b):
        cancels.cancel("uid-1")
        assert (a.cancelled, b.cancelled) == (True, False)
    cancels.cancel("uid-2")  # ended meanwhile: nothing to mark
    assert b.cancelled is False


class _Conn:
    def __init__(self) -> None:
        self.terminated: list[tuple[int, str | None]] = []

    def terminate(self, pgid: int, grace: float, nonce: str | None, become: Any = None) -> None:
        self.terminated.append((pgid, nonce))


class _Pool:
    """The SSH pool: one shared connection per VM, counting how often it is thrown away."""

    def __init__(self) -> None:
        self.conn = _Conn()
        self.discarded = 0

    def get(self, target: Any) -> _Conn:
        return self.conn

    def discard(self, target: Any) -> None:
        self.discarded += 1


def _executor(tmp_path: Any) -> tuple[execute.CommandExecutor, _Pool]:
    (tmp_path / "vm1-ssh").mkdir()
    (tmp_path / "vm1-ssh" / "ssh-privatekey").write_text("KEY")
    pool = _Pool()
    return execute.CommandExecutor(AttemptState(), pool, tmp_path,  # type: ignore[arg-type]
                                   conf=FAST_HEARTBEATS), pool


def test_terminating_a_lost_attempt_keeps_the_vms_shared_connection(tmp_path: Any) -> None:
    """Other commands run on the same pooled connection: killing one attempt's processes
    must not close it under them (it did: they ended without an exit status)."""
    executor, pool = _executor(tmp_path)
    target = Target("vm1", "h", 22, "u", "vm1-ssh", host_keys=("ssh-ed25519 AAAA",))
    assert executor.terminate_attempt(target, 4242, "marker") is True
    assert pool.conn.terminated == [(4242, "marker")]
    assert pool.discarded == 0


def test_after_a_broken_connection_the_terminate_reconnects_first(tmp_path: Any) -> None:
    executor, pool = _executor(tmp_path)
    ssh_target = executor.ssh_target(Target("vm1", "h", 22, "u", "vm1-ssh", host_keys=("k",)))
    assert executor.terminate(ssh_target, 7, None, broken=True) is True
    assert pool.discarded == 1


def test_a_lost_become_attempt_is_terminated_through_sudo_as_its_user(tmp_path: Any) -> None:
    """A lost attempt that ran as root from an unprivileged login: its processes are
    root's, so the terminate must go through sudo as root too."""
    executor, pool = _executor(tmp_path)
    calls: list[Any] = []
    pool.conn.terminate = lambda pgid, grace, nonce, become=None: calls.append(become)  # type: ignore[method-assign]
    target = Target("vm1", "h", 22, "u", "vm1-ssh", host_keys=("k",), allow_become=True)
    assert executor.terminate_attempt(target, 9, "m", "root") is True
    assert calls[0] is not None and calls[0].user == "root"
    plain = Target("vm1", "h", 22, "u", "vm1-ssh", host_keys=("k",))
    assert executor.terminate_attempt(plain, 9, "m", None) is True
    assert calls[1] is None
