"""Pure builders for the remote command line: everything from the spec is quoted.

The only text that reaches the remote shell unquoted is ``spec.command``, which is the
user's own shell line. Paths, argv items and env values are quoted with ``shlex.quote``;
env names are validated.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmfleet.api.constants import is_env_name
from vmfleet.api.models import RemoteCommandSpec


class InvalidCommand(ValueError):
    """The spec cannot be turned into a remote command line."""


@dataclass(frozen=True)
class RemoteInvocation:
    """What is sent over the SSH channel: the exec line and the bytes for stdin."""

    line: str
    stdin: bytes | None


def quote_argv(argv: Sequence[str]) -> str:
    if not argv:
        raise InvalidCommand("argv must name a program")
    return " ".join(shlex.quote(arg) for arg in argv)


def env_prefix(env: Mapping[str, str] | None) -> str:
    """``NAME='value' `` assignments for the command's environment."""
    parts = []
    for name, value in sorted((env or {}).items()):
        if not is_env_name(name):
            raise InvalidCommand(
                f"env name {name!r} is invalid: use letters, digits and underscores, "
                "not starting with a digit"
            )
        parts.append(f"{name}={shlex.quote(value)}")
    return " ".join(parts) + " " if parts else ""


def build_invocation(spec: RemoteCommandSpec) -> RemoteInvocation:
    """Turn a command, argv or script spec into the exec line and stdin."""
    if spec.command is not None:
        program = "sh -c " + shlex.quote(spec.command)
        stdin = spec.stdin
    elif spec.argv is not None:
        program = quote_argv(spec.argv)
        stdin = spec.stdin
    elif spec.script is not None:
        if spec.stdin is not None:
            raise InvalidCommand("stdin cannot be combined with script: the script is stdin")
        program = "sh -s"
        stdin = spec.script
    else:
        raise InvalidCommand(f"action {spec.action!r} is not a command")
    line = env_prefix(spec.env) + program
    if spec.working_dir is not None:
        line = f"cd -- {shlex.quote(spec.working_dir)} && {line}"
    return RemoteInvocation(line=line, stdin=stdin.encode() if stdin is not None else None)
