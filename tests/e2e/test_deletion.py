"""Deleting never waits on the controller: no finalizer on any vmfleet object.

The controller is killed (its local workers live on, as a Deployment's pods would), then
a RemoteVM, a finished and a running RemoteCommand, and finally the namespace holding
them are deleted: each completes within 10 s. The running command's remote process is
killed once a controller runs again: it finds the command gone and publishes the cancel
that the still-running worker acts on.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, remote_processes, start_controller, unique_namespace
from vmfleet.dev.proc import stop_pid_file, wait_until

pytestmark = pytest.mark.e2e


def timed_delete(ns: Namespace, *what: str) -> float:
    began = time.monotonic()
    ns.kubectl("delete", *what, "-n", str(ns), "--wait=true", "--timeout=30s", timeout=60)
    return time.monotonic() - began


def test_deletes_complete_with_the_controller_down(controlplane, kubectl, crds, make_vm,
                                                   redis_server, tmp_path):
    ns = Namespace(kubectl, unique_namespace("del")).create()
    vms = [make_vm("del-a"), make_vm("del-b")]
    controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path, [str(ns)])
    try:
        ns.add_vms(vms)
        ns.run("done", vm="del-a", argv=["true"])
        ns.finished("done")
        ns.run("long", vm="del-a", argv=["sleep", "607"])
        wait_until(lambda: remote_processes(vms[0], "sleep 607"), timeout=60,
                   what="the long command to run")
        for kind, name in (("rvm", "del-a"), ("rvm", "del-b"), ("rcmd", "done"), ("rcmd", "long")):
            assert not ns.get(kind, name)["metadata"].get("finalizers"), (kind, name)

        controller.signal(signal.SIGKILL)  # its workers are in sessions of their own: they live on
        wait_until(lambda: not controller.running(), timeout=10, what="the controller to die")

        assert timed_delete(ns, "rvm", "del-b") < 10
        assert timed_delete(ns, "rcmd", "done") < 10
        assert timed_delete(ns, "rcmd", "long") < 10
        assert remote_processes(vms[0], "sleep 607"), "nothing should have killed it yet"

        controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path,
                                      [str(ns)])
        wait_until(lambda: remote_processes(vms[0], "sleep 607") == [], timeout=30,
                   what="the deleted command's remote process to be killed")
        assert "deleted while the controller was not running" in (
            tmp_path / "controller.log").read_text()

        controller.signal(signal.SIGKILL)
        wait_until(lambda: not controller.running(), timeout=10, what="the controller to die")
        began = time.monotonic()
        kubectl("delete", "namespace", str(ns), "--wait=true", "--timeout=60s", timeout=90)
        took = time.monotonic() - began
        print(f"\nnamespace deleted in {took:.1f}s with no controller running")
        assert took < 20  # the namespace controller's own cleanup: nothing waits on vmfleet
        assert_no_tracebacks(tmp_path / "workers")
    finally:
        controller.stop(grace=10)
        for pid_file in (tmp_path / "workers").glob("*.pgid"):
            stop_pid_file(pid_file, grace=5)  # the workers the killed controllers left
