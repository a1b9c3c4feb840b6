"""What an attempt leaves on the VM: the SSH layer against a real OpenSSH sshd, checked on
the VM itself (``ps`` over a separate SSH connection).

* a terminated attempt kills what left its process group (``setsid``, ``nohup ... &``, a
  double fork), found by the marker in their environment;
* a command killed by a signal reports the signal's name (``exit-signal``);
* ``AttemptControl.terminate`` from another thread ends a running attempt at once;
* ``become`` through sudo: NOPASSWD, a password, a wrong password.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from remote_tasks.become import Become
from remote_tasks.session import AttemptControl, Deadline
from remote_tasks.shell import build_invocation
from remote_tasks.ssh import ConnectionPool
from remote_tasks.sshtarget import SSHTarget
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.planning import plan_of
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e


def target_of(vm) -> SSHTarget:  # type: ignore[no-untyped-def]
    return SSHTarget(host=vm.host, port=vm.port, user=vm.user,
                     private_key=vm.user_private_key_pem, host_keys=tuple(vm.host_public_keys),
                     passphrase=vm.key_passphrase)


def processes(vm, needle: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Live processes on the VM whose command line contains ``needle``."""
    _, out, _ = vm.run("ps -eo stat=,args=")
    return [line for line in out.decode().splitlines()
            if needle in line and not line.strip().startswith("Z") and "ps -eo" not in line]


def run(pool: ConnectionPool, vm, spec: dict, **options):  # type: ignore[no-untyped-def]
    nonce = uuid.uuid4().hex
    invocation = build_invocation(plan_of(RemoteCommandSpec.model_validate({"vm": "x", **spec})),
                                  nonce)
    conn = pool.get(target_of(vm))
    return conn.run(invocation.line, invocation.stdin, 65536, nonce=nonce, **options)


# A command whose children leave its process group in the three classic ways, each a
# sleep of its own length so the check on the VM can tell them apart.
ESCAPES = (
    "setsid sleep 701 </dev/null >/dev/null 2>&1 &\n"
    "nohup sleep 702 </dev/null >/dev/null 2>&1 &\n"
    "( ( setsid sleep 703 </dev/null >/dev/null 2>&1 & ) & )\n"
    "sh -c 'sleep 704 & exit' </dev/null >/dev/null 2>&1\n"
    "echo started\n"
    "sleep 700\n"
)
ESCAPED = ("sleep 700", "sleep 701", "sleep 702", "sleep 703", "sleep 704")


@pytest.fixture
def pool():  # type: ignore[no-untyped-def]
    p = ConnectionPool()
    yield p
    p.close_all()


def test_timeout_kills_what_left_the_process_group(make_vm, pool):  # type: ignore[no-untyped-def]
    vm = make_vm("escapes")
    result = run(pool, vm, {"script": ESCAPES},
                 deadline=Deadline(time.monotonic() + 3, "Timeout"), kill_grace=1)
    assert result.ended_by == "Timeout"
    assert result.stdout.text() == "started\n"
    assert result.signal in ("TERM", "KILL")
    # the VM itself: none of the five sleeps is left, in or out of the group
    wait_until(lambda: all(processes(vm, s) == [] for s in ESCAPED), timeout=10,
               what="every escaped sleep to be gone")


def test_the_group_kill_alone_leaves_the_escapees(make_vm, pool):  # type: ignore[no-untyped-def]
    """The reason for the marker: killing only the group (the old terminate) leaves them."""
    from remote_tasks.shell import terminate_line

    vm = make_vm("groupkill")
    nonce = uuid.uuid4().hex
    invocation = build_invocation(plan_of(RemoteCommandSpec.model_validate(
        {"vm": "x", "script": ESCAPES})), nonce)
    conn = pool.get(target_of(vm))
    holder: dict = {}

    def background() -> None:
        holder["result"] = conn.run(invocation.line, invocation.stdin, 65536, nonce=nonce)

    thread = threading.Thread(target=background)
    thread.start()
    wait_until(lambda: processes(vm, "sleep 700"), timeout=20, what="the command to start")
    _, out, _ = vm.run("pgrep -f -o 'sleep 700'")
    leader_group = vm.run(f"ps -o pgid= -p {out.decode().split()[0]}")[1].decode().strip()
    code, _, _ = vm.run(terminate_line(int(leader_group), 0.5))  # group only: no marker
    assert code == 0
    thread.join(timeout=20)
    try:
        assert processes(vm, "sleep 700") == []
        escaped = [s for s in ESCAPED[1:] if processes(vm, s)]
        assert escaped, "nothing escaped the group: the test shows nothing"
    finally:
        vm.run(terminate_line(None, 0.5, nonce))
    wait_until(lambda: all(processes(vm, s) == [] for s in ESCAPED), timeout=10,
               what="the marker kill to end the escapees")


