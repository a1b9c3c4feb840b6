"""RemoteCommands that run a RemoteCommandTemplate (``spec.templateRef``).

When the controller first sees such a command it reads the template (and its ConfigMap,
for ``scriptFrom``), checks every parameter against its declaration, and records the
script and its sha256 in ``status.template``: from then on the command runs that
recorded script, whatever the template says later. Each parameter reaches the script
only as the environment variable of its name (the worker passes env values quoted, never
as shell text). An invalid parameter fails the command (``InvalidSpec``) before anything
is sent to a worker.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from vmfleet.api.kinds import RemoteCommandTemplateSpec, TemplateParameter
from vmfleet.api.models import MAX_ARG, RemoteCommandSpec

TemplateLookup = Callable[[str, str], dict[str, Any] | None]  # (namespace, name)
ConfigMapLookup = Callable[[str, str], dict[str, str] | None]  # (namespace, name) -> data
_INTEGER = re.compile(r"-?[0-9]+")


class TemplateError(ValueError):
    """The template or a parameter is not usable: the command fails with this message."""


def _text(param: TemplateParameter, value: str | int | bool) -> str:
    """The value as the environment variable's text, checked against the declared type."""
    if param.type == "boolean":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and value in ("true", "false"):
            return value
        raise TemplateError(f"parameter {param.name}: {value!r} is not a boolean (true or false)")
    if param.type == "integer":
        if isinstance(value, bool) or not (isinstance(value, int) or _INTEGER.fullmatch(str(value))):
            raise TemplateError(f"parameter {param.name}: {value!r} is not an integer")
        number = int(value)
        if param.minimum is not None and number < param.minimum:
            raise TemplateError(f"parameter {param.name}: {number} is below its minimum "
                                f"{param.minimum}")
        if param.maximum is not None and number > param.maximum:
            raise TemplateError(f"parameter {param.name}: {number} is above its maximum "
                                f"{param.maximum}")
        return str(number)
    if isinstance(value, bool):
        raise TemplateError(f"parameter {param.name}: {value!r} is not a string (quote it)")
    return str(value)


def parameter_env(template: str, params: list[TemplateParameter],
                  given: dict[str, str | int | bool]) -> dict[str, str]:
    """The environment variables the parameters become, or TemplateError naming the first
    parameter that is unknown, missing or invalid."""
    known = {p.name: p for p in params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise TemplateError(f"parameter {unknown[0]} is not a parameter of RemoteCommandTemplate "
                            f"{template} (its parameters: {names})")
    env: dict[str, str] = {}
    for param in params:
        value = given.get(param.name, param.default)
        if value is None:
            raise TemplateError(f"parameter {param.name} is required by RemoteCommandTemplate "
                                f"{template} (it has no default)")
        text = _text(param, value)
        if len(text) > MAX_ARG:
            raise TemplateError(f"parameter {param.name}: the value is {len(text)} characters "
                                f"long; at most {MAX_ARG} are allowed")
        if param.enum is not None and text not in param.enum:
            raise TemplateError(f"parameter {param.name}: {text!r} is not one of "
                                f"{', '.join(param.enum)}")
        if param.pattern is not None:
            try:
                matched = re.fullmatch(param.pattern, text)
            except re.error as exc:
                raise TemplateError(f"parameter {param.name}: the template's pattern "
                                    f"{param.pattern!r} is not a valid regular expression: "
                                    f"{exc}") from exc
            if matched is None:
                raise TemplateError(f"parameter {param.name}: {text!r} does not match the "
                                    f"pattern {param.pattern}")
        env[param.name] = text
    return env


def template_script(namespace: str, name: str, template: dict[str, Any] | None,
                    config_map: ConfigMapLookup) -> tuple[RemoteCommandTemplateSpec, str]:
    """The template's spec and its script (read from the ConfigMap for ``scriptFrom``)."""
    if template is None:
        raise TemplateError(f"RemoteCommandTemplate {name} does not exist in namespace {namespace}")
    try:
        spec = RemoteCommandTemplateSpec.model_validate(template.get("spec") or {})
    except ValidationError as exc:
        raise TemplateError(f"RemoteCommandTemplate {name} is invalid: "
                            f"{exc.errors()[0].get('msg', exc)}") from exc
    if spec.script is not None:
        return spec, spec.script
    assert spec.script_from is not None
    ref = spec.script_from.config_map_key_ref
    data = config_map(namespace, ref.name)
    if data is None:
        raise TemplateError(f"RemoteCommandTemplate {name}: ConfigMap {ref.name} does not exist")
    if not data.get(ref.key):
        raise TemplateError(f"RemoteCommandTemplate {name}: ConfigMap {ref.name} has no key "
                            f"{ref.key} (or it is empty)")
    return spec, data[ref.key]


def resolve(namespace: str, spec: RemoteCommandSpec, status: dict[str, Any],
            get_template: TemplateLookup, config_map: ConfigMapLookup
            ) -> tuple[RemoteCommandSpec, dict[str, Any]]:
    """The spec the workers run (the script, parameters as env) and ``status.template``.
    A command that recorded its template already keeps what it recorded (the template is
    not read again: editing it never changes a command already made)."""
    assert spec.template_ref is not None
    name = spec.template_ref.name
    recorded = status.get("template") or {}
    if recorded.get("script") is not None and recorded.get("parameters") is not None:
        return effective_spec(spec, str(recorded["script"]), dict(recorded["parameters"])), recorded
    template = get_template(namespace, name)
    params, script = template_script(namespace, name, template, config_map)
    env = parameter_env(name, params.parameters, dict(spec.parameters or {}))
    clash = sorted(set(env) & set(spec.env or {}))
    if clash:
        raise TemplateError(f"parameter {clash[0]} is also set in env: give it once, as a parameter")
    meta = (template or {}).get("metadata") or {}
    recorded = {"name": name, "script": script,
                "sha256": hashlib.sha256(script.encode()).hexdigest(),
                "resourceVersion": str(meta.get("resourceVersion", "")), "parameters": env}
    return effective_spec(spec, script, env), recorded


def effective_spec(spec: RemoteCommandSpec, script: str, env: dict[str, str]) -> RemoteCommandSpec:
    """``spec`` with the template's script as ``script`` and the parameters in ``env``."""
    return spec.model_copy(update={
        "script": script, "template_ref": None, "parameters": None,
        "env": {**(spec.env or {}), **env} or None,
    })
