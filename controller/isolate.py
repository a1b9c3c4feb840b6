"""No object can stop the controller: a failure handling one object stays with it.

Every piece of per-object work (a watch event, an object of the start-up list, one
command's or one VM's share of a tick) runs inside ``Recorder.guard``: an exception is
counted in ``vmfleet_reconcile_errors_total{kind}``, logged with the object's name, and
posted once as a Warning Event (reason ``ReconcileError``) on the object itself; then
the caller goes on with the next object. Errors that are not about one object (the API
server or Redis away) are retried by the loop as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast

from vmfleet import metrics
from vmfleet.api import constants as c
from vmfleet.api.times import now_rfc3339

log = logging.getLogger("controller")

REASON_RECONCILE_ERROR = "ReconcileError"
MAX_REMEMBERED = 10_000  # (uid, error) pairs already posted: bounded
for _kind in (c.VM_KIND, c.COMMAND_KIND):
    metrics.RECONCILE_ERRORS.labels(_kind)  # exported at 0 from the start


class EventSink(Protocol):
    def create_namespaced_event(self, namespace: str, body: Any) -> Any: ...


def describe(exc: BaseException) -> str:
    """The error as one short line (its type and first line; never a traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:512] if text else type(exc).__name__


class Recorder:
    """Records failures on the objects they belong to (``events``: the core API, or None
    for log and metric only)."""

    def __init__(self, events: EventSink | None = None) -> None:
        self.events = events
        self._posted: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @contextmanager
    def guard(self, kind: str, obj: dict[str, Any] | None, doing: str) -> Iterator[None]:
        """Run a block of work on ``obj``; an exception in it is recorded, not raised."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the point: it stays with this object
            self.record(kind, obj, doing, exc)

    def record(self, kind: str, obj: dict[str, Any] | None, doing: str, exc: BaseException) -> None:
        metrics.RECONCILE_ERRORS.labels(kind).inc()
        meta = (obj or {}).get("metadata") or {}
        ref = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
        message = f"Could not {doing}: {describe(exc)}"
        with self._lock:
            key = (str(meta.get("uid") or ref), describe(exc))
            again = key in self._posted
            if not again:
                if len(self._posted) >= MAX_REMEMBERED:
                    self._posted.clear()
                self._posted.add(key)
        if again:  # the same error of the same object: counted, logged briefly
            log.debug("%s %s: %s (again)", kind, ref, message)
            return
        log.error("%s %s: %s", kind, ref, message, exc_info=exc)
        if self.events is not None and meta.get("uid") and meta.get("namespace"):
            self._post(kind, meta, message)

    def _post(self, kind: str, meta: dict[str, Any], message: str) -> None:
        now = now_rfc3339()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": c.API_VERSION, "kind": kind, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": "Warning", "reason": REASON_RECONCILE_ERROR, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": "vmfleet-controller"},
            "reportingComponent": "vmfleet-controller",
        }
        try:
            assert self.events is not None
            self.events.create_namespaced_event(meta["namespace"], cast(Any, event))
        except Exception as exc:  # noqa: BLE001 - the log line and the metric remain
            log.warning("Could not post Event %s for %s %s/%s: %s", REASON_RECONCILE_ERROR,
                        kind, meta["namespace"], meta["name"], exc)


__all__ = ["REASON_RECONCILE_ERROR", "Recorder", "describe"]
