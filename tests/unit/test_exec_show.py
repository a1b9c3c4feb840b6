"""vmfleet get / describe: columns as kubectl shows them, human durations, describe text."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vmfleet import show

NOW = datetime(2026, 11, 23, 21, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (119, "119s"), (120, "2m"), (150, "2m30s"), (600, "10m"),
     (3 * 3600 - 1, "179m"), (3 * 3600, "3h"), (3 * 3600 + 60, "3h1m"), (8 * 3600, "8h"),
     (47 * 3600, "47h"), (48 * 3600, "2d"), (50 * 3600, "2d2h"), (8 * 86400, "8d"),
     (800 * 86400, "2y70d"), (-5, "0s")],
)
def test_human_duration_matches_kubectl(seconds, text):
    assert show.human_duration(seconds) == text


def test_json_path_subset():
    obj = {"status": {"conditions": [{"type": "Reachable", "status": "False"},
                                     {"type": "Ready", "status": "True"}],
                      "facts": {"load1": 0.5}}}
    assert show.json_path(obj, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert show.json_path(obj, '.status.conditions[?(@.type=="Gone")].status') is None
    assert show.json_path(obj, ".status.facts.load1") == 0.5
    assert show.json_path(obj, ".spec.host") is None


def fields_of(text: str) -> dict[str, str]:
    """``Key:   value`` lines of a describe text (indented keys keep their indent)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() and not key.strip().count(" ") > 2:
            out.setdefault(key, value.strip())
    return out


def command(name: str, created: str, **status: object) -> dict:
    return {"metadata": {"name": name, "namespace": "ops", "creationTimestamp": created},
            "spec": {"vm": "vm1", "argv": ["sh", "-c", "echo hi; exit 4"]}, "status": status}


def test_get_commands_uses_the_crd_printer_columns():
    items = [command("b-cmd", "2026-11-23T21:07:30Z", target="vm1", phase="Failed",
                     completions="0/1"),
             command("a-cmd", "2026-11-23T21:09:55Z")]
    assert show.get_table("command", items, NOW).splitlines() == [
        "NAME    TARGET   PHASE    COMPLETIONS   AGE",
        "a-cmd" + " " * 35 + "5s",
        "b-cmd   vm1      Failed   0/1           2m30s",
    ]


def test_get_vms_wide_adds_the_priority_columns():
    vm = {"metadata": {"name": "vm1", "namespace": "ops", "creationTimestamp": "2026-11-23T20:00:00Z"},
          "spec": {"host": "127.0.10.1"},
          "status": {"conditions": [{"type": "Ready", "status": "True"}],
                     "facts": {"hostname": "vm1", "load1": 0.25},
                     "workers": {"readyReplicas": 1, "queue": "vmfleet.ops.vm1"}}}
    assert show.get_table("vm", [vm], NOW).splitlines() == [
        "NAME   HOST         READY   HOSTNAME   LOAD   AGE",
        "vm1    127.0.10.1   True    vm1        0.25   70m",
    ]
    wide = show.get_table("vm", [vm], NOW, wide=True, namespace_column=True).splitlines()
    assert wide[0].split() == ["NAMESPACE", "NAME", "HOST", "READY", "HOSTNAME", "LOAD",
                               "WORKERS", "QUEUE", "AGE"]
    assert wide[1].split() == ["ops", "vm1", "127.0.10.1", "True", "vm1", "0.25", "1",
                               "vmfleet.ops.vm1", "70m"]


