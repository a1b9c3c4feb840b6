"""Workers run only what the controller signed, for the VMs they serve (issue 22, item 2).

Against the real servers: the session's controller (it signs with the key pair the
fixtures generated into its directory), its local workers, Redis as the broker and sshd
VMs. Each test holds a VM's worker at zero replicas, so the controller's message waits in
the VM's queue in Redis, takes it as an attacker with broker access would, tampers with
it (or replays it, or moves it to another namespace's queue), puts it back and starts the
worker.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e.fleet import Kubectl, Namespace, unique_namespace
from tests.e2e.plugins.fleet import E2E_PREFIX
from vmfleet import tenancy
from vmfleet.api.constants import TASK_EXECUTE
from vmfleet.api.signing import PRIVATE_KEY_FILE, Signer, read_private_key
from vmfleet.dev.proc import wait_until

REFUSED = "Refused a message of task remote_tasks.execute_on_vm: "


@pytest.fixture
def broker(redis_server) -> Iterator[redis.Redis]:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_server.url)  # the fixture's URL: its credentials too
    yield client
    client.close()


def held_vm(ns: Namespace, make_vm: Any, name: str) -> Any:
    """A VM whose worker does not run yet: what is sent to it waits in its queue."""
    vm = make_vm(name)
    ns.add_vms([vm], workers={"replicas": 0})
    return vm


def start_workers(ns: Namespace, name: str) -> None:
    ns.k("patch", "rvm", name, "--type=merge", "-p", '{"spec": {"workers": {"replicas": 1}}}')


def take(broker: redis.Redis, queue: str) -> dict[str, Any]:
    """The oldest message of a Celery queue in Redis (kombu's list, under the key prefix
    of the queue's namespace), removed from it."""
    key = tenancy.queue_key(queue)
    wait_until(lambda: broker.llen(key) > 0, timeout=30, what=f"a message in {queue}")
    raw = broker.rpop(key)
    assert raw is not None
    message: dict[str, Any] = json.loads(raw)
    return message


def signed_arg(message: dict[str, Any]) -> dict[str, Any]:
    args, _, _ = json.loads(base64.b64decode(message["body"]))
    (signed,) = args
    assert signed["signed"] == 1 and signed["signature"]  # what the controller sent is signed
    return dict(signed)


def with_signed_arg(message: dict[str, Any], signed: dict[str, Any]) -> dict[str, Any]:
    args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
    body = json.dumps([[signed], kwargs, embed]).encode()
    return {**message, "body": base64.b64encode(body).decode()}


def put(broker: redis.Redis, queue: str, message: dict[str, Any]) -> None:
    broker.rpush(tenancy.queue_key(queue), json.dumps(message))  # the end the worker takes next


def worker_log(controller_dir: Path, ns: Namespace, vm: str) -> Path:
    return controller_dir / "workers" / f"{ns}.{vm}.0.log"


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_a_message_altered_in_the_broker_never_runs(ns: Namespace, make_vm, broker,
                                                     controller_dir):
    vm = held_vm(ns, make_vm, "held")
    ran, altered = "/tmp/vmfleet-sign-genuine", "/tmp/vmfleet-sign-altered"
    ns.run("alter", vm="held", command=f"echo genuine >> {ran}")
    queue = f"vmfleet.{ns}.held"
    message = take(broker, queue)
    signed = signed_arg(message)
    signed["body"]["plan"]["command"] = f"echo pwned-$(id -un) >> {altered}"  # what runs
    put(broker, queue, with_signed_arg(message, signed))
    start_workers(ns, "held")
    log = worker_log(controller_dir, ns, "held")
    wait_until(lambda: REFUSED + "BadSignature" in log_text(log), timeout=60,
               what="the worker to refuse the altered message")
    assert not vm.host_path(altered).exists() and not vm.host_path(ran).exists()
    assert "pwned" not in log_text(log)  # logged without its content
    # Nothing is reported for a message that does not verify: the command still waits
    # for the controller's next (freshly signed) dispatch.
    (entry,) = ns.get("rcmd", "alter")["status"]["results"]
    assert entry["phase"] == "Queued"


def test_a_message_expired_in_the_broker_never_runs(ns: Namespace, make_vm, broker,
                                                     controller_dir):
    vm = held_vm(ns, make_vm, "late")
    ran = "/tmp/vmfleet-sign-late"
    ns.run("late", vm="late", command=f"echo ran >> {ran}")
    queue = f"vmfleet.{ns}.late"
    message = take(broker, queue)
    signed = signed_arg(message)
    # The controller's very message, as it is once its expiry has passed (signed with
    # the controller's key: the expiry is part of what is signed).
    key = read_private_key(controller_dir / PRIVATE_KEY_FILE)
    expired = Signer(key, ttl_seconds=-1).sign(TASK_EXECUTE, signed["body"])
    put(broker, queue, with_signed_arg(message, expired))
    start_workers(ns, "late")
    log = worker_log(controller_dir, ns, "late")
    wait_until(lambda: REFUSED + "Expired" in log_text(log), timeout=60,
               what="the worker to refuse the expired message")
    assert not vm.host_path(ran).exists()


def test_a_replayed_message_runs_once(ns: Namespace, make_vm, broker, controller_dir):
    vm = held_vm(ns, make_vm, "again")
    runs = "/tmp/vmfleet-sign-runs"
    ns.run("again", vm="again", command=f"echo ran >> {runs}")
    queue = f"vmfleet.{ns}.again"
    message = take(broker, queue)
    put(broker, queue, message)
    put(broker, queue, message)  # the same genuine message, twice
    start_workers(ns, "again")
    ns.wait("remotecommand/again", "Complete")
    log = worker_log(controller_dir, ns, "again")
    wait_until(lambda: log_text(log).count(f"Skipped RemoteCommand {ns}/again") == 1,
               timeout=30, what="the replay to be skipped by the claim")
    put(broker, queue, message)  # replayed once more, after the command finished
    wait_until(lambda: log_text(log).count(f"Skipped RemoteCommand {ns}/again") == 2,
               timeout=30, what="the late replay to be skipped by the claim")
    assert vm.host_path(runs).read_text() == "ran\n"


@pytest.fixture
def other_ns(kubectl: Kubectl, controller) -> Iterator[Namespace]:  # type: ignore[no-untyped-def]
    namespace = Namespace(kubectl, unique_namespace(E2E_PREFIX)).create()
    yield namespace
    namespace.delete()


def test_a_message_moved_to_another_namespaces_worker_is_refused(
        ns: Namespace, other_ns: Namespace, make_vm, broker, controller_dir):
    """A genuine message of namespace B's VM, put on namespace A's queue (by someone with
    the broker's admin password: a tenant's own user cannot even read B's queue): A's
    worker does not serve B's VM, so it refuses it and runs nothing. It cannot report the
    refusal either (A's broker user reaches none of B's keys): B's attempt stays Queued
    for B's own worker (the controller sends it again, signed anew)."""
    mine = make_vm("mine")
    ns.add_vms([mine])  # A's VM, with its worker running
    theirs = held_vm(other_ns, make_vm, "theirs")
    marker = "/tmp/vmfleet-sign-moved"
    other_ns.run("moved", vm="theirs", command=f"echo ran >> {marker}")
    message = take(broker, f"vmfleet.{other_ns}.theirs")
    put(broker, f"vmfleet.{ns}.mine", message)
    wait_until(lambda: REFUSED + "VMNotServed" in log_text(worker_log(controller_dir, ns, "mine")),
               timeout=60, what="A's worker to refuse B's message")
    log = log_text(worker_log(controller_dir, ns, "mine"))
    assert "echo ran" not in log
    assert "Traceback" not in log  # it does not even try to write B's keys
    assert not mine.host_path(marker).exists() and not theirs.host_path(marker).exists()
    (entry,) = other_ns.get("rcmd", "moved")["status"]["results"]
    assert entry["phase"] == "Queued", entry
