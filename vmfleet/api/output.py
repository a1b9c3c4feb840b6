"""How much output a RemoteCommand's status keeps: one rule for the controller and the CLI.

A status holds, per target VM, a tail of stdout and one of stderr. Whatever the fan-out,
all tails together stay within one budget (``STATUS_OUTPUT_BUDGET``, 1 MiB: far below
etcd's 1.5 MiB object limit), so no status write is refused for its size and retried
for ever: each VM's tail is ``min(output.maxBytes, budget / targets / 2)`` bytes
(``tail_bytes``), and a result whose tail was cut says so (``outputTruncated: true``).
The controller cuts what workers report with ``cut_entry``; ``vmfleet exec`` asks for
the same share up front.
"""

from __future__ import annotations

from typing import Any, Final

STATUS_OUTPUT_BUDGET: Final = 1024 * 1024  # bytes: every result's stdout and stderr tails
STREAMS: Final = ("stdout", "stderr")


def tail_bytes(targets: int, max_bytes: int, budget: int = STATUS_OUTPUT_BUDGET) -> int:
    """Bytes of each stream's tail kept per VM for a command on ``targets`` VMs that asked
    for ``max_bytes`` (``output.maxBytes``): never more than its share of ``budget``."""
    share = max(0, budget) // (2 * max(1, targets))
    return max(0, min(max_bytes, share))


def status_limit(targets: int, max_bytes: int, budget: int = STATUS_OUTPUT_BUDGET) -> int:
    """What the controller cuts a reported tail to (``cut_entry``). The worker kept at most
    ``tail_bytes`` raw bytes; as text that can be longer (an undecodable byte becomes a
    3-byte replacement character), so where the tail already fits the command's own
    ``maxBytes`` it is cut only past the VM's share of the budget."""
    limit = tail_bytes(targets, max_bytes, budget)
    if limit < max_bytes:
        return limit
    share = max(0, budget) // (2 * max(1, targets))
    return max(limit, min(3 * limit, share))


def tail(text: str, limit: int) -> str:
    """The last ``limit`` bytes of ``text`` as UTF-8 (a character cut in two is dropped)."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    if limit <= 0:
        return ""
    return data[-limit:].decode("utf-8", errors="ignore")


def cut_entry(entry: dict[str, Any], limit: int) -> dict[str, Any]:
    """The result entry with its tails cut to ``limit`` bytes each (``outputTruncated``
    set when anything was cut); the same entry when nothing needs cutting."""
    cut = {key: tail(entry[key], limit) for key in STREAMS
           if isinstance(entry.get(key), str) and len(entry[key]) and
           len(entry[key].encode("utf-8", errors="replace")) > limit}
    if not cut:
        return entry
    return {**entry, **cut, "outputTruncated": True}


__all__ = ["STATUS_OUTPUT_BUDGET", "cut_entry", "status_limit", "tail", "tail_bytes"]
