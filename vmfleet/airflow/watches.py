"""One Kubernetes watch per namespace for every RemoteCommandTrigger of a triggerer.

A triggerer runs all its triggers in one asyncio loop. A watch per trigger would hold one
API connection (and one watch in the API server) per deferred task; 500 deferred tasks
would be 500 watches. Here the triggers of one loop that wait on RemoteCommands of the
same namespace, reached with the same settings, subscribe to one :class:`NamespaceWatch`:

- one LIST + WATCH of the RemoteCommands the operators created (label
  ``vmfleet.io/created-by=airflow``), resumed from its resourceVersion, re-listed after a
  410 or a lost connection; events go to the subscribers of that object's name only;
- each subscriber first registers, then reads its object once with a GET (bounded to a few
  at a time), so a command that finished before the subscription is seen without any
  event, and one that finishes after it is seen through the watch;
- objects without the label (a RemoteCommand created by other code) are waited for with a
  watch of their own, as before;
- the watch and its API client stop ``linger`` seconds after the last subscriber left.

Nothing is cached but the subscriptions: memory grows with the number of waiting tasks,
not with the number of RemoteCommands in the namespace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from vmfleet.api import constants as c

from .connection import KubeSettings
from .naming import CREATED_BY_AIRFLOW, LABEL_CREATED_BY
from .results import is_finished

__all__ = ["FINISHED", "DELETED", "NamespaceWatch", "Outcome", "shared_watch", "stats"]

log = logging.getLogger(__name__)

FINISHED = "finished"
DELETED = "deleted"
SELECTOR = f"{LABEL_CREATED_BY}={CREATED_BY_AIRFLOW}"
_BACKOFF_MAX = 30.0
_GETS_AT_ONCE = 4


@dataclass(frozen=True)
class Outcome:
    kind: str  # FINISHED or DELETED
    obj: dict[str, Any] | None


@dataclass
class Stats:
    """What this process's shared watches did (the bench reads it from the triggerer log)."""

    watches_started: int = 0
    lists: int = 0
    gets: int = 0
    events: int = 0
    per_namespace: dict[str, int] = field(default_factory=dict)


stats = Stats()


