"""Hostile input meets a shell or a path: it arrives literally or is refused, nothing else.

The lines built by ``remote_tasks.shell`` are run by a real local POSIX ``sh`` (what the
remote login shell hands them to) in an empty scratch directory: each generated value must
come out byte for byte as one argument, and the directory must still be empty afterwards
(no ``$(touch ...)``, backtick, ``;`` or newline ever ran). Transfer paths never meet a
shell (SFTP calls only); their one derived name, the temporary file, is checked for staying
in the destination's directory.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from remote_tasks.shell import GO, InvalidCommand, build_invocation, env_prefix, parse_marker, quote_argv
from remote_tasks.transfer import TEMP_MARK, TransferExecutor, TransferFailed, temp_path
from vmfleet.api.constants import ENV_NAME_PATTERN, LABEL_TRANSFERABLE, SECRET_TYPE_SSH_AUTH, is_env_name
from vmfleet.api.envelope import Envelope
from vmfleet.api.models import FileLocation, RemoteCommandSpec
from vmfleet.api.plan import Plan
from vmfleet.api.planning import plan_of

# Each shell example starts a process: enough examples to find a quoting slip, few enough
# for the unit suite to stay fast.
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# What shells, quoting and option parsers trip over, mixed into generated text.
HOSTILE = [
    "$(touch pwned)", "`touch pwned`", "; touch pwned", "&& touch pwned", "| touch pwned",
    "\ntouch pwned\n", "' ; touch pwned ; '", '" ; touch pwned ; "', "'\"'\"'", "\\", "\\'",
    "$HOME", "${IFS}", "$((1+1))", "~", "~root", "*", "?", "[a-z]*", "-rf", "--", "-", "-n",
    "--help", "a b", "\t", "\r\n", "!", "!!", "#", "%s", "%n", "\x1b[31m", "é☃𝄞", "\u202e",
    ">pwned", "<pwned", "2>pwned", "&", "{a,b}", "=", "A=B",
]
TEXT = st.text(st.characters(codec="utf-8", blacklist_characters="\0"), max_size=40)
HOSTILE_TEXT = st.one_of(
    st.sampled_from(HOSTILE),
    TEXT,
    st.lists(st.one_of(st.sampled_from(HOSTILE), TEXT), min_size=2, max_size=4).map("".join),
)


def run_sh(line: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    """Run an exec line as sshd does (the login shell's ``-c``), in ``cwd``."""
    proc = subprocess.run(["sh", "-c", line], input=stdin or b"", capture_output=True, cwd=cwd,
                          env={"PATH": os.environ["PATH"], "HOME": str(cwd)}, timeout=20)
    assert proc.returncode == 0, (line, proc.stderr)
    return proc.stdout


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="vmfleet-hostile-")


def spec(**fields: Any) -> RemoteCommandSpec:
    return RemoteCommandSpec.model_validate({"vm": "vm1", **fields})


def plan(**fields: Any) -> Plan:
    """What the controller sends the worker for that spec."""
    return plan_of(spec(**fields))


# --------------------------------------------------------------------------- argv


@SETTINGS
@given(st.lists(HOSTILE_TEXT, min_size=1, max_size=6))
@example(["$(touch pwned)", "`touch pwned`", "; touch pwned", "\ntouch pwned", "-rf", "*"])
def test_argv_items_arrive_literally_as_one_argument_each(items: list[str]) -> None:
    with scratch() as tmp:
        cwd = Path(tmp)
        line = build_invocation(plan(argv=["printf", "%s\\0", *items])).line
        out = run_sh(line, cwd)
        assert out.split(b"\0")[:-1] == [item.encode() for item in items]
        assert list(cwd.iterdir()) == []


@SETTINGS
@given(st.lists(HOSTILE_TEXT, min_size=1, max_size=4))
def test_wrapped_argv_reports_its_group_and_nothing_else_leaks(items: list[str]) -> None:
    """The line a worker really sends (wrapped with the pgid marker) keeps items literal."""
    with scratch() as tmp:
        cwd = Path(tmp)
        line = build_invocation(plan(argv=["printf", "%s\\0", *items]), nonce="abc123").line
        first, _, rest = run_sh(line, cwd, stdin=GO).partition(b"\n")
        assert parse_marker(first + b"\n", "abc123") is not None
        assert rest.split(b"\0")[:-1] == [item.encode() for item in items]
        assert list(cwd.iterdir()) == []


