"""The original guide's remote execution, rebuilt for the benchmarks (``guide_send_task``).

The guide (``~/airflow/utils/ssh_executor.py`` and ``~/airflow/tasks/remote_tasks.py``)
runs ``remote_tasks.execute_on_vm(vm_name, command)`` in a Celery worker started as
``celery -A airflow.tasks.remote_tasks worker --queues vm1_queue,default --hostname
vm1_worker --concurrency 2`` (prefork), and the caller does
``app.send_task('remote_tasks.execute_on_vm', [vm, cmd], queue='vm1_queue').get(timeout=...)``.
The task opens a NEW paramiko connection per command, under a per-host lock, runs the
command, reads stdout/stderr and the exit status, and closes the connection.

What differs from the guide, on purpose:

- the host key is pinned (the VM's key in a known_hosts file, ``RejectPolicy``) instead of
  ``AutoAddPolicy``, and the port is the VM's (the guide assumes 22);
- the broker and result backend are a Redis database given by ``GUIDE_BROKER_URL`` instead
  of Airflow's Celery configuration (RabbitMQ + PostgreSQL in the guide);
- ``TARGET_VMS`` comes from ``GUIDE_TARGET_VMS`` (JSON) instead of a Python file.

The worker imports this module (``celery -A bench.guide_app worker``); so does the caller.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import paramiko
from celery import Celery

BROKER_URL = os.environ.get("GUIDE_BROKER_URL", "redis://127.0.0.1:6379/1")
TARGET_VMS: dict[str, dict[str, Any]] = json.loads(os.environ.get("GUIDE_TARGET_VMS", "{}"))
SSH_TIMEOUT = 30

app = Celery("remote_tasks", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Airflow's default_celery config: prefetch 1, acks late (the guide inherits both).
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class SSHExecutor:
    """The guide's SSHExecutor: a new SSH connection per command, one at a time per host."""

    def __init__(self) -> None:
        self._connections: dict[str, Any] = {}  # unused, as in the guide
        self._locks: dict[str, threading.Lock] = {}

    def execute_command(self, host: str, username: str, ssh_key: str, command: str,
                        timeout: int = 30, port: int = 22,
                        known_hosts: str | None = None) -> dict[str, Any]:
        if host not in self._locks:
            self._locks[host] = threading.Lock()
        with self._locks[host]:
            try:
                ssh = paramiko.SSHClient()
                # The guide: ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())
                if known_hosts:
                    ssh.load_host_keys(known_hosts)
                ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
                ssh.connect(hostname=host, port=port, username=username, key_filename=ssh_key,
                            timeout=timeout)
                stdin, stdout, stderr = ssh.exec_command(command, timeout=timeout)
                output = stdout.read().decode("utf-8").strip()
                error = stderr.read().decode("utf-8").strip()
                exit_code = stdout.channel.recv_exit_status()
                ssh.close()
                return {"host": host, "command": command, "exit_code": exit_code,
                        "output": output, "error": error, "success": exit_code == 0,
                        "timestamp": time.time()}
            except Exception as e:  # noqa: BLE001 - the guide's catch-all
                return {"host": host, "command": command, "exit_code": -1, "output": "",
                        "error": str(e), "success": False, "timestamp": time.time()}


ssh_executor = SSHExecutor()


@app.task(bind=True, name="remote_tasks.execute_on_vm")
def execute_on_vm(self: Any, vm_name: str, command: str) -> dict[str, Any]:
    if vm_name not in TARGET_VMS:
        raise ValueError(f"Unknown VM: {vm_name}")
    vm_config = TARGET_VMS[vm_name]
    try:
        result = ssh_executor.execute_command(
            host=vm_config["host"], username=vm_config["username"], ssh_key=vm_config["ssh_key"],
            command=command, port=vm_config.get("port", 22),
            known_hosts=vm_config.get("known_hosts"),
        )
        if not result["success"]:
            self.retry(countdown=60, max_retries=3)
        return result
    except Exception as e:
        raise self.retry(exc=e, countdown=60, max_retries=3) from e
