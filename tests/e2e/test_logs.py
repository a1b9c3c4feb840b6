"""Watching commands: ``vmfleet logs`` and the output API against the real servers.

Real kube-apiserver (with its aggregation layer: the front-proxy flags), the controller
serving ``logs.vmfleet.io`` behind the APIService (``ExternalName`` Service to loopback),
a Redis broker and a Redis output store of its own, real OpenSSH sshd VMs. This module
runs a controller of its own (namespaces ``lg-*``) with the output store and the API on.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.fleet import (
    VMFLEET,
    Kubectl,
    Namespace,
    admin,
    assert_no_tracebacks,
    client_env,
    logs_api_controller,
    role_granting,
    token_kube,
    unique_namespace,
    vmfleet,
)
from vmfleet.dev.brokers import RedisServer
from vmfleet.dev.proc import ManagedProcess, wait_until
from vmfleet.kube import ApiException, Kube
from vmfleet.logs import LogRecord, read_log

pytestmark = pytest.mark.e2e

PREFIX = "lg"


@pytest.fixture(scope="module")
def logs_controller(controlplane, redis_server, crds, output: RedisServer,  # type: ignore[no-untyped-def]
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    workdir = tmp_path_factory.mktemp("logs-controller")
    try:
        with logs_api_controller(controlplane, redis_server.url, output.url, workdir, [f"{PREFIX}-*"],
                                 "e2e-logs") as proc:
            yield proc
    finally:
        assert_no_tracebacks(workdir / "controller.log", workdir / "workers")


@pytest.fixture
def lns(kubectl: Kubectl, logs_controller: ManagedProcess) -> Iterator[Namespace]:
    namespace = Namespace(kubectl, unique_namespace(PREFIX)).create()
    yield namespace
    logs_controller.check_running()
    namespace.delete()


def test_read_log_follows_a_fan_out_live_in_order_then_reads_it_whole(lns: Namespace, vms,
                                                                      controlplane):
    lns.add_vms(vms[:2])
    # Each VM prints numbered lines on both streams, a line every 0.2 s for 3 s, and a
    # partial line (no newline) at the end.
    script = ("for i in $(seq 1 15); do echo out-$i; echo err-$i >&2; sleep 0.2; done; "
              "printf 'partial'")
    lns.run("fan", vms=["vm1", "vm2"], command=script)
    kube = admin(controlplane)
    wait_until(lambda: lns.get("remotecommand", "fan").get("metadata", {}).get("uid"),
               timeout=30, what="the command")
    got: list[tuple[float, LogRecord]] = []
    ended_at: dict[str, float] = {}

    def finished() -> bool:
        status = lns.get("remotecommand", "fan").get("status") or {}
        done = status.get("phase") in ("Succeeded", "Failed")
        if done and "at" not in ended_at:
            ended_at["at"] = time.time()
        return done

    for record in read_log(kube, str(lns), "fan", follow=True):
        got.append((time.time(), record))
    assert finished()
    records = [r for _, r in got]
    for vm in ("vm1", "vm2"):
        out = "".join(r.data for r in records if r.vm == vm and r.stream == "stdout")
        err = "".join(r.data for r in records if r.vm == vm and r.stream == "stderr")
        assert out == "".join(f"out-{i}\n" for i in range(1, 16)) + "partial"
        assert err == "".join(f"err-{i}\n" for i in range(1, 16))
        seqs = [r.seq for r in records if r.vm == vm]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert {r.attempt for r in records if r.vm == vm} == {1}
    # Live: the first line arrived seconds before the last one (the command takes 3 s).
    first = min(t for t, r in got if r.data == "out-1\n")
    last = max(t for t, r in got if r.data == "out-15\n")
    assert last - first > 2.0

    # After the end: the whole output again, and resuming after a cursor loses nothing.
    whole = list(read_log(kube, str(lns), "fan"))
    assert [(r.vm, r.seq, r.stream, r.data) for r in whole] == sorted(
        [(r.vm, r.seq, r.stream, r.data) for r in records], key=lambda x: x[0])
    middle = whole[len(whole) // 2]
    rest = list(read_log(kube, str(lns), "fan", after=middle.cursor))
    assert [(r.vm, r.seq) for r in rest] == [(r.vm, r.seq) for r in whole[len(whole) // 2 + 1:]]
    tail = list(read_log(kube, str(lns), "fan", vm="vm2", tail_lines=3))
    assert [r.data for r in tail if r.stream == "stdout"][-2:] == ["out-15\n", "partial"]


def test_vmfleet_logs_prints_prefixed_streams_and_exits_like_exec(lns: Namespace, vms,
                                                                 controlplane):
    lns.add_vms(vms[:2])
    lns.run("two", vms=["vm1", "vm2"], command="echo hello; echo oops >&2; exit 3")
    lns.finished("two")
    proc = vmfleet(controlplane, "logs", "-n", str(lns), "two")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "[vm1] hello\n[vm2] hello\n"
    assert proc.stderr == "[vm1] oops\n[vm2] oops\n"
    one = vmfleet(controlplane, "logs", "-n", str(lns), "two", "--vm", "vm2", "--timestamps")
    assert one.returncode == 3
    stamp, text = one.stdout.split(" ", 1)
    assert text == "hello\n" and stamp.endswith("Z") and "T" in stamp


def test_vmfleet_logs_follow_shows_lines_before_the_command_ends(lns: Namespace, vms,
                                                               controlplane):
    lns.add_vms(vms[:1])
    lns.run("slow", vm="vm1", command="echo first; sleep 4; echo second")
    proc = subprocess.Popen([VMFLEET, "logs", "-f", "-n", str(lns), "slow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=client_env(controlplane))
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seen_at = time.time()
    status = lns.get("remotecommand", "slow").get("status") or {}
    assert first == "first\n"
    assert status.get("phase") not in ("Succeeded", "Failed")  # still running
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert rest == "second\n"
    assert time.time() - seen_at > 2


def test_exec_prints_output_live(lns: Namespace, vms, controlplane):
    lns.add_vms(vms[:1])
    proc = subprocess.Popen([VMFLEET, "exec", "-n", str(lns), "vm1", "--", "sh", "-c",
                             "echo first; sleep 4; echo second >&2; exit 2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=client_env(controlplane))
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == "first\n"
    seen_at = time.time()
    assert proc.wait(timeout=60) == 2
    # The line came while the command slept (4 s), not with its end: counted from the line,
    # not from the start, which includes the VM's worker starting.
    assert time.time() - seen_at > 2
    assert proc.stdout.read() == ""
    assert proc.stderr.read() == "second\n"


def service_account_kube(controlplane, namespace: str, name: str) -> Kube:  # type: ignore[no-untyped-def]
    controlplane.kubectl_run("create", "serviceaccount", "-n", namespace, name)
    return token_kube(controlplane, namespace, name)


def grant(controlplane, namespace: str, name: str, rules: list[dict[str, Any]]) -> None:  # type: ignore[no-untyped-def]
    body = {"apiVersion": "v1", "kind": "List", "items": role_granting(namespace, name, rules)}
    controlplane.kubectl_run("apply", "-f", "-", input=json.dumps(body))


LOG_RULE = {"apiGroups": ["logs.vmfleet.io"], "resources": ["remotecommands/log"], "verbs": ["get"]}
GET_RULE = {"apiGroups": ["vmfleet.io"], "resources": ["remotecommands"], "verbs": ["get"]}


def test_only_who_may_get_the_command_reads_its_output(lns: Namespace, vms, controlplane):
    lns.add_vms(vms[:1])
    lns.run("secret-out", vm="vm1", command="echo the-output")
    lns.finished("secret-out")
    ns = str(lns)

    def status_of(kube: Kube) -> int:
        try:
            list(read_log(kube, ns, "secret-out"))
        except ApiException as exc:
            return int(exc.status)
        return 200

    # Nothing granted: the API server refuses (403) before the controller is asked.
    nobody = service_account_kube(controlplane, ns, "nobody")
    # The log subresource but not `get` on the RemoteCommand: the controller's
    # SubjectAccessReview refuses.
    log_only = service_account_kube(controlplane, ns, "log-only")
    grant(controlplane, ns, "log-only", [LOG_RULE])
    reader = service_account_kube(controlplane, ns, "reader")
    grant(controlplane, ns, "reader", [LOG_RULE, GET_RULE])

    def settled() -> bool:
        return status_of(reader) == 200  # RBAC caches take a moment

    wait_until(settled, timeout=30, what="the reader's RoleBinding to take effect")
    with pytest.raises(ApiException) as refused:
        list(read_log(nobody, ns, "secret-out"))
    assert refused.value.status == 403
    assert json.loads(refused.value.body)["details"]["group"] == "logs.vmfleet.io"
    with pytest.raises(ApiException) as refused:
        list(read_log(log_only, ns, "secret-out"))
    assert refused.value.status == 403
    body = json.loads(refused.value.body)
    assert body["reason"] == "Forbidden"
    assert (f'User "system:serviceaccount:{ns}:log-only" cannot get resource "remotecommands" '
            'in API group "vmfleet.io"') in body["message"]
    assert [r.data for r in read_log(reader, ns, "secret-out")] == ["the-output\n"]


def test_output_past_the_cap_is_cut_and_marked(lns: Namespace, vms, controlplane, output):
    lns.add_vms(vms[:1])
    # 20 MiB of output: the store keeps 16 MiB, then the cut notice.
    lns.run("big", vm="vm1", command="head -c 20971520 /dev/zero | tr '\\0' 'x' | fold -w 1023")
    lns.finished("big", timeout=180)
    kube = admin(controlplane)
    records = list(read_log(kube, str(lns), "big"))
    out = sum(len(r.data) for r in records if r.stream == "stdout")
    assert out == 16 * 1024 * 1024
    assert records[-1].stream == "stderr" and "output cut at 16777216 bytes" in records[-1].data
    # Kept for the retention: every key of the command expires.
    import redis

    client: Any = redis.Redis.from_url(output.admin_url)
    keys = client.keys(f"vmfleet.{lns}:output:*")
    assert keys and all(0 < client.ttl(k) <= 86400 for k in keys)
    # Confined as on the broker: the namespace's own user reaches its output, another
    # namespace's user does not.
    stream = next(k for k in keys if k.endswith(b":vm1:1"))
    own: Any = redis.Redis.from_url(output.namespace_url(str(lns)))
    assert own.xlen(stream) > 0
    other: Any = redis.Redis.from_url(output.namespace_url(f"{PREFIX}-other"))
    with pytest.raises(redis.exceptions.NoPermissionError):
        other.xlen(stream)


def test_a_partial_line_shows_while_the_command_still_runs(lns: Namespace, vms, controlplane):
    lns.add_vms(vms[:1])
    lns.run("prompt", vm="vm1", command="printf 'Continue? '; sleep 5; echo yes")
    kube = admin(controlplane)
    wait_until(lambda: lns.get("remotecommand", "prompt").get("metadata", {}).get("uid"),
               timeout=30, what="the command")
    records = read_log(kube, str(lns), "prompt", follow=True)
    first = next(records)
    status = lns.get("remotecommand", "prompt").get("status") or {}
    assert first.data == "Continue? " and first.stream == "stdout"
    assert status.get("phase") not in ("Succeeded", "Failed")  # shown before the newline came
    assert [r.data for r in records] == ["yes\n"]


def test_the_output_api_answers_only_the_api_servers_front_proxy(logs_controller, controlplane,
                                                                  tmp_path):
    import http.client
    import ssl
    import urllib.request

    from vmfleet.dev.certs import Pair, ensure_leaf

    port, ca = logs_controller.logs_api
    url = f"https://127.0.0.1:{port}/apis/logs.vmfleet.io/v1alpha1"
    headers = {"X-Remote-User": "system:admin", "X-Remote-Group": "system:masters"}

    def call(context: ssl.SSLContext) -> None:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            response.read()

    # No client certificate: refused in the TLS handshake, whatever headers it sends.
    bare = ssl.create_default_context(cafile=str(ca))
    bare.check_hostname = False
    with pytest.raises((OSError, http.client.HTTPException)):
        call(bare)
    # A certificate of the cluster's CA named like the proxy (what a user could hold) is
    # not the front proxy's: refused too.
    cluster_ca = Pair(controlplane.pki / "ca.crt", controlplane.pki / "ca.key")
    forged = ensure_leaf(Pair(tmp_path / "forged.crt", tmp_path / "forged.key"), cluster_ca,
                         "front-proxy-client", server=False)
    impostor = ssl.create_default_context(cafile=str(ca))
    impostor.check_hostname = False
    impostor.load_cert_chain(str(forged.cert), str(forged.key))
    with pytest.raises((OSError, http.client.HTTPException)):
        call(impostor)
    # The API server's own front-proxy certificate gets the answer.
    _, client = controlplane.front_proxy_pki()
    proxy = ssl.create_default_context(cafile=str(ca))
    proxy.check_hostname = False
    proxy.load_cert_chain(str(client.cert), str(client.key))
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, context=proxy, timeout=10) as response:
        assert json.loads(response.read())["groupVersion"] == "logs.vmfleet.io/v1alpha1"