@SETTINGS
@given(HOSTILE_TEXT)
def test_a_hostile_program_name_is_looked_up_literally(program: str) -> None:
    """argv[0] is never split or expanded: at worst, no such program.

    Workers always send the wrapped line (``exec sh -c ...``), so even a program named
    ``-rf`` is never taken for an option of the login shell.
    """
    with scratch() as tmp:
        cwd = Path(tmp)
        line = build_invocation(plan(argv=[program, "x"]), nonce="n0").line
        proc = subprocess.run(["/bin/sh", "-c", line], input=GO, capture_output=True, cwd=cwd,
                              env={"PATH": "/nonexistent"}, timeout=20)
        assert proc.returncode in (126, 127), (program, proc.stderr)
        assert list(cwd.iterdir()) == []


def test_nul_in_the_exec_line_is_refused_with_a_clear_error() -> None:
    cases: list[dict[str, Any]] = [
        {"argv": ["echo", "a\0b"]}, {"command": "echo a\0b"},
        {"argv": ["true"], "env": {"A": "x\0"}}, {"argv": ["true"], "workingDir": "/tmp/a\0b"},
    ]
    for fields in cases:
        with pytest.raises(InvalidCommand, match="NUL character"):
            build_invocation(plan(**fields))


def test_empty_argv_is_refused() -> None:
    with pytest.raises(InvalidCommand, match="argv must name a program"):
        quote_argv([])
    with pytest.raises(ValidationError, match="at least 1 item"):
        spec(argv=[])


# --------------------------------------------------------------------------- env


ENV_NAME = re.compile(ENV_NAME_PATTERN)
BAD_NAMES = st.one_of(
    st.sampled_from(["", "1A", "A-B", "A B", "A\n", "\nA", "A;touch pwned", "$(x)", "A=B",
                     "é", "A.B", "-A", " A", "A\0"]),
    st.text(max_size=12).filter(lambda s: not ENV_NAME.fullmatch(s)),
)


@SETTINGS
@given(BAD_NAMES)
def test_invalid_env_names_are_refused_by_the_model_and_the_builder(name: str) -> None:
    assert not is_env_name(name)
    with pytest.raises(ValidationError, match="is invalid: use letters, digits and underscores"):
        spec(argv=["true"], env={name: "x"})
    with pytest.raises(InvalidCommand, match="is invalid: use letters, digits and underscores"):
        env_prefix({name: "x"})


@SETTINGS
@given(st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,20}\Z"), HOSTILE_TEXT)
@example("A", "$(touch pwned)\n`touch pwned`; touch pwned")
def test_env_values_arrive_literally(suffix: str, value: str) -> None:
    name = f"VMFLEET_T_{suffix}"
    with scratch() as tmp:
        cwd = Path(tmp)
        line = build_invocation(plan(command=f'printf "%s\\0" "${name}"', env={name: value})).line
        assert run_sh(line, cwd) == value.encode() + b"\0"
        assert list(cwd.iterdir()) == []


# --------------------------------------------------------------------------- working dir

DIR_NAME = st.one_of(
    st.sampled_from(["-", "--", "-P", "~", "$(touch pwned)", "`touch pwned`", "a;b", "a\nb",
                     " ", "*", "'", '"', "\\", "..a", "é☃"]),
    st.text(st.characters(codec="utf-8", blacklist_characters="\0/"),
            min_size=1, max_size=30).filter(lambda s: s not in (".", "..")),
)


@SETTINGS
@given(DIR_NAME, st.booleans())
def test_working_dir_is_entered_literally(name: str, relative: bool) -> None:
    with scratch() as tmp:
        home = Path(os.path.realpath(tmp))
        (home / name).mkdir()
        before = sorted(home.iterdir())
        working_dir = name if relative else str(home / name)
        line = build_invocation(plan(argv=["pwd", "-P"], workingDir=working_dir)).line
        out = run_sh(line, home)  # relative directories start from the login directory
        assert out == (str(home / name) + "\n").encode()
        assert sorted(home.iterdir()) == before
        assert list((home / name).iterdir()) == []


