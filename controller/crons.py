"""RemoteCronCommands as the controller runs them: caches, API calls, the tick.

The watch keeps two caches current: the RemoteCronCommands, and the RemoteCommands each
owns (by ownerReference). Each tick of the controller's loop, when this controller leads,
applies ``cron.plan`` to every RemoteCronCommand: it creates the run that is due, asks
``Commands`` to cancel what ``Replace`` stops, deletes what history or ``Replace`` drops,
posts Events and writes the status when it changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from pydantic import ValidationError

from vmfleet.api import constants as c
from vmfleet.api.cronexpr import CronError
from vmfleet.api.kinds import RemoteCronCommandSpec
from vmfleet.api.times import now_rfc3339, parse_rfc3339, rfc3339
from vmfleet.kube import ApiException, Kube

from . import cron
from .commands import Commands

log = logging.getLogger("controller.cron")


def is_leader() -> bool:
    """The default gate of a ``Crons`` made without a leadership (tests, one replica): it
    leads. The controller passes its Lease's ``Leadership.leading``."""
    return True


def _run(obj: dict[str, Any]) -> cron.Run:
    meta, status = obj["metadata"], obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    scheduled = annotations.get(cron.ANNOTATION_SCHEDULED)
    running = [str(r["vm"]) for r in status.get("results") or []
               if r.get("phase") not in c.Phase.TERMINAL]
    summary = f"{status.get('phase') or 'Pending'}" + (f" on {', '.join(running)}" if running else "")
    return cron.Run(
        name=meta["name"], uid=meta["uid"],
        scheduled=parse_rfc3339(scheduled) if scheduled else None,
        phase=status.get("phase"), completion_time=status.get("completionTime"),
        summary=summary, replaced=cron.ANNOTATION_REPLACED in annotations,
    )


def _owner(obj: dict[str, Any]) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == c.CRON_KIND and ref.get("controller"):
            return str(ref.get("uid"))
    return None


