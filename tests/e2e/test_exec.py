"""``vmfleet exec`` and ``kubectl vmfleet exec`` against the real fleet, as a person runs them.

Real kube-apiserver + etcd, real OpenSSH sshd VMs, the session controller with its Celery
workers, the real kubectl (which finds the ``kubectl-vmfleet`` plugin on PATH).
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess

import pytest

from tests.e2e.fleet import VMFLEET, Namespace, assert_no_tracebacks, client_env, vmfleet
from vmfleet.cli import main
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e

def no_commands_left(ns: Namespace) -> bool:
    return ns.k("get", "rcmd", "-o", "name").stdout.strip() == ""


def test_exec_prints_both_streams_and_exits_with_the_remote_code(ns: Namespace, vms, controlplane,
                                                                  controller_dir, capsys,
                                                                  monkeypatch):
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        """get and describe in this process (exec runs as its own process above)."""
        monkeypatch.setenv("KUBECONFIG", str(controlplane.kubeconfig))
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    ns.add_vms(vms[:1])
    proc = vmfleet(controlplane, "exec", "-n", str(ns), "vm1", "--",
                   "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out\n", "err\n")
    # exec deletes its RemoteCommand once it has printed the result
    wait_until(lambda: no_commands_left(ns), timeout=30, what="the exec RemoteCommand to go")

    # --keep leaves it for get and describe, which show what kubectl shows
    kept = vmfleet(controlplane, "exec", "--keep", "-n", str(ns), "vm1", "--", "sh", "-c", "exit 4")
    assert kept.returncode == 4
    name = re.search(r"kept RemoteCommand \S+/(exec-vm1-\w+)", kept.stderr).group(1)  # type: ignore[union-attr]
    ours = cli("get", "commands", "-n", str(ns)).stdout.splitlines()
    theirs = ns.k("get", "rcmd").stdout.splitlines()
    assert [line.split()[:-1] for line in ours] == [line.split()[:-1] for line in theirs]
    assert ours[1].split()[:4] == [name, "vm1", "Failed", "0/1"]
    ours = cli("get", "vms", "-n", str(ns)).stdout.splitlines()
    theirs = ns.k("get", "rvm").stdout.splitlines()
    assert [line.split()[:-1] for line in ours] == [line.split()[:-1] for line in theirs]

    described = cli("describe", "command", name, "-n", str(ns))
    assert described.returncode == 0, described.stderr
    lines = described.stdout.splitlines()
    assert "Action:" in described.stdout and "argv: sh -c 'exit 4'" in described.stdout
    assert lines[lines.index("Results:") + 2].split()[:5] == ["vm1", "Failed", "1", "4", "ExitCode"]
    assert any(line.split()[:3] == ["Failed", "True", "ExitCode"] for line in lines)
    described = cli("describe", "vm", "vm1", "-n", str(ns))
    assert described.returncode == 0, described.stderr
    assert f"@{vms[0].host}:{vms[0].port}\n" in described.stdout  # Address: user@host:port
    assert name in described.stdout  # recent commands on this VM
    missing = cli("describe", "command", "nope", "-n", str(ns))
    assert missing.returncode == 1
    assert f"RemoteCommand 'nope' not found in namespace {ns}" in missing.stderr
    assert_no_tracebacks(controller_dir / "controller.log")


def test_kubectl_vmfleet_exec(ns: Namespace, vms, controlplane):
    ns.add_vms(vms[:1])
    kubectl = [str(controlplane.kubectl), "vmfleet", "exec", "-n", str(ns), "vm1", "--"]
    env = client_env(controlplane)
    proc = subprocess.run([*kubectl, "sh", "-c", "echo out; echo err >&2; exit 4"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out\n", "err\n")

    # argv items reach the program as they were: no shell between
    proc = subprocess.run([*kubectl, "printf", "%s|", "a b", "$HOME", ";", "'"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "a b|$HOME|;|'|", "")

    # -i sends our stdin
    proc = subprocess.run([*kubectl[:-1], "-i", "--", "wc", "-c"], input="hello\n",
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "6", "")

    # a VM that does not exist, and a command that outlives --timeout
    proc = subprocess.run([*kubectl[:-2], "no-such-vm", "--", "true"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout) == (255, "")
    assert proc.stderr.startswith("vmfleet: no-such-vm: VMNotFound: "), proc.stderr
    proc = subprocess.run([*kubectl[:-1], "--timeout", "1", "--", "sh", "-c", "echo started; sleep 30"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout) == (124, "started\n"), proc.stderr
    assert proc.stderr.startswith("vmfleet: vm1: Timeout: "), proc.stderr

    # a tail only: said on stderr
    proc = subprocess.run([*kubectl[:-1], "--max-bytes", "1000", "--",
                           "sh", "-c", "head -c 5000 /dev/zero | tr '\\0' a"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout) == (0, "a" * 1000)
    assert proc.stderr == ("vmfleet: vm1: stdout was truncated: showing the last 1000 of 5000 "
                           "bytes (the full output is in the worker's log)\n")


def test_fan_out_prefixes_lines_and_fails_if_any_vm_failed(ns: Namespace, vms, make_vm,
                                                            controlplane):
    down = make_vm("down")
    ns.add_vms(vms, labels={"role": "web", "up": "yes"})
    ns.add_vms([down], labels={"role": "web"})
    down.stop()  # refuses connections: a transport error on that VM only
    master, slave = pty.openpty()  # stderr on a terminal: the progress line is shown
    try:
        proc = subprocess.run(
            [VMFLEET, "exec", "-n", str(ns), "-l", "role=web", "--", "sh", "-c",
             "echo hello; echo warn >&2"],
            stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120,
            env=client_env(controlplane))
        os.close(slave)
        stderr = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            stderr += chunk
    finally:
        os.close(master)
    text = stderr.decode().replace("\r\n", "\n")
    assert proc.returncode == 255
    assert sorted(proc.stdout.splitlines()) == ["[vm1] hello", "[vm2] hello", "[vm3] hello"]
    for vm in ("vm1", "vm2", "vm3"):
        assert f"[{vm}] warn\n" in text
    assert re.search(r"vmfleet: down: TransportError: .+\n", text), text
    assert "vmfleet exec: failed on 1 of 4 VMs: down\n" in text
    assert re.search(r"vmfleet: [0-3]/4 done, [01] failed", text), text

    # not a terminal: no progress line, and a command failing on one VM exits with its code
    proc = vmfleet(controlplane, "exec", "-n", str(ns), "-l", "role=web,up=yes",
                   "--", "sh", "-c", "[ \"$(hostname)\" != \"$1\" ] || exit 3", "sh",
                   vms[1].run("hostname")[1].decode().strip())
    assert "done," not in proc.stderr
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == "vmfleet exec: failed on 1 of 3 VMs: vm2\n"


def test_ctrl_c_cancels_the_remote_command(ns: Namespace, make_vm, controlplane):
    vm = make_vm("sleeper")
    ns.add_vms([vm])
    pid_file = "/tmp/vmfleet-exec-sleeper.pid"
    proc = subprocess.Popen(
        [VMFLEET, "exec", "-n", str(ns), "sleeper", "--", "sh", "-c",
         f"echo $$ > {pid_file}; exec sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(controlplane))
    try:
        pid = wait_until(lambda: vm.host_path(pid_file).exists()
                         and vm.host_path(pid_file).read_text().strip(),
                         timeout=60, what="the remote sleep to start")
        assert vm.run(f"kill -0 {pid}")[0] == 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: deleting RemoteCommand" in err
    assert "Traceback" not in err
    wait_until(lambda: vm.run(f"kill -0 {pid}")[0] != 0, timeout=30,
               what="the remote sleep 600 to end")
    wait_until(lambda: no_commands_left(ns), timeout=30, what="the RemoteCommand to go")
