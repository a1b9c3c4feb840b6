"""Where a worker pod keeps its probe files, the exec probes that test them, and a
worker container's default resources (shared by the controller, which writes the
worker Deployments, and by the workers)."""

from __future__ import annotations

from typing import Any, Final

#: An emptyDir of the worker pod (``VMFLEET_PROBE_DIR``).
PROBE_DIR: Final = "/run/vmfleet"
READY_FILE: Final = f"{PROBE_DIR}/ready"
ALIVE_FILE: Final = f"{PROBE_DIR}/alive"

#: Ready: the file exists while the broker answers (``test``: no shell, no Python).
READINESS_COMMAND: Final = ("test", "-e", READY_FILE)
#: Alive: the file was touched within two minutes (the probe thread runs every 5 s).
LIVENESS_COMMAND: Final = ("sh", "-c", f"find {ALIVE_FILE} -mmin -2 | grep -q .")

#: A worker's resources when the RemoteVM sets none (it writes only probe files and logs).
DEFAULT_RESOURCES: Final[dict[str, Any]] = {
    "requests": {"cpu": "50m", "memory": "128Mi", "ephemeral-storage": "64Mi"},
    "limits": {"memory": "512Mi", "ephemeral-storage": "256Mi"},
}


def probes_and_resources(resources: dict[str, Any] | None) -> dict[str, Any]:
    """A worker container's probes (ready: the broker answers; alive: the probe thread
    runs, not wedged) and its resources (the RemoteVM's, else the defaults)."""
    return {
        "readinessProbe": {"exec": {"command": list(READINESS_COMMAND)},
                           "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"exec": {"command": list(LIVENESS_COMMAND)}, "initialDelaySeconds": 30,
                          "periodSeconds": 30, "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": resources or DEFAULT_RESOURCES,
    }


__all__ = ["ALIVE_FILE", "DEFAULT_RESOURCES", "LIVENESS_COMMAND", "PROBE_DIR", "READINESS_COMMAND",
           "READY_FILE", "probes_and_resources"]
