"""JSON Patches that make each attempt run at most once.

A worker claims its VM's result entry with ``test`` operations on the expected vm, phase
and attempt: two deliveries of one message cannot both pass them. The final write tests
that the entry is still this worker's running attempt.

When the entry is the command's only one (a single-VM command), the same patch also
writes the folded command fields (``vmfleet.fold``): phase, summary, conditions. The
controller's own fold then has nothing to change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmfleet.api.constants import Phase
from vmfleet.fold import fold

Patch = list[dict[str, Any]]


def result_index(status: dict[str, Any] | None, vm: str) -> int | None:
    for index, entry in enumerate((status or {}).get("results") or []):
        if entry.get("vm") == vm:
            return index
    return None


def claim_patch(index: int, vm: str, attempt: int, worker: str, now: str) -> Patch:
    base = f"/status/results/{index}"
    return [
        {"op": "test", "path": f"{base}/vm", "value": vm},
        {"op": "test", "path": f"{base}/phase", "value": Phase.QUEUED},
        {"op": "test", "path": f"{base}/attempt", "value": attempt},
        {"op": "replace", "path": f"{base}/phase", "value": Phase.RUNNING},
        {"op": "add", "path": f"{base}/startTime", "value": now},
        {"op": "add", "path": f"{base}/worker", "value": worker},
    ]


def finish_patch(
    index: int, vm: str, attempt: int, worker: str, fields: dict[str, Any],
    remove: Iterable[str] = (),
) -> Patch:
    """Write to the entry, only if it is still this worker's running attempt.

    Used for the outcome and for heartbeats; ``remove`` names fields known to be present
    that must go (e.g. the pgid of an attempt that ended).
    """
    base = f"/status/results/{index}"
    patch: Patch = [
        {"op": "test", "path": f"{base}/vm", "value": vm},
        {"op": "test", "path": f"{base}/phase", "value": Phase.RUNNING},
        {"op": "test", "path": f"{base}/attempt", "value": attempt},
        {"op": "test", "path": f"{base}/worker", "value": worker},
    ]
    for key, value in fields.items():
        if value is not None:
            patch.append({"op": "add", "path": f"{base}/{key}", "value": value})
    for key in remove:
        if fields.get(key) is None:
            patch.append({"op": "remove", "path": f"{base}/{key}"})
    return patch


def fold_ops(status: dict[str, Any] | None, entry: dict[str, Any], now: str) -> Patch:
    """For a command whose only result entry will be ``entry``: its folded fields as ops.

    ``status`` is the command's status as read before the patch (its conditions and
    completionTime are kept). Commands with several entries are folded by the controller.
    """
    if len((status or {}).get("results") or []) != 1:
        return []
    folded = fold([entry], status, now)
    return [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in folded.items()]
