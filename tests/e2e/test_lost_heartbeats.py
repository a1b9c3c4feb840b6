"""A running attempt whose heartbeat Redis lost, and whose worker then dies, is not left
Running for ever: the controller sees it without any heartbeat for ``lost_after`` and
ends it ``WorkerLost`` (here retried, as the spec allows)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tests.e2e.fleet import assert_no_tracebacks, start_controller
from vmfleet.procs import stop_pid_file, wait_until
from vmfleet.state import heartbeats_key

pytestmark = pytest.mark.e2e

SCOPE = "lost-heartbeats"


def test_an_attempt_whose_heartbeat_set_is_gone_and_whose_worker_died_is_retried(
        controlplane, own_ns, make_vm, redis_server, shared_log, tmp_path):  # noqa: F811
    ns = own_ns()
    vm = make_vm("hb1")
    flag = shared_log.parent / "first-attempt"
    controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path, [str(ns)],
                                  extra_env={"VMFLEET_CONTROLLER_ID": SCOPE})
    try:
        ns.add_vms([vm])
        # Attempt 1 hangs (its worker is killed under it); attempt 2 ends at once.
        ns.run("hb", vm=vm.name, retries={"limit": 1, "backoffSeconds": 0},
               command=f"echo run >> {shared_log}; test -e {flag} || {{ touch {flag}; sleep 120; }}")
        wait_until(lambda: (ns.get("remotecommand", "hb").get("status") or {}).get("phase")
                   == "Running", timeout=90, interval=0.2, what="attempt 1 running")
        client = redis.Redis.from_url(redis_server.url)
        assert client.delete(heartbeats_key(str(ns), SCOPE)) == 1  # Redis lost the set
        client.close()
        for pid_file in (tmp_path / "workers").glob(f"{ns}.*.pgid"):
            try:  # the worker dies too: nobody beats for attempt 1 again
                os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed_at = time.monotonic()
        obj = ns.finished("hb", timeout=90)
        ended = time.monotonic() - killed_at
        (entry,) = obj["status"]["results"]
        print(f"\nHeartbeat set deleted and worker killed → retried and Succeeded after {ended:.1f}s")
        assert (obj["status"]["phase"], entry["attempt"]) == ("Succeeded", 2)
        assert shared_log.read_text().split() == ["run", "run"]  # the retry the spec allows
        log = (tmp_path / "controller.log").read_text()
        assert "lost during attempt 1; retrying" in log
        assert_no_tracebacks(tmp_path / "controller.log")
    finally:
        controller.stop(grace=15)
        for pid_file in (tmp_path / "workers").glob("*.pgid"):
            stop_pid_file(pid_file, grace=5)
