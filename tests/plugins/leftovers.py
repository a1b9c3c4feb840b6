"""Pytest plugin: the suite ends with nothing of its own running.

At the start of a run every process the tests start inherits ``VMFLEET_TEST_RUN`` (a
fresh id per run) from the pytest process's environment: servers, controllers, workers,
``vmfleet dev up``. After the last test (every fixture torn down) the plugin looks for
processes that still carry this run's id. One still alive after a short grace fails the
run, named with its command line, and is killed so that nothing outlives the suite.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARKER_ENV = "VMFLEET_TEST_RUN"
GRACE_SECONDS = 10.0


def marked_processes(run_id: str) -> dict[int, str]:
    """pid -> command line of the processes whose environment carries ``run_id``."""
    needle = f"{MARKER_ENV}={run_id}".encode() + b"\0"
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ:
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie: already dead
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found[int(entry.name)] = cmdline.strip()
    return found


def pytest_configure(config: pytest.Config) -> None:
    # A nested pytest (a test that runs pytest) keeps its parent's id: the parent checks.
    if MARKER_ENV not in os.environ:
        os.environ[MARKER_ENV] = uuid.uuid4().hex
        config.stash[_OWNER] = os.environ[MARKER_ENV]


_OWNER = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run_id = session.config.stash.get(_OWNER, None)
    if run_id is None or session.config.option.collectonly:
        return
    deadline = time.monotonic() + GRACE_SECONDS
    left = marked_processes(run_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = marked_processes(run_id)
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  {pid}: {cmd[:300]}" for pid, cmd in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"{len(left)} process(es) the tests started were still running {GRACE_SECONDS:.0f}s "
               f"after the last test (killed now):\n{lines}")
    if reporter is not None:
        reporter.write_sep("=", "processes left running", red=True)
        reporter.write_line(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