def test_a_missing_working_dir_fails_before_the_program_runs() -> None:
    with scratch() as tmp:
        line = build_invocation(plan(argv=["touch", "ran"], workingDir="/nonexistent/x")).line
        proc = subprocess.run(["sh", "-c", line], capture_output=True, cwd=tmp, timeout=20)
        assert proc.returncode != 0
        assert list(Path(tmp).iterdir()) == []


# --------------------------------------------------------------------------- transfer paths

SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "-", "-rf", "$(x)", "a b", "\n", "*", ".vmfleet-x", "é" * 200]),
    st.text(st.characters(codec="utf-8", blacklist_characters="\0/"),
            min_size=1, max_size=300),
)
PATHS = st.lists(SEGMENT, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))


@SETTINGS
@given(PATHS, st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=63),
       st.integers(1, 200))
def test_the_temporary_file_stays_beside_the_destination(
    path: str, uid: str, vm: str, attempt: int
) -> None:
    temp = temp_path(path, uid, vm, attempt)
    directory, name = posixpath.split(temp)
    assert directory == posixpath.dirname(path)
    assert "/" not in name and "\0" not in name
    assert name.startswith(".") and name not in (".", "..")
    assert TEMP_MARK in name
    assert len(name.encode()) <= 255  # NAME_MAX
    assert temp != path
    # Attempts and destinations never share a temporary file.
    assert temp_path(path, uid, vm, attempt + 1) != temp
    assert temp_path(path, uid, vm + "x", attempt) != temp


@SETTINGS
@given(st.one_of(st.sampled_from(["", "relative", "./x", "../x", "~/x", "-rf"]),
                 st.text(max_size=20).filter(lambda s: not s.startswith("/"))))
def test_transfer_paths_must_be_absolute(path: str) -> None:
    with pytest.raises(ValidationError):
        FileLocation.model_validate({"vm": "vm1", "path": path})


@SETTINGS
@given(st.one_of(st.sampled_from(["../vm1", "other/vm1", "other:vm1", "VM1", "vm1.", "-vm1"]),
                 st.text(max_size=20).filter(lambda s: not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", s))))
def test_vm_references_are_names_in_the_same_namespace(name: str) -> None:
    with pytest.raises(ValidationError):
        FileLocation.model_validate({"vm": name, "path": "/x"})
    with pytest.raises(ValidationError):
        spec(vm=name, argv=["true"]) if name else RemoteCommandSpec.model_validate(
            {"vm": name, "argv": ["true"]})


class _Core:
    def __init__(self, secret: Any) -> None:
        self.secret = secret

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        return self.secret


def _source_from_secret(secret_type: str) -> Any:
    secret = SimpleNamespace(type=secret_type, data={"ssh-privatekey": "a2V5", "token": "dG9r"},
                             metadata=SimpleNamespace(labels={LABEL_TRANSFERABLE: "true"}))
    commands = SimpleNamespace(state=None, pool=None)
    executor = TransferExecutor(commands,  # type: ignore[arg-type]
                                kube=lambda: SimpleNamespace(core=_Core(secret)))  # type: ignore[arg-type,return-value]
    key = "ssh-privatekey" if secret_type == SECRET_TYPE_SSH_AUTH else "token"
    source = plan_of(RemoteCommandSpec.model_validate({"transfer": {
        "from": {"secretKeyRef": {"name": "vm1-ssh", "key": key}},
        "to": [{"vm": "vm2", "path": "/x"}]}})).transfer
    assert source is not None
    return executor.open_source(Envelope("team-a", "c", "u", "vm2", 1, "", {}), source.source)


def test_a_vms_ssh_credentials_are_never_a_transfer_source() -> None:
    """Who may create RemoteCommands (not read Secrets) cannot copy a VM's key to a VM."""
    with pytest.raises(TransferFailed, match="vmfleet never copies it") as caught:
        _source_from_secret(SECRET_TYPE_SSH_AUTH)
    assert caught.value.reason == "PermissionDenied"
    assert b"".join(_source_from_secret("Opaque").chunks()) == b"tok"
