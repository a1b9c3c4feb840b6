"""An attempt's claim and result writes survive API server errors without running twice."""

from __future__ import annotations

from typing import Any

import pytest

from remote_tasks import execute
from remote_tasks.execute import Attempt
from vmfleet.api.envelope import Envelope
from vmfleet.kube import ApiException


class FlakyKube:
    """Answers status patches from a script: an exception to raise, or the object to return."""

    def __init__(self, answers: list[Any], stored: dict[str, Any] | None = None) -> None:
        self.answers = answers
        self.stored = stored
        self.patches: list[Any] = []

    def patch_command_status(self, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        self.patches.append(patch)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get_command(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stored


def attempt(kube: FlakyKube) -> Attempt:
    envelope = Envelope("ns", "c", "uid-1", "vm1", 1, "", {"command": "true"}, index=0, targets=1)
    entry = {"vm": "vm1", "phase": "Queued", "attempt": 1}
    return Attempt(kube, envelope, 0, "w1", entry, {"results": [entry]})  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(execute.time, "sleep", lambda _: None)


def test_a_claim_is_tried_again_after_a_server_timeout():
    kube = FlakyKube([ApiException(status=504, reason="Timeout"), {"metadata": {}}])
    a = attempt(kube)
    assert a.claim(4242, "n0") is True
    assert a.claimed and len(kube.patches) == 2 and kube.patches[0] == kube.patches[1]


def test_a_claim_that_landed_before_the_timeout_is_recognised():
    ours = {"metadata": {}, "status": {"results": [
        {"vm": "vm1", "phase": "Running", "attempt": 1, "worker": "w1"}]}}
    kube = FlakyKube([ApiException(status=504), ApiException(status=422)], stored=ours)
    assert attempt(kube).claim(4242, "n0") is True


def test_a_claim_taken_by_another_worker_is_not_ours_after_a_timeout():
    theirs = {"metadata": {}, "status": {"results": [
        {"vm": "vm1", "phase": "Running", "attempt": 1, "worker": "w2"}]}}
    kube = FlakyKube([ApiException(status=504), ApiException(status=422)], stored=theirs)
    a = attempt(kube)
    assert a.claim(4242, "n0") is False
    assert a.claim_lost and not a.claimed


def test_a_refused_claim_is_not_retried():
    kube = FlakyKube([ApiException(status=422)])
    assert attempt(kube).claim(4242, "n0") is False
    assert len(kube.patches) == 1


def test_the_claim_tests_uid_vm_phase_and_attempt_and_records_the_process_group():
    kube = FlakyKube([{"metadata": {}}])
    attempt(kube).claim(4242, "n0")
    ops = kube.patches[0]
    tests = {op["path"]: op["value"] for op in ops if op["op"] == "test"}
    assert tests == {"/metadata/uid": "uid-1", "/status/results/0/vm": "vm1",
                     "/status/results/0/phase": "Queued", "/status/results/0/attempt": 1}
    added = {op["path"]: op["value"] for op in ops if op["op"] in ("add", "replace")}
    assert added["/status/results/0/pgid"] == 4242
    assert added["/status/phase"] == "Running"  # a single-VM command is folded here


def test_a_deleted_command_is_claimed_but_never_started():
    kube = FlakyKube([{"metadata": {"deletionTimestamp": "t"}}])
    a = attempt(kube)
    assert a.claim(4242, "n0") is False
    assert a.claimed and a.deleting


def test_a_result_that_landed_before_the_timeout_is_recognised_also_when_it_schedules_a_retry():
    kube = FlakyKube([{"metadata": {}}])
    a = attempt(kube)
    assert a.claim(4242, "n0")
    # The result write (a retry: Pending, attempt 2) times out but did land.
    kube.answers = [ApiException(status=504), ApiException(status=422)]
    kube.stored = {"metadata": {}, "status": {"results": [
        {"vm": "vm1", "phase": "Pending", "attempt": 2, "worker": "w1"}]}}
    assert a.finish({"phase": "Pending", "attempt": 2, "reason": "TransportError",
                     "retryAfter": "t", "completionTime": None}) is True
