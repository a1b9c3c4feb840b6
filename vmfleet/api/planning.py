"""The controller's side of the execution plan: a validated spec made into a
:class:`~vmfleet.api.plan.Plan` (the plan itself, which workers read, is in
``vmfleet.api.plan`` and imports no pydantic).

:func:`plan_from_spec_wire` reads a message of the release before plans (``spec`` only):
it is the one place a worker may reach the API models, imported on the first such
message, never at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .plan import InvalidPlan, Location, Plan, Transfer

if TYPE_CHECKING:
    from .models import RemoteCommandSpec


def plan_of(spec: RemoteCommandSpec) -> Plan:
    """The plan of a validated spec (a templateRef command: its resolved spec)."""
    transfer = None
    if spec.transfer is not None:
        t = spec.transfer
        transfer = Transfer(source=t.from_.plan_source(),
                            to=tuple(Location(loc.vm, loc.path) for loc in t.to),
                            mode=t.mode, create_dirs=t.create_dirs, overwrite=t.overwrite,
                            verify=t.verify)
    return Plan(
        command=spec.command,
        argv=tuple(spec.argv) if spec.argv is not None else None,
        script=spec.script,
        transfer=transfer,
        env=dict(spec.env) if spec.env else None,
        working_dir=spec.working_dir,
        stdin=spec.stdin,
        become_user=spec.become.user if spec.become is not None else None,
        timeout_seconds=spec.timeout_seconds,
        active_deadline_seconds=spec.active_deadline_seconds,
        success_exit_codes=tuple(spec.success_exit_codes),
        output_max_bytes=spec.output.max_bytes,
        ttl_seconds_after_finished=spec.ttl_seconds_after_finished,
    )


def plan_from_spec_wire(spec: Mapping[str, Any]) -> Plan:
    """The plan of a message in the previous release's form (``spec`` only): validated
    with the API models, imported here (pydantic is loaded on the first such message).
    Raises :class:`InvalidPlan` with the validation error."""
    from .models import RemoteCommandSpec

    try:
        return plan_of(RemoteCommandSpec.model_validate(dict(spec)))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InvalidPlan(f"invalid spec: {exc}") from exc


__all__ = ["plan_from_spec_wire", "plan_of"]