class Crons:
    """Every watched RemoteCronCommand and the runs it owns."""

    def __init__(self, kube: Kube, commands: Commands,
                 leading: Callable[[], bool] = is_leader,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.kube = kube
        self.commands = commands
        self.leading = leading
        self.clock = clock
        self._lock = threading.Lock()
        self._crons: dict[str, dict[str, Any]] = {}  # uid -> object
        self._runs: dict[str, dict[str, dict[str, Any]]] = {}  # cron uid -> run uid -> object
        self._posted: set[tuple[str, str, str]] = set()  # (uid, reason, message) already posted

    # ------------------------------------------------------------------ the watches

    def seen(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self._crons[obj["metadata"]["uid"]] = obj

    def gone(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self._crons.pop(obj["metadata"]["uid"], None)
            self._runs.pop(obj["metadata"]["uid"], None)

    def command_seen(self, obj: dict[str, Any]) -> None:
        owner = _owner(obj)
        if owner is not None:
            with self._lock:
                self._runs.setdefault(owner, {})[obj["metadata"]["uid"]] = obj

    def command_gone(self, obj: dict[str, Any]) -> None:
        owner = _owner(obj)
        if owner is not None:
            with self._lock:
                self._runs.get(owner, {}).pop(obj["metadata"]["uid"], None)

    def commands_listed(self, scope: str | None, listed: set[str]) -> None:
        """The RemoteCommands were listed again (``scope``: a namespace, None: all): a run
        the list lacks was deleted while the watch was down (finished runs too, which
        the controller no longer tracks)."""
        with self._lock:
            for runs in self._runs.values():
                for uid, obj in list(runs.items()):
                    if (scope is None or obj["metadata"].get("namespace") == scope) \
                            and uid not in listed:
                        del runs[uid]

    # ------------------------------------------------------------------ the loop

    def tick(self) -> None:
        """The controller loop: every RemoteCronCommand, when this controller leads."""
        if not self.leading():
            return
        with self._lock:
            crons = list(self._crons.values())
        for obj in crons:
            try:
                self.reconcile(obj)
            except ApiException as exc:
                log.warning("Scheduling RemoteCronCommand %s/%s failed: %s %s; trying again",
                            obj["metadata"]["namespace"], obj["metadata"]["name"], exc.status,
                            exc.reason)
            except Exception:  # noqa: BLE001 - one object never stops the others
                log.exception("Scheduling RemoteCronCommand %s/%s failed",
                              obj["metadata"]["namespace"], obj["metadata"]["name"])

    def reconcile(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        try:
            spec = RemoteCronCommandSpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            self.event(obj, "Warning", c.Reason.INVALID_SPEC,
                       f"the spec is invalid: {exc.errors()[0].get('msg', exc)}")
            return
        with self._lock:
            runs = [_run(r) for r in self._runs.get(meta["uid"], {}).values()]
        created = parse_rfc3339(meta["creationTimestamp"]) if meta.get("creationTimestamp") \
            else self.clock()
        status = obj.get("status") or {}
        try:
            step = cron.plan(meta["name"], spec, status, created, runs, self.clock())
        except CronError as exc:
            self.event(obj, "Warning", c.Reason.INVALID_SPEC, f"schedule {spec.schedule!r}: {exc}")
            return
        for run in step.cancel:
            self._cancel(meta, run)
        for run in step.delete:
            self._delete(meta, run)
        if step.create is not None:
            made = self._create(obj, spec, *step.create)
            if made is not None:  # active at once (the watch brings it a moment later)
                step.status["active"] = sorted(
                    [*(step.status.get("active") or []),
                     {"name": made["metadata"]["name"], "uid": made["metadata"]["uid"]}],
                    key=lambda ref: ref["name"])
                step.status["activeCount"] = len(step.status["active"])
        for type_, reason, message in step.events:
            self.event(obj, type_, reason, message)
        new = {**{k: v for k, v in status.items() if k != "active"}, **step.status}
        if {k: v for k, v in new.items() if v is not None} != status:
            self._write_status(obj, step.status)
            log.debug("Wrote the status of RemoteCronCommand %s", ref)

    # ------------------------------------------------------------------ API calls

    def _create(self, obj: dict[str, Any], spec: RemoteCronCommandSpec, name: str,
                scheduled: datetime) -> dict[str, Any] | None:
        """Create the run (None when it exists already: never twice)."""
        meta = obj["metadata"]
        template = spec.command_template
        labels = {**((template.metadata.labels if template.metadata else None) or {}),
                  cron.LABEL_CRON: meta["name"][:63]}
        annotations = {**((template.metadata.annotations if template.metadata else None) or {}),
                       cron.ANNOTATION_SCHEDULED: rfc3339(scheduled)}
        body = {
            "apiVersion": c.API_VERSION, "kind": c.COMMAND_KIND,
            "metadata": {
                "name": name, "namespace": meta["namespace"], "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": c.API_VERSION, "kind": c.CRON_KIND,
                                     "name": meta["name"], "uid": meta["uid"],
                                     "controller": True, "blockOwnerDeletion": False}],
            },
            "spec": template.spec.wire(),
        }
        try:
            made = self.kube.create_command(meta["namespace"], body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None  # made by an earlier tick (or controller): never twice
        self.command_seen(made)
        log.info("Created RemoteCommand %s/%s for RemoteCronCommand %s (scheduled %s)",
                 meta["namespace"], name, meta["name"], rfc3339(scheduled))
        self.event(obj, "Normal", "SuccessfulCreate", f"Created RemoteCommand {name}")
        return made

    def _cancel(self, meta: dict[str, Any], run: cron.Run) -> None:
        if not run.replaced:
            self.kube.custom.patch_namespaced_custom_object(
                c.GROUP, c.VERSION, meta["namespace"], c.COMMAND_PLURAL, run.name,
                {"metadata": {"annotations": {cron.ANNOTATION_REPLACED: now_rfc3339()}}},
                _content_type="application/merge-patch+json",
            )
            with self._lock:
                cached = self._runs.get(meta["uid"], {}).get(run.uid)
                if cached is not None:
                    cached["metadata"].setdefault("annotations", {})[cron.ANNOTATION_REPLACED] = "1"
        self.commands.cancel(run.uid, f"replaced by the next run of RemoteCronCommand "
                             f"{meta['name']} (concurrencyPolicy Replace)")

    def _delete(self, meta: dict[str, Any], run: cron.Run) -> None:
        from kubernetes.client import V1DeleteOptions, V1Preconditions

        try:
            self.kube.custom.delete_namespaced_custom_object(
                c.GROUP, c.VERSION, meta["namespace"], c.COMMAND_PLURAL, run.name,
                body=V1DeleteOptions(preconditions=V1Preconditions(uid=run.uid),
                                     propagation_policy="Background"))
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        with self._lock:
            self._runs.get(meta["uid"], {}).pop(run.uid, None)
        log.info("Deleted RemoteCommand %s/%s of RemoteCronCommand %s (%s)", meta["namespace"],
                 run.name, meta["name"], run.phase or "Pending")

    def _write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        meta = obj["metadata"]
        patched = cast(dict[str, Any], self.kube.custom.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, meta["namespace"], c.CRON_PLURAL, meta["name"],
            {"status": status}, _content_type="application/merge-patch+json"))
        with self._lock:
            if meta["uid"] in self._crons:
                self._crons[meta["uid"]] = patched

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post an Event about the RemoteCronCommand (each message once per controller)."""
        meta = obj["metadata"]
        key = (meta["uid"], reason, message)
        with self._lock:
            if key in self._posted:
                return
            if len(self._posted) > 10000:
                self._posted.clear()  # bounded: at worst an old message is posted again
            self._posted.add(key)
        now = now_rfc3339()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": c.API_VERSION, "kind": c.CRON_KIND,
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": "vmfleet-controller"},
            "reportingComponent": "vmfleet-controller",
        }
        try:
            self.kube.raw.create_namespaced_event(meta["namespace"], cast(Any, body))
        except ApiException as exc:
            log.warning("Could not post Event %s for RemoteCronCommand %s/%s: %s", reason,
                        meta["namespace"], meta["name"], exc.reason)
        (log.warning if type_ == "Warning" else log.info)(
            "RemoteCronCommand %s/%s: %s: %s", meta["namespace"], meta["name"], reason, message)
