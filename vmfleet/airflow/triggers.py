"""RemoteCommandTrigger: waits in the triggerer until one RemoteCommand has finished — no
worker slot held, no SSH polling, and one Kubernetes watch per namespace shared by every
trigger of the triggerer (:mod:`vmfleet.airflow.watches`).

A user's mark-failed, mark-success or clear of the deferred task deletes the
RemoteCommand (which stops its remote processes); a triggerer that stops, restarts or
hands the trigger to another triggerer deletes nothing: the task is still ``deferred``
then, and the next triggerer picks the same RemoteCommand up again.

With ``stream_output`` the trigger also shows the command's output in the task log while
it waits (:mod:`vmfleet.airflow.output`: read through the API server's aggregated
``logs.vmfleet.io`` API, the read position kept in the RemoteCommand's
``airflow.vmfleet.io/output-position`` annotation). The triggerer routes a trigger's log
records to that task's log (``<task log>.trigger.<triggerer job id>.log``, shown by the UI
and the REST API with the task's own) by the ``trigger_id`` it binds in the trigger's
asyncio task; the reader runs in a task the trigger starts, which inherits it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import suppress
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from vmfleet.api import constants as c

from .connection import KubeSettings
from .output import CHECKPOINT_SECONDS, AnnotationStore, OutputFollower, OutputUnavailable, read_records
from .results import is_finished
from .watches import DELETED, FINISHED, Outcome, shared_watch

__all__ = ["EVENT_DELETED", "EVENT_FINISHED", "RemoteCommandTrigger"]

EVENT_FINISHED = FINISHED
EVENT_DELETED = DELETED
_BACKOFF_MAX = 30.0
# After the command finished, how long the trigger waits for the rest of its output.
OUTPUT_DRAIN_SECONDS = 15.0
# Airflow's triggerer writes a trigger's log records to the task's log only until it hears
# that the trigger ended; records still queued then go to the triggerer's own log (seen
# with 100 tasks on a loaded machine: the last batch of a few tasks). So the trigger waits
# a moment after its last line, and hands the lines of its last seconds to the task, which
# logs them again, marked (repeat).
OUTPUT_SETTLE_SECONDS = 1.0
OUTPUT_RESHOW_SECONDS = 2.0  # before the settling: the last batch or two


def _airflow_3_3_plus() -> bool:
    """Airflow 3.3 calls ``on_kill`` for a user's action only (never on a triggerer restart)."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("apache-airflow-core")).release >= (3, 3)


