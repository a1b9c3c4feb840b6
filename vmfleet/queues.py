"""Queue depth: ready messages in a Celery queue, read from the broker through kombu.

One definition for the autoscaler (``controller.scaling``) and the metrics collector
(``vmfleet_queue_depth``). A queue nobody declared yet holds nothing (0); any other
error is an error — raised for one queue, logged and counted for a scrape of many —
never a silent 0.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

log = logging.getLogger("vmfleet.queues")


class BrokerUnreachable(ConnectionError):
    """No channel to the broker, even after reconnecting once."""


class QueueDepth:
    """Ready messages in a queue, through kombu: the same call for Redis and RabbitMQ.

    Keeps one connection (reopened once on an error). A queue nobody declared yet (no
    message ever sent) holds nothing: 0.
    """

    def __init__(self, broker_url: str, timeout: float = 3.0) -> None:
        self.broker_url = broker_url
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: Any = None
        #: Per queue: how many reads failed (not counting a queue not declared yet).
        self.failures: Counter[str] = Counter()

    def _connection(self) -> Any:
        from kombu.connection import Connection

        if self._conn is None:
            self._conn = Connection(self.broker_url, connect_timeout=self.timeout,
                                    transport_options={"socket_timeout": self.timeout})
            self._conn.ensure_connection(max_retries=1)
        return self._conn

    def __call__(self, queue: str) -> int:
        with self._lock:
            for attempt in (1, 2):
                try:
                    conn = self._connection()
                    channel = conn.channel()
                except Exception as exc:  # noqa: BLE001 - reconnect once, then report the error
                    self.close_locked()
                    if attempt == 2:
                        raise BrokerUnreachable(f"the broker is unreachable: {exc}") from exc
                    continue
                try:
                    return int(channel.queue_declare(queue, passive=True).message_count)
                except Exception as exc:  # noqa: BLE001
                    if _not_found(exc):
                        return 0
                    self.close_locked()
                    if attempt == 2:
                        raise
                finally:
                    try:
                        channel.close()
                    except Exception:  # noqa: BLE001
                        pass
        raise AssertionError("unreachable")

    def sizes(self, queues: list[str]) -> dict[str, int]:
        """Depth of each queue that could be read. A queue that could not is left out
        (logged, counted in ``failures``); an unreachable broker raises
        :class:`BrokerUnreachable` at once rather than timing out once per queue."""
        found: dict[str, int] = {}
        for queue in queues:
            try:
                found[queue] = self(queue)
            except BrokerUnreachable:
                raise
            except Exception as exc:  # noqa: BLE001 - the other queues are still read
                self.failures[queue] += 1
                log.warning("Could not read the depth of queue %s: %s", queue, exc)
        return found

    def close_locked(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "code", None) or getattr(exc, "reply_code", None)
    return code == 404 or "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower()


__all__ = ["BrokerUnreachable", "QueueDepth"]
