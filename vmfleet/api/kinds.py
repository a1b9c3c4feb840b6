"""The fleet-operation kinds (DESIGN.md "More kinds"): RemoteCommandTemplate and
RemoteCronCommand. Same group and version, same conventions as ``models``: field
descriptions become the CRD descriptions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from .constants import ENV_NAME_PATTERN, is_env_name, reserved_parameter
from .models import MAX_SCRIPT, ApiModel, KeySelector, StatusModel, api_config, cel

# --------------------------------------------------------------------------- templates

_RESERVED_CEL = ("!(self.name in ['PATH', 'LD_PRELOAD', 'LD_LIBRARY_PATH', 'BASH_ENV', 'ENV', "
                 "'IFS']) && !self.name.startsWith('VMFLEET_')")
_RESERVED_MESSAGE = ("a parameter may not be named PATH, LD_PRELOAD, LD_LIBRARY_PATH, BASH_ENV, "
                     "ENV, IFS or start with VMFLEET_")


class ScriptFrom(ApiModel):
    config_map_key_ref: KeySelector = Field(
        description="The script is this key of a ConfigMap in the same namespace (read when a "
        "command starts; the controller needs `get` on ConfigMaps)."
    )


class TemplateParameter(ApiModel):
    """One parameter of a template: the environment variable ``name`` of the script."""

    model_config = api_config(
        cel(_RESERVED_CEL, _RESERVED_MESSAGE, ".name"),
        cel("!has(self.pattern) || self.type == 'string'", "pattern applies to strings",
            ".pattern"),
        cel("(!has(self.minimum) && !has(self.maximum)) || self.type == 'integer'",
            "minimum and maximum apply to integers"),
    )

    name: str = Field(min_length=1, max_length=128, pattern=ENV_NAME_PATTERN,
                      description="Name of the parameter, and of the environment variable that "
                      "carries its value to the script.")
    type: Literal["string", "integer", "boolean"] = Field(
        "string", description="string, integer or boolean (the script sees true or false).")
    pattern: str | None = Field(None, max_length=1024, description="A regular expression the "
                                "whole value must match (strings).")
    enum: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None, max_length=256, description="The values allowed (compared as text).")
    minimum: int | None = Field(None, description="Smallest value allowed (integers).")
    maximum: int | None = Field(None, description="Largest value allowed (integers).")
    default: Annotated[str | int | bool | None, WithJsonSchema(
        {"x-kubernetes-preserve-unknown-fields": True,
         "description": "Value used when a command gives none; without a default the "
                        "parameter is required."})] = None
    description: str | None = Field(None, max_length=1024, description="For people.")

    @field_validator("name")
    @classmethod
    def _allowed(cls, name: str) -> str:
        if not is_env_name(name) or reserved_parameter(name):
            raise ValueError(f"parameter {name!r}: {_RESERVED_MESSAGE}")
        return name


class RemoteCommandTemplateSpec(ApiModel):
    """A script with typed parameters that RemoteCommands run by name (spec.templateRef)."""

    model_config = api_config(
        cel("has(self.script) != has(self.scriptFrom)", "set exactly one of script or scriptFrom"),
        cel("!has(self.parameters) || self.parameters.all(a, "
            "self.parameters.exists_one(b, b.name == a.name))",
            "each parameter name may appear once", ".parameters"),
    )

    script: str | None = Field(None, min_length=1, max_length=MAX_SCRIPT,
                               description="The script, fed to sh -s on stdin.")
    script_from: ScriptFrom | None = Field(None, description="Read the script from a ConfigMap.")
    parameters: list[TemplateParameter] = Field(
        default_factory=list, max_length=64,
        description="The parameters a command may give; each reaches the script only as an "
        "environment variable of the same name.")
    description: str | None = Field(None, max_length=1024, description="For people.")

    @model_validator(mode="after")
    def _one_script(self) -> RemoteCommandTemplateSpec:
        if (self.script is None) == (self.script_from is None):
            raise ValueError("set exactly one of script or scriptFrom")
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError("each parameter name may appear once")
        return self


class RemoteCommandTemplateStatus(StatusModel):
    observed_generation: int | None = None


__all__ = [
    "RemoteCommandTemplateSpec", "RemoteCommandTemplateStatus", "ScriptFrom", "TemplateParameter",
]
