"""Pytest plugin: Celery brokers (real Redis and RabbitMQ on 127.0.0.1).

Fixtures:

* ``redis_server`` (session): a ``RedisServer`` (append-only file, so messages survive
  a restart). Use ``.url`` (``redis://127.0.0.1:PORT/0``).
* ``rabbitmq_server`` (session): a ``RabbitMQServer``, started only when a test asks for
  it (a node takes ~10 s to boot). Use ``.url`` (``amqp://guest:guest@127.0.0.1:PORT//``).
* ``make_redis`` / ``make_rabbitmq`` (function): factories for a broker of the test's
  own, e.g. to restart or kill it; stopped at the end of the test.

Don't restart or stop the session brokers in a test: other tests share them.
Tests using these fixtures are marked ``e2e``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmfleet.dev.brokers import RabbitMQServer, RedisServer

_FIXTURES = {"redis_server", "rabbitmq_server", "make_redis", "make_rabbitmq"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    created: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), **kwargs)
        created.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in created:
            server.stop()


@pytest.fixture
def make_rabbitmq(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RabbitMQServer]]:
    created: list[RabbitMQServer] = []

    def factory(**kwargs: Any) -> RabbitMQServer:
        server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"), **kwargs)
        created.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in created:
            server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
