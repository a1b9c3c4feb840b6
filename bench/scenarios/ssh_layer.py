"""One VM, many small commands: vmfleet's SSH layer against the ways people run them.

``one_vm_seq`` runs ``true`` N times one after another; ``one_vm_conc8`` runs it N times
with 8 callers at once. Per round: commands/s over the round, and p50/p95/p99 of one
command's latency as its caller saw it (for the guide's way, that includes waiting for
its per-host lock). Every exit code is checked.

Systems (see bench/README.md for what each stands for):

- ``vmfleet_ssh``: ``remote_tasks.ssh.run_command`` on one ``ConnectionPool``, the line
  built by ``remote_tasks.shell.build_invocation`` with a fresh nonce (the process-group
  wrapper and marker the worker sends; the worker's claim is the ``gate`` that sends the
  wrapper its go, here always won: no API), ``tick`` as the worker passes it (a no-op). 8 threads share the
  pool: one channel per command on one connection.
- ``guide_baseline``: the original guide's ``SSHExecutor.execute_command`` rebuilt here: a
  new ``paramiko.SSHClient`` connection per command, under a per-host ``threading.Lock``.
  One change: the VM's host key is pinned (``RejectPolicy``) instead of ``AutoAddPolicy``.
- ``ssh_controlpersist``: OpenSSH ``ssh`` with a ControlMaster opened before timing.
- ``asyncssh``: one asyncssh connection, ``run('true')``; 8 at once with ``gather`` and a
  semaphore of 8.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.fixtures import vm_pool
from bench.guide_app import SSHExecutor
from bench.harness import Bench, alternate, close_systems, latency_metrics, record_all
from vmfleet.dev.sshd import SshdVM

SCENARIOS = ("one_vm_seq", "one_vm_conc8")
COMMAND = "true"
CONCURRENCY = 8


def sizes(bench: Bench) -> dict[str, int]:
    """Commands per round."""
    return {"one_vm_seq": 50 if bench.quick else 200, "one_vm_conc8": 80 if bench.quick else 400}


class CommandFailed(RuntimeError):
    pass


def check_exit(system: str, code: int | None, detail: object = "") -> None:
    if code != 0:
        raise CommandFailed(f"{system}: `{COMMAND}` exited {code!r} {detail}")


# --------------------------------------------------------------------------- systems
# Each system is an object with ``one() -> None`` (run one command, raise unless exit 0)
# or, for asyncssh, ``batch(n, concurrency) -> (wall, latencies)``; ``close()``.


def vmfleet_target(vm: SshdVM) -> Any:
    """The ``SSHTarget`` the worker resolves for this VM (its host key pinned)."""
    from remote_tasks.sshtarget import SSHTarget

    return SSHTarget(host=vm.host, port=vm.port, user=vm.user, private_key=vm.user_private_key_pem,
                     host_keys=tuple(vm.host_public_keys))


def vmfleet_run(pool: Any, target: Any, spec: Any, system: str = "vmfleet_ssh") -> None:
    """One attempt's SSH work as ``CommandExecutor.run`` does it, minus the Kubernetes API:
    the wrapped line with a fresh nonce, ``run_command`` on the pool; the wrapper reports
    its process group, ``gate`` (the worker's claim, here always won) sends the go."""
    from remote_tasks.shell import build_invocation
    from remote_tasks.ssh import run_command

    nonce = uuid.uuid4().hex
    invocation = build_invocation(spec, nonce)
    started: list[int | None] = []

    def gate(pgid: int | None, _nonce: str) -> bool:
        started.append(pgid)
        return True

    result = run_command(
        pool, target, invocation.line, invocation.stdin, spec.output_max_bytes,
        on_stdout=lambda line: None, on_stderr=lambda line: None,
        nonce=nonce, deadline=None, gate=gate, tick=lambda: None, kill_grace=3.0,
    )
    check_exit(system, result.exit_code, result.stderr.text())
    if not started or started[0] is None:
        raise CommandFailed(f"{system}: the process-group marker was not seen")


def true_spec(vm_name: str) -> Any:
    """The plan the controller sends a worker for ``command: true`` on the VM."""
    from vmfleet.api.models import RemoteCommandSpec
    from vmfleet.api.planning import plan_of

    return plan_of(RemoteCommandSpec.model_validate({"vm": vm_name, "command": COMMAND}))


class VmfleetSSH:
    """vmfleet's SSH layer on one VM: one pool, its connection opened before timing."""

    def __init__(self, vm: SshdVM) -> None:
        from remote_tasks.ssh import ConnectionPool

        self.pool = ConnectionPool()
        self.target = vmfleet_target(vm)
        self.spec = true_spec(vm.name)
        self.pool.get(self.target)  # warm: the worker's pooled connection is long-lived

    def one(self) -> None:
        vmfleet_run(self.pool, self.target, self.spec)

    def close(self) -> None:
        self.pool.close_all()


class GuideBaseline:
    """The guide's ``SSHExecutor`` (``bench.guide_app``, also what guide_send_task's worker
    runs): a connection per command under a per-host lock.

    Same code shape as the guide (``SSHClient``, ``connect(key_filename=...)``,
    ``exec_command``, read stdout and stderr, ``recv_exit_status``, close); the host key
    is pinned with ``RejectPolicy`` instead of the guide's ``AutoAddPolicy``, and the
    port is passed (the guide's VMs listen on 22).
    """

    def __init__(self, vm: SshdVM) -> None:
        self.vm = vm
        self.known_hosts = str(vm.known_hosts_path)
        self.executor = SSHExecutor()  # the one guide_send_task's worker runs

    def one(self) -> None:
        vm = self.vm
        result = self.executor.execute_command(vm.host, vm.user, str(vm.user_key_path), COMMAND,
                                               port=vm.port, known_hosts=self.known_hosts)
        check_exit("guide_baseline", result["exit_code"], result["error"])

    def close(self) -> None:
        pass


def openssh_argv(vm: SshdVM, control_dir: Path, known_hosts: str | None = None) -> list[str]:
    """``ssh`` with a ControlMaster in ``control_dir``, pinned host key, no user config."""
    return [
        "ssh", "-F", "/dev/null", "-i", str(vm.user_key_path), "-p", str(vm.port),
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts or vm.known_hosts_path}",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C",
        "-o", "ControlPersist=60",
        f"{vm.user}@{vm.host}",
    ]


