"""RemoteVM reconciliation: keep the VM's workers running and report them in status."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from pydantic import ValidationError

from vmfleet.api.models import RemoteVMSpec

from .context import Context
from .runtime import VMRef

log = logging.getLogger("controller.vms")


def vm_ref(body: dict[str, Any]) -> VMRef:
    meta = body["metadata"]
    try:
        spec = RemoteVMSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        raise kopf.PermanentError(f"RemoteVM spec is invalid: {exc}") from exc
    return VMRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], spec=spec)


def reconcile_vm(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """Ensure the workers; return the ``status.workers`` block."""
    vm = vm_ref(body)
    return ctx.runtime.ensure(vm)
