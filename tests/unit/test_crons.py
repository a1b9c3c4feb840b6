"""controller.crons with a fake clock and a fake API: the runs it creates, the leader gate,
Replace through Commands.cancel, and no run created twice."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from controller.crons import Crons
from tests.fakes import FakeState, Fleet, command
from vmfleet.kube import ApiException

NOW = datetime(2026, 12, 6, 12, 1, 5, tzinfo=UTC)


class FakeCustom:
    def __init__(self) -> None:
        self.patched: list[tuple[str, str, dict[str, Any]]] = []
        self.deleted: list[str] = []

    def patch_namespaced_custom_object_status(self, g, v, ns, plural, name, body, **_):  # type: ignore[no-untyped-def]
        self.patched.append((plural, name, body))
        return {"metadata": {"name": name, "namespace": ns, "uid": "cron-uid",
                             "creationTimestamp": "2026-12-06T12:00:00Z"},
                "spec": CRON["spec"], "status": body["status"]}

    def patch_namespaced_custom_object(self, g, v, ns, plural, name, body, **_):  # type: ignore[no-untyped-def]
        self.patched.append((plural, name, body))

    def delete_namespaced_custom_object(self, g, v, ns, plural, name, **_):  # type: ignore[no-untyped-def]
        self.deleted.append(name)


class FakeCore:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def create_namespaced_event(self, ns: str, body: Any) -> None:
        self.events.append(body)


class FakeKube:
    def __init__(self) -> None:
        self.custom = FakeCustom()
        self.raw = FakeCore()
        self.created: list[dict[str, Any]] = []
        self.conflict = False

    def create_command(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.conflict:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)
        return {**body, "metadata": {**body["metadata"], "uid": f"run-{len(self.created)}"}}


CRON = {
    "metadata": {"name": "nightly", "namespace": "ns", "uid": "cron-uid",
                 "creationTimestamp": "2026-12-06T12:00:00Z"},
    "spec": {"schedule": "* * * * *", "concurrencyPolicy": "Replace",
             "commandTemplate": {"metadata": {"labels": {"team": "ops"}},
                                 "spec": {"selector": {}, "command": "sleep 600"}}},
}


def crons(kube: FakeKube, leading: bool = True) -> Crons:
    commands = Fleet("vm1").commands(FakeState())
    made = Crons(kube, commands, leading=lambda: leading, clock=lambda: NOW)  # type: ignore[arg-type]
    made.seen(CRON)
    return made


def test_a_due_run_is_created_owned_named_and_recorded():
    kube = FakeKube()
    crons(kube).tick()
    (body,) = kube.created
    meta = body["metadata"]
    assert meta["name"] == "nightly-29942641"
    assert meta["labels"] == {"team": "ops", "vmfleet.io/cron": "nightly"}
    assert meta["annotations"] == {"vmfleet.io/scheduled-at": "2026-12-06T12:01:00.000Z"}
    assert meta["ownerReferences"] == [{"apiVersion": "vmfleet.io/v1alpha1",
                                        "kind": "RemoteCronCommand", "name": "nightly",
                                        "uid": "cron-uid", "controller": True,
                                        "blockOwnerDeletion": False}]
    assert body["spec"]["command"] == "sleep 600"
    ((plural, name, patch),) = kube.custom.patched
    assert (plural, name) == ("remotecroncommands", "nightly")
    assert patch["status"] == {"lastScheduleTime": "2026-12-06T12:01:00.000Z", "activeCount": 1,
                               "active": [{"name": "nightly-29942641", "uid": "run-1"}]}
    assert [e["reason"] for e in kube.raw.events] == ["SuccessfulCreate"]


def test_nothing_is_written_when_nothing_changed():
    kube = FakeKube()
    made = crons(kube)
    made.tick()
    made.tick()
    made.tick()
    assert len(kube.created) == 1 and len(kube.custom.patched) == 1


def test_only_the_leader_schedules():
    kube = FakeKube()
    crons(kube, leading=False).tick()
    assert kube.created == [] and kube.custom.patched == []


def test_an_existing_run_is_never_created_twice():
    kube = FakeKube()
    kube.conflict = True
    made = crons(kube)
    made.tick()
    assert kube.created == []
    assert kube.custom.patched[0][2]["status"]["lastScheduleTime"] == "2026-12-06T12:01:00.000Z"


def test_replace_cancels_the_running_run_through_commands():
    kube = FakeKube()
    made = crons(kube)
    running = command(uid="old-uid", selector={}, command="sleep 600")
    running["metadata"].update(name="nightly-29942640", ownerReferences=[
        {"kind": "RemoteCronCommand", "uid": "cron-uid", "controller": True}],
        annotations={"vmfleet.io/scheduled-at": "2026-12-06T12:00:00.000Z"})
    made.commands.observe(running)
    (tracked,) = made.commands.tracked()
    tracked.status["results"][0]["phase"] = "Running"
    running["status"] = {"phase": "Running"}
    made.command_seen(running)
    made.tick()
    assert kube.created == []  # waits for the processes to be gone
    assert made.commands.state.cancelled == ["old-uid"]  # type: ignore[attr-defined]
    assert kube.custom.patched[0][1] == "nightly-29942640"
    assert "vmfleet.io/replaced-by-schedule" in kube.custom.patched[0][2]["metadata"]["annotations"]
    # The worker reports the kill: Cancelled; the next tick deletes it and starts the next.
    running["status"] = {"phase": "Cancelled"}
    made.command_seen(running)
    made.tick()
    assert kube.custom.deleted == ["nightly-29942640"]
    assert [b["metadata"]["name"] for b in kube.created] == ["nightly-29942641"]


def test_a_schedule_that_never_comes_is_an_event_not_a_crash():
    kube = FakeKube()
    made = crons(kube)
    made.seen({**CRON, "spec": {**CRON["spec"], "schedule": "0 0 30 2 *"}})  # February 30th
    made.tick()
    made.tick()
    assert kube.created == []
    assert [e["reason"] for e in kube.raw.events] == ["InvalidSpec"]  # once
    assert "never runs" in kube.raw.events[0]["message"]


def test_a_run_deleted_while_the_watch_was_down_no_longer_holds_back_a_forbid_schedule():
    """The controller's command watch expired and listed again: a run the list lacks was
    deleted meanwhile — even one the cron last saw Running, whose deletion event was
    never seen — so concurrencyPolicy Forbid starts the next run instead of waiting for
    a run that no longer exists."""
    kube = FakeKube()
    made = crons(kube)
    made.seen({**CRON, "spec": {**CRON["spec"], "concurrencyPolicy": "Forbid"}})
    running = command(uid="old-uid", selector={}, command="sleep 600")
    running["metadata"].update(name="nightly-29942640", ownerReferences=[
        {"kind": "RemoteCronCommand", "uid": "cron-uid", "controller": True}],
        annotations={"vmfleet.io/scheduled-at": "2026-12-06T12:00:00.000Z"})
    running["status"] = {"phase": "Running"}
    made.command_seen(running)
    made.tick()
    assert kube.created == []  # Forbid: the running run holds the next one back
    made.commands_listed("other-ns", set())  # another namespace's list: not this run's
    made.tick()
    assert kube.created == []
    made.commands_listed("ns", {"some-other-uid"})
    made.tick()
    assert [b["metadata"]["name"] for b in kube.created] == ["nightly-29942641"]
