"""Real Prometheus (Debian's package) scraping a controller and its workers during a run of
commands; the chart's alert rules loaded into it and checked with promtool; every metric
name that the dashboard and the rules use exists in a scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.chart import CHART, render
from tests.e2e.fleet import Namespace, assert_no_tracebacks, start_controller, unique_namespace
from vmfleet.dev.proc import ManagedProcess, free_port, wait_until
from vmfleet.metrics import METRIC_NAMES

pytestmark = pytest.mark.e2e

RULES = CHART / "files" / "alerts" / "vmfleet.rules.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "vmfleet.json"
SERVING = re.compile(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install-system-deps.sh (Debian package prometheus)")
    return path


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        body: bytes = response.read()
    return body.decode()


class Prometheus:
    """A Prometheus server process on a loopback port with a generated configuration."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]], rule_files: list[Path]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}]}
                for job, addresses in targets.items()
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        subprocess.run([tool("promtool"), "check", "config", str(config_path)], check=True,
                       capture_output=True, text=True)
        self.proc = ManagedProcess("prometheus", [
            tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
        ], workdir / "prometheus.log")

    def start(self) -> Prometheus:
        self.proc.start()

        def ready() -> bool:
            self.proc.check_running()
            return "Ready" in http_get(f"{self.url}/-/ready", timeout=2)

        wait_until(ready, timeout=60, interval=0.2, what="Prometheus to be ready")
        return self

    def stop(self) -> None:
        self.proc.stop(grace=10)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = json.loads(http_get(url))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def by(self, promql: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(promql)}


