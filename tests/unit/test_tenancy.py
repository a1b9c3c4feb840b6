"""The broker's tenancy fence as names and rules: every key a worker touches is under its
namespace's prefix, no product key can be a tenant's queue, and the ACL rules and
derived credentials are the ones the controller and the chart apply."""

from __future__ import annotations

from typing import Any

import pytest

from controller.tenants import DERIVED, SHARED, BrokerTenants, acl_setuser_args
from remote_tasks.slots import slots_key
from vmfleet import tenancy
from vmfleet.api.constants import default_queue, transfer_queue
from vmfleet.celeryconf import celery_config
from vmfleet.state import (
    cancel_key,
    cancels_channel,
    claim_key,
    heartbeats_key,
    live_key,
    reports_key,
)


def test_every_key_a_worker_touches_is_under_its_namespace_s_prefix() -> None:
    keys = [claim_key("team-a", "u1", "vm1", 2), cancel_key("team-a", "u1"),
            cancels_channel("team-a"), heartbeats_key("team-a", "rel"),
            reports_key("team-a", "rel"), slots_key("team-a", "vm1")]
    assert keys == ["vmfleet.team-a:claim:u1/vm1/2", "vmfleet.team-a:cancel:u1",
                    "vmfleet.team-a:cancels", "vmfleet.team-a:heartbeats:rel",
                    "vmfleet.team-a:reports:rel", "vmfleet.team-a:slots:vm1"]
    # kombu's own keys too (queue lists, unacked, bindings): its global_keyprefix.
    conf = celery_config("redis://u:p@r:6379/0", "team-a")
    assert conf["broker_transport_options"]["global_keyprefix"] == "vmfleet.team-a:"
    assert conf["worker_enable_remote_control"] is False  # no pidbox
    assert conf["worker_send_task_events"] is False
    assert "global_keyprefix" not in celery_config("amqp://b//", "team-a")["broker_transport_options"]
    # The controller's own set is outside every namespace's prefix.
    assert not live_key("rel").startswith("vmfleet.")


@pytest.mark.parametrize("bad", ["Team", "a_b", "a*", "a:b", "a.b", "", "-a", "a" * 64])
def test_only_namespace_names_make_a_prefix(bad: str) -> None:
    with pytest.raises(ValueError):
        tenancy.key_prefix(bad)


def test_no_product_key_can_be_a_tenant_s_queue() -> None:
    ns = "team-a"
    prefix = tenancy.key_prefix(ns)
    product = ["unacked", "unacked_index", "unacked_mutex", "_kombu.binding.celery",
               "claim:u/vm/1", "cancel:u", "cancels", "heartbeats:s", "reports:s", "slots:vm"]
    vm_queues = [default_queue(ns, "vm1"), default_queue(ns, "transfers"),
                 default_queue(ns, "unacked")]
    for queue in vm_queues:
        assert tenancy.collides(ns, queue) is None
        assert all(prefix + queue != prefix + key for key in product)
    assert transfer_queue(ns) not in vm_queues  # a VM named `transfers` is not the transfer queue
    for queue in ["unacked", "claim:u/vm/1", f"vmfleet.{ns}:transfers", f"vmfleet.{ns}.",
                  "vmfleet.team-b.vm1", f"vmfleet.{ns}.a:b"]:
        assert tenancy.collides(ns, queue), queue


def test_the_queue_depth_reads_each_queue_under_its_namespace_s_prefix() -> None:
    assert tenancy.queue_key("vmfleet.team-a.vm1") == "vmfleet.team-a:vmfleet.team-a.vm1"
    assert tenancy.queue_key(transfer_queue("team-a")) == "vmfleet.team-a:vmfleet.team-a:transfers"
    assert tenancy.queue_key(transfer_queue("ops")) == "vmfleet.ops:vmfleet.ops:transfers"


def test_a_namespace_s_user_reaches_its_prefix_with_the_worker_commands_only() -> None:
    rules = tenancy.namespace_rules("team-a")
    assert rules[:2] == ["~vmfleet.team-a:*", "&vmfleet.team-a:*"]
    assert rules[2] == "-@all"
    for denied in ("-@admin", "-@dangerous", "-scan", "-keys", "-pubsub", "-function"):
        assert denied in rules
    assert "+info" not in rules and not [r for r in rules if r.startswith("+acl")]
    assert tenancy.controller_rules(provision=False)[:3] == ["~vmfleet*", "&vmfleet*",
                                                             "&vmfleet.*:cancels"]
    assert "+acl|setuser" in tenancy.controller_rules(provision=True)
    assert "+acl|setuser" not in tenancy.controller_rules(provision=False)
    line = tenancy.acl_line("vmfleet-ns-team-a", "pw", rules)
    assert line.startswith("user vmfleet-ns-team-a on #") and " pw" not in line


