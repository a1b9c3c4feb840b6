"""The small message the controller sends to a VM's queue for one attempt on one VM.

The worker reads nothing of the cluster: the envelope carries what to run (``Plan``, see
``vmfleet.api.plan``) and how to reach the VM (``Target``, built by the controller from
the RemoteVM), and the worker reads the key from the VM's credentials Secret, mounted at
``<credentials dir>/<secret name>/``. Plain dataclasses: a worker needs no pydantic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .plan import Plan
from .planning import plan_from_spec_wire

# The status time helpers live in .times. Still importable from here for
# controller/reports.py; drop this line once it imports them from .times.
from .times import now_rfc3339, parse_rfc3339, rfc3339


@dataclass(frozen=True)
class Target:
    """How to reach one VM, from its RemoteVM (no secret material: the Secret's name)."""

    vm: str
    host: str
    port: int
    user: str
    secret: str
    host_keys: tuple[str, ...] = ()
    # TrustOnFirstUse with no key recorded yet: only a health probe may connect (and
    # report the key it saw, which the controller records).
    trust_on_first_use: bool = False
    connect_timeout: float = 30.0
    allow_become: bool = False
    # maxConcurrentCommands: SSH channels in use on this VM at once, across its workers.
    max_concurrent: int = 0
    bastion: Target | None = None

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Target:
        bastion = message.get("bastion")
        return cls(
            vm=str(message["vm"]), host=str(message["host"]), port=int(message["port"]),
            user=str(message["user"]), secret=str(message["secret"]),
            host_keys=tuple(message.get("host_keys") or ()),
            trust_on_first_use=bool(message.get("trust_on_first_use")),
            connect_timeout=float(message.get("connect_timeout") or 30.0),
            allow_become=bool(message.get("allow_become")),
            max_concurrent=int(message.get("max_concurrent") or 0),
            bastion=cls.from_message(bastion) if bastion else None,
        )


def terminate_body(namespace: str, target: Target, pgid: int, marker: str | None,
                   become_user: str | None) -> dict[str, Any]:
    """The message that ends a lost attempt's remote process group on one VM (as
    ``become_user`` through sudo when the attempt ran as that user)."""
    return {"namespace": namespace, "target": target.to_message(), "pgid": pgid,
            "marker": marker, "become_user": become_user}


@dataclass(frozen=True)
class Envelope:
    namespace: str
    name: str
    uid: str
    vm: str
    attempt: int
    dispatch_time: str
    # The RemoteCommand spec's wire form: what the previous release's workers read. Sent
    # beside ``plan`` until the next minor version (vmfleet.api.plan: version skew).
    spec: dict[str, Any]
    target: Target | None = None
    # activeDeadlineSeconds counts from the command's startTime.
    command_start: str | None = None
    # The process group of a lost previous attempt, terminated before this one starts.
    lost_pgid: int | None = None
    lost_marker: str | None = None
    # Transfers: every VM the copy touches (source and destinations), by name.
    targets: dict[str, Target] = field(default_factory=dict)
    # The sending controller's scope: where the worker reports (vmfleet.state).
    scope: str = "default"
    # Transfers: the credentials Secrets the namespace's RemoteVMs name, which a transfer
    # never copies (the transfer worker cannot list RemoteVMs itself).
    protected_secrets: tuple[str, ...] = ()
    # What the worker runs (None in a message of the release before plans: ``spec`` only).
    plan: Plan | None = None

    def to_message(self) -> dict[str, Any]:
        message = {f.name: getattr(self, f.name) for f in fields(self)}
        message["target"] = self.target.to_message() if self.target else None
        message["targets"] = {k: v.to_message() for k, v in self.targets.items()}
        message["protected_secrets"] = list(self.protected_secrets)
        if self.plan is None:
            del message["plan"]
        else:
            message["plan"] = self.plan.to_message()
        return message

    def work(self) -> Plan:
        """What to run: the plan, or, in a message of the previous release (``spec``
        only), the plan read from the spec with the API models (raises ``InvalidPlan``)."""
        return self.plan if self.plan is not None else plan_from_spec_wire(self.spec)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Envelope:
        fields = {k: message[k] for k in ("namespace", "name", "uid", "vm", "attempt")}
        lost_pgid = message.get("lost_pgid")
        target = message.get("target")
        return cls(
            **fields,
            dispatch_time=str(message.get("dispatch_time", "")),
            spec=dict(message.get("spec") or {}),
            target=Target.from_message(target) if target else None,
            command_start=message.get("command_start"),
            lost_pgid=int(lost_pgid) if lost_pgid is not None else None,
            lost_marker=message.get("lost_marker"),
            targets={k: Target.from_message(v) for k, v in (message.get("targets") or {}).items()},
            scope=str(message.get("scope") or "default"),
            protected_secrets=tuple(str(s) for s in message.get("protected_secrets") or ()),
            plan=Plan.from_message(message["plan"]) if message.get("plan") is not None else None,
        )

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


__all__ = ["Envelope", "Target", "terminate_body", "now_rfc3339", "parse_rfc3339", "rfc3339"]
