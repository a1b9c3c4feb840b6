"""RemoteCommands with a ``transfer`` action: one result entry per destination VM (pure).

Transfers are scheduled like commands (``Commands``, ``schedule.plan``) and sent by the
same path (``Commands._send``): each destination's attempt goes as
``remote_tasks.transfer_file`` to the namespace's transfer queue
(``vmfleet.<namespace>:transfers``), with the targets of the source and that destination
and the names of the namespace's credentials Secrets (never copied), and wakes the
namespace's transfer worker if it is scaled to zero. The worker claims it in Redis,
heartbeats and reports progress; a lost attempt (stale heartbeat) is retried or ends
``WorkerLost`` by the one retry policy, and a cleanup task removes its temporary file.

This module says what a transfer is made of and what to send; it sends nothing.
"""

from __future__ import annotations

from typing import Any

from vmfleet.api.constants import TASK_TRANSFER, Phase, Reason
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import F

from .targets import initial_results


def initial_transfer_results(
    spec: RemoteCommandSpec, vms: dict[str, dict[str, Any]], now: str,
    phase: str = Phase.QUEUED,
) -> list[dict[str, Any]]:
    """One entry per destination VM, in ``phase`` (as ``targets.initial_results``). A
    missing source VM fails every destination."""
    transfer = spec.transfer
    assert transfer is not None
    names = [loc.vm for loc in transfer.to]
    results = initial_results(names, vms, now, phase=phase)
    source = transfer.from_.describe()
    paths = {loc.vm: loc.path for loc in transfer.to}
    missing_source = transfer.from_.vm is not None and transfer.from_.vm not in vms
    for entry in results:
        entry["transfer"] = {"source": source, "path": paths[entry["vm"]]}
        if missing_source and entry["phase"] == phase:
            entry.update({F.COMPLETION_TIME: now}, phase=Phase.FAILED, reason=Reason.VM_NOT_FOUND,
                         message=f"source RemoteVM {transfer.from_.vm} does not exist in this "
                         "namespace")
            entry.pop("dispatchTime", None)
    return results


def transfer_vms(spec: RemoteCommandSpec) -> list[str]:
    """Every VM a transfer names: its destinations, then its source VM (if any)."""
    assert spec.transfer is not None
    names = [loc.vm for loc in spec.transfer.to]
    if spec.transfer.from_.vm:
        names.append(spec.transfer.from_.vm)
    return names


def attempt_vms(spec: RemoteCommandSpec, destination: str) -> list[str]:
    """The VMs one destination's attempt touches (their targets go in its message)."""
    assert spec.transfer is not None
    source = spec.transfer.from_.vm
    return [destination] + ([source] if source else [])


def protects_unseen_keys(spec: RemoteCommandSpec, task: str) -> bool:
    """Whether this message must name the credentials Secrets of RemoteVMs the watch may
    not have brought yet (read from the API first): an attempt copying from a Secret, so
    the key of a VM created just before it is protected too."""
    assert spec.transfer is not None
    return spec.transfer.from_.secret_key_ref is not None and task == TASK_TRANSFER


def lost_attempts(results: list[dict[str, Any]], lost: frozenset[str]) -> list[tuple[str, int]]:
    """``(destination, attempt)`` of each lost attempt, whose temporary file a cleanup
    task removes: an entry put back to Pending already counts its next attempt."""
    found = []
    for entry in results:
        if entry["vm"] in lost:
            attempt = int(entry.get("attempt") or 1)
            found.append((entry["vm"], attempt - 1 if entry.get("phase") == Phase.PENDING
                          else attempt))
    return found


__all__ = ["attempt_vms", "initial_transfer_results", "lost_attempts", "protects_unseen_keys",
           "transfer_vms"]