def test_derived_passwords_differ_per_namespace_and_need_the_controller_s() -> None:
    a, b = tenancy.derive_password("s3cret", "team-a"), tenancy.derive_password("s3cret", "team-b")
    assert a != b and len(a) == 64
    assert tenancy.derive_password("s3cret", "team-a") == a
    assert tenancy.derive_password("other", "team-a") != a
    with pytest.raises(ValueError):
        tenancy.derive_password("", "team-a")
    args = acl_setuser_args("s3cret", "team-a")
    assert args[:4] == ["vmfleet-ns-team-a", "reset", "on", tenancy.password_hash(a)]


def test_urls_get_credentials_and_lose_them_in_logs() -> None:
    url = tenancy.with_credentials("redis://old:x@r.ns.svc:6379/0", "vmfleet-ns-a", "p@ss/w")
    assert url == "redis://vmfleet-ns-a:p%40ss%2Fw@r.ns.svc:6379/0"
    assert tenancy.url_credentials(url) == ("vmfleet-ns-a", "p@ss/w")
    assert tenancy.redacted(url) == "redis://vmfleet-ns-a:***@r.ns.svc:6379/0"
    assert tenancy.redacted("redis://r:6379/0") == "redis://r:6379/0"


class FakePipe:
    def __init__(self, state: FakeState) -> None:
        self.state, self.commands = state, []  # type: list[tuple[Any, ...]]

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)

    def execute(self) -> None:
        if self.state.down:
            raise ConnectionError("down")
        self.state.applied.extend(self.commands)


class FakeState:
    def __init__(self, url: str) -> None:
        self.url, self.down, self.applied, self.served = url, False, [], []  # type: ignore[var-annotated]
        self.client = self

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self)

    def execute_command(self, *args: Any) -> None:
        if self.down:
            raise ConnectionError("down")
        self.saves = getattr(self, "saves", 0) + 1  # ACL SAVE

    def serve(self, namespace: str) -> None:
        self.served.append(namespace)


def test_the_controller_makes_each_namespace_s_user_and_hands_out_only_its_urls() -> None:
    state = FakeState("redis://vmfleet-controller:s3cret@r:6379/0")
    tenants = BrokerTenants(state, "redis://vmfleet-controller:s3cret@r:6379/0", None, DERIVED)  # type: ignore[arg-type]
    urls = tenants.ensure("team-a")
    password = tenancy.derive_password("s3cret", "team-a")
    assert urls.broker == f"redis://vmfleet-ns-team-a:{password}@r:6379/0" and urls.state is None
    assert state.applied == [("ACL", "SETUSER", *acl_setuser_args("s3cret", "team-a"))]
    assert state.served == ["team-a"]
    assert state.saves == 1  # kept in the ACL file: a restarted Redis knows the user at once
    tenants.ensure("team-a")
    assert len(state.applied) == 1  # once, then by refresh
    tenants.refresh(every=0)
    assert len(state.applied) == 2  # a Redis that restarted empty gets it back

    # Redis away at first sight: the next refresh creates it.
    state.down = True
    tenants.ensure("team-b")
    state.down = False
    tenants.refresh(every=3600)
    assert ("ACL", "SETUSER", *acl_setuser_args("s3cret", "team-b")) in state.applied

    # RabbitMQ broker, state in Redis: the broker URL is shared, the state URL is the namespace's.
    rabbit = BrokerTenants(state, "amqp://g:g@b//", "redis://vmfleet-controller:s3cret@r:6379/0",  # type: ignore[arg-type]
                           DERIVED)
    urls = rabbit.ensure("team-a")
    assert urls.broker == "amqp://g:g@b//" and urls.state and "vmfleet-ns-team-a" in urls.state


def test_derived_users_need_a_controller_password_and_shared_gives_the_controller_s_urls() -> None:
    with pytest.raises(ValueError, match="VMFLEET_BROKER_USERS=Shared"):
        BrokerTenants(FakeState("redis://r:6379/0"), "redis://r:6379/0", None, DERIVED)  # type: ignore[arg-type]
    state = FakeState("redis://r:6379/0")
    shared = BrokerTenants(state, "redis://r:6379/0", None, SHARED)  # type: ignore[arg-type]
    assert shared.ensure("team-a").broker == "redis://r:6379/0"
    assert state.applied == []
