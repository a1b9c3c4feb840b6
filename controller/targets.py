"""Which RemoteVMs a RemoteCommand runs on, and what its status says about them."""

from __future__ import annotations

from typing import Any

from vmfleet.api import constants as c
from vmfleet.api.constants import Phase, Reason, default_queue
from vmfleet.api.envelope import Target
from vmfleet.api.models import LabelSelector, RemoteCommandSpec
from vmfleet.api.reports import F


def label_selector_string(selector: LabelSelector) -> str:
    """The API's ``labelSelector`` query for a selector (as kubectl spells it)."""
    parts = [f"{key}={value}" for key, value in sorted((selector.match_labels or {}).items())]
    for req in selector.match_expressions or []:
        values = ",".join(req.values or [])
        if req.operator == "In":
            parts.append(f"{req.key} in ({values})")
        elif req.operator == "NotIn":
            parts.append(f"{req.key} notin ({values})")
        elif req.operator == "Exists":
            parts.append(req.key)
        else:
            parts.append(f"!{req.key}")
    return ",".join(parts)


def describe_target(spec: RemoteCommandSpec) -> str:
    """The TARGET printer column."""
    if spec.transfer is not None:
        to = ",".join(sorted({loc.vm for loc in spec.transfer.to}))
        return f"{spec.transfer.from_.vm or spec.transfer.from_.describe()} -> {to}"
    if spec.vm is not None:
        return spec.vm
    if spec.vms is not None:
        return ",".join(spec.vms) if len(spec.vms) <= 5 else \
            f"{','.join(spec.vms[:5])},... ({len(spec.vms)} VMs)"
    assert spec.selector is not None
    return label_selector_string(spec.selector) or "all VMs"


def vm_queue(vm: dict[str, Any]) -> str:
    meta = vm["metadata"]
    return str(vm["spec"].get("queue") or default_queue(meta["namespace"], meta["name"]))


def initial_results(
    names: list[str], vms: dict[str, dict[str, Any]], now: str, phase: str = Phase.QUEUED
) -> list[dict[str, Any]]:
    """One result entry per target VM (``phase``: Queued when dispatched at once, or Pending
    for the scheduler), or Failed when the VM is missing."""
    results = []
    for name in names:
        vm = vms.get(name)
        if vm is None:
            results.append({
                "vm": name, "phase": Phase.FAILED, "attempt": 1, "reason": Reason.VM_NOT_FOUND,
                "message": f"RemoteVM {name} does not exist in this namespace",
                F.COMPLETION_TIME: now,
            })
        else:
            entry = {"vm": name, "host": vm["spec"].get("host"), "phase": phase, "attempt": 1}
            if phase == Phase.QUEUED:
                entry["dispatchTime"] = now
            results.append(entry)
    return results


def vm_target(obj: dict[str, Any], bastion: Target | None = None) -> Target:
    """How a worker reaches a RemoteVM (pure): address, user, the host keys to accept (a
    TrustOnFirstUse VM's recorded key), the Secret's name, its limits."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    recorded = ((obj.get("status") or {}).get("hostKey") or {}).get("publicKey")
    tofu = spec.get("hostKeyPolicy") == c.HOST_KEY_TOFU
    keys = (recorded,) if tofu and recorded else tuple(spec.get("hostKeys") or ())
    return Target(
        vm=meta["name"], host=str(spec.get("host")), port=int(spec.get("port") or 22),
        user=str(spec.get("user")),
        secret=str((spec.get("credentialsSecretRef") or {}).get("name")),
        host_keys=keys, trust_on_first_use=tofu and not keys,
        connect_timeout=float(spec.get("connectTimeoutSeconds") or 30),
        allow_become=bool(spec.get("allowBecome")),
        max_concurrent=int(spec.get("maxConcurrentCommands") or 2),
        bastion=bastion,
    )
