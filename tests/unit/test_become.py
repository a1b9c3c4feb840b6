"""become (sudo), the attempt marker and signal names: pure builders and parsers."""

import shlex
from pathlib import Path

import paramiko
import pytest

from remote_tasks.become import (
    PasswordInvalid,
    Step,
    SudoDialogue,
    clean_password,
    read_become_password,
    refusal,
)
from remote_tasks.shell import (
    InvalidCommand,
    become_prompt,
    become_ready,
    build_invocation,
    exec_body,
    marker_env,
    sudo_line,
    terminate_line,
)
from remote_tasks.signals import signal_exit_code, signal_outcome
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.planning import plan_of

NONCE = "abc123"
PROMPT = become_prompt(NONCE).encode()
READY = become_ready(NONCE).encode() + b"\n"


def spec(**fields):
    return RemoteCommandSpec.model_validate({"vm": "vm1", **fields})


def plan(**fields):
    """What the controller sends the worker for that spec."""
    return plan_of(spec(**fields))


def test_marker_env_and_the_wrapper_exports_it():
    assert marker_env(NONCE) == "VMFLEET_ATTEMPT=abc123"
    line = build_invocation(plan(command="sleep 1"), nonce=NONCE).line
    script = shlex.split(line)[3]
    assert "; export VMFLEET_ATTEMPT=abc123; exec </dev/null; exec sh -c 'sleep 1'" in script
    with pytest.raises(InvalidCommand):
        marker_env("not;alnum")


def test_exec_body_quotes_every_part():
    assert exec_body("sh -c 'x'", {"B": "two words", "A": "$HOME"}, "/tmp/my dir") == (
        "cd -- '/tmp/my dir' || exit; export A='$HOME' B='two words'; exec sh -c 'x'")
    assert exec_body("ls", None, None) == "exec ls"


def test_sudo_line():
    line = sudo_line("exec id -u", "root", NONCE, stdin=False)
    assert line == (
        "exec sudo -S -p vmfleet-become-prompt:abc123: -u root -- env VMFLEET_ATTEMPT=abc123 "
        "sh -c 'printf '\"'\"'%s\\n'\"'\"' vmfleet-become-ready:abc123 >&2; exec </dev/null; "
        "exec id -u'")
    argv = shlex.split(line)
    assert argv[:8] == ["exec", "sudo", "-S", "-p", "vmfleet-become-prompt:abc123:", "-u", "root",
                        "--"]
    assert argv[8:11] == ["env", "VMFLEET_ATTEMPT=abc123", "sh"]
    with_stdin = shlex.split(sudo_line("exec cat", "app-user", NONCE, stdin=True))
    assert with_stdin[12] == "printf '%s\\n' vmfleet-become-ready:abc123 >&2; exec cat"
    for hostile in ("root; reboot", "-u", "$(id)", "", "a b"):
        with pytest.raises(InvalidCommand):
            sudo_line("true", hostile, NONCE, stdin=False)


def test_become_invocation_wraps_sudo_and_keeps_stdin_for_it():
    invocation = build_invocation(plan(argv=["id", "-u"], become={"user": "root"}), nonce=NONCE)
    assert invocation.become_user == "root"
    assert invocation.stdin is None
    script = shlex.split(invocation.line)[3]
    # the outer wrapper keeps stdin (sudo may read the password); the action reads /dev/null
    assert script.endswith("; export VMFLEET_ATTEMPT=abc123; " + sudo_line(
        "exec id -u", "root", NONCE, stdin=False))
    with pytest.raises(InvalidCommand, match="become needs the wrapped line"):
        build_invocation(plan(argv=["id"], become={"user": "root"}))


def test_become_is_refused_for_a_transfer_and_defaults_to_root_sudo():
    assert spec(command="id", become={}).become.model_dump() == {"user": "root", "method": "sudo"}
    with pytest.raises(ValueError, match="become applies to command, argv and script"):
        RemoteCommandSpec.model_validate({"transfer": {"from": {"vm": "a", "path": "/x"},
                                                       "to": [{"vm": "b", "path": "/y"}]},
                                          "become": {"user": "root"}})
    with pytest.raises(ValueError):
        spec(command="id", become={"method": "su"})


def test_terminate_as_the_become_user_goes_through_sudo():
    line = terminate_line(4242, 1, NONCE, as_user="root")
    argv = shlex.split(line)
    assert argv[:9] == ["exec", "sudo", "-S", "-p", "", "-u", "root", "--", "sh"]
    assert argv[10].startswith("g=4242; m=VMFLEET_ATTEMPT=abc123; ")


