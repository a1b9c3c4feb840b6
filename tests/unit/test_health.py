"""Health probes: parsers of what a VM prints, the probe's hard timeout, conditions."""

from __future__ import annotations

import shlex
import threading
import time

import pytest

from controller.health import Thresholds, conditions_changed, fold_conditions, transitions
from remote_tasks.health import (
    MARKER,
    PROBE_SCRIPT,
    ProbeParseError,
    parse_df,
    parse_free,
    parse_hostname,
    parse_loadavg,
    parse_meminfo,
    parse_os_release,
    parse_probe,
    parse_uname,
    parse_uptime,
    probe_line,
    probe_vm,
    split_sections,
)
from remote_tasks.sshtarget import SSHTarget
from vmfleet.api.facts import Facts
from vmfleet.api.models import RemoteVMSpec

DF = """\
Filesystem     1024-blocks     Used Available Capacity Mounted on
/dev/vda         264212084 24698316  70802948      26% /
"""
DF_SPACES = """\
Filesystem              1024-blocks  Used Available Capacity Mounted on
/dev/mapper/my disk          1000   900       100      90% /
"""
FREE = """\
               total        used        free      shared  buff/cache   available
Mem:     25276514304  1795465216 18443362304     8998912  5379141632 23481049088
Swap:              0           0           0
"""
FREE_OLD = """\
             total       used       free     shared    buffers     cached
Mem:      1000000     600000     400000          0      10000     200000
"""
MEMINFO = "MemTotal:       24684096 kB\nMemFree:        18010832 kB\nMemAvailable:   22930448 kB\n"
MEMINFO_OLD = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n"


@pytest.mark.parametrize("text, expected", [
    (DF, (264212084 * 1024, 24698316 * 1024)),
    (DF_SPACES, (1000 * 1024, 900 * 1024)),
])
def test_parse_df(text, expected):
    assert parse_df(text) == expected


@pytest.mark.parametrize("text", ["", "Filesystem 1024-blocks Used\n", "header\n/dev/x a b c d /\n"])
def test_parse_df_refuses_garbage(text):
    with pytest.raises(ProbeParseError):
        parse_df(text)


@pytest.mark.parametrize("text, expected", [
    (MEMINFO, (24684096 * 1024, 22930448 * 1024)),
    (MEMINFO_OLD, (1000 * 1024, 400 * 1024)),  # no MemAvailable: free + buffers + cached
    (FREE, (25276514304, 23481049088)),
    (FREE_OLD, (1000000, 400000)),  # old procps: no available column
])
def test_parse_memory(text, expected):
    assert parse_meminfo(text) == expected


def test_parse_free_needs_a_mem_line():
    with pytest.raises(ProbeParseError):
        parse_free("total used\nSwap: 0 0\n")


@pytest.mark.parametrize("func, text, expected", [
    (parse_uptime, "12345.67 2345.60\n", 12345.67),
    (parse_loadavg, "2.07 1.99 2.27 9/200 25358\n", (2.07, 1.99, 2.27)),
    (parse_hostname, "vm1\n", "vm1"),
    (parse_hostname, "  \n", None),
    (parse_uname, "Linux 6.1.0-18-amd64\n", "Linux 6.1.0-18-amd64"),
    (parse_os_release, 'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
     "Debian GNU/Linux 12 (bookworm)"),
    (parse_os_release, "NAME=Alpine\nVERSION=3.19\n", "Alpine 3.19"),
    (parse_os_release, "", None),
])
def test_small_parsers(func, text, expected):
    assert func(text) == expected


@pytest.mark.parametrize("func, text", [
    (parse_uptime, ""), (parse_uptime, "soon"), (parse_loadavg, "1.0 2.0"),
    (parse_meminfo, "Nothing: 1 kB\n"),
])
def test_small_parsers_refuse_garbage(func, text):
    with pytest.raises(ProbeParseError):
        func(text)


def probe_output(**sections: str) -> str:
    return "".join(f"\n{MARKER}{name.replace('_', '-')}@@\n{body}" for name, body in sections.items())


def test_parse_probe_whole_output():
    text = probe_output(hostname="vm1\n", uptime="100.5 20.0\n", loadavg="0.5 0.25 0.125 1/2 3\n",
                        meminfo=MEMINFO, df=DF, os_release='PRETTY_NAME="Debian 12"\n',
                        uname="Linux 6.1.0\n", end="")
    facts, problems = parse_probe(text)
    assert problems == []
    assert isinstance(facts, Facts)  # a plain dataclass: the worker needs no pydantic
    assert facts.wire() == {
        "hostname": "vm1", "os": "Debian 12", "kernel": "Linux 6.1.0", "uptimeSeconds": 100.5,
        "load1": 0.5, "load5": 0.25, "load15": 0.125,
        "memoryTotalBytes": 24684096 * 1024, "memoryAvailableBytes": 22930448 * 1024,
        "rootDiskTotalBytes": 264212084 * 1024, "rootDiskUsedBytes": 24698316 * 1024,
    }