def test_a_command_killed_by_a_signal_names_it(make_vm, pool):  # type: ignore[no-untyped-def]
    vm = make_vm("signals")
    result = run(pool, vm, {"command": "echo before; kill -9 $$; echo after"})
    assert (result.exit_code, result.signal, result.ended_by) == (None, "KILL", None)
    assert result.stdout.text() == "before\n"
    result = run(pool, vm, {"argv": ["sh", "-c", "kill -s TERM $$"]})
    assert (result.exit_code, result.signal) == (None, "TERM")
    result = run(pool, vm, {"command": "exit 137"})  # an exit code is not a signal
    assert (result.exit_code, result.signal) == (137, None)


def test_terminate_from_another_thread_ends_the_attempt_at_once(make_vm, pool):  # type: ignore[no-untyped-def]
    vm = make_vm("cancel")
    control = AttemptControl()
    holder: dict = {}

    def background() -> None:
        holder["result"] = run(pool, vm, {"script": ESCAPES.replace("sleep 700", "trap '' TERM; sleep 700")},
                               control=control, kill_grace=1)

    thread = threading.Thread(target=background)
    thread.start()
    wait_until(lambda: all(processes(vm, s) for s in ESCAPED), timeout=20,
               what="the command and its escapees to run")
    started = time.monotonic()
    assert control.terminate("Cancelled")
    killed_in = time.monotonic() - started
    assert not control.terminate("Cancelled")  # once
    assert all(processes(vm, s) == [] for s in ESCAPED)
    thread.join(timeout=20)
    result = holder["result"]
    assert result.ended_by == "Cancelled"
    # TERM was ignored by the leader: the KILL after the 1 s grace ended it
    assert result.signal == "KILL"
    assert killed_in < 1.0 + 1.0, killed_in


def test_terminate_before_the_go_never_starts_the_command(make_vm, pool):  # type: ignore[no-untyped-def]
    from remote_tasks.sshtarget import NotStarted

    vm = make_vm("early")
    control = AttemptControl()
    assert not control.terminate("Cancelled")  # nothing to kill yet
    marker = "/tmp/vmfleet-early-ran"
    with pytest.raises(NotStarted):
        run(pool, vm, {"command": f"touch {marker}"}, control=control)
    assert not vm.host_path(marker).exists()


def test_cancel_latency_of_a_quick_term(make_vm, pool):  # type: ignore[no-untyped-def]
    """A command that obeys TERM is gone well within a second of terminate()."""
    vm = make_vm("quick")
    latencies = []
    for _ in range(5):
        control = AttemptControl()
        thread = threading.Thread(target=run, args=(pool, vm, {"argv": ["sleep", "705"]}),
                                  kwargs={"control": control})
        thread.start()
        wait_until(lambda: processes(vm, "sleep 705"), timeout=20, what="sleep 705 to start")
        started = time.monotonic()
        control.terminate("Cancelled")
        latencies.append(time.monotonic() - started)
        assert processes(vm, "sleep 705") == []
        thread.join(timeout=20)
    assert max(latencies) < 1.0, latencies


def test_become_from_root_runs_as_another_user(make_vm, pool):  # type: ignore[no-untyped-def]
    from vmfleet.dev.sshd import is_root

    if not is_root():
        pytest.skip("logging in as root needs a root test run")
    vm = make_vm("become-root")
    for spec in ({"command": "id -un"}, {"argv": ["id", "-un"]}, {"script": "id -un\n"},
                 {"command": "id -un; cat", "stdin": "from stdin\n"}):
        result = run(pool, vm, {**spec, "become": {"user": "nobody"}}, become=Become("nobody"))
        assert (result.exit_code, result.become_failed) == (0, None), result.stderr.text()
        assert result.stdout.text().startswith("nobody\n"), spec
    assert result.stdout.text() == "nobody\nfrom stdin\n"


