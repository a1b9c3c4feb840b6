"""No object can stop the controller: what fails for one object stays with it (a metric,
a Warning Event, a log line) and every other object is served, at start as later; a
controller that has not started, or whose loop stopped, says so to its probes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

from controller import handlers
from controller.context import Context
from controller.isolate import REASON_RECONCILE_ERROR, Recorder
from controller.runtime import transfer_group_key
from tests.fakes import FakeKube, Parts, command_object, controller_parts, vm_object
from vmfleet.api.constants import TASK_EXECUTE, Phase


class Loop:
    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True

    def alive(self) -> bool:
        return self.started


def context(parts: Parts) -> Context:
    return Context(kube=parts.kube, dispatcher=None, runtime=parts.runtime,  # type: ignore[arg-type]
                   state=parts.state, commands=parts.commands, fleet=parts.fleet,  # type: ignore[arg-type]
                   loop=Loop(), namespaces=("ns",),  # type: ignore[arg-type]
                   recorder=parts.commands.recorder)


def errors(kind: str) -> float:
    return REGISTRY.get_sample_value("vmfleet_reconcile_errors_total", {"kind": kind}) or 0.0


def odd_vms() -> list[dict[str, Any]]:
    """Valid shapes the API server accepts that once stopped the controller."""
    return [
        vm_object("empty", workers={}),
        vm_object("sized", workers={"resources": {"requests": {"cpu": "100m"}}}),
        vm_object("pooled", workers={"resources": {"limits": {"memory": "1Gi"}}}, workerPool="p"),
        vm_object("foreign", queue="vmfleet.kube-system.vm1"),
        vm_object("vm1"),
    ]


def test_a_controller_started_among_odd_objects_serves_every_other_one() -> None:
    kube = FakeKube(vms=odd_vms(), commands=[command_object("c1", vm="vm1"),
                                             command_object("c2", vm="empty"),
                                             command_object("c3", vm="foreign")])
    parts = controller_parts(kube)
    ctx = context(parts)
    handlers.start(ctx)
    assert ctx.loop.alive()
    assert handlers.alive(SimpleNamespace(ctx=ctx)) == "serving"
    queues = sorted(q for task, _, q in parts.sent if task == TASK_EXECUTE)
    assert queues == ["vmfleet.ns.empty", "vmfleet.ns.vm1"]
    assert set(parts.runtime.applied) == {"ns/empty", "ns/sized", "ns/pool:p", "ns/vm1",
                                          transfer_group_key("ns")}
    refused = parts.commands.get("uid-ns-c3")
    assert refused is not None and refused.status["phase"] == Phase.FAILED


def test_one_object_failing_at_start_is_recorded_on_it_and_the_rest_are_served(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube(vms=[vm_object("bad"), vm_object("vm1")],
                    commands=[command_object("poison", vm="vm1"), command_object("c1", vm="vm1")])
    parts = controller_parts(kube)
    parts.commands.recorder = Recorder(kube.raw)
    ctx = context(parts)
    seen, observe = parts.fleet.seen, parts.commands.observe

    def fragile_seen(obj: dict[str, Any], **kwargs: Any) -> None:
        if obj["metadata"]["name"] == "bad":
            raise KeyError("a bug this object triggers")
        seen(obj, **kwargs)

    def fragile_observe(obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == "poison":
            raise ValueError("another bug")
        observe(obj)

    monkeypatch.setattr(parts.fleet, "seen", fragile_seen)
    monkeypatch.setattr(parts.commands, "observe", fragile_observe)
    before = (errors("RemoteVM"), errors("RemoteCommand"))
    handlers.start(ctx)
    assert ctx.loop.alive()
    assert (errors("RemoteVM"), errors("RemoteCommand")) == (before[0] + 1, before[1] + 1)
    events = {(e["involvedObject"]["kind"], e["involvedObject"]["name"]): e for e in kube.events}
    assert set(events) == {("RemoteVM", "bad"), ("RemoteCommand", "poison")}
    assert all(e["type"] == "Warning" and e["reason"] == REASON_RECONCILE_ERROR
               for e in events.values())
    assert "KeyError" in events[("RemoteVM", "bad")]["message"]
    assert [q for task, _, q in parts.sent if task == TASK_EXECUTE] == ["vmfleet.ns.vm1"]
    # Later events of the poisonous objects raise nothing out of the handlers.
    memo = SimpleNamespace(ctx=ctx)
    handlers.vm_event({"type": "MODIFIED", "object": vm_object("bad")}, memo=memo)
    handlers.command_event({"type": "ADDED", "object": command_object("poison", vm="vm1")},
                           memo=memo)
    assert len(kube.events) == 2  # the same error is posted once per object


def test_a_command_whose_start_failed_is_started_again_by_the_loop() -> None:
    parts = controller_parts()
    parts.kube.vms.append(vm_object("vm1"))
    calls = {"n": 0}
    real = parts.fleet.get

    def flaky_get(namespace: str, name: str) -> dict[str, Any] | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("the API server blinked")
        return real(namespace, name)

    parts.fleet.get = flaky_get  # type: ignore[method-assign]
    parts.commands.observe(command_object("c1", vm="vm1"))
    tracked = parts.commands.get("uid-ns-c1")
    assert tracked is not None and tracked.status.get("results") is None
    parts.commands.tick()
    assert tracked.status["results"][0]["phase"] == Phase.QUEUED


def test_the_probe_fails_until_the_controller_started_and_when_its_loop_stopped() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        handlers.alive(SimpleNamespace())
    ctx = context(controller_parts())
    with pytest.raises(RuntimeError, match="loop has stopped"):
        handlers.alive(SimpleNamespace(ctx=ctx))
