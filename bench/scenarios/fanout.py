"""Fan-out: `true` on 50 VMs at once, cold and warm; wall seconds until all 50 are done.

Every system's every VM is checked for exit code 0. See bench/README.md for what "cold"
and "warm" mean for each system.

- ``vmfleet``: end to end. 50 RemoteVMs labelled ``bench=fanout50`` (50 Celery worker
  processes), one RemoteCommand with that selector; wall = create request → the watch
  sees the terminal phase; then the object must say ``Succeeded`` with
  ``summary.succeeded == 50``, every result exit 0 on attempt 1.
- ``vmfleet_ssh``: ``remote_tasks.ssh.run_command`` from one process, a thread per VM.
- ``ansible``: ``ansible all -m raw -a true -f 50``, host keys checked.
- ``parallel_ssh``: ``pssh.clients.ParallelSSHClient`` (no host key checking: see README).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.fixtures import NAMESPACE, Cluster, cluster, vm_pool
from bench.harness import Bench, alternate, close_systems, record_all
from bench.scenarios.ssh_layer import COMMAND, CommandFailed, true_spec, vmfleet_run, vmfleet_target
from vmfleet.api.constants import COMMAND_PLURAL, GROUP, VERSION
from vmfleet.dev.sshd import SshdVM

SCENARIOS = ("fanout50_cold", "fanout50_warm")
N_VMS = 50
LABEL = {"bench": "fanout50"}
WORKERS_READY_TIMEOUT = 1800.0  # 50 Celery workers start on a 2-core machine: minutes
# Long enough for one redispatch of an unclaimed attempt (controller: 300 s).
ROUND_TIMEOUT = 420.0
# remote_tasks.ssh.ConnectionPool logs this line for every SSH connection it opens.
SSH_CONNECTED = re.compile(r"Connected to \S+@[\d.]+:\d+ \(host key ")


def command_writes(c: Cluster) -> float:
    """Mutating requests on RemoteCommands (object and status) the API server served so far."""
    return sum(v for k, v in c.write_requests().items() if k.startswith("remotecommands"))


def restart_sshds(vms: Sequence[SshdVM]) -> float:
    """Restart every VM's sshd (in parallel): every open SSH connection to them ends."""
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda vm: vm.restart(), vms))
    return time.perf_counter() - start


# --------------------------------------------------------------------------- vmfleet