# --------------------------------------------------------------------------- the whole flow
# RemoteCommands through the real control plane, controller and workers; results checked
# in status and on the VM.


def result_of(obj: dict) -> dict:
    return obj["status"]["results"][0]


def _t(stamp: str) -> float:
    from vmfleet.api.times import parse_rfc3339

    return parse_rfc3339(stamp).timestamp()


def test_timed_out_command_leaves_nothing_running(ns, make_vm):  # type: ignore[no-untyped-def]
    vm = make_vm("rc-escapes")
    ns.add_vms([vm])
    ns.run("escapes", vm=vm.name, timeoutSeconds=3, script=ESCAPES)
    obj = ns.finished("escapes", timeout=90)
    result = result_of(obj)
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "Timeout")
    assert result["stdout"] == "started\n"
    assert result["signal"] in ("TERM", "KILL")  # recorded, but vmfleet sent it: Timeout
    assert result["exitCode"] == {"TERM": 143, "KILL": 137}[result["signal"]]
    assert all(processes(vm, s) == [] for s in ESCAPED), [processes(vm, s) for s in ESCAPED]


def test_kill_9_is_signaled_kill_137(ns, make_vm):  # type: ignore[no-untyped-def]
    vm = make_vm("rc-signal")
    ns.add_vms([vm])
    ns.run("nine", vm=vm.name, command="echo before; kill -9 $$")
    obj = ns.finished("nine", timeout=90)
    result = result_of(obj)
    assert obj["status"]["phase"] == "Failed"
    assert (result["reason"], result["signal"], result["exitCode"]) == ("Signaled", "KILL", 137)
    assert result["message"] == "killed by signal KILL"
    assert result["stdout"] == "before\n"
    # a later attempt's plain exit clears the signal (one field per attempt)
    ns.run("plain", vm=vm.name, command="exit 3")
    plain = result_of(ns.finished("plain", timeout=90))
    assert (plain["reason"], plain["exitCode"], plain.get("signal")) == ("ExitCode", 3, None)


# --------------------------------------------------------------------------- become

NOPASSWD_USER = "vmfleet-e2e-nopw"
PASSWORD_USER = "vmfleet-e2e-pw"
SUDOERS = "/etc/sudoers.d/vmfleet-e2e"


