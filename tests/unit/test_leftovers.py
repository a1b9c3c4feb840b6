"""The suite's last check: processes that carry the run's marker are found, others not."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from tests.plugins.leftovers import MARKER_ENV, marked_processes


def test_a_process_with_the_runs_marker_is_found_until_it_ends() -> None:
    run_id = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, MARKER_ENV: run_id})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, MARKER_ENV: uuid.uuid4().hex})
    try:
        found = marked_processes(run_id)
        assert list(found) == [child.pid]
        assert "time.sleep(60)" in found[child.pid]
    finally:
        for proc in (child, other):
            proc.kill()
            proc.wait()
    assert marked_processes(run_id) == {}


def test_the_pytest_process_carries_a_run_id() -> None:
    assert len(os.environ[MARKER_ENV]) == 32
