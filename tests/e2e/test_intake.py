"""A pool worker's intake (``remote_tasks.intake``) on a real Redis with the namespace's ACL
user and key prefix: the messages waiting on its VMs' queues come in one drain (not one
BRPOP each), no more than the prefetch limit allows, each recorded as unacknowledged
under the namespace's prefix until it is acknowledged, and put back on its own queue
when the worker stops without acknowledging it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Queue

from remote_tasks.intake import Transport
from vmfleet import tenancy
from vmfleet.celeryconf import celery_config
from vmfleet.dev.brokers import RedisServer

pytestmark = pytest.mark.e2e


def _options(namespace: str) -> dict[str, Any]:
    options: dict[str, Any] = celery_config("redis://", namespace)["broker_transport_options"]
    return options


def test_a_pool_worker_takes_what_waits_on_its_queues_in_one_drain_within_its_prefetch(
        redis_server: RedisServer) -> None:
    ns = f"intake-{uuid.uuid4().hex[:6]}"
    url = redis_server.namespace_url(ns)  # what the namespace's workers hold
    queues = [Queue(f"vmfleet.{ns}.vm{i}", routing_key=f"vmfleet.{ns}.vm{i}") for i in range(30)]
    with Connection(url, transport_options=_options(ns)) as sender:
        producer = sender.Producer(serializer="json")
        for i, queue in enumerate(queues):
            producer.publish({"i": i}, routing_key=queue.name, declare=[queue])
    prefix = tenancy.key_prefix(ns)
    admin: Any = redis.Redis.from_url(redis_server.url)
    assert sum(admin.llen(prefix + q.name) for q in queues) == 30

    got: list[Any] = []
    with Connection(url, transport=Transport, transport_options=_options(ns)) as conn:
        channel = conn.channel()
        with Consumer(channel, queues, callbacks=[lambda body, message: got.append(message)],
                      prefetch_count=20):
            conn.drain_events(timeout=5)
            # One BRPOP brought one message; the drain the 19 more the prefetch allows.
            assert len(got) == 20
            assert len({m.delivery_info["routing_key"] for m in got}) == 20
            assert sum(admin.llen(prefix + q.name) for q in queues) == 10
            # Each is recorded as kombu records an unacknowledged message, under the prefix.
            assert admin.hlen(prefix + "unacked") == 20
            assert admin.zcard(prefix + "unacked_index") == 20
            for message in got[:15]:
                message.ack()
            assert admin.hlen(prefix + "unacked") == 5
            assert admin.zcard(prefix + "unacked_index") == 5
            conn.drain_events(timeout=5)  # room for 15: the 10 left
            assert len(got) == 30
            assert sum(admin.llen(prefix + q.name) for q in queues) == 0
            for message in got[15:25]:
                message.ack()
        # Stopping with five unacknowledged: each back on its own queue, nothing recorded.
        channel.close()
    assert admin.hlen(prefix + "unacked") == 0
    left = {q.name: admin.llen(prefix + q.name) for q in queues}
    assert {name for name, n in left.items() if n} == {
        m.delivery_info["routing_key"] for m in got[25:]}
    assert sum(left.values()) == 5
