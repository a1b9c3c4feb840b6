"""Where a worker pod keeps its probe files, and the exec probes that test them (shared
by the controller, which writes the worker Deployments, and by the workers)."""

from __future__ import annotations

from typing import Final

#: An emptyDir of the worker pod (``VMFLEET_PROBE_DIR``).
PROBE_DIR: Final = "/run/vmfleet"
READY_FILE: Final = f"{PROBE_DIR}/ready"
ALIVE_FILE: Final = f"{PROBE_DIR}/alive"

#: Ready: the file exists while the broker answers (``test``: no shell, no Python).
READINESS_COMMAND: Final = ("test", "-e", READY_FILE)
#: Alive: the file was touched within two minutes (the probe thread runs every 5 s).
LIVENESS_COMMAND: Final = ("sh", "-c", f"find {ALIVE_FILE} -mmin -2 | grep -q .")

__all__ = ["ALIVE_FILE", "LIVENESS_COMMAND", "PROBE_DIR", "READINESS_COMMAND", "READY_FILE"]
