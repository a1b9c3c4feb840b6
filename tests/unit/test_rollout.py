"""spec.rollout: waves by batch size and label partition, and the health gate (pure, with a
fake clock), and the controller dispatching one wave at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from controller.rollout import assign_waves, step
from tests.fakes import FakeState, Fleet, command
from vmfleet.api.models import RemoteCommandSpec, Rollout

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def z(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def vm(zone: str | None) -> dict[str, Any]:
    return {"metadata": {"labels": {"zone": zone} if zone else {}}}


VMS = {"a1": vm("a"), "a2": vm("a"), "a3": vm("a"), "b1": vm("b"), "n1": vm(None),
       "c1": vm("c"), "c2": vm("c")}


@pytest.mark.parametrize(
    ("rollout", "waves"),
    [
        ({"batchSize": 2}, [["a1", "a2"], ["a3", "b1"], ["c1", "c2"], ["n1"]]),
        ({"batchSize": "30%"}, [["a1", "a2"], ["a3", "b1"], ["c1", "c2"], ["n1"]]),  # 30% of 7 = 2
        ({"partitionBy": "zone"}, [["a1", "a2", "a3"], ["b1"], ["c1", "c2"], ["n1"]]),
        ({"partitionBy": "zone", "batchSize": 2}, [["a1", "a2"], ["a3"], ["b1"], ["c1", "c2"], ["n1"]]),
        ({}, [["a1", "a2", "a3", "b1", "c1", "c2", "n1"]]),
    ],
)
def test_assign_waves(rollout, waves):
    assert assign_waves(Rollout.model_validate(rollout), list(VMS), VMS) == waves


def test_rollout_is_refused_on_a_transfer():
    with pytest.raises(ValidationError, match="rollout applies to commands"):
        RemoteCommandSpec.model_validate({
            "transfer": {"from": {"vm": "a", "path": "/x"}, "to": [{"vm": "b", "path": "/y"}]},
            "rollout": {"batchSize": 1}})


def entries(*waves_phases: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"vm": f"vm{i}", "phase": p, "attempt": 1, "wave": w}
            for i, (w, p) in enumerate(waves_phases)]


def test_the_next_wave_waits_for_the_current_one_and_the_batch_wait():
    r = Rollout.model_validate({"batchSize": 1, "batchWaitSeconds": 30})
    status = {"results": entries((0, "Running"), (1, "Pending"))}
    s = step(r, status, NOW, lambda vm: None)
    assert s.open_wave == 0 and s.status == {"waves": 2, "currentWave": 1}
    status = {"results": entries((0, "Failed"), (1, "Pending")), "rollout": s.status}
    s = step(r, status, NOW, lambda vm: None)
    assert s.open_wave == 0 and s.status["nextWaveAfter"] == z(NOW + timedelta(seconds=30))
    s = step(r, {**status, "rollout": s.status}, NOW + timedelta(seconds=31), lambda vm: None)
    assert s.open_wave == 1 and s.status == {"waves": 2, "currentWave": 2}


def ready_vm(probe_at: datetime, ready: str = "True") -> dict[str, Any]:
    return {"status": {"lastProbe": {"time": z(probe_at)},
                       "conditions": [{"type": "Ready", "status": ready, "reason": "x"}]}}


def test_health_gate_probes_then_waits_for_a_fresh_ready():
    r = Rollout.model_validate({"batchSize": 1, "healthGate": {"timeoutSeconds": 60}})
    status: dict[str, Any] = {"results": entries((0, "Succeeded"), (1, "Pending"))}
    s = step(r, status, NOW, lambda vm: ready_vm(NOW - timedelta(seconds=5)))
    assert s.probe == ["vm0"] and s.open_wave == 0
    status["rollout"] = s.status
    stale = step(r, status, NOW + timedelta(seconds=2), lambda vm: ready_vm(NOW - timedelta(seconds=5)))
    assert stale.open_wave == 0 and stale.probe == [] and stale.stop is None
    fresh = step(r, status, NOW + timedelta(seconds=3), lambda vm: ready_vm(NOW + timedelta(seconds=2)))
    assert fresh.open_wave == 1


def test_health_gate_stops_on_not_ready_or_timeout():
    r = Rollout.model_validate({"batchSize": 1, "healthGate": {"timeoutSeconds": 60}})
    status: dict[str, Any] = {"results": entries((0, "Succeeded"), (1, "Pending")),
                              "rollout": {"waves": 2, "currentWave": 1,
                                          "waveCompleteTime": z(NOW), "healthGateSince": z(NOW)}}
    bad = step(r, status, NOW + timedelta(seconds=3),
               lambda vm: ready_vm(NOW + timedelta(seconds=2), ready="False"))
    assert bad.stop == "wave 1: RemoteVM vm0 is not Ready after the wave"
    late = step(r, status, NOW + timedelta(seconds=61), lambda vm: None)
    assert late.stop == "wave 1: no fresh Ready probe from vm0 within 60s"
    assert late.status["stopped"] == late.stop


def test_the_controller_dispatches_one_wave_at_a_time_and_stops_on_a_failed_gate():
    fleet = Fleet("vm1", "vm2", "vm3")
    fleet.vms["vm3"]["metadata"]["labels"] = {"zone": "a"}
    probed: list[str] = []
    commands = fleet.commands(FakeState())
    commands.probe = lambda ns, name: probed.append(name)
    commands.observe(command(selector={}, rollout={"partitionBy": "zone",
                                                   "healthGate": {"timeoutSeconds": 1}}))
    assert [e.vm for e in fleet.envelopes()] == ["vm3"]  # zone a first, unlabelled last
    (tracked,) = commands.tracked()
    waves = {e["vm"]: e["wave"] for e in tracked.status["results"]}
    assert waves == {"vm1": 1, "vm2": 1, "vm3": 0}
    entry = next(e for e in tracked.status["results"] if e["vm"] == "vm3")
    entry.update(phase="Succeeded", reason="Completed")
    with tracked.lock:
        commands.advance(tracked)
    assert probed == ["vm3"] and len(fleet.envelopes()) == 1
    tracked.status["rollout"]["healthGateSince"] = z(datetime.now(UTC) - timedelta(seconds=5))
    with tracked.lock:
        commands.advance(tracked)  # no fresh probe within 1 s: stopped
    phases = {e["vm"]: (e["phase"], e.get("reason")) for e in tracked.status["results"]}
    assert phases == {"vm1": ("Cancelled", "HealthGateFailed"),
                      "vm2": ("Cancelled", "HealthGateFailed"), "vm3": ("Succeeded", "Completed")}
    assert len(fleet.envelopes()) == 1
    assert tracked.status["phase"] == "Cancelled"
    assert "no fresh Ready probe from vm3" in tracked.status["rollout"]["stopped"]
