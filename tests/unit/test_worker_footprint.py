"""What a command worker process loads: pinned because each piece is resident memory in
every worker (200 idle per-VM workers: 200 times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_loads_the_pinned_redis_client_without_its_later_extras():
    """redis-py is pinned below 7 (pyproject.toml): 7 and 8 load their observability and
    notification modules at `import redis` (~3.7 MiB of a worker). Fails when the
    environment holds a redis-py outside the pin (reinstall: pip install -e .)."""
    code = """
import json, sys
import remote_tasks.worker, remote_tasks.app
import kombu.transport.redis
print(json.dumps(sorted(m for m in ("redis.observability", "redis.maint_notifications",
                                    "redis.keyspace_notifications", "kubernetes", "pydantic")
                        if m in sys.modules)))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "VMFLEET_METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
