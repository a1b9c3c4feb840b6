"""The broker asks who is there, and each namespace has its own key (a real Redis with
the ACLs the local environment and the chart give it).

A connection without credentials is refused; a namespace's user (what its workers hold)
reaches none of another namespace's keys — not its queued envelopes, not its reports
stream, not its cancel channel, not its claims — and nothing that lists keys or changes
the server; the controller's local workers hold their own namespace's user only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from kombu import Connection

from controller.dispatch import Dispatcher
from tests.e2e.fleet import Namespace
from vmfleet import tenancy
from vmfleet.api.constants import TASK_EXECUTE
from vmfleet.api.envelope import Envelope
from vmfleet.api.signing import Signer, generate_private_key
from vmfleet.dev.brokers import RedisServer
from vmfleet.state import State, cancels_channel, claim_key, reports_key

pytestmark = pytest.mark.e2e


def client(url: str) -> Any:
    return redis.Redis.from_url(url, socket_timeout=5)


def test_a_connection_without_credentials_or_with_a_wrong_password_is_refused(
        redis_server: RedisServer) -> None:
    anonymous = redis_server.anonymous_url
    for url in (anonymous, tenancy.with_credentials(anonymous, tenancy.CONTROLLER_USER, "wrong"),
                tenancy.with_credentials(anonymous, "default", "")):
        with pytest.raises(redis.exceptions.AuthenticationError):
            client(url).ping()
    assert client(redis_server.url).ping() is True  # the controller's user is let in


def test_a_namespace_s_user_reaches_none_of_another_namespace_s_keys(
        redis_server: RedisServer) -> None:
    a, b = f"acl-a-{uuid.uuid4().hex[:6]}", f"acl-b-{uuid.uuid4().hex[:6]}"
    queue = f"vmfleet.{b}.db"
    envelope = Envelope(namespace=b, name="c", uid="uid-b", vm="db", attempt=1, dispatch_time="",
                        spec={"command": "id"}, scope="s")
    dispatcher = Dispatcher(redis_server.url, Signer(generate_private_key(), 300))
    try:
        # As the controller sends: signed, under b's prefix.
        dispatcher.send_task(TASK_EXECUTE, envelope.to_message(), queue, b)
    finally:
        dispatcher.close()
    queued = tenancy.key_prefix(b) + queue
    controller = client(redis_server.url)
    assert controller.llen(queued) == 1

    tenant_url = redis_server.namespace_url(a)  # a's user: what a's workers hold
    tenant = client(tenant_url)
    denied: dict[str, Callable[[], Any]] = {
        "LRANGE b's queue": lambda: tenant.lrange(queued, 0, -1),
        "BRPOP b's queue": lambda: tenant.brpop([queued], timeout=1),
        "LLEN b's queue": lambda: tenant.llen(queued),
        "LPUSH into b's queue": lambda: tenant.lpush(queued, "{}"),
        "DEL b's queue": lambda: tenant.delete(queued),
        "XADD to b's reports": lambda: tenant.xadd(reports_key(b, "s"), {"r": "{}"}),
        "PUBLISH b's cancels": lambda: tenant.publish(cancels_channel(b), "uid-b"),
        "SET b's claim": lambda: tenant.set(claim_key(b, "uid-b", "db", 1), "me"),
        "a script on b's queue": lambda: tenant.eval(
            "return redis.call('LRANGE', KEYS[1], 0, -1)", 1, queued),
        "a script naming b's queue itself": lambda: tenant.eval(
            f"return redis.call('LRANGE', '{queued}', 0, -1)", 0),
        "kombu's shared unacked hash": lambda: tenant.hgetall("unacked"),
        "the controller's live set": lambda: tenant.smembers("vmfleet:live:s"),
        "SCAN": lambda: tenant.scan(0),
        "KEYS": lambda: tenant.keys("*"),
        "PUBSUB CHANNELS": lambda: tenant.pubsub_channels(),
        "FLUSHALL": lambda: tenant.flushall(),
        "CONFIG GET": lambda: tenant.config_get("requirepass"),
        "ACL LIST": lambda: tenant.acl_list(),
        "INFO": lambda: tenant.info(),
    }
    allowed = []
    for what, call in denied.items():
        try:
            call()
        except redis.exceptions.NoPermissionError:
            continue
        except redis.exceptions.ResponseError as exc:  # inside a script: refused as well
            if "can't access" in str(exc):
                continue
            raise
        allowed.append(what)
    assert allowed == []

    # Through kombu as a worker would consume, with b's key prefix: refused as well.
    with (Connection(tenant_url, transport_options=tenancy.transport_options(b)) as conn,
          pytest.raises(redis.exceptions.NoPermissionError)):
        conn.SimpleQueue(queue).get(block=True, timeout=2)
    # With its own prefix, a's worker consuming b's queue name sees a queue of its own: empty.
    with Connection(tenant_url, transport_options=tenancy.transport_options(a)) as conn:
        simple = conn.SimpleQueue(queue)
        try:
            with pytest.raises(simple.Empty):
                simple.get(block=True, timeout=1)
        finally:
            simple.close()
    assert controller.llen(queued) == 1  # b's envelope is still there, untouched

    # b's own user reaches it (the fence is per namespace, not a broken broker).
    own = client(redis_server.namespace_url(b))
    assert own.llen(queued) == 1
    assert own.xadd(reports_key(b, "s"), {"r": "{}"})
    own.delete(queued)
    for c in (tenant, own, controller):
        c.close()


def test_the_controller_s_local_workers_hold_their_namespace_s_user_only(
        ns: Namespace, make_vm: Any, controller_dir: Any, redis_server: RedisServer) -> None:
    vm = make_vm("acl")
    ns.add_vms([vm])
    ns.run("who", vm="acl", command="true")
    ns.wait("remotecommand/who", "Complete")  # the worker path ran end to end
    pid = int((controller_dir / "workers" / f"{ns}.acl.0.pgid").read_text().split()[0])
    with open(f"/proc/{pid}/environ", "rb") as fh:
        environ = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
    url = environ[b"VMFLEET_BROKER_URL"].decode()
    assert tenancy.url_credentials(url)[0] == tenancy.namespace_user(str(ns))
    assert environ[b"VMFLEET_NAMESPACE"].decode() == str(ns)
    controller_password = redis_server.passwords()[tenancy.CONTROLLER_USER].encode()
    assert not any(controller_password in value for value in environ.values())
    # Those credentials read this namespace's reports stream, and no one else's.
    worker = State(url)
    try:
        worker.report({"kind": "probe", "namespace": str(ns)}, "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.report({"kind": "probe", "namespace": "default"}, "x")
    finally:
        worker.client.close()