class Vmfleet:
    """The whole of vmfleet: API server, controller, a Celery worker per VM (Process
    runtime), or one worker process for all of them when ``spec`` names a ``workerPool``."""

    def __init__(self, bench: Bench, vms: Sequence[Any], label: dict[str, str] | None = None,
                 prefix: str = "fanout50", **spec: Any) -> None:
        self.vms = vms
        self.label = label or LABEL
        self.prefix = prefix
        self.cluster: Cluster = cluster(bench)
        names = [vm.name for vm in vms]
        how = f"pool {spec['workerPool']}: one worker process" if spec.get("workerPool") \
            else "a Celery worker each; minutes on 2 cores"
        print(f"  registering {len(vms)} RemoteVMs ({how}) ...", flush=True)
        t0 = time.monotonic()
        try:
            self.cluster.register(vms, labels=self.label, **spec)
        except TimeoutError:
            self.cluster.wait_workers_ready(names, timeout=WORKERS_READY_TIMEOUT)
        # VMs another scenario registered first lack the label.
        for i in range(0, len(names), 100):
            self.cluster.kubectl("label", "--overwrite", "-n", NAMESPACE, "remotevms",
                                 *names[i:i + 100], *(f"{k}={v}" for k, v in self.label.items()))
        self.ready_seconds = time.monotonic() - t0
        print(f"  workers of {len(vms)} VMs ready after {self.ready_seconds:.0f} s", flush=True)
        self.count = 0
        self.reconnects: list[int] = []  # per cold round: connections the workers opened

    def connections_logged(self) -> int:
        """'Connected to' lines in the workers' logs (one per SSH connection opened)."""
        total = 0
        for log in self.cluster.worker_dir.glob("*.log"):
            try:
                total += len(SSH_CONNECTED.findall(log.read_text(errors="replace")))
            except OSError:
                pass
        return total

    def round(self, cold: bool) -> dict[str, float]:
        c = self.cluster
        if cold:
            restart_sshds(self.vms)
            before = self.connections_logged()
        self.count += 1
        name = f"{self.prefix}-{'cold' if cold else 'warm'}-{self.count}-{uuid.uuid4().hex[:5]}"
        writes_before = command_writes(c)
        t0 = c.create(name, selector={"matchLabels": self.label}, command=COMMAND)
        try:
            t_end, phase = c.watcher.wait([name], timeout=ROUND_TIMEOUT)[name]
            wall = t_end - t0
            # The write that carried the end state is the controller's last for this command.
            writes = command_writes(c) - writes_before
            self.check(name, phase)
        finally:
            c.kube.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, COMMAND_PLURAL,
                                                          name)
        if cold:
            time.sleep(0.5)  # log lines are flushed per line; give the last ones a moment
            opened = self.connections_logged() - before
            self.reconnects.append(opened)
            print(f"    vmfleet cold round {self.count}: workers opened {opened} SSH connections "
                  f"(sshds restarted before the round)", flush=True)
        return {"wall_s": wall, "writes_per_vm": writes / len(self.vms)}

    def check(self, name: str, phase: str) -> None:
        """Succeeded, summary.succeeded == all VMs, every result exit 0 on attempt 1."""
        n = len(self.vms)
        obj: dict[str, Any] = self.cluster.kube.custom.get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, NAMESPACE, COMMAND_PLURAL, name)
        status = obj.get("status") or {}
        summary = status.get("summary") or {}
        if phase != "Succeeded" or summary.get("succeeded") != n:
            raise CommandFailed(f"vmfleet: {name} ended {phase} with summary {summary}")
        results = status.get("results") or []
        bad = [r for r in results if r.get("exitCode") != 0 or r.get("attempt") != 1]
        if len(results) != n or bad:
            raise CommandFailed(f"vmfleet: {name}: {len(results)} results, not exit 0 on attempt 1: "
                                f"{bad[:3]}")

    def warm_up(self) -> None:
        self.round(cold=False)  # not recorded: afterwards every worker's connection is open

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- vmfleet_ssh


class VmfleetSSHFanout:
    """``run_command`` on 50 VMs from one process, a thread per VM."""

    def __init__(self, vms: Sequence[SshdVM]) -> None:
        from remote_tasks.ssh import ConnectionPool

        self.jobs = [(vmfleet_target(vm), true_spec(vm.name)) for vm in vms]
        self.pool = ConnectionPool()

    def _fan(self, pool: Any) -> float:
        errors: list[BaseException] = []

        def one(target: Any, spec: Any) -> None:
            try:
                vmfleet_run(pool, target, spec)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=job, daemon=True) for job in self.jobs]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if errors:
            raise CommandFailed(f"vmfleet_ssh: {len(errors)} of {len(self.jobs)} VMs failed: {errors[0]!r}")
        return wall

    def round(self, cold: bool) -> dict[str, float]:
        from remote_tasks.ssh import ConnectionPool

        if not cold:
            return {"wall_s": self._fan(self.pool)}
        pool = ConnectionPool()
        try:
            return {"wall_s": self._fan(pool)}
        finally:
            pool.close_all()

    def warm_up(self) -> None:
        self.pool.close_all()
        self._fan(self.pool)

    def close(self) -> None:
        self.pool.close_all()


# --------------------------------------------------------------------------- ansible

ANSIBLE_OK = re.compile(r"^(\S+) \| CHANGED \| rc=0 >>", re.M)


