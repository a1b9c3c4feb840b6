"""The worker's readiness and liveness, as files an exec probe tests (no port: worker
pods may share the node's network, where one fixed port per pod would collide).

A daemon thread started when the worker is ready checks every ``PERIOD`` seconds that
the broker (the Redis of the shared state) answers:

- ``READY_FILE`` exists while it does (readiness: the worker can work);
- ``ALIVE_FILE`` is touched on every round, whatever the broker says (liveness: the
  process is not wedged; the probe fails when the file is older than two minutes).

The probes (``vmfleet.workerprobes``) are cheap: ``test -e`` and ``find -mmin``, no Python.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from vmfleet import workerprobes

log = logging.getLogger("remote_tasks.probes")

PROBE_DIR = Path(workerprobes.PROBE_DIR)
READY_FILE = Path(workerprobes.READY_FILE)
ALIVE_FILE = Path(workerprobes.ALIVE_FILE)
PERIOD = 5.0


def check_once(ping: Callable[[], object], directory: Path = PROBE_DIR) -> bool:
    """One round: touch ``alive``; create ``ready`` if ``ping()`` answers, else remove it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ALIVE_FILE.name).touch()
    ready = directory / READY_FILE.name
    try:
        ping()
    except Exception as exc:  # noqa: BLE001 - not ready, and the log says why
        if ready.exists():
            log.warning("Not ready: the broker does not answer (%s)", exc)
        ready.unlink(missing_ok=True)
        return False
    ready.touch()
    return True


def start(ping: Callable[[], object], stop: threading.Event,
          directory: Path = PROBE_DIR) -> threading.Thread | None:
    """The probe thread; None when the directory cannot be written (not in a pod)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("No probe files (%s): %s", directory, exc)
        return None

    def run() -> None:
        while not stop.is_set():
            try:
                check_once(ping, directory)
            except OSError as exc:
                log.warning("Could not write the probe files in %s: %s", directory, exc)
            stop.wait(PERIOD)
        (directory / READY_FILE.name).unlink(missing_ok=True)

    thread = threading.Thread(target=run, name="vmfleet-probes", daemon=True)
    thread.start()
    return thread


__all__ = ["ALIVE_FILE", "READY_FILE", "check_once", "start"]
