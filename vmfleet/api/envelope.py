"""The small message the controller sends to a VM's queue for one attempt on one VM."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The status time helpers live in .times; importable from here too (older imports).
from .times import now_rfc3339, parse_rfc3339, rfc3339

__all__ = ["Envelope", "now_rfc3339", "parse_rfc3339", "rfc3339"]


@dataclass(frozen=True)
class Envelope:
    namespace: str
    name: str
    uid: str
    vm: str
    attempt: int
    dispatch_time: str
    spec: dict[str, Any]
    # What the worker needs to claim without reading the command first (the claim's
    # ``test`` operations check it): the VM's position in ``status.results``, how many
    # entries there are, the command's startTime, and the process group of a lost
    # previous attempt to terminate first. Messages without ``index`` make the worker
    # read the command.
    index: int | None = None
    targets: int = 0
    command_start: str | None = None
    lost_pgid: int | None = None
    lost_marker: str | None = None
    entry_keys: tuple[str, ...] = ()  # the fields the entry has (a previous attempt's go)

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Envelope:
        fields = {k: message[k] for k in ("namespace", "name", "uid", "vm", "attempt")}
        index = message.get("index")
        lost_pgid = message.get("lost_pgid")
        return cls(
            **fields,
            dispatch_time=str(message.get("dispatch_time", "")),
            spec=dict(message.get("spec") or {}),
            index=int(index) if index is not None else None,
            targets=int(message.get("targets") or 0),
            command_start=message.get("command_start"),
            lost_pgid=int(lost_pgid) if lost_pgid is not None else None,
            lost_marker=message.get("lost_marker"),
            entry_keys=tuple(message.get("entry_keys") or ()),
        )

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"
