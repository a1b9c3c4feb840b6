"""Command lines: everything but the user's own ``command`` is quoted."""

import shlex
import subprocess

import pytest

from remote_tasks.shell import InvalidCommand, build_invocation, env_prefix, quote_argv
from vmfleet.api.models import RemoteCommandSpec


def spec(**fields):
    return RemoteCommandSpec.model_validate({"vm": "vm1", **fields})


@pytest.mark.parametrize(
    ("fields", "line", "stdin"),
    [
        ({"command": "hostname && uptime"}, "sh -c 'hostname && uptime'", None),
        ({"argv": ["df", "-h", "/"]}, "df -h /", None),
        ({"argv": ["echo", "$(reboot)", "a b", "it's"]},
         "echo '$(reboot)' 'a b' 'it'\"'\"'s'", None),
        ({"script": "set -e\necho hi\n"}, "sh -s", b"set -e\necho hi\n"),
        ({"command": "cat", "stdin": "data"}, "sh -c cat", b"data"),
        ({"argv": ["ls"], "workingDir": "/tmp/my dir;rm -rf /"},
         "cd -- '/tmp/my dir;rm -rf /' && ls", None),
        ({"argv": ["env"], "env": {"B": "two words", "A": "$HOME"}},
         "A='$HOME' B='two words' env", None),
    ],
)
def test_build_invocation(fields, line, stdin):
    invocation = build_invocation(spec(**fields))
    assert invocation.line == line
    assert invocation.stdin == stdin


def test_script_with_stdin_is_refused():
    with pytest.raises(InvalidCommand, match="stdin cannot be combined with script"):
        build_invocation(spec(script="cat", stdin="x"))


def test_bad_env_name_is_refused():
    with pytest.raises(InvalidCommand, match="env name 'A-B' is invalid"):
        env_prefix({"A-B": "x"})


@pytest.mark.parametrize(
    "hostile",
    ["$(touch /tmp/pwned)", "`id`", "a;b", "a\nb", "-rf", "'", '"', "\\", "*", "~root", ""],
)
def test_quoted_argv_reaches_the_program_literally(hostile):
    """Run through a real local sh: each argv item arrives exactly as given."""
    line = quote_argv(["printf", "%s\\0", hostile, "x"])
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:2] == [hostile.encode(), b"x"]
    assert shlex.split(line)[2] == hostile
