"""How ``vmfleet exec --dry-run`` (and ``vmfleet rerun --dry-run``) print a dry run's answer."""

from __future__ import annotations

from typing import Any


def format_dry_run(namespace: str, name: str, status: dict[str, Any]) -> str:
    """The controller's answer (``status.dryRun``) as lines for a terminal."""
    dry = status.get("dryRun") or {}
    matched = list(dry.get("matched") or [])
    runnable = list(dry.get("runnable") or [])
    blocked = list(dry.get("blocked") or [])
    lines = [f"Dry run of RemoteCommand {namespace}/{name}: nothing ran.",
             (f"Matched {len(matched)} VM{'s' if len(matched) != 1 else ''}: "
              f"{', '.join(matched) or '(none)'}"),
             f"Would run on {len(runnable)}: {', '.join(runnable) or '(none)'}"]
    if blocked:
        lines.append(f"Would block on {len(blocked)}:")
        width = max(len(str(b.get("vm"))) for b in blocked)
        lines += [f"  {str(b.get('vm')).ljust(width)}  {b.get('reason')}: {b.get('message', '')}"
                  for b in blocked]
    budgets = []
    if dry.get("maxParallel") is not None:
        budgets.append(f"maxParallel {dry['maxParallel']}")
    if dry.get("maxFailures") is not None:
        budgets.append(f"maxFailures {dry['maxFailures']}")
    if budgets:
        lines.append("Budgets: " + ", ".join(budgets))
    if dry.get("budget"):
        lines.append(f"Budget exceeded: {dry['budget']}")
    for i, wave in enumerate(dry.get("waves") or [], start=1):
        lines.append(f"Wave {i}: {', '.join(wave)}")
    return "\n".join(lines) + "\n"


def dry_run_exit_code(status: dict[str, Any]) -> int:
    """0 when nothing would block, 1 otherwise."""
    dry = status.get("dryRun") or {}
    return 1 if dry.get("blocked") or dry.get("budget") or not dry.get("matched") else 0
