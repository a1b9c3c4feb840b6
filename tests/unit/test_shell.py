"""Command lines: everything but the user's own ``command`` is quoted."""

import shlex
import subprocess

import pytest

from remote_tasks.shell import GO, InvalidCommand, build_invocation, env_prefix, quote_argv
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.planning import plan_of


def spec(**fields):
    return RemoteCommandSpec.model_validate({"vm": "vm1", **fields})


def plan(**fields):
    """What the controller sends the worker for that spec."""
    return plan_of(spec(**fields))


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
    invocation = build_invocation(plan(**fields))
    assert invocation.line == line
    assert invocation.stdin == stdin


def test_script_with_stdin_is_refused():
    with pytest.raises(InvalidCommand, match="stdin cannot be combined with script"):
        build_invocation(plan(script="cat", stdin="x"))


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


def test_wrapped_line_reports_its_process_group_first():
    from remote_tasks.shell import parse_marker

    invocation = build_invocation(plan(command="echo hi", workingDir="/"), nonce="abc123")
    proc = subprocess.run(["setsid", "sh", "-c", invocation.line], input=GO + b"stdin follows\n",
                          capture_output=True, check=True)
    first, rest = proc.stdout.split(b"\n", 1)
    pgid = parse_marker(first + b"\n", "abc123")
    assert pgid is not None and pgid > 1
    assert rest == b"hi\n"
    assert parse_marker(first, "other") is None
    assert parse_marker(b"vmfleet-pgid:abc123 1\n", "abc123") is None  # never group 1


def test_terminate_line_checks_the_marker_before_signalling():
    from remote_tasks.shell import terminate_line

    line = terminate_line(4242, 1.5, nonce="abc123")
    script = shlex.split(line)[3]
    assert shlex.split(line)[:3] == ["exec", "sh", "-c"]
    assert script.startswith("g=4242; m=VMFLEET_ATTEMPT=abc123; ")
    assert "grep -q -F abc123 /proc/$g/cmdline" in script
    assert 'grep -q -z -x -F "$m" /proc/$g/environ' in script
    assert 'grep -l -z -x -F "$m" /proc/[0-9]*/environ' in script
    assert "kill -s $1 -- -$g" in script
    assert "sig TERM; i=0; while alive && [ $i -lt 15 ]" in script
    assert script.endswith("sig KILL; sig KILL; exit 0")
    with pytest.raises(InvalidCommand):
        terminate_line(1, 1)
    with pytest.raises(InvalidCommand):
        terminate_line(None, 1)
    with pytest.raises(InvalidCommand):
        terminate_line(4242, 1, nonce="a;b")


def test_terminate_line_without_marker_signals_the_group_only():
    from remote_tasks.shell import terminate_line

    script = shlex.split(terminate_line(4242, 0.2))[3]
    assert script == ("g=4242; sig() { kill -s $1 -- -$g 2>/dev/null; }; "
                      "alive() { kill -s 0 -- -$g 2>/dev/null; }; alive || exit 0; sig TERM; "
                      "i=0; while alive && [ $i -lt 2 ]; do sleep 0.1; i=$((i+1)); done; "
                      "sig KILL; sig KILL; exit 0")


def test_terminate_line_ends_a_group_that_ignores_term():
    import signal
    import time

    from remote_tasks.shell import terminate_line

    victim = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & sleep 60"],
                              start_new_session=True)
    time.sleep(0.2)
    subprocess.run(["sh", "-c", terminate_line(victim.pid, 0.5)], check=True, timeout=10)
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert live_members(victim.pid) == []


def live_members(pgid):
    """Processes of the group that are not zombies (an unreaped child counts for killpg)."""
    from pathlib import Path

    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(stat.parent.name)
    return members


@pytest.mark.parametrize("told", [b"", b"no\n", b"go on\n"])
def test_the_wrapped_command_runs_only_after_the_go(tmp_path, told):
    """A delivery that loses the claim closes the channel (EOF): nothing of the command runs."""
    from remote_tasks.shell import parse_marker

    invocation = build_invocation(plan(command="touch ran"), nonce="abc123")
    proc = subprocess.run(["sh", "-c", invocation.line], input=told, capture_output=True,
                          cwd=tmp_path, check=True)
    assert parse_marker(proc.stdout, "abc123") is not None
    assert not (tmp_path / "ran").exists()


def test_the_go_line_is_not_part_of_the_commands_stdin(tmp_path):
    invocation = build_invocation(plan(command="cat", stdin="hello\nworld\n"), nonce="abc123")
    assert invocation.stdin is not None
    proc = subprocess.run(["sh", "-c", invocation.line], input=GO + invocation.stdin,
                          capture_output=True, cwd=tmp_path, check=True)
    assert proc.stdout.split(b"\n", 1)[1] == b"hello\nworld\n"


def test_connections_to_vms_disable_nagle():
    """Without TCP_NODELAY every channel open waited ~40 ms for a delayed ACK."""
    import socket

    from remote_tasks.ssh import Connection
    from remote_tasks.sshtarget import SSHTarget

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        conn = Connection(SSHTarget(host="127.0.0.1", port=port, user="u", private_key="",
                                    host_keys=()))
        sock = conn._socket()
        try:
            assert isinstance(sock, socket.socket)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            sock.close()


def test_a_wrapped_command_without_stdin_reads_dev_null_so_no_eof_is_needed(tmp_path):
    """The worker sends only the go: an EOF after it could race the server's close."""
    invocation = build_invocation(plan(command="cat; echo done"), nonce="abc123")
    assert invocation.stdin is None
    proc = subprocess.Popen(["sh", "-c", invocation.line], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(GO)
    proc.stdin.flush()  # stdin stays open: without /dev/null, cat would wait for ever
    try:
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read().split(b"\n", 1)[1] == b"done\n"
    finally:
        proc.stdin.close()
        proc.kill()
