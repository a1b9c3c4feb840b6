"""The leader's own list and watch of RemoteCommands (kopf watches the rest).

A RemoteCommand's events need none of kopf's machinery (no handler state, no finalizer,
no per-object queue): kopf would keep a memory record for every command it ever saw
(10,000 finished commands: 10,000 records), list them all in one response at start, and
route each event through its asyncio queues and a thread pool. Here the leader lists the
commands in pages of 500 (``list``: each page is applied before the next is read), notes
each scope's resourceVersion, and then watches from it in a thread per scope that hands
each event straight to ``apply(type, object)``. A watch the server ends is resumed from
the last resourceVersion seen (bookmarks included); one that is too old (410 Gone) lists
again, and the commands held that the new list lacks are ``gone`` (deleted meanwhile).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

from kubernetes.watch.watch import iter_resp_lines

from vmfleet.api import constants as c
from vmfleet.kube import ApiException, Kube

log = logging.getLogger("controller.watch")

Apply = Callable[[str, dict[str, Any]], None]  # (event type, object)
Gone = Callable[[str | None, set[str]], None]  # (scope, uids listed): the rest were deleted
PAGE = 500


class Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class CommandWatch:
    """RemoteCommands of ``scopes`` (a namespace each; None: the whole cluster, filtered
    by ``watched``), listed, then watched, each event applied in the watch's thread."""

    def __init__(self, kube: Kube, scopes: tuple[str | None, ...],
                 watched: Callable[[str], bool], apply: Apply, gone: Gone, *,
                 server_timeout: int = 270) -> None:
        self.kube = kube
        self.scopes = scopes
        self.watched = watched
        self.apply = apply
        self.gone = gone
        self.server_timeout = server_timeout
        self.versions: dict[str | None, str] = {}
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def _call(self, scope: str | None, **kwargs: Any) -> Any:
        custom = self.kube.custom
        if scope is None:
            return custom.list_cluster_custom_object(c.GROUP, c.VERSION, c.COMMAND_PLURAL, **kwargs)
        return custom.list_namespaced_custom_object(c.GROUP, c.VERSION, scope, c.COMMAND_PLURAL,
                                                    **kwargs)

    def list(self, scope: str | None) -> Iterator[dict[str, Any]]:
        """Every watched command of ``scope``, a page at a time (the peak memory is one
        page); records the list's resourceVersion, where the watch starts."""
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE}
            if token:
                kwargs["_continue"] = token
            page = cast(dict[str, Any], self._call(scope, **kwargs))
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if meta.get("resourceVersion"):
                self.versions[scope] = str(meta["resourceVersion"])
            items = page.get("items") or []
            del page
            yield from (i for i in items if self.watched(i["metadata"]["namespace"]))
            if not token:
                return

    def list_all(self) -> Iterator[dict[str, Any]]:
        for scope in self.scopes:
            yield from self.list(scope)

    def start(self) -> None:
        for scope in self.scopes:
            thread = threading.Thread(target=self._run, args=(scope,), daemon=True,
                                      name=f"vmfleet-watch-{scope or 'cluster'}")
            thread.start()
            self.threads.append(thread)

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self.threads)

    def close(self) -> None:
        """No event is applied from now on (the thread ends at its next event or timeout)."""
        self.stop.set()

    def _run(self, scope: str | None) -> None:
        while not self.stop.is_set():
            try:
                self._watch(scope)
            except Expired:
                log.info("The watch of RemoteCommands %s expired; listing them again",
                         f"in {scope}" if scope else "cluster-wide")
                self._relist(scope)
            except Exception as exc:  # noqa: BLE001 - the API server away: resumed shortly
                log.warning("Watching RemoteCommands failed: %s; watching again", exc)
                self.stop.wait(1.0)

    def _relist(self, scope: str | None) -> None:
        try:
            listed = set()
            for obj in self.list(scope):
                if self.stop.is_set():
                    return
                listed.add(obj["metadata"]["uid"])
                self.apply("ADDED", obj)
            self.gone(scope, listed)
        except Exception as exc:  # noqa: BLE001 - tried again by the next round
            log.warning("Listing RemoteCommands failed: %s; trying again", exc)
            self.versions.pop(scope, None)
            self.stop.wait(1.0)

    def _watch(self, scope: str | None) -> None:
        version = self.versions.get(scope)
        if version is None:
            raise Expired()
        try:
            response = self._call(scope, watch=True, resource_version=version,
                                  allow_watch_bookmarks=True, timeout_seconds=self.server_timeout,
                                  _preload_content=False,
                                  _request_timeout=(10, self.server_timeout + 30))
        except ApiException as exc:
            if exc.status == 410:
                raise Expired() from exc
            raise
        try:
            for line in iter_resp_lines(response):
                if self.stop.is_set():
                    return
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired()
                    raise RuntimeError(f"the watch failed: {obj.get('message') or obj}")
                meta = obj.get("metadata") or {}
                if meta.get("resourceVersion"):
                    self.versions[scope] = str(meta["resourceVersion"])
                if kind == "BOOKMARK" or not self.watched(str(meta.get("namespace"))):
                    continue
                self.apply(str(kind), obj)
        finally:
            response.close()
            response.release_conn()


__all__ = ["CommandWatch", "Expired"]
