"""RemoteFileSensor: wait until files appear on a RemoteVM, with one RemoteCommand.

The waiting happens on the VM: one RemoteCommand runs a small POSIX sh loop that checks
the paths every ``poke_interval`` seconds and ends as soon as at least one exists (or
when ``timeout`` has passed). Airflow meanwhile waits in the triggerer on a watch of that
one object — no object and no SSH session per poke, no worker slot held.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

from vmfleet.api.models import RemoteCommandStatus

from .operators import RemoteCommandOperator
from .results import failure_message

__all__ = ["NOT_FOUND_EXIT_CODE", "WAIT_SCRIPT", "RemoteFileSensor", "wait_argv"]

NOT_FOUND_EXIT_CODE = 99
# Positional parameters, never formatted into the script: $1 interval, $2 timeout, then paths.
WAIT_SCRIPT = """\
interval=$1; timeout=$2; shift 2
deadline=$(( $(date +%s) + timeout ))
while :; do
  found=0
  for p in "$@"; do
    if [ -e "$p" ]; then printf '%s\\n' "$p"; found=1; fi
  done
  [ "$found" = 1 ] && exit 0
  now=$(date +%s)
  if [ "$now" -ge "$deadline" ]; then
    echo "none of the $# paths appeared within ${timeout}s" >&2
    exit 99
  fi
  left=$(( deadline - now ))
  if [ "$left" -lt "$interval" ]; then sleep "$left"; else sleep "$interval"; fi
done
"""
_GRACE_SECONDS = 60


def wait_argv(paths: Sequence[str], poke_interval: int, timeout: int) -> list[str]:
    """``sh -c WAIT_SCRIPT`` with the interval, the timeout and the paths as arguments."""
    for path in paths:
        if not path or "\n" in path or "\0" in path:
            raise ValueError(f"invalid path to watch: {path!r}")
    return ["sh", "-c", WAIT_SCRIPT, "vmfleet-file-sensor", str(int(poke_interval)),
            str(int(timeout)), *paths]


class RemoteFileSensor(RemoteCommandOperator):
    """Wait for any of ``paths`` to exist on RemoteVM ``vm``; return the list found.

    Like the original guide's sensor, it returns every path that exists when the first
    one is seen. ``poke_interval`` is how often the VM checks, ``timeout`` (seconds) how
    long it waits before the task fails with ``AirflowSensorTimeout``.
    """

    template_fields: Sequence[str] = ("vm", "paths", "poke_interval", "timeout", "namespace")
    ui_color = "#e6f1f2"

    def __init__(
        self,
        *,
        vm: str,
        paths: Sequence[str] | str,
        poke_interval: float | str = 60,
        timeout: float | str = 7 * 24 * 3600,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("argv", ["true"])  # replaced by build_spec once paths are rendered
        super().__init__(vm=vm, **kwargs)
        self.paths = paths
        # Numbers, or templates that render to numbers (see template_fields).
        self.poke_interval = poke_interval
        self.timeout = timeout

    def _paths(self) -> list[str]:
        return [self.paths] if isinstance(self.paths, str) else [str(p) for p in self.paths]

    def _seconds(self) -> tuple[int, int]:
        return max(int(float(self.poke_interval)), 1), max(int(float(self.timeout)), 1)

    def build_spec(self) -> dict[str, Any]:
        spec = super().build_spec()
        interval, timeout = self._seconds()
        spec["argv"] = wait_argv(self._paths(), interval, timeout)
        spec["timeoutSeconds"] = timeout + _GRACE_SECONDS
        return spec

    def deferral_timeout(self) -> timedelta | None:
        return timedelta(seconds=self._seconds()[1] + 2 * _GRACE_SECONDS)

    def finish(self, namespace: str, name: str, status: dict[str, Any]) -> Any:
        parsed = RemoteCommandStatus.model_validate(status)
        entry = next(iter(parsed.results or []), None)
        if entry is not None and entry.exit_code == NOT_FOUND_EXIT_CODE:
            raise AirflowSensorTimeout(
                f"None of {self._paths()} appeared on {self.vm} within {self._seconds()[1]} s "
                f"(RemoteCommand {namespace}/{name})"
            )
        message = failure_message(namespace, name, status)
        if message or entry is None:
            raise AirflowException(message or f"RemoteCommand {namespace}/{name} has no result")
        found = [line for line in (entry.stdout or "").splitlines() if line]
        self.log.info("Found on %s: %s", self.vm, ", ".join(found))
        return found
