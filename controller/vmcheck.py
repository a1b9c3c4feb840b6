"""Which RemoteVMs the controller refuses to serve, and why (pure).

The broker is no way around the namespace boundary: a RemoteVM's queue is always under
its namespace's prefix (``vmfleet.<namespace>.``, ``constants.queue_prefix``) and holds
no ``:`` after it (reserved for the product's own queues, such as
``constants.transfer_queue``). Two RemoteVMs of a namespace never share a queue (pool
members included: each has its own, the pool's Deployment consumes them all): the one
created later (then by name) is refused, naming the other.

A refused RemoteVM gets no worker and no dispatch: ``Ready=False`` with reason
``InvalidSpec``, a Warning Event, and commands aimed at it fail at once with the same
reason. The API server refuses most of it at admission already (the chart's
ValidatingAdmissionPolicy); the controller checks it always.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from vmfleet.api.constants import default_queue, queue_prefix
from vmfleet.api.models import RemoteVMSpec

VMKey = tuple[str, str]  # (namespace, name)


def queue_of(obj: dict[str, Any]) -> str:
    """The RemoteVM's queue: ``spec.queue``, else ``vmfleet.<namespace>.<name>``."""
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    queue = spec.get("queue") if isinstance(spec, dict) else None
    return str(queue) if queue else default_queue(str(meta["namespace"]), str(meta["name"]))


def queue_problem(namespace: str, queue: str) -> str | None:
    """Why ``queue`` may not be a RemoteVM's queue in ``namespace`` (None: it may)."""
    prefix = queue_prefix(namespace)
    if not queue.startswith(prefix):
        return (f"spec.queue {queue!r} is outside namespace {namespace}: a RemoteVM's queue "
                f"must start with {prefix!r} (or leave spec.queue unset)")
    rest = queue[len(prefix):]
    if not rest or ":" in rest:
        return (f"spec.queue {queue!r} is not allowed: after {prefix!r} it needs a name "
                "without ':' (':' is reserved for vmfleet's own queues)")
    return None


def spec_problem(obj: dict[str, Any]) -> str | None:
    """Why the spec cannot be served as written (the first error, naming its field)."""
    try:
        RemoteVMSpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc") or ())
        field = f"spec.{where}" if where else "spec"
        return f"{field}: {first.get('msg', 'invalid')}"
    return None


def _order(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    return (str(meta.get("creationTimestamp") or ""), str(meta["name"]))


def problems(objs: Iterable[dict[str, Any]],
             spec_problems: dict[VMKey, str | None] | None = None) -> dict[VMKey, str]:
    """Every refused RemoteVM of ``objs`` and why: an invalid spec, a queue outside its
    namespace, or a queue an earlier RemoteVM of the namespace already has.
    ``spec_problems``: ``spec_problem`` of each object already known (a cache)."""
    found: dict[VMKey, str] = {}
    owners: dict[tuple[str, str], dict[str, Any]] = {}
    for obj in sorted(objs, key=_order):
        meta = obj["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        queue = queue_of(obj)
        known = spec_problems is not None and key in spec_problems
        invalid = spec_problems[key] if spec_problems is not None and known else spec_problem(obj)
        problem = invalid or queue_problem(key[0], queue)
        if problem is None:
            owner = owners.setdefault((key[0], queue), obj)
            if owner is not obj:
                problem = (f"spec.queue {queue!r} is already the queue of RemoteVM "
                           f"{owner['metadata']['name']}: two RemoteVMs never share a queue "
                           "(give this one its own, or leave spec.queue unset)")
        if problem is not None:
            found[key] = problem
    return found


__all__ = ["problems", "queue_of", "queue_problem", "spec_problem"]
