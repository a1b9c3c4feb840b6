"""The VMs a worker serves, and the check every message it runs passes first.

The controller sets ``VMFLEET_SERVED_VMS`` on each worker it starts: a JSON object from
``<namespace>/<vm>`` to the name of that VM's credentials Secret, for the VMs of the
worker's group (its own VM, or its pool's members) and the bastions they jump through.
A transfer worker, which reaches the VMs of whole namespaces, is given ``<namespace>/*``
(any VM of that namespace) or ``*`` (any namespace) with the Secret ``*``: its Secrets
come from the API, not from mounts.

A worker refuses a message (:class:`vmfleet.api.signing.Refused`) whose VM, or any
target it would connect to, is not in the set, or names a Secret other than the one
the set records for that VM. An empty or absent set serves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .envelope import Target
from .signing import Refusal, Refused

SERVED_ENV: Final = "VMFLEET_SERVED_VMS"
ANY: Final = "*"


@dataclass(frozen=True)
class Served:
    """``<namespace>/<vm>`` (or ``<namespace>/*``, or ``*``) → its Secret's name (or ``*``)."""

    vms: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> Served:
        if not text or not text.strip():
            return cls({})
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{SERVED_ENV} is not JSON: {exc}") from exc
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"{SERVED_ENV} must be a JSON object of strings "
                             '({"<namespace>/<vm>": "<secret>"})')
        return cls(dict(value))

    @classmethod
    def of(cls, namespace: str, vms: Iterable[tuple[str, str]]) -> Served:
        """The set of one worker group: ``(vm, secret)`` pairs of one namespace."""
        return cls({f"{namespace}/{vm}": secret for vm, secret in sorted(vms)})

    def encode(self) -> str:
        return json.dumps(dict(sorted(self.vms.items())), separators=(",", ":"))

    def secret_of(self, namespace: str, vm: str) -> str | None:
        """The Secret recorded for the VM (``*``: any), or None when it is not served."""
        for key in (f"{namespace}/{vm}", f"{namespace}/{ANY}", ANY):
            if key in self.vms:
                return self.vms[key]
        return None

    def serves_namespace(self, namespace: str) -> bool:
        """Whether any VM of ``namespace`` is served: only then may this worker report on
        that namespace's attempts (its broker user reaches no other namespace's keys)."""
        return any(key == ANY or key.split("/", 1)[0] == namespace for key in self.vms)

    def check_vm(self, namespace: str, vm: str) -> None:
        if self.secret_of(namespace, vm) is None:
            raise Refused(Refusal.NOT_SERVED,
                          f"RemoteVM {namespace}/{vm} is not served by this worker")

    def check(self, namespace: str, target: Target) -> None:
        """The target (and its bastion) is served, with the Secret the set records."""
        secret = self.secret_of(namespace, target.vm)
        if secret is None:
            raise Refused(Refusal.NOT_SERVED,
                          f"RemoteVM {namespace}/{target.vm} is not served by this worker")
        if secret not in (ANY, target.secret):
            raise Refused(Refusal.WRONG_SECRET,
                          f"the message names a Secret that is not RemoteVM {namespace}/"
                          f"{target.vm}'s")
        if target.bastion is not None:
            self.check(namespace, target.bastion)


__all__ = ["ANY", "SERVED_ENV", "Served"]
