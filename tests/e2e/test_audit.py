"""A record of every run, end to end: one Event per attempt on the RemoteCommand and one
JSON audit line per attempt in the controller's log, each naming the worker that ran it.

Real kube-apiserver + etcd, real OpenSSH sshd, real Redis, the controller with the
Process runtime (its workers are named ``local/<deployment>-<index>.<namespace>``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, holds_for
from vmfleet.dev.manifests import credentials_secret, remote_vm
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e


def host_key_fingerprint(vm: Any) -> str:
    """What ``ssh-keygen -l`` prints for the VM's host key."""
    out = subprocess.run(["ssh-keygen", "-lf", f"{vm.host_key_path}.pub"], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def attempt_events(ns: Namespace, name: str) -> list[dict[str, Any]]:
    items = ns.kubectl.get_json("-n", str(ns), "events", "--field-selector",
                                f"involvedObject.name={name}")["items"]
    return sorted((e for e in items if e["reason"].startswith("Attempt")),
                  key=lambda e: e["metadata"]["name"])


def audit_lines(log: Path, uid: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith('{"') and '"kind":"RemoteCommandAttempt"' in line:
            body = json.loads(line)
            if body["uid"] == uid:
                lines.append(body)
    return sorted(lines, key=lambda body: body["attempt"])


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_each_attempt_of_a_retried_command_has_an_event_and_an_audit_line(
        ns: Namespace, vms, controller_dir: Path) -> None:
    vm = vms[0]
    ns.add_vms([vm])
    marker = f"/tmp/vmfleet-audit-{uuid.uuid4().hex[:8]}"
    # The first attempt fails with exit code 3 (retried), the second succeeds.
    script = (f"if [ -e {marker} ]; then echo second; rm -f {marker}; "
              f"else touch {marker}; echo first; echo oops >&2; exit 3; fi")
    ns.run("retried", vm=vm.name, command=script,
           retries={"limit": 1, "onExitCodes": [3], "backoffSeconds": 0})
    obj = ns.finished("retried")
    uid = obj["metadata"]["uid"]
    (result,) = obj["status"]["results"]
    worker = f"local/vmfleet-worker-{vm.name}-0.{ns}"
    assert (obj["status"]["phase"], result["attempt"], result["exitCode"]) == ("Succeeded", 2, 0)
    # The result names the worker that ran it, and the whole output's digest.
    assert result["worker"] == worker
    assert (result["stdoutBytes"], result["stdoutSha256"]) == (7, sha("second\n"))
    assert (result["stderrBytes"], result["stderrSha256"]) == (0, sha(""))
    fingerprint = host_key_fingerprint(vm)
    assert result["hostKeyFingerprint"] == fingerprint

    # One Event per attempt, once both ends are written (the Events follow the status).
    wait_until(lambda: len(attempt_events(ns, "retried")) >= 2, timeout=30,
               what="an Event for each attempt")
    holds_for(lambda: len(attempt_events(ns, "retried")) == 2, 1.0, what="two Events, no third")
    first, second = sorted(attempt_events(ns, "retried"), key=lambda e: e["metadata"]["name"])
    records = [json.loads(e["metadata"]["annotations"]["vmfleet.io/attempt"]) for e in (first, second)]
    assert [(e["type"], e["reason"], e["count"]) for e in (first, second)] == [
        ("Warning", "AttemptFailed", 1), ("Normal", "AttemptSucceeded", 1)]
    for event in (first, second):
        assert event["involvedObject"]["uid"] == uid
        assert event["involvedObject"]["kind"] == "RemoteCommand"
    one, two = records
    expected_common = {"vm": vm.name, "host": vm.host, "hostKeyFingerprint": fingerprint,
                       "worker": worker, "signal": None}
    assert one == {**expected_common, "attempt": 1, "phase": "Failed", "reason": "ExitCode",
                   "exitCode": 3, "stdoutBytes": 6, "stdoutSha256": sha("first\n"),
                   "stderrBytes": 5, "stderrSha256": sha("oops\n"),
                   "startTime": one["startTime"], "completionTime": one["completionTime"]}
    assert two == {**expected_common, "attempt": 2, "phase": "Succeeded", "reason": "Completed",
                   "exitCode": 0, "stdoutBytes": 7, "stdoutSha256": sha("second\n"),
                   "stderrBytes": 0, "stderrSha256": sha(""),
                   "startTime": result["startTime"], "completionTime": result["completionTime"]}
    assert one["startTime"] <= one["completionTime"] <= two["startTime"] <= two["completionTime"]
    assert "exit code 3" in first["message"] and worker in first["message"]
    assert first["metadata"]["name"].startswith(f"retried.{vm.name}.1.")

    # One audit line per attempt in the controller's log, the same fields, naming its Event.
    log = controller_dir / "controller.log"
    wait_until(lambda: len(audit_lines(log, uid)) >= 2, timeout=10, what="the audit lines")
    lines = audit_lines(log, uid)
    assert [line["attempt"] for line in lines] == [1, 2]  # once each
    for line, record, event in zip(lines, records, (first, second), strict=True):
        assert {k: line[k] for k in record} == record
        assert (line["kind"], line["namespace"], line["name"], line["uid"]) == (
            "RemoteCommandAttempt", str(ns), "retried", uid)
        assert line["event"] == event["metadata"]["name"]
        assert line["controller"] == event["reportingInstance"]
    assert_no_tracebacks(controller_dir / "controller.log", controller_dir / "workers")


def test_a_fan_out_over_50_vms_gets_one_event_per_50_attempts(
        ns: Namespace, vms, controller_dir: Path) -> None:
    """60 RemoteVMs (one sshd behind them all, one worker pool): two Events, of 50 and
    10 attempts, and still an audit line per attempt."""
    vm = vms[0]
    ns.kubectl.apply(credentials_secret(vm, str(ns), "fan-ssh"), *[
        {**body, "metadata": {**body["metadata"], "name": f"fan-{i:02}", "labels": {"fan": "yes"}}}
        for i in range(60)
        for body in [remote_vm(vm, str(ns), "fan-ssh", workerPool="fan", maxConcurrentCommands=1)]])
    ns.run("fan", selector={"matchLabels": {"fan": "yes"}}, command="echo hi")
    obj = ns.finished("fan", timeout=240)
    assert obj["status"]["completions"] == "60/60", obj["status"]
    uid = obj["metadata"]["uid"]
    wait_until(lambda: len(attempt_events(ns, "fan")) >= 2, timeout=30, what="two block Events")
    holds_for(lambda: len(attempt_events(ns, "fan")) == 2, 1.0, what="two block Events, no third")
    events = attempt_events(ns, "fan")
    assert [(e["metadata"]["name"].split(".")[1], e["count"], e["reason"], e["type"]) for e in events] == [
        ("a1-b0", 50, "AttemptsEnded", "Normal"), ("a1-b1", 10, "AttemptsEnded", "Normal")]
    blocks = [json.loads(e["metadata"]["annotations"]["vmfleet.io/attempts"]) for e in events]
    assert [r["vm"] for block in blocks for r in block] == [f"fan-{i:02}" for i in range(60)]
    assert {(r["phase"], r["exitCode"], r["stdoutBytes"], r["stdoutSha256"], r["worker"].split("-")[0])
            for block in blocks for r in block} == {("Succeeded", 0, 3, sha("hi\n"), "local/vmfleet")}
    assert events[0]["message"].startswith("Attempt 1 on 50 VMs (fan-00 .. fan-49): 50 Succeeded")
    log = controller_dir / "controller.log"
    wait_until(lambda: len(audit_lines(log, uid)) >= 60, timeout=10, what="60 audit lines")
    lines = audit_lines(log, uid)
    assert sorted(line["vm"] for line in lines) == [f"fan-{i:02}" for i in range(60)]
    assert {line["event"] for line in lines} == {e["metadata"]["name"] for e in events}
