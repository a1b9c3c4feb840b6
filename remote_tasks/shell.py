"""Pure builders for the remote command line: everything from the plan is quoted.

The only text that reaches the remote shell unquoted is ``plan.command`` (the spec's
``command``), which is the user's own shell line. Paths, argv items and env values are quoted with ``shlex.quote``;
env names are validated.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmfleet.api.constants import ATTEMPT_MARKER_ENV, is_env_name
from vmfleet.api.plan import Plan


class InvalidCommand(ValueError):
    """The plan cannot be turned into a remote command line."""


@dataclass(frozen=True)
class RemoteInvocation:
    """What is sent over the SSH channel: the exec line and the bytes for stdin."""

    line: str
    stdin: bytes | None
    become_user: str | None = None  # run through sudo_line: the worker speaks to sudo first


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

    Before the body, the wrapper exports ``VMFLEET_ATTEMPT=<nonce>`` (``marker_env``):
    every process the command starts inherits it, including those that leave the process
    group (``setsid``, ``nohup ... &``, a double fork), so ``terminate_line`` finds them.
    """
    script = (f"printf '%s %s\\n' {marker_for(nonce)} \"$$\"; "
              f"IFS= read -r vmfleet_go && [ \"$vmfleet_go\" = go ] || exit 0; unset vmfleet_go; "
              f"export {marker_env(nonce)}; "
              f"{'' if stdin else 'exec </dev/null; '}{body}")
    return "exec sh -c " + shlex.quote(script)


def marker_env(nonce: str) -> str:
    """``VMFLEET_ATTEMPT=<nonce>``: the environment entry every process of the attempt has."""
    marker_for(nonce)  # validates the nonce
    return f"{ATTEMPT_MARKER_ENV}={nonce}"


BECOME_PROMPT = "vmfleet-become-prompt"
BECOME_READY = "vmfleet-become-ready"


def become_prompt(nonce: str) -> str:
    """The prompt sudo prints (on stderr, no newline) when it wants the password."""
    marker_for(nonce)
    return f"{BECOME_PROMPT}:{nonce}:"


def become_ready(nonce: str) -> str:
    """The line the action prints on stderr once sudo has let it run as the other user."""
    marker_for(nonce)
    return f"{BECOME_READY}:{nonce}"


def sudo_line(body: str, user: str, nonce: str, stdin: bool) -> str:
    """Run ``body`` (a shell line) as ``user`` through ``sudo -S``, replacing the wrapper.

    ``sudo -S -p <prompt>`` reads a password, if it needs one, from stdin (the worker sends
    it only after seeing the prompt: never argv, never environment). The action first
    prints ``become_ready`` on stderr, which tells the worker that sudo let it through and
    that the rest of stdin is the action's. sudo resets the environment, so the attempt's
    marker is set again inside (``env``). ``exec``: sudo becomes the process group
    leader, and a command killed by a signal kills sudo with the same signal.
    """
    if not _USER_RE.fullmatch(user):
        raise InvalidCommand(f"become.user {user!r} is not a user name")
    inner = (f"printf '%s\\n' {become_ready(nonce)} >&2; "
             f"{'' if stdin else 'exec </dev/null; '}{body}")
    return (f"exec sudo -S -p {shlex.quote(become_prompt(nonce))} -u {shlex.quote(user)} -- "
            f"env {marker_env(nonce)} sh -c {shlex.quote(inner)}")


def sudo_prefix(user: str) -> str:
    """``sudo -S -p '' -u USER --`` for a helper line (terminate) run as the become user:
    a password, when sudo wants one, is read from stdin without a prompt."""
    if not _USER_RE.fullmatch(user):
        raise InvalidCommand(f"become.user {user!r} is not a user name")
    return f"sudo -S -p '' -u {shlex.quote(user)} --"


_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def parse_marker(first_line: bytes, nonce: str) -> int | None:
    """The pgid from the wrapper's first stdout line, or None if it is not ours."""
    try:
        label, pgid = first_line.decode("ascii").strip().split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    if label != marker_for(nonce) or not pgid.isdigit() or int(pgid) < 2:
        return None
    return int(pgid)


