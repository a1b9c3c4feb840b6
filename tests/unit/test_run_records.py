"""controller.audit: one Event per ended attempt (one per 50 on a fan-out over 50 VMs), one
JSON audit line per attempt, written once even when two controllers handle the same end;
the worker's whole-output SHA-256; the worker pod's name."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from controller.audit import (
    AGGREGATE_ABOVE,
    ANNOTATION_ATTEMPT,
    ANNOTATION_ATTEMPTS,
    AttemptRecord,
    Pending,
    RunRecords,
    audit_line,
    event_body,
    layout_of,
    record_of_report,
)
from controller.commands import Commands
from controller.loop import Writer
from controller.process_runtime import ProcessRuntime, local_worker_name
from controller.runtime import VMRef, WorkerGroup
from controller.tracked import Tracked
from remote_tasks.output import StreamTail
from tests.fakes import FakeState, Fleet, command, finished, report
from vmfleet.api.models import RemoteVMSpec
from vmfleet.kube import ApiException

SHA_OUT = hashlib.sha256(b"hello\n").hexdigest()
FP = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"


class Events:
    """The core API's Event create, as the API server answers it: 409 for a name taken;
    ``fail``: errors to raise first."""

    def __init__(self, *fail: Exception) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.fail = list(fail)
        self.calls = 0

    def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> None:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        name = body["metadata"]["name"]
        if name in self.items:
            raise ApiException(status=409, reason="AlreadyExists")
        assert body["metadata"]["namespace"] == namespace
        self.items[name] = body


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


class Kube:
    """The API server's copy of the commands' status (shared by two controllers)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def patch_command_status(self, namespace: str, name: str, patch: Any) -> dict[str, Any]:
        if isinstance(patch, dict):
            self.status = patch["status"]
        else:
            for op in patch:
                parts = op["path"].split("/")[2:]
                if parts[0] == "results":
                    self.status["results"][int(parts[1])] = op["value"]
                elif op["op"] == "remove":
                    self.status.pop(parts[0], None)
                else:
                    self.status[parts[0]] = op["value"]
        return {}


class Controller:
    """One controller's commands, status writer and run records (no threads)."""

    def __init__(self, name: str, fleet: Fleet, kube: Kube, events: Events) -> None:
        self.state = FakeState()
        self.lines = Lines()
        logger = logging.getLogger(f"test.audit.{name}.{id(self)}")
        logger.propagate = False
        logger.addHandler(self.lines)
        logger.setLevel(logging.INFO)
        self.commands: Commands = fleet.commands(self.state)
        self.records = RunRecords(events, self.state.ack, name, logger=logger,
                                  lookup=lambda ns, n, uid: layout_of(kube.status))
        self.commands.records = self.records
        self.writer = Writer(kube, self.state, self.commands, threads=1)  # type: ignore[arg-type]

    def tracked(self) -> Tracked:
        tracked = self.commands.get("c-uid")
        assert tracked is not None
        return tracked

    def end(self, vm: str, report_id: str, attempt: int = 1, **fields: Any) -> None:
        self.commands.apply(report("claimed", vm, attempt, phase="Running", worker=f"pod-{vm}",
                                   startTime="2026-12-07T01:00:00.000Z"), f"c{report_id}")
        self.commands.apply(finished(vm, attempt, **fields), report_id)


def fields(vm: str, **more: Any) -> dict[str, Any]:
    return {"host": f"{vm}.example", "hostKeyFingerprint": FP, "stdoutBytes": 6,
            "stdoutSha256": SHA_OUT, "stderrBytes": 0,
            "stderrSha256": hashlib.sha256(b"").hexdigest(), "worker": f"pod-{vm}", **more}


def test_each_attempt_of_up_to_50_vms_gets_an_event_and_an_audit_line_with_its_fields() -> None:
    names = [f"vm{i:02}" for i in range(AGGREGATE_ABOVE)]
    events = Events()
    a = Controller("ctl-a", Fleet(*names), Kube(), events)
    a.commands.observe(command(selector={}))
    a.writer.write(a.tracked())
    for i, vm in enumerate(names):
        a.end(vm, f"{i}-0", **fields(vm))
    a.writer.write(a.tracked())
    assert a.state.acked == [f"c{i}-0" for i in range(50)]  # the claims; the ends wait for Events
    assert events.items == {}  # nothing written in the status writer's way
    a.records.flush()
    assert len(events.items) == 50
    assert a.state.acked[50:] == [f"{i}-0" for i in range(50)]
    event = next(e for e in events.items.values() if e["involvedObject"]["name"] == "c"
                 and json.loads(e["metadata"]["annotations"][ANNOTATION_ATTEMPT])["vm"] == "vm07")
    record = json.loads(event["metadata"]["annotations"][ANNOTATION_ATTEMPT])
    assert record == {"vm": "vm07", "host": "vm07.example", "hostKeyFingerprint": FP,
                      "attempt": 1, "phase": "Succeeded", "reason": "Completed", "exitCode": 0,
                      "signal": None, "startTime": "2026-12-07T01:00:00.000Z",
                      "completionTime": "2026-11-23T12:00:05.000Z", "stdoutBytes": 6,
                      "stdoutSha256": SHA_OUT, "stderrBytes": 0,
                      "stderrSha256": hashlib.sha256(b"").hexdigest(), "worker": "pod-vm07"}
    assert (event["type"], event["reason"], event["count"]) == ("Normal", "AttemptSucceeded", 1)
    assert event["involvedObject"] == {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteCommand",
                                       "name": "c", "namespace": "ns", "uid": "c-uid"}
    assert event["reportingInstance"] == "ctl-a"
    assert event["metadata"]["name"].startswith("c.vm07.1.")
    assert "exit code 0" in event["message"] and FP in event["message"] and "pod-vm07" in event["message"]
    assert len(a.lines.lines) == 50
    line = next(line for line in a.lines.lines if line["vm"] == "vm07")
    assert line == {**record, "kind": "RemoteCommandAttempt", "namespace": "ns", "name": "c",
                    "uid": "c-uid", "event": event["metadata"]["name"], "controller": "ctl-a",
                    "time": line["time"]}


