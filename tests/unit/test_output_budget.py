"""One output budget per RemoteCommand status (vmfleet.api.output), whatever the fan-out:
the rule, and the controller cutting what workers report to it."""

from __future__ import annotations

import json

import pytest

from tests.fakes import command_object, controller_parts, vm_object
from vmfleet.api.output import STATUS_OUTPUT_BUDGET, cut_entry, status_limit, tail, tail_bytes
from vmfleet.api.reports import read_report
from vmfleet.exec import FAN_OUT_OUTPUT_BUDGET, output_max_bytes

MiB = 1024 * 1024


@pytest.mark.parametrize(("targets", "max_bytes", "budget", "expected"), [
    (1, 16384, MiB, 16384),  # one VM: what it asked for
    (1, 256 * 1024, MiB, 256 * 1024),
    (2, 256 * 1024, MiB, 256 * 1024),
    (3, 256 * 1024, MiB, MiB // 6),
    (1000, 256 * 1024, MiB, 524),
    (10000, 256 * 1024, MiB, 52),
    (50, 16384, 100 * 1024, 1024),
    (0, 100, MiB, 100),
    (5, 100, 0, 0),
])
def test_each_tail_is_the_smaller_of_what_was_asked_and_its_share(
        targets: int, max_bytes: int, budget: int, expected: int) -> None:
    assert tail_bytes(targets, max_bytes, budget) == expected


@pytest.mark.parametrize("targets", [1, 2, 7, 50, 1000, 10000])
def test_all_tails_together_stay_within_the_budget(targets: int) -> None:
    assert 2 * targets * tail_bytes(targets, 256 * 1024) <= STATUS_OUTPUT_BUDGET


def test_the_cli_asks_for_the_same_share() -> None:
    assert FAN_OUT_OUTPUT_BUDGET == STATUS_OUTPUT_BUDGET
    for targets in (2, 3, 50, 1000):
        assert output_max_bytes(targets) == tail_bytes(targets, 256 * 1024)


def test_a_tail_is_cut_on_bytes_and_never_splits_a_character() -> None:
    assert tail("abcdef", 3) == "def"
    assert tail("héé", 3) == "é"  # 'é' is 2 bytes: 3 bytes hold one whole character
    assert tail("abc", 10) == "abc" and tail("abc", 0) == ""
    entry = {"vm": "vm1", "stdout": "x" * 100, "stderr": "e", "outputTruncated": False}
    cut = cut_entry(entry, 10)
    assert (cut["stdout"], cut["stderr"], cut["outputTruncated"]) == ("x" * 10, "e", True)
    assert cut_entry(entry, 100) is entry  # nothing to cut: unchanged


def test_the_controller_keeps_a_fan_outs_status_within_its_budget() -> None:
    parts = controller_parts()
    parts.commands.output_budget = 64 * 1024
    names = [f"vm{i:02d}" for i in range(50)]
    parts.kube.vms.extend(vm_object(n) for n in names)
    parts.commands.observe(command_object("fan", selector={}, output={"maxBytes": 256 * 1024}))
    tracked = parts.commands.get("uid-ns-fan")
    assert tracked is not None and len(tracked.status["results"]) == 50
    for name in names:
        fields = {"phase": "Succeeded", "reason": "Completed", "exitCode": 0,
                  "stdout": "o" * 256 * 1024, "stderr": "é" * 1000, "stdoutBytes": 256 * 1024,
                  "stderrBytes": 2000, "outputTruncated": False,
                  "completionTime": "2026-12-06T12:00:00Z"}
        report = read_report({"kind": "attempt", "event": "finished", "namespace": "ns", "name": "fan",
                              "uid": "uid-ns-fan", "vm": name, "attempt": 1, "worker": "w",
                              "time": "2026-12-06T12:00:00Z", "fields": fields})
        assert parts.commands.apply(report, f"r-{name}")
    results = tracked.status["results"]
    tails = sum(len(e[k].encode()) for e in results for k in ("stdout", "stderr"))
    assert tails <= 64 * 1024
    assert all(e["outputTruncated"] is True for e in results)
    assert all(e["stdoutBytes"] == 256 * 1024 for e in results)  # the exact size is kept
    assert len(json.dumps(tracked.status, ensure_ascii=False).encode()) < 64 * 1024 + 50 * 600


def test_a_tail_within_its_own_max_bytes_keeps_its_replacement_characters() -> None:
    # 1,024 raw bytes kept by the worker, two of them undecodable: 1,028 bytes as text.
    text = "a" * 1020 + "z\ufffd\ufffd\n"
    limit = status_limit(1, 1024)
    assert cut_entry({"stdout": text, "outputTruncated": False}, limit)["stdout"] == text
    # Past its share of the budget the controller still cuts.
    assert status_limit(50, 256 * 1024, 64 * 1024) == tail_bytes(50, 256 * 1024, 64 * 1024)
    assert status_limit(1, 256 * 1024) == 512 * 1024  # 3 x 256 KiB capped at the share
