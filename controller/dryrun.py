"""``spec.dryRun``: what a RemoteCommand would run on, and what would block it (pure).

The controller resolves the targets as it would for a real run, looks at each RemoteVM
(missing, paused, not Ready, ``become`` without ``allowBecome``) and at the budgets
(``maxParallel``, ``maxFailures``, resolved against the matched VMs), writes the answer
into ``status.dryRun`` and ends the command in phase ``DryRun``: nothing is sent to any
worker. The condition ``Finished`` is True with reason ``DryRun``; ``Complete`` is never
set, so nothing waiting for success mistakes a dry run for one.
"""

from __future__ import annotations

from typing import Any

from controller.fold import set_condition
from vmfleet.api.constants import Condition, Phase, Reason
from vmfleet.api.counts import describe_count, resolve_count
from vmfleet.api.models import RemoteCommandSpec

from .rollout import assign_waves

# Blockers that would make the VM's result Failed (a paused VM only waits).
_FAILING = frozenset({Reason.VM_NOT_FOUND, Reason.BECOME_NOT_ALLOWED, Reason.NOT_READY})


def blocker(spec: RemoteCommandSpec, name: str, vm: dict[str, Any] | None) -> dict[str, str] | None:
    """Why ``vm`` would not run the command, or None when nothing blocks it."""
    if vm is None:
        return {"vm": name, "reason": Reason.VM_NOT_FOUND,
                "message": f"RemoteVM {name} does not exist in this namespace"}
    vm_spec = vm.get("spec") or {}
    if vm_spec.get("paused"):
        return {"vm": name, "reason": Reason.PAUSED,
                "message": "spec.paused is true: the command would wait until it is unpaused"}
    if spec.become is not None and not vm_spec.get("allowBecome"):
        return {"vm": name, "reason": Reason.BECOME_NOT_ALLOWED,
                "message": f"spec.become asks for user {spec.become.user} but the RemoteVM has "
                "allowBecome: false"}
    ready = next((cond for cond in (vm.get("status") or {}).get("conditions") or []
                  if cond.get("type") == Condition.READY), None)
    if ready is None or ready.get("status") != "True":
        why = (ready or {}).get("message") or (ready or {}).get("reason") or "no health probe yet"
        return {"vm": name, "reason": Reason.NOT_READY, "message": f"Ready is not True: {why}"}
    return None


def report(spec: RemoteCommandSpec, names: list[str],
           vms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``status.dryRun`` for these target names (``vms``: the RemoteVMs that exist)."""
    blocked = [b for name in names if (b := blocker(spec, name, vms.get(name))) is not None]
    blocked_names = {b["vm"] for b in blocked}
    total = len(names)
    out: dict[str, Any] = {
        "matched": sorted(names),
        "runnable": sorted(n for n in names if n not in blocked_names),
        "blocked": sorted(blocked, key=lambda b: b["vm"]),
    }
    if spec.rollout is not None:
        out["waves"] = assign_waves(spec.rollout, names, vms)
    if spec.max_parallel is not None:
        out["maxParallel"] = resolve_count(spec.max_parallel, total)
    if spec.max_failures is not None:
        limit = resolve_count(spec.max_failures, total)
        out["maxFailures"] = limit
        failing = sum(1 for b in blocked if b["reason"] in _FAILING)
        if failing and failing >= limit:
            out["budget"] = (f"{failing} blocked VM{'s' if failing != 1 else ''} would fail, "
                             "reaching maxFailures "
                             f"({describe_count(spec.max_failures, total)}): the run would "
                             "stop starting VMs there")
    return out


def summary_line(dry: dict[str, Any]) -> str:
    """One line for the condition's message and the controller's log."""
    matched, blocked = len(dry["matched"]), len(dry["blocked"])
    line = (f"dry run: {matched} VM{'s' if matched != 1 else ''} matched, "
            f"{len(dry['runnable'])} would run, {blocked} would block")
    if dry.get("budget"):
        line += f"; {dry['budget']}"
    return line + "; nothing ran"


def dry_run_status(spec: RemoteCommandSpec, names: list[str], vms: dict[str, dict[str, Any]],
                   target: str, now: str) -> dict[str, Any]:
    """The whole status of a dry run: phase DryRun, Finished=True (reason DryRun)."""
    dry = report(spec, names, vms)
    message = summary_line(dry)
    conditions = set_condition([], Condition.FINISHED, "True", Reason.DRY_RUN, message, now)
    return {
        "phase": Phase.DRY_RUN, "target": target, "startTime": now, "completionTime": now,
        "completions": f"0/{len(names)}", "conditions": conditions, "dryRun": dry,
        "summary": {"targets": len(names), "pending": 0, "running": 0, "succeeded": 0,
                    "failed": 0, "cancelled": 0},
    }