class NamespaceWatch:
    """The shared watch of one namespace in one event loop (see the module's docstring)."""

    def __init__(self, key: Hashable, settings: KubeSettings, namespace: str,
                 watch_timeout_seconds: int, linger: float) -> None:
        self.key = key
        self.settings = settings
        self.namespace = namespace
        self.watch_timeout_seconds = watch_timeout_seconds
        self.linger = linger
        self._subscribers: dict[str, set[asyncio.Future[Outcome]]] = {}
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._gets = asyncio.Semaphore(_GETS_AT_ONCE)
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ subscribers
    @property
    def subscribers(self) -> int:
        return sum(len(f) for f in self._subscribers.values())

    async def wait(self, name: str, alone: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """The outcome of RemoteCommand ``name``: finished (with the object) or deleted.

        ``alone`` waits with a watch of its own: used when the object lacks the label
        this watch selects on.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._subscribers.setdefault(name, set()).add(future)
        self._start()
        try:
            obj = await self._get(name)
            if obj is None:
                return Outcome(DELETED, None)
            if is_finished(obj):
                return Outcome(FINISHED, obj)
            labels = obj.get("metadata", {}).get("labels") or {}
            if labels.get(LABEL_CREATED_BY) != CREATED_BY_AIRFLOW:
                self._unsubscribe(name, future)
                return await alone()
            return await future
        finally:
            self._unsubscribe(name, future)

    def _unsubscribe(self, name: str, future: asyncio.Future[Outcome]) -> None:
        futures = self._subscribers.get(name)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._subscribers[name]
        if not self._subscribers and self._idle is None and self._task is not None:
            self._idle = asyncio.get_running_loop().call_later(self.linger, self._stop_if_idle)

    def _deliver(self, name: str, outcome: Outcome) -> None:
        for future in self._subscribers.get(name, ()):
            if not future.done():
                future.set_result(outcome)

    # ------------------------------------------------------------------ the API
    async def client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                self._client = await self.settings.async_api_client()
            return self._client

    async def _api(self) -> Any:
        from kubernetes_asyncio import client

        return client.CustomObjectsApi(await self.client())

    async def _get(self, name: str) -> dict[str, Any] | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        api = await self._api()
        backoff = 1.0
        while True:
            try:
                async with self._gets:
                    stats.gets += 1
                    obj: dict[str, Any] = await api.get_namespaced_custom_object(
                        c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, name)
                    return obj
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status != 429 and (exc.status or 0) < 500:
                    raise
                reason: object = exc.status
            except (TimeoutError, OSError) as exc:
                reason = exc
            log.warning("Reading RemoteCommand %s/%s failed (%s); retrying in %.0f s",
                        self.namespace, name, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    # ------------------------------------------------------------------ the watch
    def _start(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"vmfleet-watch-{self.namespace}")

    def _forget(self) -> None:
        if _WATCHES.get(self.key) is self:
            del _WATCHES[self.key]

    def _stop_if_idle(self) -> None:
        self._idle = None
        if not self._subscribers and self._task is not None:
            # A trigger that comes later gets a new watch (shared_watch), never this one.
            self._forget()
            self._task.cancel()

    async def _run(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        stats.watches_started += 1
        stats.per_namespace[self.namespace] = stats.per_namespace.get(self.namespace, 0) + 1
        log.info("Watching RemoteCommands in %s (%s) for %d deferred task(s)", self.namespace,
                 SELECTOR, self.subscribers)
        backoff = 1.0
        try:
            while True:
                try:
                    await self._list_and_watch()
                    backoff = 1.0
                except ApiException as exc:
                    if exc.status not in (410, 429) and (exc.status or 0) < 500:
                        log.error("Watch of RemoteCommands in %s failed: %s %s; retrying in %.0f s",
                                  self.namespace, exc.status, exc.reason, backoff)
                    else:
                        log.warning("Watch of RemoteCommands in %s ended (%s); re-listing",
                                    self.namespace, exc.status)
                    if exc.status != 410:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, _BACKOFF_MAX)
                except (TimeoutError, OSError) as exc:
                    log.warning("Lost the API server while watching RemoteCommands in %s: %s; "
                                "retrying in %.0f s", self.namespace, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                except Exception:
                    # Never leave the subscribers waiting on a dead watch.
                    log.exception("Watch of RemoteCommands in %s failed; retrying in %.0f s",
                                  self.namespace, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            self._forget()
            client, self._client = self._client, None
            if client is not None:
                await client.close()
            log.info("Stopped watching RemoteCommands in %s", self.namespace)

    async def _list_and_watch(self) -> None:
        from kubernetes_asyncio import watch

        api = await self._api()
        stats.lists += 1
        listing = await api.list_namespaced_custom_object(
            c.GROUP, c.VERSION, self.namespace, c.COMMAND_PLURAL, label_selector=SELECTOR)
        present = set()
        for obj in listing.get("items") or []:
            name = obj.get("metadata", {}).get("name")
            present.add(name)
            if is_finished(obj):
                self._deliver(name, Outcome(FINISHED, obj))
        for name in [n for n in self._subscribers if n not in present]:
            # Gone while the watch was down (or not labelled): ask the object itself.
            obj = await self._get(name)
            if obj is None:
                self._deliver(name, Outcome(DELETED, None))
        resource_version = listing["metadata"]["resourceVersion"]
        while True:
            w = watch.Watch()
            async with w.stream(
                api.list_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace,
                c.COMMAND_PLURAL, label_selector=SELECTOR, resource_version=resource_version,
                timeout_seconds=self.watch_timeout_seconds, allow_watch_bookmarks=True,
            ) as stream:
                async for item in stream:
                    kind, obj = item.get("type"), item.get("object") or {}
                    meta = obj.get("metadata", {}) if isinstance(obj, dict) else {}
                    resource_version = meta.get("resourceVersion") or resource_version
                    if kind == "BOOKMARK":
                        continue
                    stats.events += 1
                    name = meta.get("name")
                    if name not in self._subscribers:
                        continue
                    if kind == "DELETED":
                        self._deliver(name, Outcome(DELETED, obj))
                    elif kind in ("ADDED", "MODIFIED") and is_finished(obj):
                        self._deliver(name, Outcome(FINISHED, obj))


_WATCHES: dict[Hashable, NamespaceWatch] = {}


def shared_watch(settings: KubeSettings, namespace: str, watch_timeout_seconds: int = 300,
                 linger: float = 30.0) -> NamespaceWatch:
    """This event loop's watch of ``namespace`` for ``settings`` (created on first use)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), settings, namespace)
    watch = _WATCHES.get(key)
    if watch is None:
        watch = NamespaceWatch(key, settings, namespace, watch_timeout_seconds, linger)
        _WATCHES[key] = watch
    return watch
