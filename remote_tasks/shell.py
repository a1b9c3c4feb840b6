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


PGID_MARKER = "vmfleet-pgid"


def marker_for(nonce: str) -> str:
    """The first line the wrapper prints: ``vmfleet-pgid:<nonce> <pgid>``."""
    if not nonce.isalnum():
        raise InvalidCommand("the marker nonce must be alphanumeric")
    return f"{PGID_MARKER}:{nonce}"


GO = b"go\n"


def wrap(body: str, nonce: str, stdin: bool = True) -> str:
    """Run ``body`` in a POSIX sh that first reports its process group, then waits for a go.

    sshd makes the login shell of an exec request a session and process group leader;
    ``exec sh`` keeps that process, so ``$$`` is the group of everything the command
    starts. Terminating ``-$$`` ends the command and its children, whatever the login
    shell is.

    The wrapper then reads one line from stdin and runs ``body`` only if it is ``go``
    (``GO``): the worker claims the attempt in Redis between the two (and
    reports the process group), and a delivery that loses the claim closes the channel, so its
    wrapper exits without running anything. ``read`` takes exactly that line from the
    pipe; the rest of stdin is the command's. Without ``stdin``, the command reads
    /dev/null (the worker sends no EOF after the go).
    """
    script = (f"printf '%s %s\\n' {marker_for(nonce)} \"$$\"; "
              f"IFS= read -r vmfleet_go && [ \"$vmfleet_go\" = go ] || exit 0; unset vmfleet_go; "
              f"{'' if stdin else 'exec </dev/null; '}{body}")
    return "exec sh -c " + shlex.quote(script)


def parse_marker(first_line: bytes, nonce: str) -> int | None:
    """The pgid from the wrapper's first stdout line, or None if it is not ours."""
    try:
        label, pgid = first_line.decode("ascii").strip().split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    if label != marker_for(nonce) or not pgid.isdigit() or int(pgid) < 2:
        return None
    return int(pgid)


def terminate_line(pgid: int, grace_seconds: float, nonce: str | None = None) -> str:
    """TERM a remote process group, wait up to ``grace_seconds``, then KILL what is left.

    With ``nonce``, nothing is signalled unless the group leader is still the attempt's
    wrapper (its command line carries the marker): a recycled process id is left alone.
    """
    if pgid < 2:
        raise InvalidCommand(f"refusing to signal process group {pgid}")
    ticks = max(int(grace_seconds * 10), 1)
    check = ""
    if nonce is not None:
        marker = marker_for(nonce)
        check = (f"if [ -r /proc/{pgid}/cmdline ]; then "
                 f"grep -q -F {marker} /proc/{pgid}/cmdline 2>/dev/null || exit 0; fi; ")
    script = check + (
        f"kill -s TERM -- -{pgid} 2>/dev/null || exit 0; i=0; "
        f"while kill -s 0 -- -{pgid} 2>/dev/null && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done; "
        f"kill -s KILL -- -{pgid} 2>/dev/null; exit 0"
    )
    return "exec sh -c " + shlex.quote(script)


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


def build_invocation(spec: RemoteCommandSpec, nonce: str | None = None) -> RemoteInvocation:
    """Turn a command, argv or script spec into the exec line and stdin.

    With ``nonce``, the line is wrapped (``wrap``) so that its first stdout line reports
    the remote process group.
    """
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
    for what, text in [("command", spec.command), ("workingDir", spec.working_dir),
                       *(("argv", a) for a in spec.argv or ()),
                       *((f"env {k}", v) for k, v in (spec.env or {}).items())]:
        if text is not None and "\0" in text:
            # An SSH exec request is a C string on the server: a NUL would cut the line.
            raise InvalidCommand(f"{what} contains a NUL character, which no remote program can receive")
    line = env_prefix(spec.env) + program
    if spec.working_dir is not None:
        # "./" keeps a relative directory literal: cd treats "-" as $OLDPWD and searches CDPATH.
        wd = spec.working_dir if spec.working_dir.startswith("/") else "./" + spec.working_dir
        line = f"cd -- {shlex.quote(wd)} && {line}"
    if nonce is not None:
        line = wrap(line, nonce, stdin=stdin is not None)
    return RemoteInvocation(line=line, stdin=stdin.encode() if stdin is not None else None)
