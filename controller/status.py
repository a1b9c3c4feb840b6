"""The one place RemoteCommand status is written from (the controller is its only writer).

``status_patch(written, desired)`` (pure) turns the status as last written into the
status wanted now: the whole status as a merge patch the first time, then a JSON Patch
that replaces only the result entries and fields that changed (no ``test`` operations
are needed: nobody else writes). Every field goes through the typed status models of
``vmfleet.api.models`` first, so a field the CRD does not define is an error here, not
something the API server's structural schema drops without a word.
"""

from __future__ import annotations

from typing import Any

from controller.fold import fold, set_condition
from vmfleet.api.constants import Condition, Phase, Reason
from vmfleet.api.models import RemoteCommandStatus, RemoteVMStatus, TargetResult
from vmfleet.api.reports import F

from .reports import ATTEMPT_FIELDS

Patch = dict[str, Any] | list[dict[str, Any]]


class UnknownField(ValueError):
    """A status write names a field the API does not have (a bug in the controller)."""


def _known(model: type[Any], body: dict[str, Any], where: str) -> None:
    names = {field.alias or name for name, field in model.model_fields.items()}
    unknown = sorted(set(body) - names)
    if unknown:
        raise UnknownField(f"{where} has no field {', '.join(unknown)}")


def checked_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A result entry as written: known fields only, validated, no nulls."""
    _known(TargetResult, entry, f"status.results[{entry.get('vm')}]")
    if entry.get("transfer") is not None:
        from vmfleet.api.models import TransferResult

        _known(TransferResult, entry["transfer"], f"status.results[{entry.get('vm')}].transfer")
    TargetResult.model_validate(entry)
    return {key: value for key, value in entry.items() if value is not None}


def checked_status(status: dict[str, Any]) -> dict[str, Any]:
    _known(RemoteCommandStatus, status, "status")
    body = {key: value for key, value in status.items() if value is not None and key != "results"}
    RemoteCommandStatus.model_validate(body)
    if status.get("results") is not None:
        body["results"] = [checked_entry(entry) for entry in status["results"]]
    return body


def status_patch(written: dict[str, Any] | None, desired: dict[str, Any]) -> Patch | None:
    """The patch from ``written`` to ``desired`` (None: nothing changed)."""
    desired = checked_status(desired)
    written = written or {}
    old_results = written.get("results")
    new_results = desired.get("results")
    if old_results is None or new_results is None or len(old_results) != len(new_results):
        if {k: v for k, v in written.items()} == desired:
            return None
        return {"status": desired}
    ops: list[dict[str, Any]] = []
    for index, (old, new) in enumerate(zip(old_results, new_results, strict=True)):
        if old != new:
            ops.append({"op": "replace", "path": f"/status/results/{index}", "value": new})
    for key, value in desired.items():
        if key != "results" and written.get(key) != value:
            ops.append({"op": "add", "path": f"/status/{key}", "value": value})
    for key in written:
        if key not in desired:
            ops.append({"op": "remove", "path": f"/status/{key}"})
    return ops or None


def internal_error_status(status: dict[str, Any], message: str, now: str, *,
                          bare: bool = False) -> dict[str, Any]:
    """The status of a command whose wanted status failed validation (pure): ``Failed``,
    reason ``InternalError``, every unfinished entry failed with it, every entry that is
    itself invalid cut to its VM and attempt. ``bare``: not even that could be written,
    so no results at all."""
    results: list[dict[str, Any]] = []
    for entry in [] if bare else status.get("results") or []:
        try:
            entry = checked_entry(entry)
        except ValueError:
            entry = {F.VM: str(entry.get(F.VM)), F.ATTEMPT: int(entry.get(F.ATTEMPT) or 1)}
        if entry.get(F.PHASE) not in Phase.TERMINAL:
            entry = {k: v for k, v in entry.items() if k not in ATTEMPT_FIELDS}
            entry.update({F.PHASE: Phase.FAILED, F.REASON: Reason.INTERNAL_ERROR,
                          F.MESSAGE: message, F.COMPLETION_TIME: now})
        results.append(entry)
    new: dict[str, Any] = {F.START_TIME: status.get(F.START_TIME) or now}
    if not bare:
        new["results"] = results
    new.update(fold(results, {}, now))
    conditions = set_condition(new["conditions"], Condition.FAILED, "True", Reason.INTERNAL_ERROR,
                               message, now)
    new.update(phase=Phase.FAILED, conditions=set_condition(
        conditions, Condition.FINISHED, "True", Phase.FAILED, message, now))
    new.setdefault(F.COMPLETION_TIME, now)
    return new


def checked_vm_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The RemoteVM status fields that validate against ``RemoteVMStatus``, and an error
    for each one that does not (dropped: a bug, never written)."""
    names = {field.alias or name for name, field in RemoteVMStatus.model_fields.items()}
    valid: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in fields.items():
        if key not in names:
            errors.append(f"status has no field {key}")
            continue
        try:
            RemoteVMStatus.model_validate({key: value})
        except ValueError as exc:
            errors.append(f"status.{key}: {exc}")
            continue
        valid[key] = value
    return valid, errors


__all__ = ["UnknownField", "checked_entry", "checked_status", "checked_vm_fields",
           "internal_error_status", "status_patch"]
