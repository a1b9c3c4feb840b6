"""`vmfleet logs` printing and exit codes, and the output API's pure parts: paths,
discovery, the front proxy's identity headers and the SubjectAccessReview it asks."""

from __future__ import annotations

import io
from email.message import Message

import pytest

from controller.logsapi import (
    Caller,
    RequestHeaderAuth,
    parse_path,
    resource_list,
    review,
)
from vmfleet.api.logs import LogRecord, log_path
from vmfleet.logs import query, records
from vmfleet.logscli import LinePrinter, exit_code, parse_duration


def rec(vm: str, stream: str, data: str, attempt: int = 1, seq: int = 1) -> LogRecord:
    return LogRecord(vm=vm, attempt=attempt, stream=stream, seq=seq,  # type: ignore[arg-type]
                     time="2026-12-07T01:00:00.000000Z", data=data, cursor="c")


def test_fan_out_lines_are_prefixed_and_streams_kept_apart():
    out, err = io.StringIO(), io.StringIO()
    printer = LinePrinter(out, err, prefixed=True)
    printer.write([rec("vm1", "stdout", "a\n"), rec("vm2", "stderr", "oops\n"),
                   rec("vm1", "stdout", "par"), rec("vm1", "stdout", "tial\n")])
    assert out.getvalue() == "[vm1] a\n[vm1] partial\n"
    assert err.getvalue() == "[vm2] oops\n"


def test_timestamps_and_a_later_attempt_and_a_last_partial_line():
    out, err = io.StringIO(), io.StringIO()
    printer = LinePrinter(out, err, prefixed=False, timestamps=True)
    printer.write([rec("vm1", "stdout", "x\n"), rec("vm1", "stdout", "y", attempt=2)])
    printer.end()
    stamp = "2026-12-07T01:00:00.000000Z"
    assert out.getvalue() == f"{stamp} x\n{stamp} y\n"
    assert err.getvalue() == "vmfleet: vm1: attempt 2\n"


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200),
                                               ("1h30m", 5400)])
