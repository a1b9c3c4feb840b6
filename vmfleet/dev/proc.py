"""The dev kit's process helpers: those of the product (:mod:`vmfleet.procs`), which the
local environment and the tests use as they are."""

from vmfleet.procs import (
    ManagedProcess,
    WaitTimeout,
    free_port,
    port_open,
    stop_pid_file,
    wait_until,
    write_pid_file,
)

__all__ = ["ManagedProcess", "WaitTimeout", "free_port", "port_open", "stop_pid_file",
           "wait_until", "write_pid_file"]
