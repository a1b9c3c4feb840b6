"""``python -m remote_tasks.worker``: Celery's worker with the runtimes' options, without
Celery's command line, and what a worker process loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.runtime import worker_argv
from remote_tasks import worker as entry

ROOT = Path(__file__).resolve().parents[2]


class Started:
    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}
        self.exitcode = 0

    def __call__(self, **kwargs: Any) -> Started:
        self.kwargs = kwargs
        return self

    def start(self) -> None:
        self.kwargs["started"] = True


def test_the_runtimes_command_starts_celerys_thread_pool_worker(monkeypatch):
    from remote_tasks.app import app

    started = Started()
    monkeypatch.setattr(app, "Worker", started)
    argv = worker_argv("vmfleet.ops.vm1,vmfleet.ops.vm2", 4, "vmfleet-worker-vm1@%h")
    assert argv[:3] == ["python", "-m", "remote_tasks.worker"]
    assert entry.main(argv[3:]) == 0
    kwargs = started.kwargs
    assert kwargs["started"] is True
    assert kwargs["queues"] == ["vmfleet.ops.vm1", "vmfleet.ops.vm2"]
    assert (kwargs["pool_cls"], kwargs["concurrency"]) == ("threads", 4)
    assert kwargs["hostname"].startswith("vmfleet-worker-vm1@") and "%h" not in kwargs["hostname"]
    assert (kwargs["without_gossip"], kwargs["without_mingle"], kwargs["without_heartbeat"]) == (
        True, True, True)
    assert kwargs["loglevel"] == 20  # INFO


@pytest.mark.parametrize("argv", [
    [],                                            # no queue
    ["-Q", ""],                                    # no queue either
    ["-Q", "q", "--pool", "prefork"],              # only the thread pool
    ["-Q", "q", "--concurrency", "0"],
    ["-Q", "q", "--autoscale", "4,1"],             # not an option of the runtimes
])
def test_anything_else_is_a_usage_error(argv):
    with pytest.raises(SystemExit) as stopped:
        entry.main(argv)
    assert stopped.value.code == 2


def test_a_worker_process_loads_no_command_line_and_defers_invoke():
    """What the worker imports before it starts: no click-repl, prompt_toolkit or pygments
    (Celery's command line), and paramiko's invoke unloaded until used."""
    code = """
import json, sys
import remote_tasks.worker
loaded = [m for m in ("click_repl", "prompt_toolkit", "pygments", "celery.bin.celery",
                      "remote_tasks.transfer") if m in sys.modules]
deferred = type(sys.modules["invoke"]).__name__
import paramiko.config
paramiko.config.invoke.run  # used: loaded then
print(json.dumps([loaded, deferred, type(sys.modules["invoke"]).__name__]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMFLEET_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [[], "_LazyModule", "module"]

