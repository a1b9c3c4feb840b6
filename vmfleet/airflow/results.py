"""From a finished RemoteCommand to what an Airflow task returns (pure; no Airflow import)."""

from __future__ import annotations

from typing import Any

from vmfleet.api.constants import Phase
from vmfleet.api.models import RemoteCommandStatus, TargetResult
from vmfleet.api.times import parse_rfc3339

__all__ = ["CommandFailed", "failure_message", "is_finished", "result_of", "results_of",
           "retarget"]

_STDERR_IN_MESSAGE = 4096


class CommandFailed(Exception):
    """The RemoteCommand ended without success on at least one VM."""


def is_finished(obj: dict[str, Any] | None) -> bool:
    phase = ((obj or {}).get("status") or {}).get("phase")
    return phase in Phase.TERMINAL


def _duration(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        a, b = parse_rfc3339(start), parse_rfc3339(end)
    except ValueError:
        return None
    return round((b - a).total_seconds(), 3)


def result_of(entry: TargetResult) -> dict[str, Any]:
    """One VM's result as the task returns it (plain JSON for XCom)."""
    return {
        "vm": entry.vm,
        "host": entry.host,
        "phase": entry.phase,
        "success": entry.phase == Phase.SUCCEEDED,
        "exit_code": entry.exit_code,
        "reason": entry.reason,
        "message": entry.message,
        "stdout": entry.stdout or "",
        "stderr": entry.stderr or "",
        "stdout_bytes": entry.stdout_bytes,
        "stderr_bytes": entry.stderr_bytes,
        "output_truncated": bool(entry.output_truncated),
        "attempt": entry.attempt,
        "dispatch_time": entry.dispatch_time,
        "start_time": entry.start_time,
        "completion_time": entry.completion_time,
        "duration_seconds": _duration(entry.start_time, entry.completion_time),
    }


def results_of(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{vm: result}`` for every target VM of a RemoteCommand's status, in VM order."""
    parsed = RemoteCommandStatus.model_validate(status or {})
    return {e.vm: result_of(e) for e in sorted(parsed.results or [], key=lambda e: e.vm)}


def failure_message(namespace: str, name: str, status: dict[str, Any] | None) -> str | None:
    """None when the command succeeded; else what went wrong, VM by VM, with stderr tails."""
    parsed = RemoteCommandStatus.model_validate(status or {})
    if parsed.phase == Phase.SUCCEEDED:
        return None
    lines = [f"RemoteCommand {namespace}/{name} {(parsed.phase or 'Unknown').lower()}"]
    failed = [e for e in parsed.results or [] if e.phase != Phase.SUCCEEDED]
    if not failed:
        # Refused before any VM ran it (invalid spec, no targets): the conditions say why.
        for cond in parsed.conditions or []:
            if cond.status == "True" and cond.message:
                lines.append(f"{cond.type}: {cond.reason}: {cond.message}")
                break
    for entry in sorted(failed, key=lambda e: e.vm):
        head = f"on {entry.vm}: {entry.reason or entry.phase}"
        if entry.exit_code is not None:
            head += f" (exit code {entry.exit_code})"
        if entry.message:
            head += f": {entry.message}"
        lines.append(head)
        stderr = (entry.stderr or "").rstrip("\n")
        if stderr:
            if len(stderr) > _STDERR_IN_MESSAGE:
                stderr = "…" + stderr[-_STDERR_IN_MESSAGE:]
            lines.append(f"stderr of {entry.vm}:\n{stderr}")
    return "\n".join(lines)


def retarget(spec: dict[str, Any], vms: list[str]) -> dict[str, Any]:
    """``spec`` (wire form) aimed at exactly ``vms`` (``only_failed`` on a task retry)."""
    out = {k: v for k, v in spec.items() if k not in ("vm", "vms", "selector")}
    out["vms"] = list(vms)
    return out