@pytest.fixture(scope="module")
def sudo_users():  # type: ignore[no-untyped-def]
    """Two unprivileged login users: one with a NOPASSWD sudoers entry, one that sudo asks
    for its password (a random one, set here). Removed again at the end."""
    import shutil
    import subprocess
    from pathlib import Path

    from vmfleet.dev.sshd import is_root

    if not is_root() or shutil.which("sudo") is None:
        pytest.skip("needs root (to add users and a sudoers entry) and sudo "
                    "(scripts/install-system-deps.sh installs it)")
    password = uuid.uuid4().hex
    for user in (NOPASSWD_USER, PASSWORD_USER):
        if subprocess.run(["id", user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
    # "*": no password, but not locked ("!"), which sshd would refuse even for a key
    subprocess.run(["usermod", "-p", "*", NOPASSWD_USER], check=True)
    subprocess.run(["chpasswd"], input=f"{PASSWORD_USER}:{password}\n", text=True, check=True)
    Path(SUDOERS).write_text(f"{NOPASSWD_USER} ALL=(ALL) NOPASSWD: ALL\n"
                             f"{PASSWORD_USER} ALL=(ALL) ALL\n")
    Path(SUDOERS).chmod(0o440)
    try:
        yield password
    finally:
        Path(SUDOERS).unlink(missing_ok=True)
        for user in (NOPASSWD_USER, PASSWORD_USER):
            subprocess.run(["userdel", "--remove", user], capture_output=True)


def add_vm(ns, vm, password: str | None = None, **spec) -> None:  # type: ignore[no-untyped-def]
    from vmfleet.dev.manifests import vm_manifests

    secret, remote_vm = vm_manifests(vm, str(ns), **spec)
    if password is not None:
        secret["stringData"]["become-password"] = password
    ns.kubectl.apply(secret, remote_vm)


def everything_readable(ns, controller_dir) -> str:  # type: ignore[no-untyped-def]
    """Every log file, Event and status the test can read."""
    from tests.e2e.fleet import logs_of

    logs = logs_of(sorted(controller_dir.rglob("*.log")))
    events = ns.k("get", "events", "-o", "json").stdout
    commands = ns.k("get", "rcmd", "-o", "json").stdout
    vms = ns.k("get", "rvm", "-o", "json").stdout
    return "\n".join([logs, events, commands, vms])


def test_become_with_nopasswd_from_an_unprivileged_login(ns, make_vm, sudo_users):  # type: ignore[no-untyped-def]
    vm = make_vm("bnopw", user=NOPASSWD_USER)
    add_vm(ns, vm, allowBecome=True)
    ns.run("plain", vm=vm.name, command="id -u")
    assert result_of(ns.finished("plain"))["stdout"].strip() != "0"
    for name, action in (("cmd", {"command": "id -u"}), ("argv", {"argv": ["id", "-u"]}),
                         ("script", {"script": "id -u\ncat\n"})):
        ns.run(name, vm=vm.name, become={"user": "root"}, **action)
    for name in ("cmd", "argv", "script"):
        result = result_of(ns.finished(name))
        assert (result["phase"], result["reason"], result["exitCode"]) == (
            "Succeeded", "Completed", 0), result
        assert result["stdout"] == "0\n"


def test_become_with_a_password(ns, make_vm, sudo_users, controller_dir):  # type: ignore[no-untyped-def]
    password = sudo_users
    vm = make_vm("bpw", user=PASSWORD_USER)
    add_vm(ns, vm, password=password, allowBecome=True)
    ns.run("root", vm=vm.name, become={"user": "root"}, command="id -u; cat",
           stdin="stdin after the password\n")
    result = result_of(ns.finished("root"))
    assert (result["phase"], result["exitCode"]) == ("Succeeded", 0), result
    assert result["stdout"] == "0\nstdin after the password\n"
    assert "vmfleet-become" not in result.get("stderr", "")
    assert password not in everything_readable(ns, controller_dir)


def test_become_with_a_wrong_password_fails_fast(ns, make_vm, sudo_users, controller_dir):  # type: ignore[no-untyped-def]
    vm = make_vm("bwrong", user=PASSWORD_USER)
    wrong = "wrong-" + uuid.uuid4().hex
    add_vm(ns, vm, password=wrong, allowBecome=True)
    ns.run("wrong", vm=vm.name, become={"user": "root"}, command="touch /root/vmfleet-never")
    obj = ns.finished("wrong", timeout=60)
    result = result_of(obj)
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "BecomeFailed")
    assert "sudo refused the password" in result["message"]
    assert _t(result["completionTime"]) - _t(result["startTime"]) < 10
    assert wrong not in everything_readable(ns, controller_dir)
    # no password at all where sudo wants one: BecomeFailed too, not a hang
    vm2 = make_vm("bnone", user=PASSWORD_USER)
    add_vm(ns, vm2, allowBecome=True)
    ns.run("none", vm=vm2.name, become={"user": "root"}, command="true")
    result = result_of(ns.finished("none", timeout=60))
    assert result["reason"] == "BecomeFailed"
    assert "has no 'become-password' key" in result["message"]


def test_become_nobody_from_a_root_login_and_a_vm_that_refuses(ns, make_vm):  # type: ignore[no-untyped-def]
    from vmfleet.dev.sshd import is_root

    if not is_root():
        pytest.skip("CI logs in as root; here the login user is not root")
    vm = make_vm("bnobody")
    add_vm(ns, vm, allowBecome=True)
    ns.run("nobody", vm=vm.name, become={"user": "nobody"}, argv=["id", "-un"])
    result = result_of(ns.finished("nobody"))
    assert (result["phase"], result["stdout"]) == ("Succeeded", "nobody\n"), result
    refusing = make_vm("brefuse")
    add_vm(ns, refusing)  # allowBecome defaults to false
    marker = "/tmp/vmfleet-become-refused"
    ns.run("refused", vm=refusing.name, become={"user": "nobody"}, command=f"touch {marker}")
    result = result_of(ns.finished("refused"))
    assert (result["phase"], result["reason"]) == ("Failed", "BecomeFailed")
    assert "does not allow become (spec.allowBecome is false)" in result["message"]
    assert not refusing.host_path(marker).exists()


def test_become_timeout_kills_the_other_users_processes(ns, make_vm, sudo_users):  # type: ignore[no-untyped-def]
    """An unprivileged login, the action as root: the terminate runs through sudo too."""
    vm = make_vm("bkill", user=NOPASSWD_USER)
    add_vm(ns, vm, allowBecome=True)
    ns.run("stubborn", vm=vm.name, become={"user": "root"}, timeoutSeconds=2,
           script="trap '' TERM\nsetsid sleep 706 </dev/null >/dev/null 2>&1 &\nsleep 707\n")
    result = result_of(ns.finished("stubborn", timeout=60))
    assert result["reason"] == "Timeout"
    assert processes(vm, "sleep 706") == [] and processes(vm, "sleep 707") == []


# --------------------------------------------------------------------------- transfers

GiB = 1024 * 1024 * 1024


def sparse_file(vm, path: str, size: int) -> None:  # type: ignore[no-untyped-def]
    """A big source that costs no disk: reading it is bounded by SFTP, not the disk."""
    local = vm.host_path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    with local.open("wb") as fh:
        fh.truncate(size)


def wait_for_the_partial_file(inbox: Path) -> None:
    """Until the transfer has written its first bytes to a file in ``inbox``."""
    wait_until(lambda: any(inbox.joinpath(n).stat().st_size > 0 for n in os.listdir(inbox)),
               timeout=30, interval=0.05, what="the partial file to grow")


def test_transfer_timeout_removes_the_partial_file(ns, make_vm):  # type: ignore[no-untyped-def]
    src_vm, dst_vm = make_vm("xsrc"), make_vm("xdst")
    ns.add_vms([src_vm, dst_vm])
    sparse_file(src_vm, "/tmp/big/src.bin", 4 * GiB)
    inbox = dst_vm.host_path("/tmp/in")
    inbox.mkdir(parents=True)
    # The clock starts at the claim, before connecting to either VM: 10 s leaves a loaded
    # machine time to connect and write part of the file (3 s once did not: CI, stop 21),
    # and is far too short for 4 GiB through paramiko (about 30 MiB/s here).
    ns.run("slow", timeoutSeconds=10, transfer={
        "from": {"vm": src_vm.name, "path": "/tmp/big/src.bin"},
        "to": [{"vm": dst_vm.name, "path": "/tmp/in/dst.bin"}]})
    wait_for_the_partial_file(inbox)
    obj = ns.finished("slow", timeout=90)
    result = result_of(obj)
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "Timeout"), result
    assert 0 < result["transfer"]["bytes"] < 4 * GiB  # it had written part of the file
    assert result["transfer"]["partialRemoved"] is True
    assert "did not finish within timeoutSeconds (10s)" in result["message"]
    assert f"the partial file on {dst_vm.name} was removed" in result["message"]
    assert os.listdir(inbox) == []  # no temporary file, no target