class ControlPersist:
    """OpenSSH ``ssh`` per command, multiplexed over a ControlMaster opened beforehand."""

    def __init__(self, vm: SshdVM, workdir: Path) -> None:
        self.control_dir = workdir / "cm"
        self.control_dir.mkdir(parents=True, exist_ok=True)
        self.argv = openssh_argv(vm, self.control_dir)
        self.one()  # opens the master (warm)
        check = subprocess.run([*self.argv[:-1], "-O", "check", self.argv[-1]],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise CommandFailed(f"ssh_controlpersist: no master running: {check.stderr.strip()}")

    def one(self) -> None:
        done = subprocess.run([*self.argv, COMMAND], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)
        check_exit("ssh_controlpersist", done.returncode, done.stderr.decode(errors="replace"))

    def close(self) -> None:
        subprocess.run([*self.argv[:-1], "-O", "exit", self.argv[-1]], capture_output=True,
                       timeout=30)


class AsyncSSH:
    """One asyncssh connection on an event loop kept for the whole scenario."""

    def __init__(self, vm: SshdVM) -> None:
        import asyncssh

        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncssh.connect(
            vm.host, port=vm.port, username=vm.user, client_keys=[str(vm.user_key_path)],
            known_hosts=str(vm.known_hosts_path), agent_path=None, config=[]))

    async def _one(self, latencies: list[float], sem: asyncio.Semaphore) -> None:
        async with sem:
            start = time.perf_counter()
            result = await self.conn.run(COMMAND, check=False)
            latencies.append(time.perf_counter() - start)
        check_exit("asyncssh", result.exit_status, result.stderr)

    def batch(self, n: int, concurrency: int) -> tuple[float, list[float]]:
        async def go() -> list[float]:
            sem = asyncio.Semaphore(concurrency)
            latencies: list[float] = []
            if concurrency == 1:
                for _ in range(n):
                    await self._one(latencies, sem)
            else:
                await asyncio.gather(*(self._one(latencies, sem) for _ in range(n)))
            return latencies

        start = time.perf_counter()
        latencies = self.loop.run_until_complete(go())
        return time.perf_counter() - start, latencies

    def close(self) -> None:
        self.conn.close()
        self.loop.run_until_complete(self.conn.wait_closed())
        self.loop.close()