def test_a_fan_out_over_50_vms_gets_one_event_per_50_attempts() -> None:
    names = [f"vm{i:03}" for i in range(120)]
    events = Events()
    a = Controller("ctl-a", Fleet(*names), Kube(), events)
    a.commands.observe(command(selector={}, retries={"limit": 1, "onExitCodes": [3],
                                                     "backoffSeconds": 0}))
    a.writer.write(a.tracked())
    for i, vm in enumerate(names[:49]):
        a.end(vm, f"{i}-0", **fields(vm))
    a.writer.write(a.tracked())
    a.records.flush()
    assert events.items == {}  # the first block of 50 is not over: one VM still runs
    a.end(names[49], "49-0", **fields(names[49], exitCode=3, phase="Failed", reason="ExitCode"))
    a.writer.write(a.tracked())
    a.records.flush()
    (first,) = events.items.values()
    assert first["count"] == 50 and first["reason"] == "AttemptsEnded" and first["type"] == "Warning"
    assert first["message"].startswith("Attempt 1 on 50 VMs (vm000 .. vm049): 1 Failed (ExitCode), 49 Succeeded")
    block = json.loads(first["metadata"]["annotations"][ANNOTATION_ATTEMPTS])
    assert [r["vm"] for r in block] == names[:50] and block[49]["exitCode"] == 3
    assert len(a.lines.lines) == 50  # an audit line per attempt all the same
    for i, vm in enumerate(names[50:], start=50):
        a.end(vm, f"{i}-0", **fields(vm))
    a.end(names[49], "49-1", attempt=2, **fields(names[49]))  # its retry
    a.writer.write(a.tracked())
    a.records.flush()
    counts = sorted((e["metadata"]["name"].split(".")[1], e["count"]) for e in events.items.values())
    assert counts == [("a1-b0", 50), ("a1-b1", 50), ("a1-b2", 20), ("a2-b0", 1)]
    assert len(a.lines.lines) == 121
    assert sorted(a.state.acked) == sorted([f"c{i}-0" for i in range(120)] + ["c49-1"]
                                           + [f"{i}-0" for i in range(120)] + ["49-1"])


def test_an_attempt_is_recorded_once_by_two_controllers() -> None:
    """A leader wrote the end into the status, then stopped before its Event: the reports
    were not acknowledged, so the next leader reads them again and records them. A
    leader that wrote the Event but stopped before acknowledging: the next one's create
    is a 409, and it logs no second audit line."""
    kube, events = Kube(), Events()
    a = Controller("ctl-a", Fleet("vm1", "vm2"), kube, events)
    a.commands.observe(command(selector={}))
    a.writer.write(a.tracked())
    a.end("vm1", "1-0", **fields("vm1"))
    a.end("vm2", "2-0", **fields("vm2"))
    a.writer.write(a.tracked())
    a.records.submit("c-uid", None, [])  # (nothing new)
    # vm1's Event goes out; then A loses the Lease before the next flush.
    groups = a.records._groups  # noqa: SLF001 - split one flush in two
    vm2 = {k: g for k, g in groups.items() if ".vm2." in k}
    for key in vm2:
        del groups[key]
    a.records.flush()
    a.state.acked.remove("1-0")  # ...and before vm1's ack reached Redis
    groups.update(vm2)
    a.records.flush(leading=False)  # not leading: drops vm2's record, unacknowledged
    assert len(events.items) == 1 and [line["vm"] for line in a.lines.lines] == ["vm1"]

    b = Controller("ctl-b", Fleet("vm1", "vm2"), kube, events)
    b.commands.observe({**command(selector={}), "status": kube.status})  # finished: not tracked
    assert kube.status["phase"] == "Succeeded" and b.commands.get("c-uid") is None
    for rid, vm in (("1-0", "vm1"), ("2-0", "vm2")):  # the pending reports, read again
        assert b.commands.apply(finished(vm, **fields(vm)), rid) is True
    b.records.flush()
    assert len(events.items) == 2
    assert [line["vm"] for line in b.lines.lines] == ["vm2"]  # vm1's: a 409, no second line
    assert sorted(b.state.acked) == ["1-0", "2-0"]
    assert {line["vm"]: line["controller"] for line in a.lines.lines + b.lines.lines} == {
        "vm1": "ctl-a", "vm2": "ctl-b"}


