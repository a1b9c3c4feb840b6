"""The execution plan: what a worker needs to run one attempt, and nothing else.

The controller validates a RemoteCommand's spec (the pydantic models of
``vmfleet.api.models``, templates resolved) and turns it into a :class:`Plan` with
:func:`vmfleet.api.planning.plan_of`; the dispatch envelope carries it (``Envelope.plan``),
signed with the rest of the message. The worker reads it with plain frozen dataclasses: a
command worker imports no pydantic (nor the API models); this module imports neither.

Wire form (``to_message``/``from_message``): a JSON object with snake_case keys; a field
at its default is left out. Reading ignores keys this release does not know and gives a
missing key its default, so a plan of the next minor version still reads here.

Version skew (the chart's rule: workers accept the previous minor version's messages):
a message of the release before plans carries only ``spec``, the RemoteCommand spec's
wire form. A worker reads it with :func:`vmfleet.api.planning.plan_from_spec_wire`,
which imports the API models then, and only then: the worker pays pydantic's import the
first time such a message reaches it. Until the next minor version the controller sends ``spec`` beside
``plan``, so that the previous release's workers, still running during a rolling
upgrade, find what they read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

DEFAULT_OUTPUT_MAX_BYTES: Final = 16384  # output.maxBytes's default (models.OutputSpec)


class InvalidPlan(ValueError):
    """A message's plan (or the old form's spec) cannot be read."""


@dataclass(frozen=True)
class KeyRef:
    """One key of a ConfigMap or Secret of the command's namespace."""

    name: str
    key: str

    def to_message(self) -> dict[str, str]:
        return {"name": self.name, "key": self.key}

    @classmethod
    def from_message(cls, body: Any) -> KeyRef | None:
        if not body:
            return None
        return cls(name=str(body["name"]), key=str(body["key"]))


@dataclass(frozen=True)
class Source:
    """Where a transfer reads: a file on a VM, or one key of a ConfigMap or Secret."""

    vm: str | None = None
    path: str | None = None
    config_map_key_ref: KeyRef | None = None
    secret_key_ref: KeyRef | None = None

    def describe(self) -> str:
        """``vm1:/path``, ``configMap/name/key`` or ``secret/name/key`` (as status says)."""
        if self.config_map_key_ref is not None:
            return f"configMap/{self.config_map_key_ref.name}/{self.config_map_key_ref.key}"
        if self.secret_key_ref is not None:
            return f"secret/{self.secret_key_ref.name}/{self.secret_key_ref.key}"
        return f"{self.vm}:{self.path}"

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"vm": self.vm, "path": self.path}
        if self.config_map_key_ref is not None:
            message["config_map_key_ref"] = self.config_map_key_ref.to_message()
        if self.secret_key_ref is not None:
            message["secret_key_ref"] = self.secret_key_ref.to_message()
        return {k: v for k, v in message.items() if v is not None}

    @classmethod
    def from_message(cls, body: Mapping[str, Any]) -> Source:
        vm, path = body.get("vm"), body.get("path")
        return cls(vm=str(vm) if vm is not None else None,
                   path=str(path) if path is not None else None,
                   config_map_key_ref=KeyRef.from_message(body.get("config_map_key_ref")),
                   secret_key_ref=KeyRef.from_message(body.get("secret_key_ref")))


@dataclass(frozen=True)
class Location:
    """One destination of a transfer: a path on a VM."""

    vm: str
    path: str


@dataclass(frozen=True)
class Transfer:
    """``spec.transfer``: copy one file to one or more VMs over SFTP."""

    source: Source
    to: tuple[Location, ...]
    mode: str | None = None
    create_dirs: bool = False
    overwrite: str = "Always"  # Always | Never | IfDifferent
    verify: bool = False

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "source": self.source.to_message(),
            "to": [{"vm": loc.vm, "path": loc.path} for loc in self.to],
            "overwrite": self.overwrite,
        }
        if self.mode is not None:
            message["mode"] = self.mode
        if self.create_dirs:
            message["create_dirs"] = True
        if self.verify:
            message["verify"] = True
        return message

    @classmethod
    def from_message(cls, body: Mapping[str, Any]) -> Transfer:
        mode = body.get("mode")
        return cls(source=Source.from_message(body.get("source") or {}),
                   to=tuple(Location(str(loc["vm"]), str(loc["path"]))
                            for loc in body.get("to") or ()),
                   mode=str(mode) if mode is not None else None,
                   create_dirs=bool(body.get("create_dirs")),
                   overwrite=str(body.get("overwrite") or "Always"),
                   verify=bool(body.get("verify")))


