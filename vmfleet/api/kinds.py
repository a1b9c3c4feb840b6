"""The fleet-operation kinds (DESIGN.md "More kinds"): RemoteCommandTemplate and
RemoteCronCommand. Same group and version, same conventions as ``models``: field
descriptions become the CRD descriptions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from .constants import ENV_NAME_PATTERN, is_env_name, reserved_parameter
from .cronexpr import CronError, parse, zone
from .models import (
    MAX_NAME,
    MAX_SCRIPT,
    ApiModel,
    KeySelector,
    ObjectCondition,
    RemoteCommandSpec,
    StatusModel,
    api_config,
    cel,
)

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


# --------------------------------------------------------------------------- schedules


class CommandTemplateMetadata(ApiModel):
    labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=64, description="Labels of each RemoteCommand made.")
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        None, max_length=64, description="Annotations of each RemoteCommand made.")


class CommandTemplate(ApiModel):
    """What each run is: a RemoteCommand with this metadata and spec (as a CronJob's
    jobTemplate)."""

    metadata: CommandTemplateMetadata | None = Field(None, description="Labels and annotations.")
    spec: RemoteCommandSpec = Field(description="The RemoteCommand spec of every run.")


class RemoteCronCommandSpec(ApiModel):
    """Run a RemoteCommand on a schedule, as a CronJob runs Jobs."""

    schedule: str = Field(min_length=1, max_length=256,
                          description="Cron schedule: minute hour day-of-month month "
                          "day-of-week (e.g. \"0 2 * * *\", \"*/15 * * * mon-fri\"), or "
                          "@hourly, @daily, @weekly, @monthly, @yearly.")
    time_zone: str | None = Field(None, min_length=1, max_length=64,
                                  description="IANA time zone of the schedule (default UTC), "
                                  "e.g. Europe/Paris.")
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = Field(
        "Allow", description="When a run is due while an earlier one is still running: Allow "
        "starts it too; Forbid skips it; Replace stops the running one (its processes are "
        "killed on every VM), deletes it and starts the new one.")
    starting_deadline_seconds: int | None = Field(
        None, ge=0, le=7 * 86400,
        description="A run that could not start within this many seconds of its scheduled "
        "time is skipped (counted as missed). Replace also waits at most this long (default "
        "60) for the running command's processes to be gone before starting the next.")
    suspend: bool = Field(False, description="Start no new runs (running ones continue).")
    successful_history_limit: int = Field(3, ge=0, le=100,
                                          description="Finished successful runs kept.")
    failed_history_limit: int = Field(1, ge=0, le=100, description="Finished failed runs kept.")
    command_template: CommandTemplate = Field(description="The RemoteCommand each run creates.")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            parse(value)
        except CronError as exc:
            raise ValueError(f"schedule {value!r}: {exc}") from exc
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zone(value)
            except CronError as exc:
                raise ValueError(str(exc)) from exc
        return value


class RunReference(StatusModel):
    name: str = Field(max_length=MAX_NAME, description="The RemoteCommand.")
    uid: str | None = Field(None, max_length=64)


class RemoteCronCommandStatus(StatusModel):
    active: list[RunReference] | None = Field(None, max_length=1000,
                                              description="Runs that have not finished.")
    active_count: int | None = Field(None, ge=0, description="How many runs are active (the "
                                     "ACTIVE column).")
    last_schedule_time: str | None = Field(None, description="When the last run was scheduled.")
    last_successful_time: str | None = Field(None, description="When the last successful run "
                                             "finished.")
    conditions: list[ObjectCondition] | None = Field(
        None, max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = None


__all__ = [
    "CommandTemplate", "RemoteCommandTemplateSpec", "RemoteCommandTemplateStatus",
    "RemoteCronCommandSpec", "RemoteCronCommandStatus", "ScriptFrom", "TemplateParameter",
]
