"""Counts as numbers or percentages of the matched VMs, and the ``vms`` target form."""

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from controller.schedule import plan
from controller.targets import describe_target
from vmfleet.api import crdgen
from vmfleet.api.counts import describe_count, resolve_count
from vmfleet.api.models import RemoteCommandSpec

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [(3, 10, 3), ("30%", 10, 3), ("35%", 10, 3), ("10%", 5, 1), ("1%", 10, 1),
     ("100%", 7, 7), ("20%", 10, 2), ("50%", 3, 1), (0, 10, 0)],
)
def test_resolve_count(value, total, expected):
    assert resolve_count(value, total) == expected


def test_describe_count():
    assert describe_count(2, 10) == "2"
    assert describe_count("20%", 10) == "20% of 10 = 2"


def _spec(**fields):
    return RemoteCommandSpec.model_validate({"selector": {}, "command": "true", **fields})


def _status(*phases):
    return {"startTime": "2026-12-06T12:00:00.000Z",
            "results": [{"vm": f"vm{i}", "phase": p, "attempt": 1} for i, p in enumerate(phases)]}


def _queues(n):
    return {f"vm{i}": f"q{i}" for i in range(n)}


def test_max_parallel_percentage_is_of_the_targets():
    p = plan(_spec(maxParallel="30%"), _status(*["Pending"] * 10), NOW, queues=_queues(10))
    assert p.dispatch == [("vm0", 1), ("vm1", 1), ("vm2", 1)]


def test_max_parallel_percentage_is_at_least_one():
    p = plan(_spec(maxParallel="5%"), _status(*["Pending"] * 10), NOW, queues=_queues(10))
    assert p.dispatch == [("vm0", 1)]


def test_max_parallel_percentage_is_a_rolling_window():
    status = _status("Running", "Succeeded", "Queued", *["Pending"] * 7)
    p = plan(_spec(maxParallel="30%"), status, NOW, queues=_queues(10))
    assert p.dispatch == [("vm3", 1)]


def test_max_failures_percentage_stops_at_its_count():
    below = plan(_spec(maxFailures="20%"), _status("Failed", *["Pending"] * 9), NOW,
                 queues=_queues(10))
    assert not [c for c in below.changes if c.set.get("phase") == "Cancelled"]
    at = plan(_spec(maxFailures="20%", maxParallel=1),
              _status("Failed", "Failed", *["Pending"] * 8), NOW, queues=_queues(10))
    cancelled = [c for c in at.changes if c.set.get("phase") == "Cancelled"]
    assert len(cancelled) == 8
    assert cancelled[0].set["message"] == "not started: 2 VMs failed (maxFailures 20% of 10 = 2)"
    assert at.dispatch == []


@pytest.mark.parametrize("bad", ["0%", "101%", "x", "10", "-1%", 0, 10001, "10 %"])
def test_bad_max_parallel_is_refused(bad):
    if bad == "10":
        # a string of digits is read as the number it spells (as int-or-string fields are)
        assert _spec(maxParallel=bad).max_parallel == 10
        return
    with pytest.raises(ValidationError):
        _spec(maxParallel=bad)


def test_max_failures_may_be_zero():
    assert _spec(maxFailures=0).max_failures == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"vm": "a", "vms": ["b"], "command": "x"}, "exactly one target must be set: vm, vms or selector"),
        ({"vms": ["b"], "selector": {}, "command": "x"}, "exactly one target"),
        ({"vms": [], "command": "x"}, "at least 1 item"),
        ({"vms": ["a", "b", "a"], "command": "x"}, r"each VM may appear once in vms \(a\)"),
        ({"vms": ["a"], "transfer": {"from": {"vm": "a", "path": "/x"},
                                     "to": [{"vm": "b", "path": "/y"}]}}, "transfer.from"),
    ],
)
def test_vms_target_one_of(body, message):
    with pytest.raises(ValidationError, match=message):
        RemoteCommandSpec.model_validate(body)


def test_vms_target_column():
    assert describe_target(RemoteCommandSpec.model_validate({"vms": ["a", "b"], "command": "x"})) == "a,b"
    many = RemoteCommandSpec.model_validate({"vms": [f"v{i}" for i in range(7)], "command": "x"})
    assert describe_target(many) == "v0,v1,v2,v3,v4,... (7 VMs)"


def test_crd_counts_are_int_or_string_with_a_rule():
    spec = crdgen.remotecommand_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    for field in ("maxParallel", "maxFailures"):
        prop = spec["properties"][field]
        assert prop["x-kubernetes-int-or-string"] is True
        assert "type" not in prop
        assert "percentage" in prop["description"]
        assert "matches(" in prop["x-kubernetes-validations"][0]["rule"]
    assert spec["properties"]["vms"]["type"] == "array"
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("[has(self.vm), has(self.vms), has(self.selector)]" in r for r in rules)
