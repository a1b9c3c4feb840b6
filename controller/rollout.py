"""``spec.rollout``: run a command in waves (pure).

``assign_waves`` orders the target VMs into waves: with ``partitionBy`` one label value at a
time (values sorted, VMs without the label last), each value cut into ``batchSize`` VMs
(a number or a percentage of all matched VMs); without it the sorted VMs cut likewise.

``step`` says, each time the controller looks, which wave may be dispatched:

- the current wave runs (``maxParallel`` and ``maxFailures`` still apply) until every
  entry of it is final;
- with ``healthGate``, the controller then asks fresh probes of the VMs the wave
  succeeded on (``probe``) and waits until each reports ``Ready`` from a probe newer than
  the wave's end. A fresh probe that is not Ready, or no fresh Ready within
  ``timeoutSeconds``, stops the rollout: the VMs not started end ``Cancelled`` with reason
  ``HealthGateFailed``;
- after ``batchWaitSeconds`` the next wave opens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from vmfleet.api.constants import Condition, Phase, Reason
from vmfleet.api.counts import resolve_count
from vmfleet.api.models import Rollout
from vmfleet.api.times import parse_rfc3339, rfc3339

VMState = Callable[[str], dict[str, Any] | None]  # the RemoteVM of a name, as cached


def assign_waves(rollout: Rollout, names: list[str], vms: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The VMs of each wave, in order."""
    total = len(names)
    if rollout.partition_by is None:
        groups = [sorted(names)]
    else:
        key = rollout.partition_by
        values: dict[str | None, list[str]] = {}
        for name in names:
            labels = ((vms.get(name) or {}).get("metadata") or {}).get("labels") or {}
            values.setdefault(labels.get(key), []).append(name)
        order = sorted(v for v in values if v is not None) + ([None] if None in values else [])
        groups = [sorted(values[v]) for v in order]
    size = resolve_count(rollout.batch_size, total) if rollout.batch_size is not None else None
    waves: list[list[str]] = []
    for group in groups:
        step = size or len(group) or 1
        waves += [group[i:i + step] for i in range(0, len(group), step)]
    return [w for w in waves if w]


@dataclass
class RolloutStep:
    open_wave: int  # entries of waves up to this index (from 0) may be dispatched
    status: dict[str, Any]  # status.rollout
    probe: list[str] = field(default_factory=list)  # VMs to probe now
    stop: str | None = None  # why the rollout stops (the rest are cancelled)


def _fresh_ready(vm: dict[str, Any] | None, since: datetime) -> bool | None:
    """True: Ready from a probe after ``since``; False: a fresh probe that is not Ready;
    None: no fresh probe yet."""
    status = (vm or {}).get("status") or {}
    probe_time = (status.get("lastProbe") or {}).get("time")
    if not probe_time or parse_rfc3339(probe_time) <= since:
        return None
    ready: dict[str, Any] = next(
        (cd for cd in status.get("conditions") or [] if cd.get("type") == Condition.READY), {})
    return ready.get("status") == "True"


def _gate(rollout: Rollout, wave: int, entries: list[dict[str, Any]], state: dict[str, Any],
          now: datetime, vm_state: VMState) -> tuple[bool, list[str], str | None]:
    """(passed, VMs to probe now, why it failed) for the health gate after ``wave``."""
    assert rollout.health_gate is not None
    vms = [e["vm"] for e in entries if e.get("phase") == Phase.SUCCEEDED]
    if "healthGateSince" not in state:
        state["healthGateSince"] = rfc3339(now)
        return False, vms, None
    since = parse_rfc3339(state["healthGateSince"])
    waiting = []
    for vm in vms:
        verdict = _fresh_ready(vm_state(vm), since)
        if verdict is False:
            return False, [], f"wave {wave + 1}: RemoteVM {vm} is not Ready after the wave"
        if verdict is None:
            waiting.append(vm)
    if not waiting:
        return True, [], None
    if now >= since + timedelta(seconds=rollout.health_gate.timeout_seconds):
        return False, [], (f"wave {wave + 1}: no fresh Ready probe from {', '.join(waiting)} "
                           f"within {rollout.health_gate.timeout_seconds}s")
    return False, [], None


def step(rollout: Rollout, status: dict[str, Any], now: datetime, vm_state: VMState) -> RolloutStep:
    """Which wave may run now (see the module's docstring)."""
    results = status.get("results") or []
    state = dict(status.get("rollout") or {})
    waves = int(state.get("waves") or (max((int(e.get("wave") or 0) for e in results), default=0) + 1))
    state["waves"] = waves
    current = int(state.get("currentWave") or 1) - 1
    state["currentWave"] = current + 1
    if state.get("stopped") or current >= waves - 1:
        return RolloutStep(current, state)
    entries = [e for e in results if int(e.get("wave") or 0) == current]
    if any(e.get("phase") not in Phase.TERMINAL for e in entries):
        return RolloutStep(current, state)
    state.setdefault("waveCompleteTime", rfc3339(now))
    probe: list[str] = []
    if rollout.health_gate is not None:
        passed, probe, failed = _gate(rollout, current, entries, state, now, vm_state)
        if failed:
            state["stopped"] = failed
            return RolloutStep(current, state, stop=failed)
        if not passed:
            return RolloutStep(current, state, probe=probe)
    opens = parse_rfc3339(state["waveCompleteTime"]) + timedelta(seconds=rollout.batch_wait_seconds)
    if now < opens:
        state["nextWaveAfter"] = rfc3339(opens)
        return RolloutStep(current, state)
    return RolloutStep(current + 1, {"waves": waves, "currentWave": current + 2})


def stop_entries(results: list[dict[str, Any]], message: str, now: datetime) -> None:
    """The VMs not started end Cancelled (HealthGateFailed)."""
    for entry in results:
        if entry.get("phase") == Phase.PENDING and int(entry.get("attempt", 1)) == 1:
            entry.update({"phase": Phase.CANCELLED, "reason": Reason.HEALTH_GATE_FAILED,
                          "message": f"not started: the rollout stopped: {message}",
                          "completionTime": rfc3339(now)})
