"""A worker group's backlog, as ``Fleet`` sizes it: its queues' depth and the result
entries Queued or Running on its VMs.

``entry_counts`` counts the entries over the controller's own copy of the commands (no
reads); the queue depth readers count the messages waiting in the broker, one round trip
a tick on Redis (``redis_queue_depths``), through kombu elsewhere (``kombu_queue_depths``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmfleet.api.constants import Phase
from vmfleet.tenancy import queue_key

from .runtime import TRANSFERS_GROUP

QueueDepthReader = Callable[[list[str]], dict[str, int]]
Counts = Callable[[], dict[tuple[str, str], tuple[int, int]]]  # (ns, vm) -> (queued, running)


def entry_counts(tracked: list[Any]) -> dict[tuple[str, str], tuple[int, int]]:
    """``(queued, running)`` result entries per VM over the controller's commands; a
    namespace's transfers count under ``(namespace, TRANSFERS_GROUP)``: they run on its
    transfer worker, not on their VMs' workers."""
    counts: dict[tuple[str, str], list[int]] = {}
    for command in tracked:
        transfers = getattr(command.spec, "transfer", None) is not None
        for entry in command.status.get("results") or []:
            phase = entry.get("phase")
            if phase not in (Phase.QUEUED, Phase.RUNNING):
                continue
            slot = counts.setdefault(
                (command.namespace, TRANSFERS_GROUP if transfers else entry["vm"]), [0, 0])
            slot[0 if phase == Phase.QUEUED else 1] += 1
    return {key: (v[0], v[1]) for key, v in counts.items()}


def redis_queue_depths(client: Any) -> QueueDepthReader:
    """Queue depth of Celery's Redis transport: the list and its priority lists, one
    round trip for every queue (a kombu call per queue costs a thousand calls a tick)."""
    suffixes = ("", "\x06\x163", "\x06\x166", "\x06\x169")

    def read(queues: list[str]) -> dict[str, int]:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            key = queue_key(queue)  # under its namespace's key prefix
            for suffix in suffixes:
                pipe.llen(key + suffix)
        values = pipe.execute()
        return {queue: sum(int(v) for v in values[i * 4:(i + 1) * 4])
                for i, queue in enumerate(queues)}

    return read


def kombu_queue_depths(depth: Callable[[str], int]) -> QueueDepthReader:
    def read(queues: list[str]) -> dict[str, int]:
        return {queue: depth(queue) for queue in queues}

    return read


__all__ = ["Counts", "QueueDepthReader", "entry_counts", "kombu_queue_depths", "redis_queue_depths"]