class Ansible:
    """``ansible all -m raw -a true -f 50`` with its own config, host keys checked."""

    def __init__(self, vms: Sequence[SshdVM], workdir: Path) -> None:
        self.vms = vms
        self.forks = len(vms)
        self.dir = workdir / "ansible"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = Path(sys.executable).with_name("ansible")
        if not self.binary.exists():
            raise FileNotFoundError(f"{self.binary} (pip install ansible-core)")
        known_hosts = self.dir / "known_hosts"
        known_hosts.write_text("".join(line + "\n" for vm in vms for line in vm.known_hosts_lines()))
        self.inventory = self.dir / "inventory.ini"
        self.inventory.write_text("[fanout]\n" + "".join(
            f"{vm.name} ansible_host={vm.host} ansible_port={vm.port} ansible_user={vm.user} "
            f"ansible_ssh_private_key_file={vm.user_key_path}\n" for vm in vms))
        self.config = self.dir / "ansible.cfg"
        self.config.write_text(
            "[defaults]\n"
            "host_key_checking = True\n"
            "gathering = explicit\n"
            "retry_files_enabled = False\n"
            "interpreter_python = auto_silent\n"
            f"forks = {self.forks}\n"
            "[ssh_connection]\n"
            # ssh_args stays the default (-C -o ControlMaster=auto -o ControlPersist=60s).
            f"ssh_common_args = -F /dev/null -o UserKnownHostsFile={known_hosts} "
            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes\n"
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        self.env.update(ANSIBLE_CONFIG=str(self.config), ANSIBLE_HOME=str(self.dir / "home"),
                        ANSIBLE_LOCAL_TEMP=str(self.dir / "tmp"), ANSIBLE_NOCOLOR="1",
                        ANSIBLE_FORCE_COLOR="0")
        self.warm_dir = self.dir / "cp-warm"
        self.count = 0

    def run_once(self, control_dir: Path) -> float:
        control_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir)}
        argv = [str(self.binary), "all", "-i", str(self.inventory), "-m", "raw", "-a", COMMAND,
                "-f", str(self.forks)]
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL, cwd=self.dir)
        wall = time.perf_counter() - start
        ok = set(ANSIBLE_OK.findall(done.stdout))
        if done.returncode != 0 or len(ok) != len(self.vms):
            raise CommandFailed(f"ansible: exit {done.returncode}, {len(ok)} of {len(self.vms)} CHANGED rc=0; "
                                f"{(done.stdout + done.stderr)[-1500:]}")
        return wall

    def masters(self, control_dir: Path) -> list[Path]:
        return [p for p in control_dir.iterdir() if p.is_socket()] if control_dir.exists() else []

    def exit_masters(self, control_dir: Path) -> None:
        for sock in self.masters(control_dir):
            subprocess.run(["ssh", "-F", "/dev/null", "-S", str(sock), "-O", "exit", "x"],
                           capture_output=True, timeout=30)

    def round(self, cold: bool) -> dict[str, float]:
        if cold:
            self.count += 1
            control_dir = self.dir / f"cp-cold-{self.count}"
            try:
                return {"wall_s": self.run_once(control_dir)}
            finally:
                self.exit_masters(control_dir)
        alive = len(self.masters(self.warm_dir))
        if alive != len(self.vms):
            print(f"    ansible warm: {alive} of {len(self.vms)} ControlPersist masters alive before the round",
                  flush=True)
        return {"wall_s": self.run_once(self.warm_dir)}

    def warm_up(self) -> None:
        self.run_once(self.warm_dir)

    def close(self) -> None:
        self.exit_masters(self.warm_dir)


# --------------------------------------------------------------------------- parallel_ssh


