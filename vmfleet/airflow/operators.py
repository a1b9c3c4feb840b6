"""RemoteCommandOperator and RemoteFileTransferOperator: create a RemoteCommand, defer
to RemoteCommandTrigger until it has finished, return its results to XCom.

Every synchronous API call goes through the operator's :attr:`~_RemoteCommandBase.hook`
(a :class:`~vmfleet.airflow.hooks.VmfleetHook` built from the connection arguments, as
``SSHOperator`` works through ``ssh_hook``): create-or-attach, the brief wait, the
``only_failed`` look-up of earlier tries and the delete in ``on_kill``. What the operator
adds is Airflow's: names from the task identity, the attach checks, results to XCom.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException

from vmfleet.api import constants as c
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.rerun import ANNOTATION_RERUN_OF, LABEL_RERUN_OF, not_succeeded

from .hooks import VmfleetHook
from .naming import ANNOTATION_SPEC_HASH, TaskIdentity, command_name, spec_hash
from .output import CHECKPOINT_SECONDS, as_repeat
from .results import failure_message, is_finished, results_of, retarget
from .triggers import EVENT_DELETED, EVENT_FINISHED, RemoteCommandTrigger

__all__ = ["STALE_EVENT_GUARD_SECONDS", "RemoteCommandOperator", "RemoteFileTransferOperator"]

# Airflow 3.3 fails a deferred task whose trigger fires before the scheduler has handled
# the executor's "success" for the deferring run, once the resumed run is already running
# (apache/airflow#71580, #72716; fix proposed in #71579). Under load that report comes
# seconds late, so a trigger holds its event until this long after the deferral. A command
# that ends in the first ``defer_after_seconds`` does not defer at all.
STALE_EVENT_GUARD_SECONDS = 10.0
_POLL_SECONDS = 0.5


def _identity(context: Any) -> TaskIdentity:
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    return TaskIdentity(
        dag_id=ti.dag_id, task_id=ti.task_id, run_id=ti.run_id,
        map_index=-1 if map_index is None else int(map_index),
        try_number=int(ti.try_number or 1),
    )


class _RemoteCommandBase(BaseOperator):
    """What every vmfleet operator shares: where the cluster is, create-or-attach, defer."""

    ui_color = "#d8eefa"

    def __init__(
        self,
        *,
        namespace: str | None = None,
        kubernetes_conn_id: str | None = None,
        config_file: str | None = None,
        cluster_context: str | None = None,
        in_cluster: bool | None = None,
        deferrable: bool = True,
        watch_timeout_seconds: int = 300,
        defer_after_seconds: float = 3.0,
        stream_output: bool = True,
        output_checkpoint_seconds: float = CHECKPOINT_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.defer_after_seconds = defer_after_seconds
        self.stream_output = stream_output
        self.output_checkpoint_seconds = output_checkpoint_seconds
        self._output_streamed = False
        self._output_last_lines: list[str] = []
        self._output_shown = 0
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_file = config_file
        self.cluster_context = cluster_context
        self.in_cluster = in_cluster
        self.deferrable = deferrable
        self.watch_timeout_seconds = watch_timeout_seconds
        self._command_ref: tuple[str, str] | None = None

    # ------------------------------------------------------------------ to override
    def build_spec(self) -> dict[str, Any]:
        """The RemoteCommand spec (camelCase, as the API stores it), templates rendered."""
        raise NotImplementedError

    def deferral_timeout(self) -> timedelta | None:
        return self.execution_timeout

    allow_dry_run: bool = False
    only_failed: bool = False

    def finish(self, namespace: str, name: str, status: dict[str, Any]) -> Any:
        """Turn the finished command's status into the task's return value (or raise)."""
        if status.get("phase") == c.Phase.DRY_RUN:
            if not self.allow_dry_run:
                raise AirflowException(
                    f"RemoteCommand {namespace}/{name} was a dry run: nothing ran (pass "
                    "allow_dry_run=True to accept one)")
            self.log.info("RemoteCommand %s/%s: dry run, nothing ran", namespace, name)
            return {"dry_run": status.get("dryRun") or {}}
        self.log_output(status)
        message = failure_message(namespace, name, status)
        if message:
            raise AirflowException(message)
        self.log.info("RemoteCommand %s/%s succeeded", namespace, name)
        return results_of(status)

    # ------------------------------------------------------------------ shared
    @cached_property
    def hook(self) -> VmfleetHook:
        """The hook every API call of this task goes through (made at first use)."""
        return VmfleetHook(
            kubernetes_conn_id=self.kubernetes_conn_id, config_file=self.config_file,
            cluster_context=self.cluster_context, in_cluster=self.in_cluster,
        )

    def validated_spec(self) -> dict[str, Any]:
        try:
            return RemoteCommandSpec.model_validate(self.build_spec()).wire()
        except ValueError as exc:
            raise AirflowException(f"Task {self.task_id} builds an invalid RemoteCommand: {exc}") from exc

    def log_output(self, status: dict[str, Any]) -> None:
        """Each VM's outcome, and its output unless the trigger already showed all of it."""
        if self._output_streamed:
            if self._output_last_lines:
                self.log.info("The output's last lines again (the triggerer may not have written "
                              "them to this log before the task resumed):")
                for line in self._output_last_lines:
                    self.log.info("%s", as_repeat(line))
            self.log.info("The output is above, shown while the task was deferred")
        for vm, result in results_of(status).items():
            duration = result["duration_seconds"]
            self.log.info(
                "%s (%s): %s, exit code %s%s", vm, result["host"] or "?",
                result["reason"] or result["phase"], result["exit_code"],
                f", {duration} s" if duration is not None else "",
            )
            again = " (again: part of it is above, shown while the task was deferred)" \
                if self._output_shown else ""
            for stream in ("stdout", "stderr"):
                if result[stream] and not self._output_streamed:
                    self.log.info("%s %s%s:\n%s", vm, stream, again, result[stream].rstrip("\n"))

    def execute(self, context: Any) -> Any:
        namespace = self.hook.namespace(self.namespace)
        identity = _identity(context)
        name = command_name(identity)
        self._command_ref = (namespace, name)
        spec = self.validated_spec()
        previous = self._previous_try(namespace, identity)
        rerun_of: str | None = None
        if previous is not None:
            remaining = not_succeeded(previous.get("status"))
            if remaining == []:
                self.log.info("Every VM succeeded in the previous try (RemoteCommand %s/%s): "
                              "nothing to run again", namespace, previous["metadata"]["name"])
                return self._finish_try(context, namespace, previous["metadata"]["name"],
                                        previous.get("status") or {})
            if remaining:
                spec = retarget(spec, remaining)
                rerun_of = str(previous["metadata"]["name"])
                self.log.info("only_failed: running again on the %s VMs that did not succeed "
                              "in RemoteCommand %s/%s: %s", len(remaining), namespace, rerun_of,
                              ", ".join(remaining))
        obj = self._create_or_attach(namespace, name, identity, spec, rerun_of)
        if not is_finished(obj) and self.deferrable and self.defer_after_seconds > 0:
            obj = self._wait_briefly(namespace, name, obj)
        if is_finished(obj):
            return self._finish_try(context, namespace, name, obj.get("status") or {})
        trigger = RemoteCommandTrigger(
            name=name, namespace=namespace, **self.hook.settings.to_kwargs(),
            watch_timeout_seconds=self.watch_timeout_seconds,
            not_before=time.time() + STALE_EVENT_GUARD_SECONDS if self.deferrable else None,
            stream_output=self.stream_output,
            output_checkpoint_seconds=self.output_checkpoint_seconds,
        )
        if not self.deferrable:
            event = asyncio.run(_first_event(trigger))
            return self.execute_complete(context, event)
        self.defer(trigger=trigger, method_name="execute_complete", timeout=self.deferral_timeout())

    def _previous_try(self, namespace: str, identity: TaskIdentity) -> dict[str, Any] | None:
        """``only_failed``: the finished RemoteCommand of the previous try (its name is
        derived from the task identity), or None (first try, or it is gone)."""
        if not self.only_failed or identity.try_number <= 1:
            return None
        name = command_name(replace(identity, try_number=identity.try_number - 1))
        obj = self.hook.get_command(name, namespace)
        if obj is None:
            self.log.info("only_failed: the previous try's RemoteCommand %s/%s is gone; "
                          "running on every target", namespace, name)
            return None
        return obj if is_finished(obj) else None

    def _wait_briefly(self, namespace: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Up to ``defer_after_seconds`` in the worker: a short command needs no deferral."""
        deadline = time.monotonic() + self.defer_after_seconds
        while not is_finished(obj) and time.monotonic() < deadline:
            time.sleep(min(_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
            current = self.hook.get_command(name, namespace)
            if current is None:
                return obj  # deleted: the trigger reports it
            obj = current
        return obj

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        namespace, name = event["namespace"], event["name"]
        self._command_ref = (namespace, name)
        if event.get("event") == EVENT_DELETED:
            raise AirflowException(
                f"RemoteCommand {namespace}/{name} was deleted before it finished "
                "(cancelled by someone, or its namespace went away)"
            )
        if event.get("event") != EVENT_FINISHED:
            raise AirflowException(f"Unexpected event for RemoteCommand {namespace}/{name}: {event!r}")
        self._output_streamed = bool(event.get("output_streamed"))
        self._output_last_lines = [str(x) for x in event.get("output_last_lines") or []]
        self._output_shown = int(event.get("output_shown") or 0)
        return self._finish_try(context, namespace, name, event.get("command_status") or {})

    def _finish_try(self, context: Any, namespace: str, name: str, status: dict[str, Any]) -> Any:
        """``finish``; with ``only_failed`` on a retry, the result also holds the VMs that
        succeeded in earlier tries (this try's own result wins for a VM it ran)."""
        result = self.finish(namespace, name, status)
        if not self.only_failed or not isinstance(result, dict) or "dry_run" in result:
            return result
        identity = _identity(context)
        earlier: dict[str, Any] = {}
        for number in range(identity.try_number - 1, 0, -1):
            obj = self.hook.get_command(command_name(replace(identity, try_number=number)),
                                        namespace)
            if obj is None:
                break
            for vm, entry in results_of(obj.get("status")).items():
                if entry["success"]:
                    earlier.setdefault(vm, entry)
        return {vm: merged for vm, merged in sorted({**earlier, **result}.items())}

    def on_kill(self) -> None:
        """Deleting the RemoteCommand cancels it (the controller stops the remote processes)."""
        if self._command_ref is None:
            return
        namespace, name = self._command_ref
        if self.hook.delete_command(name, namespace):
            self.log.info("Deleted RemoteCommand %s/%s (task killed)", namespace, name)

    def _create_or_attach(
        self, namespace: str, name: str, identity: TaskIdentity,
        spec: dict[str, Any], rerun_of: str | None = None,
    ) -> dict[str, Any]:
        digest = spec_hash(spec)
        body = {"apiVersion": c.API_VERSION, "kind": c.COMMAND_KIND,
                "metadata": _metadata(namespace, name, identity, digest, rerun_of), "spec": spec}
        existing, created = self.hook.create_or_get_command(body)
        if created:
            self.log.info("Created RemoteCommand %s/%s (%s)", namespace, name,
                          _describe_target(spec))
            return existing
        annotations = existing.get("metadata", {}).get("annotations") or {}
        if not identity.matches(annotations):
            raise AirflowException(
                f"RemoteCommand {namespace}/{name} exists but was not created by this task "
                f"instance ({identity.dag_id}.{identity.task_id}, run {identity.run_id}); "
                "delete it or rename the task"
            )
        if annotations.get(ANNOTATION_SPEC_HASH) != digest:
            raise AirflowException(
                f"RemoteCommand {namespace}/{name} was created by an earlier run of this task try "
                "with a different spec; clear the task (a new try creates a new RemoteCommand) "
                "or delete the object"
            )
        self.log.info(
            "Re-attached to RemoteCommand %s/%s (phase %s): created by an earlier run of this "
            "task try, so the command is not started again", namespace, name,
            (existing.get("status") or {}).get("phase") or "Pending",
        )
        return existing


def _metadata(namespace: str, name: str, identity: TaskIdentity, digest: str,
              rerun_of: str | None) -> dict[str, Any]:
    """The RemoteCommand's metadata: the task identity, the spec's hash, and for an
    ``only_failed`` retry the previous try's command it re-runs."""
    labels, annotations = identity.labels(), {**identity.annotations(), ANNOTATION_SPEC_HASH: digest}
    if rerun_of is not None:
        labels[LABEL_RERUN_OF] = rerun_of
        annotations[ANNOTATION_RERUN_OF] = rerun_of
    return {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations}


async def _first_event(trigger: RemoteCommandTrigger) -> dict[str, Any]:
    """Wait in the worker (``deferrable=False``) with the trigger's own watch."""
    async for event in trigger.run():
        payload: dict[str, Any] = event.payload
        return payload
    raise AirflowException(f"Watch on RemoteCommand {trigger.namespace}/{trigger.name} ended early")


def _describe_target(spec: dict[str, Any]) -> str:
    if "transfer" in spec:
        t = spec["transfer"]
        to = ", ".join(f"{d['vm']}:{d['path']}" for d in t["to"])
        return f"transfer {t['from']['vm']}:{t['from']['path']} -> {to}"
    if "vm" in spec:
        return f"on {spec['vm']}"
    if "vms" in spec:
        return f"on {', '.join(spec['vms'])}"
    return f"on VMs matching {spec.get('selector')}"


class RemoteCommandOperator(_RemoteCommandBase):
    """Run a command on one RemoteVM (``vm``) or on every RemoteVM a label selector matches.

    Exactly one of ``command`` (a shell line for ``sh -c``), ``argv`` (each item quoted)
    or ``script`` (fed to ``sh -s``). The task creates one RemoteCommand per try, named
    from the dag id, task id, run id, map index and try number; a task that restarts
    within the same try re-attaches to it. It then defers to
    :class:`~vmfleet.airflow.triggers.RemoteCommandTrigger` and returns ``{vm: result}``
    (``host``, ``exit_code``, ``stdout``, ``stderr``, ``success``, ``reason``,
    ``start_time``, ``completion_time``, ``duration_seconds``, …). A command that fails on
    any VM fails the task with that VM's message and stderr.

    :param command_retries: the RemoteCommand's ``spec.retries``
        (``{"limit", "backoffSeconds", "onExitCodes"}``): retries on the VM side, within
        one task try. The operator's ``retries`` stays Airflow's own.
    :param namespace: where the RemoteCommand is created (default: the connection's
        namespace, else ``"default"``).
    :param config_file / cluster_context / in_cluster / kubernetes_conn_id: how to reach
        Kubernetes, as in the cncf-kubernetes provider.
    :param vms: a third target form, a list of RemoteVM names (exactly one of ``vm``,
        ``vms``, ``selector``).
    :param max_parallel / max_failures: a number or a percentage of the matched VMs
        (``"10%"``).
    :param only_failed: on a task retry, run only on the VMs that did not succeed in the
        previous try's RemoteCommand (found by its name); the task returns the results
        of every VM, earlier tries' successes included. A retry after a full success
        runs nothing.
    :param dry_run: create a dry run (``spec.dryRun``): nothing runs. Refused unless
        ``allow_dry_run=True``; then the task returns ``{"dry_run": status.dryRun}``.
    :param deferrable: wait in the triggerer (default) or in the worker.
    :param defer_after_seconds: wait this long in the worker first (default 3): a command
        done by then returns without deferring.
    :param stream_output: show the command's output in the task log while the task is
        deferred (default True): ``[vm] line``, stderr as ``[vm stderr] line``. It costs
        one request held open to the API server per deferred task, and a write of the read
        position (an annotation on the RemoteCommand) at most every
        ``output_checkpoint_seconds`` (default 2) while lines come; False saves both, and
        the task log shows the output tails when the command ends, as before.
    """

    template_fields: Sequence[str] = (
        "vm", "vms", "selector", "command", "argv", "script", "env", "working_dir", "stdin",
        "namespace",
    )
    template_fields_renderers = {"script": "bash", "command": "bash", "env": "json"}

    def __init__(
        self,
        *,
        vm: str | None = None,
        vms: list[str] | None = None,
        selector: dict[str, Any] | None = None,
        command: str | None = None,
        argv: list[str] | None = None,
        script: str | None = None,
        env: dict[str, str] | None = None,
        working_dir: str | None = None,
        stdin: str | None = None,
        timeout_seconds: int | None = None,
        active_deadline_seconds: int | None = None,
        command_retries: dict[str, Any] | None = None,
        success_exit_codes: list[int] | None = None,
        max_parallel: int | str | None = None,
        max_failures: int | str | None = None,
        output_max_bytes: int | None = None,
        ttl_seconds_after_finished: int | None = None,
        dry_run: bool = False,
        allow_dry_run: bool = False,
        only_failed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if sum(t is not None for t in (vm, vms, selector)) != 1:
            raise ValueError(f"{self.task_id}: set exactly one target: vm, vms or selector")
        if dry_run and not allow_dry_run:
            raise ValueError(f"{self.task_id}: dry_run=True runs nothing and never succeeds; "
                             "pass allow_dry_run=True to make the task return the dry run's "
                             "answer")
        if sum(x is not None for x in (command, argv, script)) != 1:
            raise ValueError(f"{self.task_id}: set exactly one of command, argv or script")
        self.vm = vm
        self.vms = vms
        self.selector = selector
        self.dry_run = dry_run
        self.allow_dry_run = allow_dry_run
        self.only_failed = only_failed
        self.command = command
        self.argv = argv
        self.script = script
        self.env = env
        self.working_dir = working_dir
        self.stdin = stdin
        self.timeout_seconds = timeout_seconds
        self.active_deadline_seconds = active_deadline_seconds
        self.command_retries = command_retries
        self.success_exit_codes = success_exit_codes
        self.max_parallel = max_parallel
        self.max_failures = max_failures
        self.output_max_bytes = output_max_bytes
        self.ttl_seconds_after_finished = ttl_seconds_after_finished

    def build_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "vm": self.vm,
            "vms": list(self.vms) if self.vms is not None else None,
            "selector": self.selector,
            "command": self.command,
            "argv": [str(a) for a in self.argv] if self.argv is not None else None,
            "script": self.script,
            "env": {str(k): str(v) for k, v in self.env.items()} if self.env else None,
            "workingDir": self.working_dir,
            "stdin": self.stdin,
            "timeoutSeconds": self.timeout_seconds,
            "activeDeadlineSeconds": self.active_deadline_seconds,
            "retries": self.command_retries,
            "successExitCodes": self.success_exit_codes,
            "maxParallel": self.max_parallel,
            "maxFailures": self.max_failures,
            "output": {"maxBytes": self.output_max_bytes} if self.output_max_bytes is not None else None,
            "ttlSecondsAfterFinished": self.ttl_seconds_after_finished,
            "dryRun": True if self.dry_run else None,
        }
        return {k: v for k, v in spec.items() if v is not None}


class RemoteFileTransferOperator(_RemoteCommandBase):
    """Copy a file from one RemoteVM to others over SFTP (a RemoteCommand with ``transfer``).

    ``dest_path`` defaults to ``source_path``; ``dest_vm`` may be one name or a list.
    ``mode``, ``create_dirs``, ``overwrite`` (``Always``, ``Never``, ``IfDifferent``) and
    ``verify`` (re-read and compare sha256) are the API's ``spec.transfer`` fields.
    Returns ``{"from": {"vm", "path"}, "to": [{"vm", "path"}, …], "results": {vm: result}}``.
    """

    template_fields: Sequence[str] = (
        "source_vm", "source_path", "dest_vm", "dest_path", "mode", "namespace",
    )

    def __init__(
        self,
        *,
        source_vm: str,
        source_path: str,
        dest_vm: str | list[str],
        dest_path: str | None = None,
        mode: str | None = None,
        create_dirs: bool = False,
        overwrite: str = "Always",
        verify: bool = False,
        timeout_seconds: int | None = None,
        command_retries: dict[str, Any] | None = None,
        ttl_seconds_after_finished: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_vm = source_vm
        self.source_path = source_path
        self.dest_vm = dest_vm
        self.dest_path = dest_path
        self.mode = mode
        self.create_dirs = create_dirs
        self.overwrite = overwrite
        self.verify = verify
        self.timeout_seconds = timeout_seconds
        self.command_retries = command_retries
        self.ttl_seconds_after_finished = ttl_seconds_after_finished

    def _destinations(self) -> list[dict[str, str]]:
        vms = [self.dest_vm] if isinstance(self.dest_vm, str) else list(self.dest_vm)
        path = self.dest_path or self.source_path
        return [{"vm": vm, "path": path} for vm in vms]

    def build_spec(self) -> dict[str, Any]:
        transfer: dict[str, Any] = {
            "from": {"vm": self.source_vm, "path": self.source_path},
            "to": self._destinations(),
            "createDirs": self.create_dirs,
            "overwrite": self.overwrite,
        }
        if self.verify:
            transfer["verify"] = True
        if self.mode is not None:
            transfer["mode"] = str(self.mode)
        spec: dict[str, Any] = {
            "transfer": transfer,
            "timeoutSeconds": self.timeout_seconds,
            "retries": self.command_retries,
            "ttlSecondsAfterFinished": self.ttl_seconds_after_finished,
        }
        return {k: v for k, v in spec.items() if v is not None}

    def finish(self, namespace: str, name: str, status: dict[str, Any]) -> Any:
        results = super().finish(namespace, name, status)
        return {
            "from": {"vm": self.source_vm, "path": self.source_path},
            "to": self._destinations(),
            "results": results,
        }
