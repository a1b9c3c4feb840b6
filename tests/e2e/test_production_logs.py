"""The output API of the chart on the pod-network cluster (issue 24, item 3).

charts/vmfleet installed with the output store and the output API on (``logsApi``,
``outputStore``), images built here: the API server reaches the controller pods through
the APIService -> Service -> pod network path (no host network anywhere), checks the
controller's serving certificate against the chart's caBundle, and the controller
checks the API server's front-proxy certificate and the caller's ``get`` on the
RemoteCommand. Read with the host's kubeconfig (through the relay on loopback):
``vmfleet logs -f`` shows lines while the command runs, the whole output after; a
caller without ``get`` on the RemoteCommand gets 403. Uninstalled at the end: the
APIService is gone, so namespace deletions cluster-wide are not held up.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.fleet import VMFLEET, Kubectl, Namespace, admin, client_env, role_granting, token_kube, unique_namespace
from tests.e2e.release import RELEASE, DefaultRelease, install, new_release
from vmfleet.dev.cluster import Cluster
from vmfleet.dev.proc import wait_until
from vmfleet.dev.sshd import SshdVM
from vmfleet.kube import ApiException, Kube
from vmfleet.logs import read_log

pytestmark = pytest.mark.timeout(600)

APISERVICE = "v1alpha1.logs.vmfleet.io"
LOG_RULE = {"apiGroups": ["logs.vmfleet.io"], "resources": ["remotecommands/log"], "verbs": ["get"]}
GET_RULE = {"apiGroups": ["vmfleet.io"], "resources": ["remotecommands"], "verbs": ["get"]}


def apiservice_condition(kubectl: Kubectl) -> dict[str, Any]:
    got = kubectl("get", "apiservice", APISERVICE, "-o", "json", check=False)
    if got.returncode != 0:
        return {}
    conditions = json.loads(got.stdout).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c.get("type") == "Available"), {})


@pytest.fixture(scope="module")
def logs_release(cluster: Cluster, cluster_image: str, cluster_redis_image: str,
                 cluster_vms: list[SshdVM], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultRelease]:
    started = time.monotonic()
    # The images' names and the two switches: everything else is the chart's default.
    rel = new_release(cluster, "prodlogs", tmp_path_factory.mktemp("logs-release"), cluster_image,
                      cluster_redis_image, outputStore={"enabled": True}, logsApi={"enabled": True})
    ns, kubectl = rel.ns, rel.kubectl
    installed = False
    try:
        install(rel)
        installed = True
        print(f"\nhelm install --wait (output store and API on, pod network): "
              f"{time.monotonic() - started:.1f}s")

        def available() -> bool:
            return apiservice_condition(kubectl).get("status") == "True"

        try:
            wait_until(available, timeout=90, interval=0.5, what=f"APIService {APISERVICE} Available")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {apiservice_condition(kubectl)}\n{rel.diagnostics()}") from None
        print(f"APIService Available: {time.monotonic() - started:.1f}s")
        ns.add_vms(cluster_vms[:1])
        yield rel
        # Every request reached the controllers as the front proxy's: nothing refused, no traceback.
        logs = ns.k("logs", "-l", "app.kubernetes.io/component=controller", "--prefix",
                    "--tail=-1", check=False).stdout
        assert "Traceback" not in logs and "Refused a connection" not in logs, logs[-4000:]
    finally:
        if installed:
            rel.helm_run("uninstall", RELEASE, "--wait", "--timeout", "90s", timeout=150)
        ns.delete()
        print(f"\nthe output API on the pod network, install to uninstall: {time.monotonic() - started:.1f}s")
    # Uninstalled: the APIService is gone, and a namespace deletion completes.
    assert kubectl("get", "apiservice", APISERVICE, check=False).returncode != 0
    scratch = Namespace(kubectl, unique_namespace("prodlogs-gone")).create()
    kubectl("delete", "namespace", scratch.name, "--wait=true", "--timeout=60s", timeout=90)


def service_account(cluster: Cluster, namespace: str, name: str,
                    rules: list[dict[str, Any]]) -> Kube:
    """A client with the token of a new ServiceAccount, granted ``rules`` in ``namespace``."""
    items: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}]
    if rules:
        items += role_granting(namespace, name, rules)
    cluster.cp.kubectl_run("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                 "items": items}))
    return token_kube(cluster.cp, namespace, name)


def test_vmfleet_logs_follows_a_command_through_the_aggregated_api(
        logs_release: DefaultRelease, cluster: Cluster) -> None:
    ns = logs_release.ns
    lines = [f"line-{i}\n" for i in range(1, 9)]
    ns.run("ticker", vm="vm1", command="for i in $(seq 1 8); do echo line-$i; sleep 0.5; done")
    follow = subprocess.Popen([VMFLEET, "logs", "-f", "-n", ns.name, "ticker"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=client_env(cluster.cp), stdin=subprocess.DEVNULL)
    try:
        assert follow.stdout is not None and follow.stderr is not None
        first = follow.stdout.readline()
        seen_at = time.monotonic()
        phase = (ns.get("remotecommand", "ticker").get("status") or {}).get("phase")
        if first != "line-1\n":
            follow.kill()
            raise AssertionError(f"first line {first!r}; stderr: {follow.stderr.read()}\n"
                                 f"{logs_release.diagnostics()}")
        assert phase not in ("Succeeded", "Failed")  # shown while the command still ran
        rest = follow.stdout.read()
        assert follow.wait(timeout=60) == 0, follow.stderr.read()
        assert time.monotonic() - seen_at > 2  # the rest came as it was printed
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert first + rest == "".join(lines)
    assert logs_release.finished("ticker")["status"]["phase"] == "Succeeded"
    # After the end, the whole output: from the CLI and from the client library.
    whole = subprocess.run([VMFLEET, "logs", "-n", ns.name, "ticker"], capture_output=True, text=True,
                           timeout=60, env=client_env(cluster.cp), stdin=subprocess.DEVNULL)
    assert (whole.returncode, whole.stdout, whole.stderr) == (0, "".join(lines), "")
    records = list(read_log(admin(cluster.cp), ns.name, "ticker"))
    assert [(r.vm, r.attempt, r.stream) for r in records] == [("vm1", 1, "stdout")] * len(records)
    assert "".join(r.data for r in records) == "".join(lines)


def test_only_who_may_get_the_command_reads_its_output(logs_release: DefaultRelease,
                                                       cluster: Cluster) -> None:
    ns = logs_release.ns
    ns.run("secret-out", vm="vm1", command="echo the-output")
    assert logs_release.finished("secret-out")["status"]["phase"] == "Succeeded"

    def status_of(kube: Kube) -> tuple[int, dict[str, Any]]:
        try:
            list(read_log(kube, ns.name, "secret-out"))
        except ApiException as exc:
            return int(exc.status), json.loads(exc.body or "{}")
        return 200, {}

    # Nothing granted: the API server refuses before it proxies.
    nobody = service_account(cluster, ns.name, "nobody", [])
    # The log subresource but not `get` on the RemoteCommand: the API server proxies,
    # the controller's SubjectAccessReview refuses.
    log_only = service_account(cluster, ns.name, "log-only", [LOG_RULE])
    reader = service_account(cluster, ns.name, "reader", [LOG_RULE, GET_RULE])
    wait_until(lambda: status_of(reader)[0] == 200, timeout=30, interval=0.5,
               what="the reader's RoleBinding to take effect")
    assert [r.data for r in read_log(reader, ns.name, "secret-out")] == ["the-output\n"]
    status, body = status_of(nobody)
    assert status == 403 and body["details"]["group"] == "logs.vmfleet.io", body
    status, body = status_of(log_only)
    assert status == 403 and body["reason"] == "Forbidden", body
    assert (f'User "system:serviceaccount:{ns.name}:log-only" cannot get resource "remotecommands" '
            'in API group "vmfleet.io"') in body["message"], body