def test_parse_probe_keeps_what_it_can_and_lists_problems():
    facts, problems = parse_probe(probe_output(hostname="vm1", uptime="x", df="", end=""))
    assert facts.hostname == "vm1"
    assert facts.uptime_seconds is None
    assert any(p.startswith("uptime") for p in problems)
    assert "df: no output" in problems


def test_parse_probe_without_end_marker_is_an_error():
    with pytest.raises(ProbeParseError):
        parse_probe(probe_output(hostname="vm1"))


def test_split_sections_ignores_text_before_the_first_marker():
    assert split_sections("motd\n" + probe_output(a="1", b="2\n3")) == {"a": "1", "b": "2\n3"}


def test_probe_line_quotes_the_fixed_script_and_bounds_it():
    line = probe_line(7)
    assert "timeout -s KILL 9 sh -c" in line  # the worker gives up first (7s)
    assert line.count(shlex.quote(PROBE_SCRIPT)) == 2  # one quoted word: with and without timeout


class _HungPool:
    """A pool whose connect never returns (a VM that accepts TCP but never speaks)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.discarded = 0

    def get(self, target):
        self.release.wait(30)
        raise OSError("released")

    def discard(self, target):
        self.discarded += 1


def test_a_probe_that_never_returns_times_out():
    pool = _HungPool()
    target = SSHTarget(host="192.0.2.1", port=22, user="u", private_key="k", host_keys=("x",))
    started = time.monotonic()
    result = probe_vm(pool, target, 1.0)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    pool.release.set()
    assert (result.succeeded, result.reason) == (False, "Timeout")
    assert "within 1s" in result.message
    assert elapsed < 2.5
    assert pool.discarded == 1


# --------------------------------------------------------------------------- conditions

NOW = "2026-01-01T00:01:00.000Z"


def spec(**extra):
    return RemoteVMSpec.model_validate({
        "host": "h", "user": "u", "credentialsSecretRef": {"name": "s"},
        "hostKeyPolicy": "TrustOnFirstUse", "healthCheck": {"periodSeconds": 10}, **extra,
    })


GOOD_FACTS = {"rootDiskTotalBytes": 100, "rootDiskUsedBytes": 50, "memoryTotalBytes": 100,
              "memoryAvailableBytes": 60}


def status(probe=None, facts=None, workers=None, conditions=None):
    out = {"workers": workers or {"replicas": 1, "readyReplicas": 1}}
    if probe is not None:
        out["lastProbe"] = {"time": "2026-01-01T00:00:55.000Z", **probe}
    if facts is not None:
        out["facts"] = facts
    if conditions is not None:
        out["conditions"] = conditions
    return out


def by_type(conditions):
    return {c["type"]: (c["status"], c["reason"]) for c in conditions}


OK = {"succeeded": True, "reason": "Completed", "latencySeconds": 0.1}


@pytest.mark.parametrize("st, expected", [
    (status(), {"Reachable": ("Unknown", "NotProbed"), "Ready": ("Unknown", "NotProbed")}),
    (status(OK, GOOD_FACTS), {
        "Reachable": ("True", "Completed"), "HostKeyVerified": ("True", "HostKeyMatched"),
        "DiskPressure": ("False", "RootDiskHasSpace"), "MemoryPressure": ("False", "MemoryAvailable"),
        "WorkersReady": ("True", "WorkersRunning"), "Ready": ("True", "VMReady")}),
    (status(OK, {**GOOD_FACTS, "rootDiskUsedBytes": 95}), {
        "DiskPressure": ("True", "RootDiskFull"), "Ready": ("False", "RootDiskFull")}),
    (status(OK, {**GOOD_FACTS, "memoryAvailableBytes": 5}), {
        "MemoryPressure": ("True", "MemoryLow"), "Ready": ("False", "MemoryLow")}),
    (status({"succeeded": False, "reason": "TransportError", "message": "refused"}, GOOD_FACTS), {
        "Reachable": ("False", "TransportError"), "DiskPressure": ("Unknown", "NotProbed"),
        "Ready": ("False", "TransportError")}),
    (status({"succeeded": False, "reason": "Timeout"}), {"Reachable": ("False", "Timeout")}),
    (status({"succeeded": False, "reason": "HostKeyMismatch", "message": "other key"}), {
        "HostKeyVerified": ("False", "HostKeyMismatch"), "Reachable": ("False", "HostKeyMismatch")}),
    (status({"succeeded": False, "reason": "AuthFailed"}), {
        "HostKeyVerified": ("True", "HostKeyMatched"), "Reachable": ("False", "AuthFailed")}),
    (status({"succeeded": False, "reason": "CredentialsInvalid", "message": "no Secret"}), {
        "Reachable": ("False", "CredentialsInvalid"), "HostKeyVerified": ("Unknown", "NotProbed")}),
    (status(OK, GOOD_FACTS, workers={"replicas": 2, "readyReplicas": 1}), {
        "WorkersReady": ("False", "WorkersStarting"), "Ready": ("True", "VMReady")}),
    (status(OK, GOOD_FACTS, workers={"replicas": 0, "readyReplicas": 0}), {
        "WorkersReady": ("True", "ScaledToZero")}),
])
def test_fold_conditions(st, expected):
    got = by_type(fold_conditions(spec(), st, NOW))
    for type_, value in expected.items():
        assert got[type_] == value, type_


@pytest.mark.parametrize("replicas, reason", [(1, "ProbeOverdue"), (0, "ScaledToZero")])
def test_a_stale_probe_makes_reachable_unknown(replicas, reason):
    st = status(OK, GOOD_FACTS, workers={"replicas": replicas, "readyReplicas": replicas})
    st["lastProbe"]["time"] = "2026-01-01T00:00:00.000Z"  # 60s old, period 10s, timeout 10s
    got = by_type(fold_conditions(spec(), st, NOW))
    assert got["Reachable"] == ("Unknown", reason)
    assert got["Ready"][0] == "Unknown"


def test_thresholds_are_configurable():
    st = status(OK, {**GOOD_FACTS, "rootDiskUsedBytes": 60})
    assert by_type(fold_conditions(spec(), st, NOW, Thresholds(disk_used_ratio=0.5)))[
        "DiskPressure"] == ("True", "RootDiskFull")


def test_fold_is_stable_and_keeps_transition_times():
    first = fold_conditions(spec(), status(OK, GOOD_FACTS), NOW)
    again = fold_conditions(spec(), status(OK, GOOD_FACTS, conditions=first),
                            "2026-01-01T00:01:01.000Z")
    assert not conditions_changed(first, again)


def test_transitions_warn_once_when_conditions_turn_bad():
    good = fold_conditions(spec(), status(OK, GOOD_FACTS), NOW)
    bad = fold_conditions(spec(), status(
        {"succeeded": False, "reason": "HostKeyMismatch", "message": "key changed"},
        conditions=good), NOW)
    assert transitions(good, bad) == [("HostKeyMismatch", "key changed"),
                                      ("Unreachable", "key changed")]
    assert transitions(bad, bad) == []


def test_demo_health_rows_come_from_status():
    from vmfleet.dev.demo import health_rows

    vm = {"metadata": {"name": "vm1"}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "facts": {"hostname": "vm1", "load1": 0.5, "memoryAvailableBytes": 2**31,
                  "rootDiskUsedBytes": 25, "rootDiskTotalBytes": 100, "uptimeSeconds": 7200}}}
    assert health_rows([vm, {"metadata": {"name": "vm2"}}]) == [
        ["vm1", "True", "vm1", "0.5", "2.0 GiB", "25%", "2.0 h"],
        ["vm2", "?", "-", "-", "-", "-", "-"],
    ]


def test_each_condition_has_its_own_pure_verdict():
    from controller import health as h

    never = h.Observed(probe={}, facts={}, workers={}, host_key={}, age=None, stale=False)
    assert h.reachable_verdict(never, 30) == ("Unknown", "ScaledToZero",
                                              "no worker runs while the VM is scaled to zero: not probed")
    assert h.host_key_verdict(never, "Pinned", known=False) == ("Unknown", "NotProbed", "not verified yet")
    assert h.host_key_verdict(never, "Pinned", known=True) is None  # kept as it was
    assert h.workers_ready_verdict(never) is None
    assert h.disk_pressure_verdict({"rootDiskTotalBytes": 10, "rootDiskUsedBytes": 9}, True, 0.9)[:2] == (
        "True", "RootDiskFull")
    assert h.disk_pressure_verdict({"rootDiskTotalBytes": 10, "rootDiskUsedBytes": 9}, False, 0.9)[0] == "Unknown"
    assert h.memory_pressure_verdict({"memoryTotalBytes": 10, "memoryAvailableBytes": 5}, True, 0.1) == (
        "False", "MemoryAvailable", "50% of memory available")
    starting = h.Observed(probe={}, facts={}, workers={"replicas": 2, "readyReplicas": 1}, host_key={},
                          age=1.0, stale=False)
    assert h.workers_ready_verdict(starting) == ("False", "WorkersStarting", "1/2 workers ready")
    conditions = [{"type": "Reachable", "status": "True"},
                  {"type": "HostKeyVerified", "status": "False", "reason": "HostKeyMismatch", "message": "m"},
                  {"type": "DiskPressure", "status": "Unknown", "reason": "NotProbed", "message": "n"}]
    assert h.ready_verdict(conditions) == ("False", "HostKeyMismatch", "HostKeyVerified: m")
