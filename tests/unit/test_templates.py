"""RemoteCommandTemplate: parameters checked, passed as environment variables, the script
recorded when the command starts."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from pydantic import ValidationError

from controller.templates import TemplateError, parameter_env, resolve
from tests.fakes import FakeState, Fleet, command
from vmfleet.api.envelope import Envelope
from vmfleet.api.kinds import RemoteCommandTemplateSpec, TemplateParameter
from vmfleet.api.models import RemoteCommandSpec, RemoteCommandStatus

PARAMS = [
    TemplateParameter(name="SERVICE", enum=["nginx", "redis"]),
    TemplateParameter(name="VERSION", pattern=r"[0-9]+\.[0-9]+"),
    TemplateParameter(name="WORKERS", type="integer", minimum=1, maximum=64, default=4),
    TemplateParameter(name="DRAIN", type="boolean", default=False),
    TemplateParameter(name="NOTE", default="none"),
]


def test_values_become_environment_text():
    env = parameter_env("restart", PARAMS, {"SERVICE": "nginx", "VERSION": "1.25",
                                            "WORKERS": "8", "DRAIN": True})
    assert env == {"SERVICE": "nginx", "VERSION": "1.25", "WORKERS": "8", "DRAIN": "true",
                   "NOTE": "none"}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"VERSION": "1.2"}, "parameter SERVICE is required by RemoteCommandTemplate restart"),
        ({"SERVICE": "apache", "VERSION": "1.2"}, "parameter SERVICE: 'apache' is not one of nginx, redis"),
        ({"SERVICE": "nginx", "VERSION": "1.2; rm -rf /"},
         r"parameter VERSION: '1.2; rm -rf /' does not match the pattern \[0-9\]\+"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "WORKERS": 0}, "parameter WORKERS: 0 is below its minimum 1"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "WORKERS": "65"}, "65 is above its maximum 64"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "WORKERS": "x"}, "'x' is not an integer"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "WORKERS": True}, "True is not an integer"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "DRAIN": "yes"}, "'yes' is not a boolean"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "NOTE": False}, "is not a string"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "EXTRA": "1"},
         "parameter EXTRA is not a parameter of RemoteCommandTemplate restart"),
        ({"SERVICE": "nginx", "VERSION": "1.2", "NOTE": "x" * 5000}, "at most 4096"),
    ],
)
def test_invalid_parameters_are_refused_naming_the_parameter(given, message):
    with pytest.raises(TemplateError, match=message):
        parameter_env("restart", PARAMS, given)


@pytest.mark.parametrize("name", ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV",
                                  "IFS", "VMFLEET_ATTEMPT", "VMFLEET_X", "1X", "A-B"])
def test_reserved_and_invalid_names_are_refused_in_templates_and_commands(name):
    with pytest.raises(ValidationError):
        TemplateParameter(name=name)
    with pytest.raises(ValidationError, match="not allowed|parameter name"):
        RemoteCommandSpec.model_validate({"vm": "a", "templateRef": {"name": "t"},
                                          "parameters": {name: "x"}})


def test_template_spec_one_script_and_unique_names():
    with pytest.raises(ValidationError, match="exactly one of script or scriptFrom"):
        RemoteCommandTemplateSpec.model_validate({"parameters": []})
    with pytest.raises(ValidationError, match="once"):
        RemoteCommandTemplateSpec.model_validate(
            {"script": "x", "parameters": [{"name": "A"}, {"name": "A"}]})


def test_command_action_one_of_with_template_ref():
    with pytest.raises(ValidationError, match="exactly one action"):
        RemoteCommandSpec.model_validate({"vm": "a", "script": "x", "templateRef": {"name": "t"}})
    with pytest.raises(ValidationError, match="parameters go with templateRef"):
        RemoteCommandSpec.model_validate({"vm": "a", "script": "x", "parameters": {"A": "1"}})


TEMPLATE = {"metadata": {"name": "restart", "resourceVersion": "42"},
            "spec": {"script": 'systemctl restart "$SERVICE"\n',
                     "parameters": [{"name": "SERVICE", "pattern": "[a-z]+"}]}}


def _spec(**fields: Any) -> RemoteCommandSpec:
    return RemoteCommandSpec.model_validate({"vm": "vm1", "templateRef": {"name": "restart"},
                                             **fields})


def test_resolve_records_script_sha256_and_parameters():
    spec, record = resolve("ns", _spec(parameters={"SERVICE": "nginx"}, env={"A": "1"}), {},
                           lambda ns, n: TEMPLATE, lambda ns, n: None)
    script = TEMPLATE["spec"]["script"]
    assert record == {"name": "restart", "script": script,
                      "sha256": hashlib.sha256(script.encode()).hexdigest(),
                      "resourceVersion": "42", "parameters": {"SERVICE": "nginx"}}
    assert spec.script == script and spec.template_ref is None and spec.parameters is None
    assert spec.env == {"A": "1", "SERVICE": "nginx"}
    RemoteCommandSpec.model_validate(spec.wire())  # what the worker validates
    RemoteCommandStatus.model_validate({"template": record})


def test_a_recorded_script_is_kept_when_the_template_changes():
    status = {"template": {"name": "restart", "script": "echo old\n", "sha256": "x",
                           "parameters": {"SERVICE": "nginx"}}}
    spec, record = resolve("ns", _spec(parameters={"SERVICE": "nginx"}), status,
                           lambda ns, n: {**TEMPLATE, "spec": {"script": "echo new\n"}},
                           lambda ns, n: None)
    assert spec.script == "echo old\n" and record is status["template"]


def test_script_from_a_config_map():
    template = {"metadata": {}, "spec": {"scriptFrom": {"configMapKeyRef": {"name": "cm", "key": "run.sh"}}}}
    spec, _ = resolve("ns", _spec(), {}, lambda ns, n: template,
                      lambda ns, n: {"run.sh": "echo from-cm\n"} if n == "cm" else None)
    assert spec.script == "echo from-cm\n"
    with pytest.raises(TemplateError, match="ConfigMap cm has no key run.sh"):
        resolve("ns", _spec(), {}, lambda ns, n: template, lambda ns, n: {})
    with pytest.raises(TemplateError, match="RemoteCommandTemplate restart does not exist"):
        resolve("ns", _spec(), {}, lambda ns, n: None, lambda ns, n: None)


def test_a_parameter_also_in_env_is_refused():
    with pytest.raises(TemplateError, match="parameter SERVICE is also set in env"):
        resolve("ns", _spec(parameters={"SERVICE": "a"}, env={"SERVICE": "b"}), {},
                lambda ns, n: TEMPLATE, lambda ns, n: None)


def test_the_controller_dispatches_the_script_with_parameters_as_env():
    fleet = Fleet("vm1")
    commands = fleet.commands(FakeState())
    commands.get_template = lambda ns, name: TEMPLATE
    body = command(vm="vm1", templateRef={"name": "restart"}, parameters={"SERVICE": "nginx"})
    del body["spec"]["command"]
    commands.observe(body)
    (envelope,) = fleet.envelopes()
    assert envelope.spec["script"] == TEMPLATE["spec"]["script"]
    assert envelope.spec["env"] == {"SERVICE": "nginx"}
    assert "templateRef" not in envelope.spec and "parameters" not in envelope.spec
    assert isinstance(envelope, Envelope)
    (tracked,) = commands.tracked()
    assert tracked.status["template"]["parameters"] == {"SERVICE": "nginx"}


def test_an_invalid_parameter_fails_the_command_before_anything_runs():
    fleet = Fleet("vm1")
    commands = fleet.commands(FakeState())
    commands.get_template = lambda ns, name: TEMPLATE
    body = command(vm="vm1", templateRef={"name": "restart"}, parameters={"SERVICE": "$(id)"})
    del body["spec"]["command"]
    commands.observe(body)
    assert fleet.sent == []
    (tracked,) = commands.tracked()
    assert tracked.status["phase"] == "Failed"
    failed = next(c for c in tracked.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"] == "parameter SERVICE: '$(id)' does not match the pattern [a-z]+"


def test_parameter_values_are_int_or_string_in_the_crd():
    """CEL needs a typed map: the API server refuses rules over an untyped one."""
    from vmfleet.api import crdgen

    spec = crdgen.remotecommand_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]
    values = spec["properties"]["parameters"]["additionalProperties"]
    assert values["x-kubernetes-int-or-string"] is True
    with pytest.raises(ValidationError):
        RemoteCommandSpec.model_validate({"vm": "a", "templateRef": {"name": "t"},
                                          "parameters": {"A": True}})