class ParallelSSH:
    """parallel-ssh's native client (ssh2-python, gevent) over the 50 hosts."""

    def __init__(self, vms: Sequence[SshdVM]) -> None:
        from pssh.config import HostConfig

        self.hosts = [vm.host for vm in vms]
        self.host_config = [HostConfig(port=vm.port, user=vm.user, private_key=str(vm.user_key_path),
                                       allow_agent=False) for vm in vms]
        self.client: Any = None

    def new_client(self) -> Any:
        from pssh.clients import ParallelSSHClient

        return ParallelSSHClient(self.hosts, host_config=self.host_config, pool_size=len(self.hosts),
                                 num_retries=1, timeout=60, allow_agent=False)

    def run_once(self, client: Any) -> float:
        start = time.perf_counter()
        output = client.run_command(COMMAND, stop_on_errors=False)
        client.join(output)
        wall = time.perf_counter() - start
        bad = [(o.host, o.exit_code, o.exception) for o in output
               if o.exception is not None or o.exit_code != 0]
        if len(output) != len(self.hosts) or bad:
            raise CommandFailed(f"parallel_ssh: {len(output)} outputs, failed: {bad[:3]}")
        return wall

    @staticmethod
    def disconnect(client: Any) -> None:
        for host_client in list(getattr(client, "_host_clients", {}).values()):
            try:
                host_client.disconnect()
            except Exception:
                pass

    def round(self, cold: bool) -> dict[str, float]:
        if not cold:
            return {"wall_s": self.run_once(self.client)}
        client = self.new_client()
        try:
            return {"wall_s": self.run_once(client)}
        finally:
            self.disconnect(client)

    def warm_up(self) -> None:
        if self.client is not None:
            self.disconnect(self.client)
        self.client = self.new_client()
        self.run_once(self.client)

    def close(self) -> None:
        if self.client is not None:
            self.disconnect(self.client)


# --------------------------------------------------------------------------- run

NOTES = {
    "vmfleet": "end to end: create RemoteCommand (selector) -> watch sees Succeeded; 50 workers",
    "vmfleet_ssh": "remote_tasks.ssh.run_command, one process, a thread per VM",
    "ansible": "ansible -m raw -f 50, host keys checked, ControlPersist=60s",
    "parallel_ssh": "ParallelSSHClient (no host key checking)",
}


def run(bench: Bench, wanted: list[str]) -> None:
    vms = vm_pool(bench, N_VMS)
    workdir = bench.workdir / "fanout"
    workdir.mkdir(parents=True, exist_ok=True)
    n_rounds = bench.rounds(full=5, quick=2)

    systems: dict[str, Any] = {}
    makers: dict[str, Callable[[], Any]] = {
        "vmfleet": lambda: Vmfleet(bench, vms),
        "vmfleet_ssh": lambda: VmfleetSSHFanout(vms),
        "ansible": lambda: Ansible(vms, workdir),
        "parallel_ssh": lambda: ParallelSSH(vms),
    }
    for name, make in makers.items():
        try:
            systems[name] = make()
        except Exception as exc:
            print(f"  {name}: setup failed: {exc!r}", file=sys.stderr, flush=True)
            for scenario in wanted:
                bench.skip(scenario, name, f"setup failed: {exc!r}")
    try:
        for scenario in wanted:
            cold = scenario == "fanout50_cold"
            if not cold:
                # Warm: each system has just run `true` on all 50 VMs (connections open).
                for name, system in list(systems.items()):
                    try:
                        system.warm_up()
                    except Exception as exc:
                        print(f"  {name}: warm-up failed: {exc!r}", file=sys.stderr, flush=True)
                        bench.skip(scenario, name, f"warm-up failed: {exc!r}")
                        del systems[name]

            def measure(system: Any, cold: bool = cold) -> Callable[[], dict[str, float]]:
                return lambda: system.round(cold)

            print(f"  {scenario}: {n_rounds} rounds, `{COMMAND}` on {N_VMS} VMs", flush=True)
            measured = alternate(n_rounds, {name: measure(s) for name, s in systems.items()})
            notes = dict(NOTES)
            if cold and "vmfleet" in systems and systems["vmfleet"].reconnects:
                notes["vmfleet"] += (f"; cold = sshds restarted before each round, workers "
                                     f"reconnected {systems['vmfleet'].reconnects} times")
            record_all(bench, scenario, measured, notes)
    finally:
        close_systems(systems)