@pytest.mark.parametrize(
    ("chunks", "has_password", "out", "steps", "failure"),
    [
        # NOPASSWD: the ready line at once; what follows is stderr
        ([READY + b"warn\n"], False, b"warn\n", [Step.READY], None),
        # sudo's own warnings before it are stderr too; the marker may arrive split
        ([b"sudo: unable to resolve host vm1\n" + READY[:7], READY[7:]], False,
         b"sudo: unable to resolve host vm1\n", [Step.READY], None),
        # a password: sent at the prompt, then ready
        ([PROMPT, READY], True, b"", [Step.SEND_PASSWORD, Step.READY], None),
        ([PROMPT[:5], PROMPT[5:] + READY + b"x"], True, b"x",
         [Step.SEND_PASSWORD, Step.READY], None),
        # wrong password: sudo prompts again, which fails at once
        ([PROMPT, b"Sorry, try again.\n" + PROMPT], True, b"Sorry, try again.\n",
         [Step.SEND_PASSWORD, Step.FAILED], "sudo refused the password"),
        # no password where sudo wants one
        ([PROMPT], False, b"", [Step.FAILED], "has no 'become-password' key"),
    ],
)
def test_sudo_dialogue(chunks, has_password, out, steps, failure):
    dialogue = SudoDialogue(NONCE, has_password)
    seen_out, seen_steps = b"", []
    for chunk in chunks:
        data, new = dialogue.feed(chunk)
        seen_out += data
        seen_steps += new
    seen_out += dialogue.flush()
    assert (seen_out, seen_steps) == (out, steps)
    if failure is None:
        assert dialogue.failure is None and dialogue.ready
    else:
        assert failure in (dialogue.failure or "")
    assert dialogue.feed(b"after\n") == (b"after\n", [])  # after the dialogue: plain stderr


def test_sudo_that_never_got_going_leaves_its_words_as_stderr():
    dialogue = SudoDialogue(NONCE, False)
    data, steps = dialogue.feed(b"sudo: a terminal is required\n")
    assert steps == [] and not dialogue.ready
    assert data + dialogue.flush() == b"sudo: a terminal is required\n"


def test_clean_password():
    assert clean_password("s3cret\n") == "s3cret"
    assert clean_password("s3cret\r\n") == "s3cret"
    assert clean_password("with space ") == "with space "
    assert clean_password("") is None and clean_password(None) is None
    with pytest.raises(PasswordInvalid):
        clean_password("two\nlines")


def test_read_become_password_from_the_mounted_secret_or_its_data(tmp_path: Path):
    (tmp_path / "become-password").write_text("from-file\n")

    def unread() -> dict[str, str]:
        raise AssertionError("the mounted Secret is enough")

    assert read_become_password(tmp_path, unread) == "from-file"
    assert read_become_password(tmp_path / "empty", unread) is None
    assert read_become_password(None, lambda: {"become-password": "from-data"}) == "from-data"
    assert read_become_password(None, lambda: {"ssh-privatekey": "k"}) is None


def test_refusal():
    assert refusal("vm1", False, None) is None
    assert refusal("vm1", True, "root") is None
    message = refusal("vm1", False, "root")
    assert message is not None and "RemoteVM vm1 does not allow become" in message


def test_signal_exit_codes():
    assert signal_exit_code("KILL") == 137
    assert signal_exit_code("TERM") == 143
    assert signal_exit_code("SEGV") == 139
    assert signal_exit_code("NOPE") is None
    assert signal_outcome("KILL", None) == {"signal": "KILL", "exitCode": 137}
    assert signal_outcome(None, 3) == {"signal": None}


def test_judge_names_the_signal():
    from remote_tasks.execute import judge
    from remote_tasks.output import StreamTail
    from remote_tasks.session import ExecResult

    result = ExecResult(None, StreamTail(10), StreamTail(10), 0.0, 1.0, signal="KILL")
    outcome = judge(result, [0])
    assert (outcome.phase, outcome.reason, outcome.message) == (
        "Failed", "Signaled", "killed by signal KILL")
    fields = outcome.fields("2026-01-01T00:00:00Z").wire()
    assert (fields["exitCode"], fields["signal"]) == (137, "KILL")
    plain = judge(ExecResult(2, StreamTail(10), StreamTail(10), 0.0, 1.0), [0])
    assert plain.fields("t").signal is None  # cleared when an earlier attempt had one


def test_signal_transport_keeps_exit_signal():
    from remote_tasks.session import exit_signal
    from remote_tasks.ssh import SignalTransport

    class FakeChannel:
        def __init__(self) -> None:
            import threading

            self.status_event = threading.Event()

    chan = FakeChannel()
    m = paramiko.Message()
    m.add_string("exit-signal")
    m.add_boolean(False)
    m.add_string("KILL")
    m.add_boolean(False)
    m.add_string("")
    m.add_string("")
    m.rewind()
    SignalTransport._handle_channel_request(chan, m)  # type: ignore[arg-type]
    assert exit_signal(chan) == "KILL"  # type: ignore[arg-type]
    assert chan.status_event.is_set()
    handler = SignalTransport._channel_handler_table[paramiko.common.MSG_CHANNEL_REQUEST]
    assert handler is SignalTransport._handle_channel_request