def test_transfer_from_a_stalled_source_ends_at_its_deadline(ns, make_vm):  # type: ignore[no-untyped-def]
    """The source stops answering mid-copy (its sshd session stopped): the blocked read is
    cut at the deadline, not waited on forever, and the partial file is removed."""
    import signal

    from vmfleet.dev.sshd import _descendants

    src_vm, dst_vm = make_vm("stallsrc"), make_vm("stalldst")
    ns.add_vms([src_vm, dst_vm])
    sparse_file(src_vm, "/tmp/big/src.bin", 2 * GiB)
    inbox = dst_vm.host_path("/tmp/in")
    inbox.mkdir(parents=True)
    # The deadline counts from the command's startTime, connecting included: 12 s leaves a
    # loaded machine time to write the first bytes before the source is stopped.
    ns.run("stall", activeDeadlineSeconds=12, transfer={
        "from": {"vm": src_vm.name, "path": "/tmp/big/src.bin"},
        "to": [{"vm": dst_vm.name, "path": "/tmp/in/dst.bin"}]})
    wait_for_the_partial_file(inbox)
    sessions = _descendants(src_vm._sshd_pid())  # type: ignore[arg-type]
    for pid in sessions:
        os.kill(pid, signal.SIGSTOP)
    try:
        obj = ns.finished("stall", timeout=60)
    finally:
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    result = result_of(obj)
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "DeadlineExceeded"), result
    assert result["transfer"]["partialRemoved"] is True
    assert "activeDeadlineSeconds (12s) passed" in result["message"]
    assert _t(result["completionTime"]) - _t(obj["status"]["startTime"]) < 21
    assert os.listdir(inbox) == []