def test_since_takes_kubectl_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "1d", "-5s"])
def test_since_refuses_other_text(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def command(results, **spec):
    return {"spec": spec, "status": {"results": results}}


@pytest.mark.parametrize(("obj", "vm", "code"), [
    (command([{"vm": "vm1", "phase": "Failed", "reason": "ExitCode", "exitCode": 3}], vm="vm1"),
     None, 3),
    (command([{"vm": "vm1", "phase": "Succeeded", "exitCode": 0},
              {"vm": "vm2", "phase": "Failed", "reason": "ExitCode", "exitCode": 4}],
             vms=["vm1", "vm2"]), None, 4),
    (command([{"vm": "vm1", "phase": "Succeeded", "exitCode": 0},
              {"vm": "vm2", "phase": "Failed", "reason": "ExitCode", "exitCode": 4}],
             vms=["vm1", "vm2"]), "vm1", 0),
    (command([{"vm": "vm1", "phase": "Running"}], vm="vm1"), None, 0),
    (command([{"vm": "vm1", "phase": "Failed", "reason": "Timeout"}], vm="vm1"), None, 124),
    (None, None, 130),
])
def test_exit_code_follows_exec(obj, vm, code):
    assert exit_code(obj, vm) == code


def test_the_client_sends_only_what_was_asked_and_parses_records_across_chunks():
    assert query() == []
    assert query(vm="vm1", attempt=2, follow=True, since_seconds=5, tail_lines=3, after="c") == [
        ("vm", "vm1"), ("attempt", "2"), ("follow", "true"), ("sinceSeconds", "5"),
        ("tailLines", "3"), ("after", "c")]
    line = rec("vm1", "stdout", "héllo\n").to_json().encode()
    chunks = [line[:7], line[7:] + b"\n" + line[:3], line[3:] + b"\n"]
    assert [r.data for r in records(iter(chunks))] == ["héllo\n", "héllo\n"]


def test_paths_and_discovery():
    assert parse_path(log_path("ops", "patch")) == ("ops", "patch")
    assert parse_path("/apis/logs.vmfleet.io/v1alpha1/namespaces/ops/remotecommands/p") is None
    assert parse_path("/apis/vmfleet.io/v1alpha1/namespaces/ops/remotecommands/p/log") is None
    names = [r["name"] for r in resource_list()["resources"]]
    assert names == ["remotecommands/log"]  # no resource a RESTMapper could take for the CRD's


def headers(*pairs: tuple[str, str]) -> Message:
    message = Message()
    for name, value in pairs:
        message[name] = value
    return message


def test_the_caller_comes_from_the_front_proxys_headers_only_over_its_certificate():
    auth = RequestHeaderAuth.from_configmap({
        "requestheader-client-ca-file": "PEM",
        "requestheader-allowed-names": '["front-proxy-client"]',
        "requestheader-username-headers": '["X-Remote-User"]',
        "requestheader-group-headers": '["X-Remote-Group"]',
        "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
    })
    proxy = {"subject": ((("commonName", "front-proxy-client"),),)}
    other = {"subject": ((("commonName", "someone"),),)}
    assert auth.proxy_allowed(proxy) and not auth.proxy_allowed(other)
    assert not auth.proxy_allowed(None)
    caller = auth.caller(headers(("X-Remote-User", "alice"), ("X-Remote-Group", "dev"),
                                 ("X-Remote-Group", "system:authenticated"),
                                 ("X-Remote-Extra-Scopes%2Fx", "a")))
    assert caller == Caller("alice", ("dev", "system:authenticated"), {"scopes/x": ["a"]})
    assert auth.caller(headers(("X-Remote-Group", "dev"))) is None
    with pytest.raises(ValueError, match="requestheader-client-ca-file"):
        RequestHeaderAuth.from_configmap({})


def test_the_review_asks_get_on_the_remotecommand_itself():
    body = review(Caller("alice", ("dev",), {}), "ops", "patch")
    assert body["spec"] == {
        "user": "alice", "groups": ["dev"], "extra": {},
        "resourceAttributes": {"namespace": "ops", "verb": "get", "group": "vmfleet.io",
                               "resource": "remotecommands", "name": "patch"}}


def test_worker_pods_take_their_output_store_url_from_their_broker_secret():
    from controller.deployment_runtime import DeploymentSettings, worker_env

    base = DeploymentSettings(image="vmfleet:1", broker_url="redis://b/0")
    assert "VMFLEET_OUTPUT_URL" not in {e["name"] for e in worker_env("ops", base)}
    env = {e["name"]: e for e in worker_env("ops", DeploymentSettings(
        image="vmfleet:1", broker_url="redis://b/0", output_url="redis://o/0"))}
    assert env["VMFLEET_OUTPUT_URL"] == {"name": "VMFLEET_OUTPUT_URL", "valueFrom": {
        "secretKeyRef": {"name": "vmfleet-broker", "key": "output-url"}}}


def test_local_workers_get_their_namespaces_own_output_store_user():
    from controller.tenants import DERIVED, BrokerTenants

    class State:
        url = "redis://vmfleet-controller:s3cret@r:6379/0"
        client = None

        def serve(self, namespace: str) -> None:
            pass

    class Client:
        def __init__(self) -> None:
            self.calls: list[tuple[object, ...]] = []

        def pipeline(self, transaction: bool = False) -> Client:
            return self

        def execute_command(self, *args: object) -> None:
            self.calls.append(args)

        def execute(self) -> list[object]:
            return []

    state = State()
    state.client = Client()  # type: ignore[assignment]
    output = Client()
    tenants = BrokerTenants(state, State.url, None, DERIVED,  # type: ignore[arg-type]
                            output_url="redis://vmfleet-controller:other@o:6379/0",
                            output_client=output)
    urls = tenants.ensure("ops")
    assert urls.output is not None and urls.output.startswith("redis://vmfleet-ns-ops:")
    assert urls.output.endswith("@o:6379/0") and urls.output != urls.broker.replace("@r:", "@o:")
    (setuser,) = output.calls
    assert setuser[:3] == ("ACL", "SETUSER", "vmfleet-ns-ops") and "~vmfleet.ops:*" in setuser