class RemoteCommandTrigger(BaseTrigger):
    """Fires one event when RemoteCommand ``namespace/name`` is finished (or gone).

    The event's payload is ``{"event": "finished", "name", "namespace", "phase",
    "command_status"}`` with the object's whole ``status``, or ``{"event": "deleted", …}``
    when the object disappeared before it finished.

    :param name: the RemoteCommand's name.
    :param namespace: its namespace.
    :param kubernetes_conn_id: an Airflow connection of type ``kubernetes``, resolved in
        the triggerer (no credentials are stored with the trigger).
    :param config_file: a kubeconfig path on the triggerer's machine.
    :param cluster_context: the kubeconfig context to use.
    :param in_cluster: use the pod's service account.
    :param watch_timeout_seconds: how long one watch request lasts before it is renewed.
    :param not_before: a Unix time before which no event fires (the operator sets it a few
        seconds after the deferral: see ``STALE_EVENT_GUARD_SECONDS`` in the operators).
    :param stream_output: show the command's output in the task log while waiting (one
        request held open per trigger; see :mod:`vmfleet.airflow.output`). The event then
        says ``"output_streamed": True`` when all of it was shown (``"output_shown"``: how
        many records were), and
        ``"output_last_lines"`` holds the lines of its last seconds, for the task to log
        again marked ``(repeat)`` (the triggerer may not have written them to the task's
        log before it heard that the trigger ended).
    :param output_checkpoint_seconds: at most one write of the read position (an
        annotation on the RemoteCommand) per this many seconds; lines reach the task log
        in batches this far apart.
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        kubernetes_conn_id: str | None = None,
        config_file: str | None = None,
        cluster_context: str | None = None,
        in_cluster: bool | None = None,
        watch_timeout_seconds: int = 300,
        not_before: float | None = None,
        stream_output: bool = False,
        output_checkpoint_seconds: float = CHECKPOINT_SECONDS,
    ) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.settings = KubeSettings(
            kubernetes_conn_id=kubernetes_conn_id, config_file=config_file,
            cluster_context=cluster_context, in_cluster=in_cluster,
        )
        self.watch_timeout_seconds = watch_timeout_seconds
        self.not_before = not_before
        self.stream_output = stream_output
        self.output_checkpoint_seconds = output_checkpoint_seconds
        self._fired = False
        self._command_done = False
        self._follower: OutputFollower | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                **self.settings.to_kwargs(),
                "watch_timeout_seconds": self.watch_timeout_seconds,
                "not_before": self.not_before,
                "stream_output": self.stream_output,
                "output_checkpoint_seconds": self.output_checkpoint_seconds,
            },
        )

    def _event(self, kind: str, obj: dict[str, Any] | None, output_streamed: bool = False,
               output_last_lines: list[str] | None = None, output_shown: int = 0) -> TriggerEvent:
        status = (obj or {}).get("status") or {}
        return TriggerEvent({
            "event": kind,
            "name": self.name,
            "namespace": self.namespace,
            "phase": status.get("phase"),
            "command_status": status,
            "output_streamed": output_streamed,
            "output_last_lines": output_last_lines or [],
            "output_shown": output_shown,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # Started from this task, the reader inherits the trigger_id the triggerer bound
        # for its log records: its lines go to this task's log.
        follower = asyncio.ensure_future(self.show_output()) if self.stream_output else None
        try:
            watch = shared_watch(self.settings, self.namespace, self.watch_timeout_seconds)
            outcome = await watch.wait(self.name, self._wait_alone)
            self._command_done = True
            early = (self.not_before or 0.0) - time.time()
            streamed = False
            last_lines: list[str] = []
            if follower is not None:
                drain = max(early, OUTPUT_DRAIN_SECONDS if outcome.kind == EVENT_FINISHED else 0.0)
                done, _ = await asyncio.wait({follower}, timeout=drain)
                streamed = bool(done) and follower.result()
                if not done:
                    self.log.warning("The output of RemoteCommand %s/%s did not end within %.0f s of "
                                     "the command: the task shows its output as the status has it",
                                     self.namespace, self.name, drain)
                    follower.cancel()  # no line after this one: the task logs the tails
                    with suppress(asyncio.CancelledError):
                        await follower
                if streamed and self._follower is not None:
                    await asyncio.sleep(OUTPUT_SETTLE_SECONDS)
                    last_lines = self._follower.recent(OUTPUT_SETTLE_SECONDS + OUTPUT_RESHOW_SECONDS)
            early = (self.not_before or 0.0) - time.time()
            if early > 0:
                await asyncio.sleep(early)
            self._fired = True
            yield self._event(outcome.kind, outcome.obj, output_streamed=streamed,
                              output_last_lines=last_lines,
                              output_shown=self._follower.shown if self._follower is not None else 0)
        finally:
            if follower is not None and not follower.done():
                follower.cancel()
                with suppress(asyncio.CancelledError):
                    await follower

    async def show_output(self) -> bool:
        """Show the command's output in the task log until it ended; True when all of it
        was shown. Never raises: the output is a view, the event is what the task needs."""
        from functools import partial

        describe = f"{self.namespace}/{self.name}"
        try:
            api_client = await self.settings.async_api_client()
        except Exception as exc:  # noqa: BLE001 - the event does not depend on it
            self.log.warning("Not showing the output of RemoteCommand %s: %s", describe, exc)
            return False
        try:
            self._follower = OutputFollower(
                partial(read_records, api_client, self.namespace, self.name),
                AnnotationStore(api_client, self.namespace, self.name),
                lambda line: self.log.info("%s", line),
                describe=describe, checkpoint_seconds=self.output_checkpoint_seconds,
                finished=lambda: self._command_done, logger=self.log,
            )
            return await self._follower.run()
        except OutputUnavailable as exc:
            (self.log.info if exc.not_served else self.log.warning)(
                "Not showing the output in the task log: %s", exc)
        except Exception as exc:  # noqa: BLE001 - as above; the event still comes
            self.log.warning("Stopped showing the output of RemoteCommand %s in the task log: %s: %s",
                             describe, type(exc).__name__, exc)
        finally:
            await api_client.close()
        return False

    async def _wait_alone(self) -> Outcome:
        events = self._run_alone()
        try:
            payload = (await events.__anext__()).payload
        finally:
            await events.aclose()
        return Outcome(payload["event"], {"status": payload["command_status"]})

    async def _run_alone(self) -> AsyncGenerator[TriggerEvent, None]:
        """A watch of this one object (for a RemoteCommand without the operators' label)."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        api_client = await self.settings.async_api_client()
        backoff = 1.0
        try:
            api = client.CustomObjectsApi(api_client)
            while True:
                try:
                    event = await self._wait(api)
                except ApiException as exc:
                    if exc.status not in (410, 429) and (exc.status or 0) < 500:
                        raise
                    self.log.warning("Watch on RemoteCommand %s/%s ended (%s); resuming",
                                     self.namespace, self.name, exc.status)
                except (TimeoutError, OSError) as exc:
                    # aiohttp's connection errors are OSErrors: the API server is away.
                    self.log.warning("Lost the API server while watching RemoteCommand %s/%s: %s; "
                                     "retrying in %.0f s", self.namespace, self.name, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                else:
                    if event is not None:
                        yield event
                        return
                    backoff = 1.0
        finally:
            await api_client.close()

    async def _wait(self, api: Any) -> TriggerEvent | None:
        """One GET then one watch from its resourceVersion; None when the watch timed out."""
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            obj = await api.get_namespaced_custom_object(
                c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, self.name
            )
        except ApiException as exc:
            if exc.status == 404:
                return self._event(EVENT_DELETED, None)
            raise
        if is_finished(obj):
            return self._event(EVENT_FINISHED, obj)
        self.log.info("Watching RemoteCommand %s/%s (phase %s)", self.namespace, self.name,
                      (obj.get("status") or {}).get("phase") or "Pending")
        w = watch.Watch()
        async with w.stream(
            api.list_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL,
            field_selector=f"metadata.name={self.name}",
            resource_version=obj["metadata"]["resourceVersion"],
            timeout_seconds=self.watch_timeout_seconds,
            allow_watch_bookmarks=False,
        ) as stream:
            async for item in stream:
                kind, current = item.get("type"), item.get("object") or {}
                if kind == "DELETED":
                    return self._event(EVENT_DELETED, current)
                if kind in ("ADDED", "MODIFIED") and is_finished(current):
                    return self._event(EVENT_FINISHED, current)
        return None

    async def task_state(self) -> str | None:
        """The task instance's state as the API server has it now (None if unknown)."""
        ti = getattr(self, "task_instance", None)
        if ti is None:
            return None
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=ti.map_index,
        )
        key = f"{ti.task_id}_{ti.map_index}" if ti.map_index is not None and ti.map_index >= 0 \
            else ti.task_id
        state = (states.get(ti.run_id) or {}).get(key)
        return None if state is None else str(getattr(state, "value", state))

    async def safe_to_cancel(self) -> bool:
        """True when the user moved the task out of ``deferred`` (mark-failed, clear, …).

        A task still ``deferred`` means the trigger is only being moved (a triggerer
        stopping or restarting): its RemoteCommand must keep running. Unknown: not safe.
        """
        try:
            state = await self.task_state()
        except Exception as exc:  # noqa: BLE001 - deleting nothing is the safe answer
            self.log.warning("Could not read the state of the task waiting on RemoteCommand "
                             "%s/%s (%s): keeping the command", self.namespace, self.name, exc)
            return False
        return state is not None and state != "deferred"

    async def on_kill(self) -> None:
        """A user marked, cleared or killed the deferred task: cancel its RemoteCommand.

        Airflow 3.3+ calls this for a user's action only, never when a triggerer stops,
        restarts or hands the trigger over (the task is then still deferred and its
        command must go on). The task's state is not read here: after a clear, the next
        try can already be deferred again by the time this runs.
        """
        if self._fired:
            return
        await self.delete_command()

    async def cleanup(self) -> None:
        """Before Airflow 3.3 the triggerer calls no on_kill: a trigger that ends without an
        event while its task is no longer deferred was cancelled by a user (the check the
        cncf-kubernetes pod trigger makes); one whose task is still deferred was moved."""
        if self._fired or _airflow_3_3_plus():
            return
        if await self.safe_to_cancel():
            await self.delete_command()

    async def delete_command(self) -> None:
        """Delete the RemoteCommand, which cancels it (the controller stops its processes)."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        api_client = await self.settings.async_api_client()
        try:
            await client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
                c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, self.name
            )
            self.log.info("Deleted RemoteCommand %s/%s (the task was killed, marked or cleared)",
                          self.namespace, self.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        finally:
            await api_client.close()
