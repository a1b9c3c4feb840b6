"""charts/vmfleet rendered with the real helm (built by scripts/install-helm.sh): lint,
template for the default values and each ci/*-values.yaml, and what the objects say."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
import yaml

from tests.chart import CHART, IDS, REPO, VALUE_SETS, find, helm, render, rules_of


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_lint_strict(values):
    args = ["lint", str(CHART), "--strict", "--namespace", "fleet"]
    if values is not None:
        args += ["-f", str(values)]
    proc = helm(*args)
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_every_object_is_named_and_labelled_from_the_helpers(values):
    docs = render(values)
    assert docs
    for doc in docs:
        meta = doc["metadata"]
        where = f"{doc['kind']}/{meta['name']}"
        if doc["kind"] == "APIService":  # Kubernetes fixes its name: <version>.<group>
            assert meta["name"] == "v1alpha1.logs.vmfleet.io", where
        else:
            assert meta["name"].startswith("rel-vmfleet"), where
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "vmfleet", where
        assert labels["app.kubernetes.io/instance"] == "rel", where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["helm.sh/chart"] == "vmfleet-0.2.0", where
        assert "app.kubernetes.io/component" in labels, where
        if doc["kind"] in ("Deployment",):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert "helm.sh/chart" not in selector and "app.kubernetes.io/version" not in selector
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()


def test_default_objects():
    docs = render()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == sorted([
        "ClusterRole/rel-vmfleet-cluster-reader",
        "ClusterRoleBinding/rel-vmfleet-cluster-reader",
        "Deployment/rel-vmfleet-broker",
        "Deployment/rel-vmfleet-controller",
        "Lease/rel-vmfleet-controller",
        "PodDisruptionBudget/rel-vmfleet-controller",
        "NetworkPolicy/rel-vmfleet-broker",
        "Role/rel-vmfleet-controller",
        "Role/rel-vmfleet-controller-leader",
        "Role/rel-vmfleet-transfer-worker",
        "Role/rel-vmfleet-verify-key",
        "RoleBinding/rel-vmfleet-controller",
        "RoleBinding/rel-vmfleet-controller-leader",
        "RoleBinding/rel-vmfleet-transfer-worker",
        "RoleBinding/rel-vmfleet-verify-key",
        "Secret/rel-vmfleet-signing-key",
        "Secret/rel-vmfleet-broker",  # the release namespace's own workers'
        "Secret/rel-vmfleet-broker-acl",
        "Secret/rel-vmfleet-broker-controller",
        "Secret/rel-vmfleet-broker-transfers",
        "Service/rel-vmfleet-broker",
        "Service/rel-vmfleet-controller",
        "Service/rel-vmfleet-worker-metrics",
        "ServiceAccount/rel-vmfleet-controller",
        "ServiceAccount/rel-vmfleet-transfer-worker",
        "ValidatingAdmissionPolicy/rel-vmfleet-controller-fence",
        "ValidatingAdmissionPolicyBinding/rel-vmfleet-controller-fence",
    ])
    # Off by default: prometheus-operator kinds and the dashboard.
    assert not find(docs, "ServiceMonitor") and not find(docs, "PrometheusRule")
    assert not find(docs, "ConfigMap")


def test_only_the_controller_mounts_the_signing_key():
    docs = render()
    (secret,) = find(docs, "Secret", "rel-vmfleet-signing-key")
    pem = base64.b64decode(secret["data"]["signing.key"])
    from vmfleet.api.signing import load_private_key
    load_private_key(pem)  # an Ed25519 key the controller can load
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    mounting = [d["metadata"]["name"] for d in find(docs, "Deployment")
                if any((v.get("secret") or {}).get("secretName") == "rel-vmfleet-signing-key"
                       for v in d["spec"]["template"]["spec"].get("volumes") or [])]
    assert mounting == ["rel-vmfleet-controller"]
    (controller,) = find(docs, "Deployment", "rel-vmfleet-controller")
    env = {e["name"]: e.get("value") for e in
           controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VMFLEET_SIGNING_KEY_FILE"] == "/var/run/secrets/vmfleet.io/signing/signing.key"
    assert env["VMFLEET_VERIFY_KEY_CONFIGMAP"] == "rel-vmfleet-verify-key"
    (role,) = find(docs, "Role", "rel-vmfleet-verify-key")
    assert {"apiGroups": [""], "resources": ["configmaps"],
            "resourceNames": ["rel-vmfleet-verify-key"], "verbs": ["get", "patch"]} in role["rules"]
    # A key of the user's: nothing generated, their Secret mounted.
    docs = render(None, "signing.existingSecret=my-key")
    assert not find(docs, "Secret", "rel-vmfleet-signing-key")
    (controller,) = find(docs, "Deployment", "rel-vmfleet-controller")
    volumes = controller["spec"]["template"]["spec"]["volumes"]
    assert any((v.get("secret") or {}).get("secretName") == "my-key" for v in volumes)


def test_the_lease_is_created_by_the_chart_and_the_controller_may_only_renew_it():
    docs = render()
    (lease,) = find(docs, "Lease", "rel-vmfleet-controller", "fleet")
    assert lease["spec"] == {}
    (role,) = find(docs, "Role", "rel-vmfleet-controller-leader", "fleet")
    assert rules_of(role) == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "resourceNames": ["rel-vmfleet-controller"],
                               "verbs": ["get", "update"]}]
    (binding,) = find(docs, "RoleBinding", "rel-vmfleet-controller-leader", "fleet")
    assert binding["subjects"][0]["name"] == "rel-vmfleet-controller"
    for doc in find(docs, "Role") + find(docs, "ClusterRole"):  # nobody creates Leases
        assert not any("leases" in r["resources"] and "create" in r["verbs"] for r in rules_of(doc))


def test_the_controller_may_apply_worker_budgets_and_nothing_more_of_policy():
    (role,) = find(render(), "Role", "rel-vmfleet-controller", "fleet")
    policy = [r for r in rules_of(role) if "policy" in r["apiGroups"]]
    assert policy == [{"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
                       "verbs": ["get", "create", "patch"]}]


def test_broker_persistence_is_a_statefulset_with_a_claim():
    docs = render(None, "broker.bundled.persistence.enabled=true",
                  "broker.bundled.persistence.storageClassName=local")
    assert not find(docs, "Deployment", "rel-vmfleet-broker")
    (sts,) = find(docs, "StatefulSet", "rel-vmfleet-broker", "fleet")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == "rel-vmfleet-broker"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                             "resources": {"requests": {"storage": "1Gi"}}}
    pod = sts["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["acl"]  # /data is the claim, not an emptyDir
    args = pod["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    (default,) = find(render(), "Deployment", "rel-vmfleet-broker")
    assert default["spec"]["strategy"] == {"type": "Recreate"}  # no two writers
    assert default["spec"]["template"]["spec"]["volumes"][0] == {"name": "data", "emptyDir": {}}


def test_every_container_has_distinct_probes_and_bounded_memory_and_storage():
    for deploy in find(render(), "Deployment"):
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        where = deploy["metadata"]["name"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert {"memory", "ephemeral-storage"} <= limits.keys(), where
        assert {"memory", "ephemeral-storage"} <= requests.keys(), where
        assert container["readinessProbe"] and container["livenessProbe"], where
        if where not in ("rel-vmfleet-broker", "rel-vmfleet-output-store"):  # TCP checks (Redis)
            assert container["readinessProbe"] != container["livenessProbe"], where


def test_the_controller_pdb_keeps_one_replica_and_only_with_several():
    (pdb,) = find(render(), "PodDisruptionBudget", "rel-vmfleet-controller")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    single = render(None, "controller.replicas=1")
    assert not find(single, "PodDisruptionBudget")
    (deploy,) = find(single, "Deployment", "rel-vmfleet-controller")
    assert "affinity" not in deploy["spec"]["template"]["spec"]


def test_controller_deployment():
    docs = render()
    (deploy,) = find(docs, "Deployment", "rel-vmfleet-controller")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert pod["serviceAccountName"] == "rel-vmfleet-controller"
    assert container["command"] == ["vmfleet", "controller"]
    assert "--standalone" in container["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert "--namespace=fleet" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9807, "health": 8080, "ready": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ready"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a large fleet's start
    env = {e["name"]: e for e in container["env"]}
    assert env["VMFLEET_HEALTH_PORT"]["value"] == "8081"
    assert env["VMFLEET_LEADER_ELECTION"]["value"] == "true"
    assert env["VMFLEET_LEADER_ELECTION_NAMESPACE"]["value"] == "fleet"
    assert env["VMFLEET_LEADER_ELECTION_NAME"]["value"] == "rel-vmfleet-controller"
    assert [env[f"VMFLEET_{k}_SECONDS"]["value"] for k in ("LEASE_DURATION", "RENEW_DEADLINE",
                                                            "RETRY_PERIOD")] == ["15", "10", "2"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    # The new revision's pods avoid each other, not the old ones (a rollout would stack them).
    assert anti[0]["podAffinityTerm"]["matchLabelKeys"] == ["pod-template-hash"]
    assert env["VMFLEET_BROKER_URL"] == {"name": "VMFLEET_BROKER_URL", "valueFrom": {
        "secretKeyRef": {"name": "rel-vmfleet-broker-controller", "key": "url"}}}
    assert env["VMFLEET_BROKER_SECRET_NAME"]["value"] == "rel-vmfleet-broker"
    assert env["VMFLEET_BROKER_SECRET_KEY"]["value"] == "url"
    assert env["VMFLEET_WORKER_RUNTIME"]["value"] == "Deployment"
    assert env["VMFLEET_WORKER_IMAGE"]["value"] == container["image"] == "vmfleet:0.1.0"
    assert "VMFLEET_WORKER_SERVICE_ACCOUNT" not in env  # worker pods hold no API credentials
    assert env["VMFLEET_METRICS_PORT"]["value"] == "9807"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_transfer_workers_are_the_controllers_and_run_as_the_namespaces_account():
    """No shared transfer worker: the controller runs one per namespace (its Deployment
    ``vmfleet-transfers``), as the ServiceAccount the chart made in that namespace."""
    docs = render()
    assert [d["metadata"]["name"] for d in find(docs, "Deployment")] == [
        "rel-vmfleet-broker", "rel-vmfleet-controller"]
    (controller,) = find(docs, "Deployment", "rel-vmfleet-controller")
    env = {e["name"]: e.get("value") for e in
           controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VMFLEET_TRANSFER_SERVICE_ACCOUNT"] == "rel-vmfleet-transfer-worker"
    assert find(docs, "ServiceAccount", "rel-vmfleet-transfer-worker", "fleet")
    (binding,) = find(docs, "RoleBinding", "rel-vmfleet-transfer-worker", "fleet")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-vmfleet-transfer-worker",
                                    "namespace": "fleet"}]
    assert binding["roleRef"]["name"] == "rel-vmfleet-transfer-worker"
    docs = render(None, "transferWorker.enabled=false")
    assert not find(docs, "ServiceAccount", "rel-vmfleet-transfer-worker")
    (controller,) = find(docs, "Deployment", "rel-vmfleet-controller")
    names = {e["name"] for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "VMFLEET_TRANSFER_SERVICE_ACCOUNT" not in names


CONTROLLER_RULES = {
    ("vmfleet.io", "remotevms"): {"get", "list", "watch", "patch"},
    ("vmfleet.io", "remotecommands"): {"get", "list", "watch", "patch", "delete", "create"},
    ("vmfleet.io", "remotevms/status"): {"patch"},
    ("vmfleet.io", "remotecommands/status"): {"patch"},
    # RemoteCronCommands (schedules), RemoteCommandTemplates, worker PodDisruptionBudgets
    ("vmfleet.io", "remotecroncommands"): {"get", "list", "watch"},
    ("vmfleet.io", "remotecroncommands/status"): {"patch"},
    ("vmfleet.io", "remotecommandtemplates"): {"get"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch"},
    ("", "events"): {"create"},
    ("", "configmaps"): {"get"},
}


def verbs(doc: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for rule in rules_of(doc):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return found


def test_the_controller_holds_only_the_verbs_its_code_uses():
    """No Deployment update or delete (RemoteVMs own the Deployments), no Event patch, no
    events.k8s.io: each verb left is one a call in controller/ (or kopf's watch) makes."""
    (role,) = find(render(), "Role", "rel-vmfleet-controller")
    assert verbs(role) == {**CONTROLLER_RULES, ("apps", "deployments"): {"list", "watch", "create", "patch"}}


def test_vm_workers_get_no_account_or_role_and_the_controller_reads_no_secret():
    docs = render()
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert not find(docs, kind, "rel-vmfleet-worker")  # their pods mount no token
    (controller,) = find(docs, "Role", "rel-vmfleet-controller")
    assert all("secrets" not in r["resources"] and "pods" not in r["resources"]
               for r in rules_of(controller))
    (transfer,) = find(docs, "Role", "rel-vmfleet-transfer-worker")
    assert verbs(transfer) == {("", "secrets"): {"get"}, ("", "configmaps"): {"get"}}


def test_cluster_wide_and_several_namespaces():
    docs = render(CHART / "ci" / "clusterwide-values.yaml")
    (deploy,) = find(docs, "Deployment", "rel-vmfleet-controller")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not [a for a in args if a.startswith("--namespace")]
    (cluster_role,) = find(docs, "ClusterRole", "rel-vmfleet-controller")
    assert find(docs, "ClusterRoleBinding", "rel-vmfleet-controller")
    # Cluster-wide it reads and watches; it writes Deployments only where workers may run.
    assert verbs(cluster_role) == {**CONTROLLER_RULES, ("apps", "deployments"): {"list", "watch"}}
    assert sorted(d["metadata"]["namespace"] for d in find(docs, "Role", "rel-vmfleet-controller")) \
        == ["vmfleet-ci-a", "vmfleet-ci-b"]
    for ns in ("vmfleet-ci-a", "vmfleet-ci-b"):
        (role,) = find(docs, "Role", "rel-vmfleet-controller", ns)
        assert verbs(role) == {("apps", "deployments"): {"create", "patch"}}
        (binding,) = find(docs, "RoleBinding", "rel-vmfleet-controller", ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "rel-vmfleet-controller"}
        assert not find(docs, "ServiceAccount", "rel-vmfleet-worker", ns)
        assert not find(docs, "Role", "rel-vmfleet-worker", ns)
        (transfer,) = find(docs, "Role", "rel-vmfleet-transfer-worker", ns)
        (secrets,) = [r for r in rules_of(transfer) if "secrets" in r["resources"]]
        assert secrets["resourceNames"] == ["vm1-ssh", "vm2-ssh"]


def test_external_broker_from_a_secret():
    docs = render(CHART / "ci" / "external-broker-values.yaml")
    assert not find(docs, "Deployment", "rel-vmfleet-broker")
    assert not find(docs, "ServiceAccount", "rel-vmfleet-transfer-worker")
    (deploy,) = find(docs, "Deployment", "rel-vmfleet-controller")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["VMFLEET_BROKER_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "vmfleet-broker", "key": "url"}}
    assert env["VMFLEET_BROKER_SECRET_NAME"]["value"] == "vmfleet-broker"
    assert env["VMFLEET_BROKER_SECRET_KEY"]["value"] == "url"
    assert container["image"] == "registry.example.com/platform/vmfleet:0.1.0"


def acl_users(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    (acl,) = find(docs, "Secret", "rel-vmfleet-broker-acl")
    users = {}
    for line in acl["stringData"]["users.acl"].splitlines():
        words = line.split()
        users[words[1]] = words[2:]
    return users


def test_the_bundled_broker_asks_who_is_there_and_each_namespace_has_its_own_user():
    from vmfleet import tenancy

    docs = render(None, "watchNamespaces={team-a,team-b}")
    users = acl_users(docs)
    # Off, yet allowed what the append-only file replays as it (tenancy.DEFAULT_USER_ACL).
    assert ["user", "default", *users["default"]] == tenancy.DEFAULT_USER_ACL.split()
    assert set(users) == {"default", "vmfleet-controller", "vmfleet-transfers",
                          "vmfleet-ns-team-a", "vmfleet-ns-team-b"}
    # The rules are vmfleet/tenancy.py's, word for word.
    assert users["vmfleet-controller"][2:] == tenancy.controller_rules(provision=False)
    assert users["vmfleet-transfers"][2:] == tenancy.transfers_rules()
    for ns in ("team-a", "team-b"):
        rules = users[f"vmfleet-ns-{ns}"]
        assert rules[0] == "on" and rules[2:] == tenancy.namespace_rules(ns)
        (secret,) = find(docs, "Secret", "rel-vmfleet-broker", ns)
        password = secret["stringData"]["password"]
        assert len(password) >= 32
        assert rules[1] == tenancy.password_hash(password)  # the Secret's is the ACL's
        assert secret["stringData"]["url"] == (
            f"redis://vmfleet-ns-{ns}:{password}@rel-vmfleet-broker.fleet.svc:6379/0")
        assert password not in repr(acl_users(docs))  # hashed in the ACL file
    passwords = {find(docs, "Secret", "rel-vmfleet-broker", ns)[0]["stringData"]["password"]
                 for ns in ("team-a", "team-b")}
    assert len(passwords) == 2
    (controller,) = find(docs, "Secret", "rel-vmfleet-broker-controller")
    assert users["vmfleet-controller"][1] == tenancy.password_hash(
        controller["stringData"]["password"])
    # The Redis loads that file, with maxmemory and noeviction, and restarts when it changes.
    (redis,) = find(docs, "Deployment", "rel-vmfleet-broker")
    pod = redis["spec"]["template"]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--aclfile") + 1] == "/var/run/vmfleet.io/broker-acl/users.acl"
    assert args[args.index("--maxmemory") + 1] == "256mb"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert {"name": "acl", "secret": {"secretName": "rel-vmfleet-broker-acl",
                                      "defaultMode": 0o440}} in pod["spec"]["volumes"]
    assert pod["metadata"]["annotations"]["checksum/acl"]
    other = render(None, "watchNamespaces={team-a}")
    (redis2,) = find(other, "Deployment", "rel-vmfleet-broker")
    assert redis2["spec"]["template"]["metadata"]["annotations"]["checksum/acl"] != \
        pod["metadata"]["annotations"]["checksum/acl"]


def test_no_connection_string_is_a_literal_value_in_any_pod():
    for values in VALUE_SETS:
        for doc in render(values):
            if doc["kind"] != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    value = str(env.get("value", ""))
                    assert "redis://" not in value and "amqp://" not in value, (
                        doc["metadata"]["name"], env)
                    if env["name"] in ("VMFLEET_BROKER_URL", "VMFLEET_STATE_URL"):
                        assert "secretKeyRef" in env["valueFrom"], (doc["metadata"]["name"], env)


def test_the_broker_port_admits_vmfleet_s_own_pods_only():
    docs = render(None, "watchNamespaces={team-a,team-b}")
    (policy,) = find(docs, "NetworkPolicy", "rel-vmfleet-broker")
    spec = policy["spec"]
    (redis,) = find(docs, "Deployment", "rel-vmfleet-broker")
    assert spec["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    ours, workers = rule["from"]
    assert ours == {"podSelector": {"matchExpressions": [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": ["vmfleet"]},
        {"key": "app.kubernetes.io/instance", "operator": "In", "values": ["rel"]},
        {"key": "app.kubernetes.io/component", "operator": "In",
         "values": ["controller", "transfer-worker"]}]}}
    assert workers["namespaceSelector"] == {"matchExpressions": [{
        "key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]}
    # The labels the controller puts on worker pods (controller/runtime.py).
    from controller.runtime import VMRef, single, worker_labels
    from vmfleet.api.models import RemoteVMSpec

    spec_ = RemoteVMSpec.model_validate({"host": "h", "user": "u",
                                         "credentialsSecretRef": {"name": "s"}})
    labels = worker_labels(single(VMRef("team-a", "vm1", "uid", spec_)))
    assert workers["podSelector"]["matchLabels"].items() <= labels.items()
    assert not find(render(None, "networkPolicy.enabled=false"), "NetworkPolicy")
    cluster = find(render(CHART / "ci" / "clusterwide-values.yaml"), "NetworkPolicy")
    assert cluster[0]["spec"]["ingress"][0]["from"][1]["namespaceSelector"] == {}


def test_the_alert_fires_before_the_broker_is_full():
    rules = yaml.safe_load((CHART / "files" / "alerts" / "vmfleet.rules.yaml").read_text())
    (alert,) = [r for g in rules["groups"] for r in g["rules"]
                if r["alert"] == "VmfleetBrokerMemoryHigh"]
    assert alert["expr"] == "max(vmfleet_broker_memory_used_ratio) > 0.8"
    from vmfleet.metrics import METRIC_NAMES

    assert "vmfleet_broker_memory_used_ratio" in METRIC_NAMES


def test_external_broker_needs_its_secret():
    proc = helm("template", "rel", str(CHART), "--set", "broker.bundled.enabled=false", check=False)
    assert proc.returncode != 0
    assert "broker.external.existingSecret is required" in proc.stderr


@pytest.mark.parametrize("setting, message", [
    ("image.pullPolicy=Sometimes", "value must be one of"),
    ("metrics.controllerPort=0", "minimum"),
    ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
    ("unknownKey=1", "additional properties"),
])
def test_schema_rejects_bad_values(setting, message):
    proc = helm("template", "rel", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_monitoring_objects():
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    (rule,) = find(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files/alerts/vmfleet.rules.yaml").read_text())
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"VmfleetVMDown", "VmfleetCommandFailureRatioHigh", "VmfleetQueueBacklogGrowing",
            "VmfleetWorkerReplicasNotReady", "VmfleetHostKeyMismatch"} <= alerts
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    services = [d for d in find(docs, "Service")
                if d["metadata"]["labels"].get("vmfleet.io/metrics") == "true"]
    assert {s["metadata"]["name"] for s in services} == {
        "rel-vmfleet-controller", "rel-vmfleet-worker-metrics"}
    for service in services:
        assert service["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    (dashboard,) = find(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["vmfleet.json"]) == json.loads(
        (CHART / "files/dashboards/vmfleet.json").read_text())


def test_worker_metrics_service_selects_the_controllers_worker_pods():
    from controller.runtime import VMRef, WorkerGroup, transfer_group, worker_labels
    from vmfleet.api.models import RemoteVMSpec

    spec = RemoteVMSpec.model_validate({"host": "h", "user": "u",
                                        "credentialsSecretRef": {"name": "s"}, "hostKeys": ["k"]})
    vm = VMRef("fleet", "vm1", "u1", spec)
    (service,) = find(render(), "Service", "rel-vmfleet-worker-metrics")
    for group in (WorkerGroup("fleet", [vm]), WorkerGroup("fleet", [vm], pool="web"),
                  transfer_group("fleet", [vm])):
        assert service["spec"]["selector"].items() <= worker_labels(group).items()
    assert service["spec"]["ports"][0]["targetPort"] == 9808


def test_every_value_is_documented():
    """prometheus-community style: each value (or the section holding it) has a `# --` comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    entries: list[tuple[int, str, bool]] = []  # (indent, path, documented)
    comment: list[str] = []
    stack: list[tuple[int, str]] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            if not stripped:
                comment = []
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([p for _, p in stack] + [match.group(2)])
        stack.append((indent, match.group(2)))
        entries.append((indent, path, any(c.startswith("# --") for c in comment)))
        comment = []

    def ok(path: str, documented: bool) -> bool:
        if documented or any(p.startswith(path + ".") and d for _, p, d in entries if p == path):
            return True
        children = [(p, d) for _, p, d in entries if p.startswith(path + ".")
                    and "." not in p[len(path) + 1:]]
        return bool(children) and all(ok(p, d) for p, d in children)

    undocumented = [p for indent, p, d in entries if indent == 0 and not ok(p, d)]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {p for i, p, _ in entries if i == 0} == set(values)


def test_chart_crds_are_the_generated_ones():
    for path in sorted((REPO / "crds").glob("*.yaml")):
        assert (CHART / "crds" / path.name).read_text() == path.read_text(), path.name


def test_the_queue_policy_refuses_a_remotevm_queue_outside_its_namespace() -> None:
    """Rendered where the cluster serves ValidatingAdmissionPolicy (>= 1.30)."""
    out = helm("template", "rel", str(CHART), "--namespace", "fleet", "--api-versions",
               "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (policy,) = find(docs, "ValidatingAdmissionPolicy", "rel-vmfleet-remotevm-queue")
    (binding,) = find(docs, "ValidatingAdmissionPolicyBinding", "rel-vmfleet-remotevm-queue")
    assert binding["spec"] == {"policyName": "rel-vmfleet-remotevm-queue",
                               "validationActions": ["Deny"]}
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["remotevms"]
    (rule,) = policy["spec"]["validations"]
    assert "'^vmfleet[.]' + request.namespace + '[.][^:]+$'" in rule["expression"]
    off = helm("template", "rel", str(CHART), "--set", "remoteVMQueuePolicy.enabled=false",
               "--api-versions", "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy").stdout
    assert "rel-vmfleet-remotevm-queue" not in off


def test_output_store_and_output_api():
    """The output store is a Redis of its own that evicts (never the broker), reached with
    the broker's users; the output API is an APIService to the controller with a serving
    certificate its caBundle verifies, the controller may review access, and view/edit/admin
    may ask for remotecommands/log."""
    from cryptography import x509

    docs = render(CHART / "ci" / "logs-values.yaml")
    assert not find(render(), "APIService")  # off by default: cluster-wide, one release
    kinds = {f"{d['kind']}/{d['metadata']['name']}" for d in docs} - {
        f"{d['kind']}/{d['metadata']['name']}" for d in render()}
    assert kinds == {
        "Deployment/rel-vmfleet-output-store", "Service/rel-vmfleet-output-store",
        "NetworkPolicy/rel-vmfleet-output-store", "Secret/rel-vmfleet-logs-api",
        "Service/rel-vmfleet-logs-api", "APIService/v1alpha1.logs.vmfleet.io",
        "ClusterRole/rel-vmfleet-logs-api-fleet", "ClusterRoleBinding/rel-vmfleet-logs-api-fleet",
        "RoleBinding/rel-vmfleet-logs-api-fleet", "ClusterRole/rel-vmfleet-logs-api-fleet-view",
        "ClusterRole/rel-vmfleet-logs-api-fleet-edit", "ClusterRole/rel-vmfleet-logs-api-fleet-admin"}
    (store,) = find(docs, "Deployment", "rel-vmfleet-output-store")
    (redis,) = store["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert args[args.index("--maxmemory") + 1] == "256mb"
    assert args[args.index("--aclfile") + 1] == "/var/run/vmfleet.io/broker-acl/users.acl"
    (broker,) = find(docs, "Deployment", "rel-vmfleet-broker")
    (broker_redis,) = broker["spec"]["template"]["spec"]["containers"]
    assert broker_redis["args"][broker_redis["args"].index("--maxmemory-policy") + 1] == "noeviction"
    (ns_secret,) = find(docs, "Secret", "rel-vmfleet-broker", "fleet")
    assert ns_secret["stringData"]["output-url"].startswith(
        "redis://vmfleet-ns-fleet:") and "@rel-vmfleet-output-store.fleet.svc:6379/0" in \
        ns_secret["stringData"]["output-url"]
    (policy,) = find(docs, "NetworkPolicy", "rel-vmfleet-output-store")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "output-store"

    (deploy,) = find(docs, "Deployment", "rel-vmfleet-controller")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["VMFLEET_OUTPUT_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-vmfleet-broker-controller", "key": "output-url"}
    assert env["VMFLEET_LOGS_API_PORT"]["value"] == "8443"
    (api,) = find(docs, "APIService", "v1alpha1.logs.vmfleet.io")
    assert api["spec"]["service"] == {"name": "rel-vmfleet-logs-api", "namespace": "fleet",
                                      "port": 443}
    (secret,) = find(docs, "Secret", "rel-vmfleet-logs-api")
    ca = x509.load_pem_x509_certificate(base64.b64decode(api["spec"]["caBundle"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert cert.issuer == ca.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "rel-vmfleet-logs-api.fleet.svc" in names.get_values_for_type(x509.DNSName)
    (service,) = find(docs, "Service", "rel-vmfleet-logs-api")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "controller"
    (review,) = find(docs, "ClusterRole", "rel-vmfleet-logs-api-fleet")
    assert rules_of(review) == [{"apiGroups": ["authorization.k8s.io"],
                                 "resources": ["subjectaccessreviews"], "verbs": ["create"]}]
    (reader,) = find(docs, "RoleBinding", "rel-vmfleet-logs-api-fleet", "kube-system")
    assert reader["roleRef"]["name"] == "extension-apiserver-authentication-reader"
    for role in ("view", "edit", "admin"):
        (aggregated,) = find(docs, "ClusterRole", f"rel-vmfleet-logs-api-fleet-{role}")
        assert aggregated["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{role}"] == "true"
        assert rules_of(aggregated) == [{"apiGroups": ["logs.vmfleet.io"],
                                         "resources": ["remotecommands/log"], "verbs": ["get"]}]

    off = render()
    assert not find(off, "APIService") and not find(off, "Deployment", "rel-vmfleet-output-store")
    (deploy,) = find(off, "Deployment", "rel-vmfleet-controller")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert not {"VMFLEET_OUTPUT_URL", "VMFLEET_LOGS_API_PORT"} & {e["name"] for e in container["env"]}
