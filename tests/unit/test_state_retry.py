"""A worker's writes to Redis (claim, report, release) are retried while Redis is away
(the broker pod restarting) for ``write_retry_seconds``, and fail after it."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from vmfleet.state import State


class FlakyClient:
    """XADD refused ``failures`` times (Redis restarting), then answered."""

    def __init__(self, failures: int, error: type[Exception] = redis.ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def xadd(self, stream: str, fields: dict[str, Any]) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("Connection refused")
        return b"1-0"


def state_with(client: FlakyClient, retry_seconds: float) -> State:
    state = State("redis://127.0.0.1:1/0")
    state.client = client
    state.write_retry_seconds = retry_seconds
    return state


@pytest.mark.parametrize("error", [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError])
def test_a_report_is_retried_until_redis_answers(error: type[Exception]) -> None:
    client = FlakyClient(failures=2, error=error)
    assert state_with(client, 10).report({"namespace": "ns1", "uid": "u"}) == "1-0"
    assert client.calls == 3


def test_a_report_fails_once_the_retry_time_is_spent() -> None:
    client = FlakyClient(failures=1000)
    with pytest.raises(redis.ConnectionError):
        state_with(client, 0.5).report({"namespace": "ns1", "uid": "u"})
    assert 2 <= client.calls <= 4


@pytest.mark.parametrize("error", [redis.ResponseError, redis.AuthenticationError])
def test_an_error_redis_answered_is_not_retried(error: type[Exception]) -> None:
    client = FlakyClient(failures=1, error=error)
    with pytest.raises(error):
        state_with(client, 10).report({"namespace": "ns1", "uid": "u"})
    assert client.calls == 1
