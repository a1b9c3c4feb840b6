"""The controller's readiness endpoint, ``/readyz`` (kopf's ``/healthz`` is its liveness).

Ready means the controller can do its work: its caches are synced and the broker and
the API server answer. It does not mean leading: a warm standby is Ready, so a Service
in front of the replicas (metrics) needs no leader-only readiness, and a rolling update
waits for the new replica to be able to take over before it stops an old one. The
answer is computed at most once a second, however often it is asked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("controller.readiness")

Check = Callable[[], tuple[bool, str]]


class CachedCheck:
    """``check()`` at most once per ``ttl`` seconds."""

    def __init__(self, check: Check, ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.check = check
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._answer: tuple[bool, str] = (False, "not checked yet")

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            now = self.clock()
            if self._at is None or now - self._at >= self.ttl:
                try:
                    self._answer = self.check()
                except Exception as exc:  # noqa: BLE001 - not ready, and why
                    self._answer = (False, f"the readiness check failed: {exc}")
                self._at = now
            return self._answer


def serve_readiness(port: int, check: Check, address: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve ``GET /readyz`` (200 ready, 503 not, the reason as text) in a daemon thread."""
    cached = CachedCheck(check)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/readyz":
                self.send_error(404)
                return
            ok, reason = cached()
            body = (reason + "\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds: no access log

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="vmfleet-readyz", daemon=True).start()
    log.info("Serving /readyz on %s:%s", address, server.server_address[1])
    return server


__all__ = ["CachedCheck", "serve_readiness"]
