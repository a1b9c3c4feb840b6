"""A fake of the API server's side of the output API, for unit tests (no cluster).

``FakeLogApi`` is a real HTTP server on loopback (aiohttp.web) that answers what the
Airflow trigger asks the Kubernetes API server:

- ``GET /apis/logs.vmfleet.io/v1alpha1/namespaces/{ns}/remotecommands/{name}/log``
  (``follow=true``, ``after=CURSOR``): the command's records after the cursor as NDJSON,
  in chunks that split records, then waits for more until ``end()``;
- ``GET`` and ``PATCH`` (merge patch) of the RemoteCommand in ``vmfleet.io``, for the
  annotation that keeps the read position.

The test appends output with ``print_lines``, and can make the next requests fail
(``fail_next``: statuses) or drop a stream after some records (``drop_after``). Every
request and every PATCH is recorded with its time.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from vmfleet.api.logs import CONTENT_TYPE, LogRecord, log_path


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


@dataclass
class FakeLogApi:
    namespace: str = "ops"
    name: str = "c"
    records: list[LogRecord] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    patches: list[tuple[float, dict[str, Any], str]] = field(default_factory=list)  # (time, body, type)
    fail_next: list[int | tuple[int, str]] = field(default_factory=list)  # status, or (status, message)
    drop_after: int | None = None  # records sent before the next log stream is cut
    log_status: int | None = None  # the log path answers this status (404: not served)
    ended: bool = False
    gone: bool = False
    _changed: asyncio.Condition | None = None
    _runner: web.AppRunner | None = None
    port: int = 0

    # ------------------------------------------------------------------ the test's side
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def print_lines(self, vm: str, *lines: str, stream: str = "stdout", attempt: int = 1) -> None:
        """The VM printed ``lines`` (each as given: add the newline for a whole line)."""
        for data in lines:
            seq = 1 + sum(1 for r in self.records if (r.vm, r.attempt) == (vm, attempt))
            self.records.append(LogRecord(
                vm=vm, attempt=attempt, stream=stream, seq=seq,  # type: ignore[arg-type]
                time=datetime.now(UTC).isoformat(), data=data, cursor=f"c{len(self.records) + 1}"))
        self._notify()

    def end(self) -> None:
        """Every attempt ended: follow requests end once they sent everything."""
        self.ended = True
        self._notify()

    def log_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/log")]

    def _notify(self) -> None:
        if self._changed is not None:
            changed = self._changed

            async def wake() -> None:
                async with changed:
                    changed.notify_all()

            asyncio.get_running_loop().create_task(wake())

    # ------------------------------------------------------------------ the server
    async def start(self) -> FakeLogApi:
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_get(log_path(self.namespace, self.name), self._log)
        obj = f"/apis/vmfleet.io/v1alpha1/namespaces/{self.namespace}/remotecommands/{self.name}"
        app.router.add_get(obj, self._get)
        app.router.add_patch(obj, self._patch)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request) -> web.Response | None:
        self.requests.append(Request(request.method, request.path, dict(request.query),
                                     dict(request.headers), time.monotonic()))
        if self.fail_next:
            status, message = (lambda f: f if isinstance(f, tuple) else (f, ""))(self.fail_next.pop(0))
            return web.Response(status=status, text=json.dumps(
                {"kind": "Status", "code": status, "message": message}))
        if self.gone:
            return web.Response(status=404, text="not found")
        return None

    async def _get(self, request: web.Request) -> web.Response:
        if (failed := self._record(request)) is not None:
            return failed
        return web.json_response({"metadata": {"name": self.name, "namespace": self.namespace,
                                               "annotations": dict(self.annotations)}})

    async def _patch(self, request: web.Request) -> web.Response:
        if (failed := self._record(request)) is not None:
            return failed
        body = await request.json()
        self.patches.append((time.monotonic(), body, request.headers.get("Content-Type", "")))
        self.annotations.update(body["metadata"]["annotations"])
        return await self._get(request)

    async def _log(self, request: web.Request) -> web.StreamResponse:
        if (failed := self._record(request)) is not None:
            return failed
        if self.log_status is not None:
            return web.Response(status=self.log_status, text="the server could not find the requested resource")
        assert self._changed is not None
        after = request.query.get("after")
        index = 0 if not after else int(after.removeprefix("c"))
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await response.prepare(request)
        drop, self.drop_after = self.drop_after, None
        sent = 0
        while True:
            if index < len(self.records):
                if drop is not None and sent >= drop:
                    assert request.transport is not None
                    request.transport.abort()  # no final chunk: the client sees a cut stream
                    return response
                line = (self.records[index].to_json() + "\n").encode()
                # Split each record over two chunks: a reader must join them.
                await response.write(line[:7])
                await response.write(line[7:])
                index += 1
                sent += 1
                continue
            if self.ended:
                await response.write_eof()
                return response
            async with self._changed:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)