def names_used(text: str) -> set[str]:
    """Metric names in PromQL text, without the series suffixes of histograms."""
    names = set()
    for name in re.findall(r"\bvmfleet_[a-z0-9_]+", text):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def scraped_names(url: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(http_get(url)):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


@pytest.fixture
def metrics_namespace(kubectl, crds) -> Iterator[Namespace]:
    """A namespace outside the session controller's ``e2e-*`` pattern, for our own controller."""
    ns = Namespace(kubectl, unique_namespace("metrics")).create()
    yield ns
    ns.delete()


def test_promtool_checks_the_chart_rules(tmp_path):
    out = subprocess.run([tool("promtool"), "check", "rules", str(RULES)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {sum(1 for _ in rule_exprs())} rules found" in out.stdout
    # The PrometheusRule that the chart renders carries the same groups.
    (rule,) = [d for d in render(CHART / "ci" / "monitoring-values.yaml") if d["kind"] == "PrometheusRule"]
    rendered = tmp_path / "rendered.rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    out = subprocess.run([tool("promtool"), "check", "rules", str(rendered)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_has_the_structure_grafana_imports():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "bargauge", "gauge", "table"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip()
            assert target["datasource"]["uid"] == "${datasource}"
    # Every metric of the contract is on the dashboard, and nothing else of ours.
    used = set().union(*(names_used(e) for e in dashboard_exprs()))
    assert used == set(METRIC_NAMES)


def test_prometheus_scrapes_controller_and_workers_during_a_run(
    controlplane, metrics_namespace, redis_server, vms, make_vm, tmp_path
):
    ns = metrics_namespace
    controller_port = free_port()
    controller = start_controller(
        controlplane.kubeconfig, redis_server.url, tmp_path, [ns.name],
        extra_env={"VMFLEET_METRICS_PORT": str(controller_port)},
    )
    prometheus: Prometheus | None = None
    try:
        rekeyed = make_vm("rekeyed")
        ns.add_vms([vms[0], vms[1], rekeyed])
        rekeyed.regenerate_host_key()
        rekeyed.restart()

        # Each local worker serves its own port (the controller hands out free ones).
        def worker_ports() -> dict[str, int] | None:
            controller.check_running()
            found = {}
            for vm in ("vm1", "vm2", "rekeyed"):
                log = tmp_path / "workers" / f"{ns}.{vm}.0.log"
                match = SERVING.search(log.read_text()) if log.exists() else None
                if match is None:
                    return None
                found[vm] = int(match.group(1))
            return found

        ports = wait_until(worker_ports, timeout=60, what="the workers' metrics endpoints")
        assert len(set(ports.values()) | {controller_port}) == 4
        controller_url = f"http://127.0.0.1:{controller_port}/metrics"
        wait_until(lambda: http_get(controller_url), timeout=30, what="the controller's /metrics")

        prometheus = Prometheus(tmp_path / "prometheus", {
            "vmfleet-controller": [f"127.0.0.1:{controller_port}"],
            "vmfleet-worker": [f"127.0.0.1:{p}" for p in ports.values()],
        }, [RULES]).start()

        for i in range(3):
            ns.run(f"ok-{i}", vm="vm1", command="true")
        for i in range(2):
            ns.run(f"fail-{i}", vm="vm2", command="exit 3")
        # A VM whose host key changed: its worker refuses to connect (for a health probe or
        # for this command, whichever comes first; the command may also be held back).
        ns.run("mitm", vm="rekeyed", command="true")
        phases = {name: ns.finished(name)["status"]["phase"]
                  for name in ("ok-0", "ok-1", "ok-2", "fail-0", "fail-1")}
        assert list(phases.values()) == ["Succeeded"] * 3 + ["Failed"] * 2

        sel = f'namespace="{ns}",vm=~"vm1|vm2"'

        def counts(promql: str, label: str, expected: dict[str, float]) -> dict[str, float]:
            return wait_until(lambda: (got := prometheus.by(promql, label)) == expected and got,
                              timeout=30, interval=0.5, what=f"{promql} == {expected}")

        counts(f"sum by (result) (vmfleet_commands_total{{{sel}}})", "result",
               {"Succeeded": 3, "Failed": 2})
        counts(f"sum by (reason) (vmfleet_commands_total{{{sel}}})", "reason",
               {"Completed": 3, "ExitCode": 2})
        counts(f"sum by (vm) (vmfleet_commands_total{{{sel}}})", "vm", {"vm1": 3, "vm2": 2})
        # The duration histogram: one observation per attempt, in finite buckets.
        counts(f"sum(vmfleet_command_duration_seconds_count{{{sel}}})", "", {"": 5})
        (p99,) = prometheus.query(
            f"histogram_quantile(0.99, sum by (le) (vmfleet_command_duration_seconds_bucket{{{sel}}}))")
        assert 0 < float(p99["value"][1]) < 60
        buckets = prometheus.query(f'vmfleet_command_duration_seconds_bucket{{{sel},le="+Inf"}}')
        assert sum(float(b["value"][1]) for b in buckets) == 5
        # Queue waits, SSH connects and the host key refusal, from the workers.
        assert prometheus.by("sum(vmfleet_command_queue_wait_seconds_count)", "")[""] >= 5
        assert prometheus.by("sum(vmfleet_ssh_connect_seconds_count)", "")[""] >= 2
        assert prometheus.by("sum(vmfleet_ssh_connections_open)", "")[""] >= 2
        wait_until(lambda: prometheus.by(
            'sum(vmfleet_ssh_errors_total{kind="HostKeyMismatch"})', "").get("", 0) >= 1,
            timeout=30, interval=0.5, what="a HostKeyMismatch SSH error")
        # The controller: workers per VM and the VMs' queue depths read from Redis.
        counts(f'vmfleet_worker_replicas{{{sel},state="ready"}}', "vm", {"vm1": 1, "vm2": 1})
        counts(f'vmfleet_queue_depth{{queue=~"vmfleet\\\\.{ns}\\\\..*"}}', "queue",
               {f"vmfleet.{ns}.vm1": 0, f"vmfleet.{ns}.vm2": 0, f"vmfleet.{ns}.rekeyed": 0})
        assert prometheus.by("up", "job") == {"vmfleet-controller": 1, "vmfleet-worker": 1}
        assert len(prometheus.query("up == 1")) == 4
        # The chart's alert for a host key mismatch fires, naming the VM.
        wait_until(
            lambda: prometheus.query('ALERTS{alertname="VmfleetHostKeyMismatch",alertstate="firing"}'),
            timeout=30, interval=0.5, what="the VmfleetHostKeyMismatch alert")
        assert not prometheus.query('ALERTS{alertname="VmfleetReconcileErrors"}')

        # Every name that the dashboard and the rules use is exported by the controller or a
        # worker (renaming a metric fails here).
        exported = scraped_names(controller_url) | scraped_names(
            f"http://127.0.0.1:{ports['vm1']}/metrics")
        used = set().union(*(names_used(e) for e in dashboard_exprs() + rule_exprs()))
        assert used <= exported, f"used but not exported: {sorted(used - exported)}"
        assert set(METRIC_NAMES) <= exported
        # Labels stay bounded: no command text, output or per-command names in any series.
        series = json.loads(http_get(f"{prometheus.url}/api/v1/series?"
                                     + urllib.parse.urlencode({"match[]": '{__name__=~"vmfleet_.*"}'})))
        for labels in series["data"]:
            text = json.dumps(labels)
            assert "exit 3" not in text and "ok-0" not in text and "fail-0" not in text
        assert_no_tracebacks(tmp_path / "workers", tmp_path / "controller.log")
    finally:
        if prometheus is not None:
            prometheus.stop()
        controller.stop(grace=30)