def test_a_lost_worker_s_attempt_is_recorded_by_the_controller() -> None:
    events = Events()
    a = Controller("ctl-a", Fleet("vm1"), Kube(), events)
    a.commands.observe(command(vm="vm1"))
    a.commands.apply(report("claimed", "vm1", phase="Running", worker="pod-x", host="h1",
                            startTime="2026-12-07T01:00:00.000Z"), "c1")
    a.commands.advance(a.tracked(), lost=frozenset({"vm1"}))
    a.writer.write(a.tracked())
    a.records.flush()
    (event,) = events.items.values()
    record = json.loads(event["metadata"]["annotations"][ANNOTATION_ATTEMPT])
    assert (record["phase"], record["reason"], record["worker"], record["exitCode"]) == (
        "Failed", "WorkerLost", "pod-x", None)
    assert event["type"] == "Warning"


def test_an_api_error_is_logged_counted_and_given_up_after_three_tries() -> None:
    err = ApiException(status=500, reason="Internal Server Error")
    events = Events(err, err, err)
    now = [0.0]
    state = FakeState()
    lines = Lines()
    logger = logging.getLogger("test.audit.errors")
    logger.propagate = False
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    records = RunRecords(events, state.ack, "ctl", logger=logger, clock=lambda: now[0])
    before = {r: REGISTRY.get_sample_value("vmfleet_run_events_total", {"result": r}) or 0
              for r in ("Failed", "GaveUp")}
    records.submit("u", (("vm1", "Succeeded", 1),), [Pending(AttemptRecord(
        "ns", "c", "u", "vm1", 1, "Succeeded"), ["9-0"])])
    records.flush()
    assert events.calls == 1 and state.acked == [] and records.held() == 1
    records.flush()
    assert events.calls == 1  # not before its backoff
    for _ in range(2):
        now[0] += 60
        records.flush()
    assert events.calls == 3 and records.held() == 0 and events.items == {}
    assert state.acked == ["9-0"]  # not retried for ever
    assert [(line["vm"], line["event"]) for line in lines.lines] == [("vm1", None)]
    assert REGISTRY.get_sample_value("vmfleet_run_events_total", {"result": "Failed"}) == before["Failed"] + 2
    assert REGISTRY.get_sample_value("vmfleet_run_events_total", {"result": "GaveUp"}) == before["GaveUp"] + 1


def test_the_record_and_audit_line_of_a_signalled_attempt() -> None:
    rep = finished("vm1", 2, phase="Failed", reason="Signaled", exitCode=None, signal="KILL",
                   worker="vmfleet-worker-vm1-7d9f-abcde", startTime="t1")
    record = record_of_report(rep, {"host": "10.0.0.1"})
    assert (record.host, record.attempt, record.signal, record.exit_code, record.start_time) == (
        "10.0.0.1", 2, "KILL", None, "t1")
    body = event_body("c.vm1.2.x", [record], "ctl", "now")
    assert "signal KILL" in body["message"] and body["reason"] == "AttemptFailed"
    line = json.loads(audit_line(record, "c.vm1.2.x", "ctl", "now"))
    assert line["worker"] == "vmfleet-worker-vm1-7d9f-abcde" and line["signal"] == "KILL"


def test_the_worker_hashes_the_whole_output_as_it_reads_it() -> None:
    data = bytes(range(256)) * 1000
    tail = StreamTail(100)
    for start in range(0, len(data), 4096):
        tail.feed(data[start:start + 4096])
    assert (tail.total, tail.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(tail.text().encode("utf-8", "replace")) < len(data)  # only the tail is kept


def test_a_local_worker_is_named_by_its_group_and_index(tmp_path: Path) -> None:
    spec = RemoteVMSpec.model_validate({"host": "10.0.0.1", "user": "u", "hostKeys": ["ssh-ed25519 AAAA"],
                                        "credentialsSecretRef": {"name": "vm1-ssh"}})
    group = WorkerGroup("ops", [VMRef("ops", "vm1", "u-vm1", spec)])
    assert local_worker_name(group, 1) == "local/vmfleet-worker-vm1-1.ops"
    runtime = ProcessRuntime("redis://b", tmp_path / "logs", verify_key="k")
    env = runtime._env(group, runtime.worker_urls("ops"), 1)  # noqa: SLF001
    assert env["VMFLEET_POD_NAME"] == "local/vmfleet-worker-vm1-1.ops"