@dataclass(frozen=True)
class Plan:
    """One attempt's work: exactly one action (``command``, ``argv``, ``script`` or
    ``transfer``) and how to run it. Frozen; ``env`` is a read-only view by convention."""

    command: str | None = None
    argv: tuple[str, ...] | None = None
    script: str | None = None
    transfer: Transfer | None = None
    env: Mapping[str, str] | None = None
    working_dir: str | None = None
    stdin: str | None = None
    become_user: str | None = None  # spec.become.user (the method is sudo)
    timeout_seconds: int | None = None
    active_deadline_seconds: int | None = None
    success_exit_codes: tuple[int, ...] = (0,)
    output_max_bytes: int = DEFAULT_OUTPUT_MAX_BYTES
    # spec.ttlSecondsAfterFinished: bounds how long the whole output is kept.
    ttl_seconds_after_finished: int | None = None

    @property
    def action(self) -> str | None:
        for name in ("command", "argv", "script", "transfer"):
            if getattr(self, name) is not None:
                return name
        return None

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "command": self.command,
            "argv": list(self.argv) if self.argv is not None else None,
            "script": self.script,
            "transfer": self.transfer.to_message() if self.transfer is not None else None,
            "env": dict(self.env) if self.env else None,
            "working_dir": self.working_dir,
            "stdin": self.stdin,
            "become_user": self.become_user,
            "timeout_seconds": self.timeout_seconds,
            "active_deadline_seconds": self.active_deadline_seconds,
            "ttl_seconds_after_finished": self.ttl_seconds_after_finished,
        }
        message = {k: v for k, v in message.items() if v is not None}
        if self.success_exit_codes != (0,):
            message["success_exit_codes"] = list(self.success_exit_codes)
        if self.output_max_bytes != DEFAULT_OUTPUT_MAX_BYTES:
            message["output_max_bytes"] = self.output_max_bytes
        return message

    @classmethod
    def from_message(cls, body: Any) -> Plan:
        """The plan of a message; raises :class:`InvalidPlan`."""
        if not isinstance(body, Mapping):
            raise InvalidPlan("the plan is not an object")
        try:
            argv, env, transfer = body.get("argv"), body.get("env"), body.get("transfer")
            codes = body.get("success_exit_codes")
            return cls(
                command=_text(body.get("command")),
                argv=tuple(str(a) for a in argv) if argv is not None else None,
                script=_text(body.get("script")),
                transfer=Transfer.from_message(transfer) if transfer is not None else None,
                env={str(k): str(v) for k, v in env.items()} if env else None,
                working_dir=_text(body.get("working_dir")),
                stdin=_text(body.get("stdin")),
                become_user=_text(body.get("become_user")),
                timeout_seconds=_int(body.get("timeout_seconds")),
                active_deadline_seconds=_int(body.get("active_deadline_seconds")),
                success_exit_codes=tuple(int(c) for c in codes) if codes else (0,),
                output_max_bytes=int(body.get("output_max_bytes", DEFAULT_OUTPUT_MAX_BYTES)),
                ttl_seconds_after_finished=_int(body.get("ttl_seconds_after_finished")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidPlan(f"the plan cannot be read: {exc!r}") from exc


def _text(value: Any) -> str | None:
    return str(value) if value is not None else None


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


__all__ = ["DEFAULT_OUTPUT_MAX_BYTES", "InvalidPlan", "KeyRef", "Location", "Plan", "Source",
           "Transfer"]