def terminate_line(pgid: int | None, grace_seconds: float, nonce: str | None = None,
                   as_user: str | None = None) -> str:
    """End an attempt: TERM, wait up to ``grace_seconds``, then KILL what is left.

    What is signalled: the process group ``pgid`` and, with ``nonce``, every process whose
    environment carries ``VMFLEET_ATTEMPT=<nonce>`` (``marker_env``) and that the remote
    user may signal (its own processes; all of them for root): children that called
    ``setsid``, ran under ``nohup ... &`` or double-forked out of the group. A single
    ``grep -z`` reads every ``/proc/*/environ`` the user can read (others' are unreadable).

    With ``nonce``, the group is signalled only if its leader is still the attempt's
    (the nonce in its command line or environment): a recycled process id is left alone.

    ``as_user``: run it through ``sudo -S -p ''`` as that user (an attempt with become:
    its processes are that user's); a password, if sudo wants one, is read from stdin.
    """
    if pgid is not None and pgid < 2:
        raise InvalidCommand(f"refusing to signal process group {pgid}")
    if pgid is None and nonce is None:
        raise InvalidCommand("terminate needs a process group or a marker")
    ticks = max(int(grace_seconds * 10), 1)
    parts = [f"g={pgid if pgid is not None else ''}"]
    if nonce is not None:
        env = marker_env(nonce)
        parts += [
            f"m={shlex.quote(env)}",
            # the group's leader must still be ours: the nonce in its cmdline or environ
            f'if [ -n "$g" ] && [ -r /proc/$g/cmdline ] && '
            f'! grep -q -F {nonce} /proc/$g/cmdline 2>/dev/null && '
            f'! grep -q -z -x -F "$m" /proc/$g/environ 2>/dev/null; then g=; fi',
            'marked() { grep -l -z -x -F "$m" /proc/[0-9]*/environ 2>/dev/null; }',
            'sig() { [ -z "$g" ] || kill -s $1 -- -$g 2>/dev/null; '
            'for f in $(marked); do p=${f#/proc/}; kill -s $1 ${p%/environ} 2>/dev/null; done; }',
            'alive() { { [ -n "$g" ] && kill -s 0 -- -$g 2>/dev/null; } || [ -n "$(marked)" ]; }',
        ]
    else:
        parts += [
            'sig() { kill -s $1 -- -$g 2>/dev/null; }',
            'alive() { kill -s 0 -- -$g 2>/dev/null; }',
        ]
    parts += [
        "alive || exit 0",
        "sig TERM",
        "i=0",
        f"while alive && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done",
        # twice: a process forked between the scan and the kill is caught by the second
        "sig KILL",
        "sig KILL",
        "exit 0",
    ]
    script = "; ".join(parts)
    if as_user is not None:
        return f"exec {sudo_prefix(as_user)} sh -c {shlex.quote(script)}"
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


def build_invocation(plan: Plan, nonce: str | None = None) -> RemoteInvocation:
    """Turn a command, argv or script plan into the exec line and stdin.

    With ``nonce``, the line is wrapped (``wrap``) so that its first stdout line reports
    the remote process group.
    """
    if plan.command is not None:
        program = "sh -c " + shlex.quote(plan.command)
        stdin = plan.stdin
    elif plan.argv is not None:
        program = quote_argv(plan.argv)
        stdin = plan.stdin
    elif plan.script is not None:
        if plan.stdin is not None:
            raise InvalidCommand("stdin cannot be combined with script: the script is stdin")
        program = "sh -s"
        stdin = plan.script
    else:
        raise InvalidCommand(f"action {plan.action!r} is not a command")
    for what, text in [("command", plan.command), ("workingDir", plan.working_dir),
                       *(("argv", a) for a in plan.argv or ()),
                       *((f"env {k}", v) for k, v in (plan.env or {}).items())]:
        if text is not None and "\0" in text:
            # An SSH exec request is a C string on the server: a NUL would cut the line.
            raise InvalidCommand(f"{what} contains a NUL character, which no remote program can receive")
    wd = None
    if plan.working_dir is not None:
        # "./" keeps a relative directory literal: cd treats "-" as $OLDPWD and searches CDPATH.
        wd = plan.working_dir if plan.working_dir.startswith("/") else "./" + plan.working_dir
    data = stdin.encode() if stdin is not None else None
    if nonce is None:
        if plan.become_user is not None:
            raise InvalidCommand("become needs the wrapped line (a nonce)")
        line = env_prefix(plan.env) + program
        if wd is not None:
            line = f"cd -- {shlex.quote(wd)} && {line}"
        return RemoteInvocation(line=line, stdin=data)
    # Wrapped: the program replaces the shell (exec), so a signal that kills it is what sshd
    # reports (exit-signal), and the session's process is the command's.
    body = exec_body(program, plan.env, wd)
    if plan.become_user is None:
        return RemoteInvocation(line=wrap(body, nonce, stdin=stdin is not None), stdin=data)
    line = wrap(sudo_line(body, plan.become_user, nonce, stdin=stdin is not None), nonce)
    return RemoteInvocation(line=line, stdin=data, become_user=plan.become_user)


def exec_body(program: str, env: Mapping[str, str] | None, working_dir: str | None) -> str:
    """``cd -- DIR || exit; export NAME='value'; exec PROGRAM``: each part quoted."""
    parts = []
    if working_dir is not None:
        parts.append(f"cd -- {shlex.quote(working_dir)} || exit")
    assignments = env_prefix(env).strip()
    if assignments:
        parts.append(f"export {assignments}")
    parts.append(f"exec {program}")
    return "; ".join(parts)
