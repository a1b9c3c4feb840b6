"""vmfleet.queues.QueueDepth: one reading of queue depth for the autoscaler and /metrics."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controller import scaling
from vmfleet import metrics
from vmfleet.queues import BrokerUnreachable, QueueDepth


class NotFound(Exception):
    def __init__(self, queue: str) -> None:
        super().__init__(f"NOT_FOUND - no queue {queue!r} in vhost '/'")


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    def queue_declare(self, queue: str, passive: bool) -> Any:
        assert passive
        outcome = self.broker.queues.get(queue)
        if outcome is None:
            raise NotFound(queue)
        if isinstance(outcome, Exception):
            raise outcome
        return SimpleNamespace(message_count=outcome)

    def close(self) -> None:
        self.broker.closed_channels += 1


class FakeBroker:
    """What QueueDepth uses of a kombu Connection."""

    def __init__(self, queues: dict[str, Any], down: bool = False) -> None:
        self.queues = queues
        self.down = down
        self.connections = 0
        self.closed_channels = 0

    def connect(self) -> Any:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.connections += 1
        return SimpleNamespace(channel=lambda: FakeChannel(self), release=lambda: None)


def depth_on(broker: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> QueueDepth:
    depth = QueueDepth("redis://127.0.0.1:1/0")

    def connection() -> Any:
        if depth._conn is None:
            depth._conn = broker.connect()
        return depth._conn

    monkeypatch.setattr(depth, "_connection", connection)
    return depth


def test_depth_of_a_queue_and_of_one_never_declared(monkeypatch):
    broker = FakeBroker({"q1": 5})
    depth = depth_on(broker, monkeypatch)
    assert depth("q1") == 5
    assert depth("never-used") == 0
    assert broker.connections == 1 and broker.closed_channels == 2  # one connection kept


def test_a_broker_error_on_one_queue_is_raised_after_one_reconnect(monkeypatch):
    broker = FakeBroker({"q1": RuntimeError("PRECONDITION_FAILED")})
    depth = depth_on(broker, monkeypatch)
    with pytest.raises(RuntimeError, match="PRECONDITION_FAILED"):
        depth("q1")
    assert broker.connections == 2


def test_an_unreachable_broker_is_named(monkeypatch):
    depth = depth_on(FakeBroker({}, down=True), monkeypatch)
    with pytest.raises(BrokerUnreachable, match="Connection refused"):
        depth("q1")
    with pytest.raises(BrokerUnreachable):
        depth.sizes(["q1", "q2"])


def test_sizes_leave_out_a_queue_that_could_not_be_read_and_say_so(monkeypatch, caplog):
    broker = FakeBroker({"good": 3, "bad": RuntimeError("ACCESS_REFUSED")})
    depth = depth_on(broker, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="vmfleet.queues"):
        assert depth.sizes(["good", "bad", "fresh"]) == {"good": 3, "fresh": 0}
    assert depth.failures == {"bad": 1}
    assert "Could not read the depth of queue bad: ACCESS_REFUSED" in caplog.text


def test_the_metric_has_no_sample_for_a_queue_that_could_not_be_read(monkeypatch):
    broker = FakeBroker({"vmfleet.x.good": 4, "vmfleet.x.bad": RuntimeError("ACCESS_REFUSED")})
    depth = depth_on(broker, monkeypatch)
    registry = CollectorRegistry()
    registry.register(metrics.QueueDepthCollector(depth.sizes, ["vmfleet.x.good", "vmfleet.x.bad"]))
    assert registry.get_sample_value("vmfleet_queue_depth", {"queue": "vmfleet.x.good"}) == 4
    assert registry.get_sample_value("vmfleet_queue_depth", {"queue": "vmfleet.x.bad"}) is None


def test_one_definition():
    assert scaling.QueueDepth is QueueDepth
    assert metrics.broker_queue_sizer("redis://127.0.0.1:1/0").__self__.__class__ is QueueDepth  # type: ignore[attr-defined]