def test_describe_command():
    obj = command(
        "exec-vm1-x", "2026-11-23T21:09:00Z", phase="Failed", completions="0/1",
        summary={"targets": 1, "failed": 1},
        startTime="2026-11-23T21:09:00.100Z", completionTime="2026-11-23T21:09:00.400Z",
        conditions=[{"type": "Failed", "status": "True", "reason": "ExitCode",
                     "message": "vm1: exit code 4", "lastTransitionTime": "2026-11-23T21:09:00Z"}],
        results=[{"vm": "vm1", "phase": "Failed", "attempt": 1, "exitCode": 4,
                  "reason": "ExitCode", "message": "exit code 4", "stdoutBytes": 3,
                  "stderrBytes": 0, "startTime": "2026-11-23T21:09:00.150Z",
                  "completionTime": "2026-11-23T21:09:00.400Z", "worker": "w-0"}],
    )
    obj["spec"]["env"] = {"TOKEN": "secret-value"}
    events = [{"type": "Warning", "reason": "Dispatch", "message": "retrying\n", "count": 2,
               "lastTimestamp": "2026-11-23T21:09:30Z", "source": {"component": "kopf"}}]
    text = show.describe_command(obj, events, NOW)
    fields = fields_of(text)
    assert fields["Name"] == "exec-vm1-x"
    assert fields["Action"] == "argv: sh -c 'echo hi; exit 4'"
    assert fields["Env"] == "TOKEN" and "secret-value" not in text
    assert fields["Summary"] == "targets 1, failed 1"
    assert fields["Completed"] == "2026-11-23T21:09:00.400Z (59s ago)"
    lines = text.splitlines()
    assert lines[lines.index("Conditions:") + 2].split() == [
        "Failed", "True", "ExitCode", "60s", "vm1:", "exit", "code", "4"]
    assert lines[lines.index("Results:") + 2].split() == [
        "vm1", "Failed", "1", "4", "ExitCode", "0.250s", "3B/0B", "w-0", "exit", "code", "4"]
    assert lines[lines.index("Events:") + 2].split() == [
        "Warning", "Dispatch", "30s", "(x2)", "kopf", "retrying"]


def test_describe_command_without_status_or_events():
    text = show.describe_command(command("new", "2026-11-23T21:09:59Z"), [], NOW)
    assert fields_of(text)["Phase"] == "Pending"
    assert text.endswith("Conditions:  <none>\nResults:  <none>\nEvents:  <none>\n")


def test_describe_vm_with_facts_and_recent_commands():
    vm = {"metadata": {"name": "vm1", "namespace": "ops", "labels": {"role": "web"},
                       "creationTimestamp": "2026-11-23T20:00:00Z"},
          "spec": {"host": "127.0.10.1", "user": "root", "port": 2222,
                   "credentialsSecretRef": {"name": "vm1-ssh"}, "hostKeys": ["ssh-ed25519 AAA"]},
          "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Probed"}],
                     "facts": {"hostname": "vm1", "load1": 0.5, "load5": 0.25, "load15": 0.0,
                               "memoryTotalBytes": 2 * 1024 ** 3,
                               "memoryAvailableBytes": 1024 ** 3, "uptimeSeconds": 90000},
                     "workers": {"runtime": "Process", "replicas": 1, "readyReplicas": 1}}}
    commands = [command("old", "2026-11-23T21:00:00Z", results=[{"vm": "vm1", "phase": "Succeeded",
                                                                  "exitCode": 0}]),
                command("other-vm", "2026-11-23T21:05:00Z", results=[{"vm": "vm2"}]),
                command("new", "2026-11-23T21:08:00Z", results=[{"vm": "vm1", "phase": "Failed",
                                                                  "exitCode": 4,
                                                                  "reason": "ExitCode"}])]
    text = show.describe_vm(vm, [], commands, NOW)
    fields = fields_of(text)
    assert fields["Address"] == "root@127.0.10.1:2222"
    assert fields["Host key policy"] == "Pinned (1 keys)"
    assert fields["Queue"] == "vmfleet.ops.vm1"
    assert fields["Workers"] == "1 (default); Process runtime, 1/1 ready"
    assert fields["  Load"] == "0.5 0.25 0.0"
    assert fields["  Memory"] == "1.0GiB available of 2.0GiB"
    assert fields["  Uptime"] == "25h"
    lines = text.splitlines()
    start = lines.index("Recent commands:")
    assert [line.split()[0] for line in lines[start + 2:start + 4]] == ["new", "old"]
    assert text.endswith("Events:  <none>\n")


def test_kind_aliases():
    assert {show.KINDS[k] for k in ("vms", "rvm", "remotevms", "vm")} == {"vm"}
    assert {show.KINDS[k] for k in ("commands", "rcmd", "remotecommands")} == {"command"}
