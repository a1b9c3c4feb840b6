"""What a terminal is told of a RemoteCommand's results: the exit code ``vmfleet exec`` and
``vmfleet logs`` return for them and the lines that explain a failure on stderr.

Pure functions on the status' ``results`` (dicts as the API server returns them), shared
by :mod:`vmfleet.exec` and :mod:`vmfleet.logscli`; tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TextIO

from .api.constants import Phase, Reason

# Exit codes that are not a remote exit status.
EXIT_TRANSPORT = 255  # the command did not run or its connection broke (as ssh does)
EXIT_TIMEOUT = 124  # timeoutSeconds or activeDeadlineSeconds expired (as timeout(1) does)
EXIT_CANCELLED = 130  # cancelled (Ctrl-C, or someone deleted the RemoteCommand)
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away

TRANSPORT_REASONS = frozenset({
    Reason.TRANSPORT_ERROR, Reason.AUTH_FAILED, Reason.HOST_KEY_MISMATCH, Reason.VM_NOT_FOUND,
    Reason.CREDENTIALS_INVALID, Reason.WORKER_LOST, Reason.INVALID_SPEC, Reason.NO_TARGETS,
})
TIMEOUT_REASONS = frozenset({Reason.TIMEOUT, Reason.DEADLINE_EXCEEDED})



def exit_code_for(result: dict[str, Any]) -> int:
    """The exit code ``vmfleet exec`` reports for one VM's final result."""
    phase, reason, code = result.get("phase"), result.get("reason"), result.get("exitCode")
    if phase == Phase.SUCCEEDED:
        return int(code or 0)
    if phase == Phase.CANCELLED or reason == Reason.CANCELLED:
        return EXIT_CANCELLED
    if reason in TIMEOUT_REASONS:
        return EXIT_TIMEOUT
    if code is not None and reason not in TRANSPORT_REASONS:
        return int(code) if int(code) != 0 else 1
    return EXIT_TRANSPORT


def fan_out_exit_code(results: Sequence[dict[str, Any]]) -> int:
    """0 when every VM succeeded; else the largest of the VMs' exit codes (at least 1)."""
    failed = [exit_code_for(r) for r in results if r.get("phase") != Phase.SUCCEEDED]
    return max([1, *failed]) if failed else 0


def failure_message(result: dict[str, Any]) -> str | None:
    """A line for stderr when a VM's result is not just the command's own exit status."""
    phase, reason = result.get("phase"), result.get("reason")
    if phase == Phase.SUCCEEDED or reason == Reason.EXIT_CODE:
        return None
    vm = result.get("vm", "?")
    detail = result.get("message") or ""
    if reason in TRANSPORT_REASONS or (reason is None and result.get("exitCode") is None):
        what = "the command did not run or its connection broke"
        if reason == Reason.WORKER_LOST:
            what = "the worker running the command was lost"
        return f"vmfleet: {vm}: {reason or 'Failed'}: {detail or what}"
    if reason in TIMEOUT_REASONS:
        return f"vmfleet: {vm}: {reason}: {detail or 'the command took too long and was ended'}"
    if phase == Phase.CANCELLED or reason == Reason.CANCELLED:
        return f"vmfleet: {vm}: cancelled{': ' + detail if detail else ''}"
    if reason == Reason.EXIT_CODE or result.get("exitCode") is not None:
        return None
    return f"vmfleet: {vm}: {reason}: {detail}" if detail else f"vmfleet: {vm}: {reason}"


def truncation_notices(result: dict[str, Any]) -> list[str]:
    """Say which streams were cut to their tail in status (the worker's log has all)."""
    if not result.get("outputTruncated"):
        return []
    notes = []
    vm = result.get("vm", "?")
    for stream in ("stdout", "stderr"):
        total = result.get(f"{stream}Bytes")
        kept = len((result.get(stream) or "").encode())
        if total is not None and total > kept:
            notes.append(f"vmfleet: {vm}: {stream} was truncated: showing the last {kept} of "
                         f"{total} bytes (the full output is in the worker's log)")
    if not notes:
        notes.append(f"vmfleet: {vm}: output was truncated (the full output is in the worker's log)")
    return notes


def is_final(result: dict[str, Any]) -> bool:
    return result.get("phase") in Phase.TERMINAL


def command_failure(obj: dict[str, Any]) -> str:
    """Why a command ended without any per-VM result (e.g. no VM matched, invalid spec)."""
    status = obj.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("message"):
            return str(condition["message"])
    return f"the RemoteCommand ended {status.get('phase', 'without a result')}"


def write(stream: TextIO, text: str) -> None:
    """Write output text; characters the terminal's encoding lacks become '?', never a crash."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = stream.encoding or "utf-8"
        stream.write(text.encode(encoding, errors="replace").decode(encoding))


def api_message(exc: Any) -> str:
    """The API server's own message in an ``ApiException`` (else its status and reason)."""
    import json

    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"


__all__ = ["EXIT_BROKEN_PIPE", "EXIT_CANCELLED", "EXIT_TIMEOUT", "EXIT_TRANSPORT", "EXIT_USAGE",
           "TIMEOUT_REASONS", "TRANSPORT_REASONS", "api_message", "command_failure",
           "exit_code_for", "failure_message", "fan_out_exit_code", "is_final",
           "truncation_notices", "write"]
