"""The API models: defaults, one-of rules and clear errors for bad input."""

import pytest
from pydantic import ValidationError

from vmfleet.api.constants import default_queue
from vmfleet.api.models import RemoteCommandSpec, RemoteVMSpec


def test_command_defaults_match_design():
    spec = RemoteCommandSpec.model_validate({"vm": "vm1", "command": "uptime"})
    assert spec.action == "command"
    assert spec.success_exit_codes == [0]
    assert spec.output.max_bytes == 16384
    assert spec.retries.limit == 0 and spec.retries.backoff_seconds == 60
    assert spec.wire() == {
        "vm": "vm1", "command": "uptime", "retries": {"limit": 0, "backoffSeconds": 60,
                                                      "onExitCodes": []},
        "successExitCodes": [0], "output": {"maxBytes": 16384},
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"vm": "vm1"}, "exactly one action"),
        ({"vm": "vm1", "command": "a", "argv": ["b"]}, "exactly one action"),
        ({"command": "a"}, "exactly one target"),
        ({"vm": "vm1", "selector": {"matchLabels": {"a": "b"}}, "command": "a"},
         "exactly one target"),
        ({"vm": "vm1", "transfer": {"from": {"vm": "a", "path": "/x"}, "to": [{"vm": "b", "path": "/y"}]}},
         "transfer.from and transfer.to"),
        ({"vm": "vm1", "command": "a", "env": {"1BAD": "x"}}, "env name '1BAD' is invalid"),
        ({"vm": "vm1", "command": "a", "unknownField": 1}, "Extra inputs are not permitted"),
        ({"vm": "Not_A_Name", "command": "a"}, "String should match pattern"),
        ({"vm": "vm1", "argv": []}, "at least 1 item"),
    ],
)
def test_invalid_commands_are_refused_with_a_reason(body, message):
    with pytest.raises(ValidationError, match=message):
        RemoteCommandSpec.model_validate(body)


def test_transfer_needs_no_target():
    spec = RemoteCommandSpec.model_validate(
        {"transfer": {"from": {"vm": "vm1", "path": "/a"}, "to": [{"vm": "vm2", "path": "/b"}]}}
    )
    assert spec.action == "transfer"
    assert spec.transfer is not None and spec.transfer.from_.vm == "vm1"
    assert spec.wire()["transfer"]["from"] == {"vm": "vm1", "path": "/a"}


def test_vm_defaults_and_queue():
    spec = RemoteVMSpec.model_validate({
        "host": "10.0.0.5", "user": "rocky", "credentialsSecretRef": {"name": "vm1-ssh"},
        "hostKeys": ["ssh-ed25519 AAAA"],
    })
    assert (spec.port, spec.host_key_policy, spec.max_concurrent_commands) == (22, "Pinned", 2)
    assert spec.health_check.period_seconds == 60 and spec.connect_timeout_seconds == 30
    assert default_queue("ops", "vm1") == "vmfleet.ops.vm1"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"port": 0}, "greater than or equal to 1"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"host": ""}, "at least 1 character"),
        ({"host": "a b"}, "String should match pattern"),
        ({"workers": {"replicas": 1, "autoscale": {"maxReplicas": 2}}}, "not both"),
    ],
)
def test_invalid_vms_are_refused(patch, message):
    body = {"host": "h", "user": "u", "credentialsSecretRef": {"name": "s"}, **patch}
    with pytest.raises(ValidationError, match=message):
        RemoteVMSpec.model_validate(body)