# --------------------------------------------------------------------------- measuring


def threaded_batch(one: Callable[[], None], n: int, concurrency: int) -> tuple[float, list[float]]:
    """``n`` calls of ``one``, by ``concurrency`` threads each taking the next call."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            start = time.perf_counter()
            one()
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    start = time.perf_counter()
    if concurrency == 1:
        worker()
    else:
        with ThreadPoolExecutor(concurrency) as ex:
            for fut in [ex.submit(worker) for _ in range(concurrency)]:
                fut.result()  # re-raises a failed command
    wall = time.perf_counter() - start
    if len(latencies) != n:
        raise CommandFailed(f"{len(latencies)} of {n} commands finished")
    return wall, latencies


def metrics_of(n: int, wall: float, latencies: list[float]) -> dict[str, float]:
    return {"commands_per_s": n / wall, **latency_metrics(latencies)}


NOTES = {
    "vmfleet_ssh": "remote_tasks.ssh.run_command, pooled connection (warm), worker's wrapped line",
    "guide_baseline": "new paramiko connection per command under a per-host lock; host key pinned",
    "ssh_controlpersist": "OpenSSH ssh per command over a warm ControlMaster",
    "asyncssh": "one asyncssh connection (warm)",
}


def run(bench: Bench, wanted: list[str]) -> None:
    vm = vm_pool(bench, 1)[0]
    workdir = bench.workdir / "ssh_layer"
    workdir.mkdir(parents=True, exist_ok=True)
    n_rounds = bench.rounds(full=5, quick=2)
    counts = sizes(bench)

    systems: dict[str, Any] = {}
    makers: dict[str, Callable[[], Any]] = {
        "vmfleet_ssh": lambda: VmfleetSSH(vm),
        "guide_baseline": lambda: GuideBaseline(vm),
        "ssh_controlpersist": lambda: ControlPersist(vm, workdir),
        "asyncssh": lambda: AsyncSSH(vm),
    }
    for name, make in makers.items():
        try:
            systems[name] = make()
        except Exception as exc:
            for scenario in wanted:
                bench.skip(scenario, name, f"setup failed: {exc!r}")
    try:
        for scenario in wanted:
            n = counts[scenario]
            concurrency = 1 if scenario == "one_vm_seq" else CONCURRENCY

            def measure(system: Any, n: int = n, concurrency: int = concurrency,
                        ) -> Callable[[], dict[str, float]]:
                def go() -> dict[str, float]:
                    if isinstance(system, AsyncSSH):
                        wall, latencies = system.batch(n, concurrency)
                    else:
                        wall, latencies = threaded_batch(system.one, n, concurrency)
                    return metrics_of(n, wall, latencies)
                return go

            print(f"  {scenario}: {n_rounds} rounds of {n} commands"
                  f"{f', {concurrency} at once' if concurrency > 1 else ''}", flush=True)
            measured = alternate(n_rounds, {name: measure(s) for name, s in systems.items()})
            record_all(bench, scenario, measured, NOTES)
    finally:
        close_systems(systems)
