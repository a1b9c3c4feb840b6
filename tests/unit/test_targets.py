"""Which VMs a command runs on, and the envelope that tells a worker how to reach one."""

import pytest

from controller.targets import describe_target, initial_results, label_selector_string
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.models import LabelSelector, RemoteCommandSpec


@pytest.mark.parametrize(
    ("selector", "query"),
    [
        ({"matchLabels": {"tier": "web", "env": "prod"}}, "env=prod,tier=web"),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
         "zone in (a,b)"),
        ({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["1"]},
                               {"key": "gpu", "operator": "Exists"},
                               {"key": "old", "operator": "DoesNotExist"}]},
         "x notin (1),gpu,!old"),
        ({}, ""),
    ],
)
def test_label_selector_string(selector, query):
    assert label_selector_string(LabelSelector.model_validate(selector)) == query


def test_describe_target():
    assert describe_target(RemoteCommandSpec(vm="vm1", command="x")) == "vm1"
    sel = RemoteCommandSpec.model_validate({"selector": {}, "command": "x"})
    assert describe_target(sel) == "all VMs"
    transfer = RemoteCommandSpec.model_validate({"transfer": {
        "from": {"vm": "vm1", "path": "/a"},
        "to": [{"vm": "vm3", "path": "/b"}, {"vm": "vm2", "path": "/b"}]}})
    assert describe_target(transfer) == "vm1 -> vm2,vm3"


def test_initial_results_queue_known_vms_and_fail_missing_ones():
    vms = {"vm1": {"spec": {"host": "127.0.10.1"}}}
    results = initial_results(["vm1", "ghost"], vms, "T")
    assert results == [
        {"vm": "vm1", "host": "127.0.10.1", "phase": "Queued", "attempt": 1, "dispatchTime": "T"},
        {"vm": "ghost", "phase": "Failed", "attempt": 1, "reason": "VMNotFound",
         "message": "RemoteVM ghost does not exist in this namespace", "completionTime": "T"},
    ]


def test_initial_results_pending_for_the_scheduler():
    results = initial_results(["vm1"], {"vm1": {"spec": {"host": "h"}}}, "T", phase="Pending")
    assert results == [{"vm": "vm1", "host": "h", "phase": "Pending", "attempt": 1}]


def test_the_envelope_carries_the_target_and_old_messages_still_parse():
    bastion = Target("b", "10.0.0.1", 22, "jump", "b-ssh", host_keys=("ssh-ed25519 BBBB",))
    target = Target("vm2", "10.0.0.2", 2222, "rocky", "vm2-ssh", host_keys=("ssh-ed25519 AAAA",),
                    allow_become=True, max_concurrent=3, bastion=bastion)
    new = Envelope("ns", "c", "uid-1", "vm2", 2, "t0", {"command": "true"}, target=target,
                   command_start="t-1", lost_pgid=4242, lost_marker="abc")
    message = new.to_message()
    assert message["target"]["secret"] == "vm2-ssh" and message["target"]["bastion"]["vm"] == "b"
    assert "index" not in message and "entry_keys" not in message
    assert Envelope.from_message(message) == new
    old = {"namespace": "ns", "name": "c", "uid": "uid-1", "vm": "vm2", "attempt": 2,
           "dispatch_time": "t0", "spec": {"command": "true"}}
    parsed = Envelope.from_message(old)
    assert parsed.target is None and parsed.lost_pgid is None and parsed.targets == {}


def test_a_target_carries_no_key_material():
    target = Target("vm1", "h", 22, "u", "vm1-ssh")
    assert set(target.to_message()) == {
        "vm", "host", "port", "user", "secret", "host_keys", "trust_on_first_use",
        "connect_timeout", "allow_become", "max_concurrent", "bastion"}
