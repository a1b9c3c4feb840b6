"""The execution plan: what the controller sends a worker instead of the RemoteCommand spec.

A worker runs a plan with plain dataclasses (no pydantic in a command worker); the plan
travels signed inside the envelope; a message of the previous release (``spec`` only)
still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.commands import Commands
from tests.fakes import FakeState, vm_object
from vmfleet.api.constants import TASK_EXECUTE, TASK_TRANSFER, transfer_queue
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.facts import WIRE_NAMES, Facts
from vmfleet.api.models import RemoteCommandSpec, VMFacts
from vmfleet.api.plan import InvalidPlan, Plan
from vmfleet.api.planning import plan_from_spec_wire, plan_of
from vmfleet.api.signing import Refusal, Refused, Signer, Verifier, generate_private_key

ROOT = Path(__file__).resolve().parents[2]

SPECS: list[dict[str, Any]] = [
    {"vm": "vm1", "command": "echo hi"},
    {"vm": "vm1", "command": "cat", "stdin": "x\ny\n", "env": {"A": "1", "B_2": "two words"},
     "workingDir": "/srv", "timeoutSeconds": 30, "activeDeadlineSeconds": 600,
     "successExitCodes": [0, 3], "output": {"maxBytes": 100}, "become": {"user": "root"}},
    {"vms": ["vm1", "vm2"], "argv": ["printf", "%s\\n", "$(x)", ""]},
    {"selector": {"matchLabels": {"a": "b"}}, "script": "set -e\nuptime\n",
     "retries": {"limit": 2}, "maxParallel": 1},
    {"transfer": {"from": {"vm": "vm1", "path": "/a b"}, "to": [{"vm": "vm2", "path": "/x"},
                                                                {"vm": "vm3", "path": "/y"}],
                  "mode": "0640", "createDirs": True, "overwrite": "IfDifferent", "verify": True}},
    {"transfer": {"from": {"secretKeyRef": {"name": "tok", "key": "k"}},
                  "to": [{"vm": "vm2", "path": "/x"}], "overwrite": "Never"}},
    {"transfer": {"from": {"configMapKeyRef": {"name": "cm", "key": "run.sh"}},
                  "to": [{"vm": "vm2", "path": "/x"}]}},
]


def spec(body: dict[str, Any]) -> RemoteCommandSpec:
    return RemoteCommandSpec.model_validate(body)


@pytest.mark.parametrize("body", SPECS)
def test_a_plan_carries_what_the_worker_reads_of_the_spec(body: dict[str, Any]) -> None:
    s = spec(body)
    plan = plan_of(s)
    assert plan.action == s.action
    assert (plan.command, plan.script, plan.stdin, plan.working_dir) == (
        s.command, s.script, s.stdin, s.working_dir)
    assert plan.argv == (tuple(s.argv) if s.argv is not None else None)
    assert dict(plan.env or {}) == (s.env or {})
    assert plan.become_user == (s.become.user if s.become else None)
    assert (plan.timeout_seconds, plan.active_deadline_seconds) == (
        s.timeout_seconds, s.active_deadline_seconds)
    assert list(plan.success_exit_codes) == s.success_exit_codes
    assert plan.output_max_bytes == s.output.max_bytes
    if s.transfer is not None:
        assert plan.transfer is not None
        assert plan.transfer.source.describe() == s.transfer.from_.describe()
        assert [(loc.vm, loc.path) for loc in plan.transfer.to] == [
            (loc.vm, loc.path) for loc in s.transfer.to]
        assert (plan.transfer.mode, plan.transfer.create_dirs, plan.transfer.overwrite,
                plan.transfer.verify) == (s.transfer.mode, s.transfer.create_dirs,
                                          s.transfer.overwrite, s.transfer.verify)


@pytest.mark.parametrize("body", SPECS)
def test_a_plan_survives_the_signed_trip_through_the_broker(body: dict[str, Any]) -> None:
    key = generate_private_key()
    plan = plan_of(spec(body))
    envelope = Envelope("ns", "c", "uid-1", "vm2", 1, "t0", spec(body).wire(), plan=plan,
                        target=Target("vm2", "h", 22, "u", "vm2-ssh"))
    wire = json.loads(json.dumps(Signer(key, 60).sign(TASK_EXECUTE, envelope.to_message())))
    received = Envelope.from_message(Verifier(key.public_key()).open(wire, TASK_EXECUTE))
    assert received.plan == plan
    assert received.work() == plan
    assert received == envelope


def test_the_signature_covers_the_plan() -> None:
    key = generate_private_key()
    envelope = Envelope("ns", "c", "uid-1", "vm1", 1, "t0", {}, plan=Plan(command="true"))
    signed = Signer(key, 60).sign(TASK_EXECUTE, envelope.to_message())
    signed["body"]["plan"]["command"] = "rm -rf /"
    with pytest.raises(Refused) as refused:
        Verifier(key.public_key()).open(signed, TASK_EXECUTE)
    assert refused.value.reason == Refusal.BAD_SIGNATURE


def test_defaults_are_left_out_and_unknown_keys_ignored() -> None:
    assert Plan(command="true").to_message() == {"command": "true"}
    newer = {"command": "true", "a_field_of_the_next_release": {"x": 1}}
    assert Plan.from_message(newer) == Plan(command="true")
    assert Plan.from_message({"argv": ["a"]}).success_exit_codes == (0,)
    with pytest.raises(InvalidPlan):
        Plan.from_message(["not", "an", "object"])
    with pytest.raises(InvalidPlan):
        Plan.from_message({"timeout_seconds": "soon"})


def test_a_message_of_the_previous_release_carries_only_the_spec_and_still_runs() -> None:
    body = SPECS[1]
    old = Envelope("ns", "c", "uid-1", "vm1", 1, "t0", spec(body).wire()).to_message()
    assert "plan" not in old  # what the previous release's controller sent
    assert Envelope.from_message(old).work() == plan_of(spec(body))
    with pytest.raises(InvalidPlan, match="invalid spec"):
        plan_from_spec_wire({"command": "true", "argv": ["true"]})


def test_the_controller_sends_the_plan_and_the_spec_for_the_previous_release() -> None:
    """A worker of the previous release, still running during a rolling upgrade, reads
    ``spec``; this release's reads ``plan``. Transfers go by the commands' sending path."""
    sent: list[tuple[str, dict[str, Any], str]] = []
    s = spec(SPECS[4])

    def send(task: str, message: dict[str, Any], queue: str, namespace: str | None) -> None:
        sent.append((task, message, queue))

    commands = Commands(
        FakeState(), send, lambda ns, name: vm_object(name, ns),
        lambda ns, selector: [], lambda obj: Target(obj["metadata"]["name"], "h", 22, "u", "s"),
        lambda ns, name: None, lambda uid, ns, name: None)  # type: ignore[arg-type]
    commands.observe({"metadata": {"namespace": "ns", "name": "copy", "uid": "copy-uid"},
                      "spec": SPECS[4]})
    tracked = commands.get("copy-uid")
    assert tracked is not None
    assert tracked.plan is tracked.plan  # made once per command, not per dispatch
    assert [(task, message["vm"], queue) for task, message, queue in sent] == [
        (TASK_TRANSFER, "vm2", transfer_queue("ns")), (TASK_TRANSFER, "vm3", transfer_queue("ns"))]
    message = sent[0][1]
    assert message["spec"] == s.wire()
    assert Plan.from_message(message["plan"]) == plan_of(s)
    assert sorted(message["targets"]) == ["vm1", "vm2"]  # the source and this destination


def test_facts_are_spelled_as_the_remotevm_status_model_spells_them() -> None:
    aliases = {name: field.alias for name, field in VMFacts.model_fields.items()}
    assert WIRE_NAMES == aliases
    facts = Facts(hostname="vm1", uptime_seconds=1.5, memory_total_bytes=2,
                  last_probe_time="2026-12-07T00:00:00Z")
    assert VMFacts.model_validate(facts.wire()).wire() == facts.wire()


def _worker_python(code: str, envelope: Envelope) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, with the envelope's message as ``sys.argv[1]``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMFLEET_METRICS_PORT": "0"}
    return subprocess.run([sys.executable, "-c", code, json.dumps(envelope.to_message())],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_command_worker_imports_no_pydantic() -> None:
    """What ``celery -A remote_tasks worker`` imports, then a command message read and its
    command line built, then a health probe's facts: pydantic is never loaded, nor the
    kubernetes client."""
    code = """
import json, sys
import remote_tasks  # what `celery -A remote_tasks worker` imports: the app and every task
from remote_tasks import tasks
from remote_tasks.health import parse_probe
from remote_tasks.shell import build_invocation
from vmfleet.api.envelope import Envelope
envelope = Envelope.from_message(json.loads(sys.argv[1]))
build_invocation(envelope.work(), "abc123")
parse_probe("@@vmfleet-probe:hostname@@\\nvm1\\n@@vmfleet-probe:end@@\\n").facts.wire()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core",
                                                            "kubernetes")
                or m == "vmfleet.api.models")
print(json.dumps(loaded))
"""
    done = _worker_python(code, Envelope("ns", "c", "u", "vm1", 1, "t", spec(SPECS[1]).wire(),
                                         plan=plan_of(spec(SPECS[1]))))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_only_a_message_of_the_previous_release_loads_the_api_models() -> None:
    code = """
import json, sys
import remote_tasks
from vmfleet.api.envelope import Envelope
Envelope.from_message(json.loads(sys.argv[1])).work()
print(json.dumps("pydantic" in sys.modules))
"""
    done = _worker_python(code, Envelope("ns", "c", "u", "vm1", 1, "t", spec(SPECS[0]).wire()))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) is True
