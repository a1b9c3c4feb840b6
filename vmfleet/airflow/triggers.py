"""RemoteCommandTrigger: waits in the triggerer, with a Kubernetes watch on one
RemoteCommand, until that command has finished — no worker slot held, no SSH polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from vmfleet.api import constants as c

from .connection import KubeSettings
from .results import is_finished

__all__ = ["EVENT_DELETED", "EVENT_FINISHED", "RemoteCommandTrigger"]

EVENT_FINISHED = "finished"
EVENT_DELETED = "deleted"
_BACKOFF_MAX = 30.0


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
    ) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.settings = KubeSettings(
            kubernetes_conn_id=kubernetes_conn_id, config_file=config_file,
            cluster_context=cluster_context, in_cluster=in_cluster,
        )
        self.watch_timeout_seconds = watch_timeout_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                **self.settings.to_kwargs(),
                "watch_timeout_seconds": self.watch_timeout_seconds,
            },
        )

    def _event(self, kind: str, obj: dict[str, Any] | None) -> TriggerEvent:
        status = (obj or {}).get("status") or {}
        return TriggerEvent({
            "event": kind,
            "name": self.name,
            "namespace": self.namespace,
            "phase": status.get("phase"),
            "command_status": status,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
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
                except (OSError, asyncio.TimeoutError) as exc:
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

    async def on_kill(self) -> None:
        """A user killed the deferred task: delete the RemoteCommand, which cancels it."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        api_client = await self.settings.async_api_client()
        try:
            await client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
                c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, self.name
            )
            self.log.info("Deleted RemoteCommand %s/%s (task killed)", self.namespace, self.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        finally:
            await api_client.close()
