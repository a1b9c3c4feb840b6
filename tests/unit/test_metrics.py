"""vmfleet.metrics: the names the README lists, bounded labels, and what each helper records."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from vmfleet import metrics
from vmfleet.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ALLOWED_LABELS = {"namespace", "vm", "result", "reason", "queue", "kind", "state", "le"}


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def unique() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def exported_families() -> dict[str, set[str]]:
    """Metric family name -> label names, from the process registry."""
    families: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if family.name.startswith("vmfleet_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            families[name] = {label for s in family.samples for label in s.labels}
    return families


def test_metric_names_are_the_contracts():
    assert len(set(metrics.METRIC_NAMES)) == 18
    # The README's metrics paragraph is the contract users read: the same names, no more.
    section = README.read_text().split("**Metrics.**", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"vmfleet_[a-z0-9_]+", section)) == set(metrics.METRIC_NAMES)
    metrics.register_queue_depth(lambda queues: {q: 0 for q in queues})
    metrics.register_broker_memory(lambda: {"used_memory": 1, "maxmemory": 4})
    text = generate_latest(REGISTRY).decode()
    declared = set(re.findall(r"^# TYPE (vmfleet_[a-z0-9_]+) ", text, re.M))
    assert declared == set(metrics.METRIC_NAMES)


def test_labels_are_bounded():
    ns, vm = unique(), unique()
    metrics.command_finished(ns, vm, "Succeeded", "Completed", 0.0)
    metrics.observe_workers(ns, vm, {"replicas": 1, "readyReplicas": 1, "queue": "q"})
    for name, labels in exported_families().items():
        assert labels <= ALLOWED_LABELS, f"{name} has unbounded labels {labels - ALLOWED_LABELS}"


def test_command_finished_counts_by_result_and_reason_and_times_it():
    ns = unique()
    started = metrics.command_claimed("")
    metrics.command_finished(ns, "vm1", "Succeeded", "Completed", started)
    metrics.command_finished(ns, "vm1", "Failed", "ExitCode", started)
    metrics.command_finished(ns, "vm1", "Failed", "ExitCode", started)
    assert value("vmfleet_commands_total", namespace=ns, vm="vm1", result="Succeeded",
                 reason="Completed") == 1
    assert value("vmfleet_commands_total", namespace=ns, vm="vm1", result="Failed",
                 reason="ExitCode") == 2
    assert value("vmfleet_command_duration_seconds_count", namespace=ns, vm="vm1") == 3


@pytest.mark.parametrize("dispatch, observed", [
    (timedelta(seconds=2), 2.0),
    (timedelta(seconds=-5), 0.0),  # clock skew: never negative
])
def test_queue_wait_from_the_envelopes_dispatch_time(dispatch, observed):
    before_count = value("vmfleet_command_queue_wait_seconds_count") or 0
    before_sum = value("vmfleet_command_queue_wait_seconds_sum") or 0
    sent = (datetime.now(UTC) - dispatch).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    metrics.command_claimed(sent)
    assert value("vmfleet_command_queue_wait_seconds_count") == before_count + 1
    assert value("vmfleet_command_queue_wait_seconds_sum") - before_sum == pytest.approx(observed, abs=0.5)


def test_unparsable_dispatch_time_is_not_observed():
    before = value("vmfleet_command_queue_wait_seconds_count") or 0
    metrics.command_claimed("yesterday")
    assert (value("vmfleet_command_queue_wait_seconds_count") or 0) == before


def test_ssh_connecting_times_success_and_counts_errors_by_kind():
    class HostKeyMismatch(Exception):
        pass

    ok_before = value("vmfleet_ssh_connect_seconds_count") or 0
    err_before = value("vmfleet_ssh_errors_total", kind="HostKeyMismatch") or 0
    with metrics.ssh_connecting():
        pass
    with pytest.raises(HostKeyMismatch), metrics.ssh_connecting():
        raise HostKeyMismatch("nope")
    assert value("vmfleet_ssh_connect_seconds_count") == ok_before + 1
    assert value("vmfleet_ssh_errors_total", kind="HostKeyMismatch") == err_before + 1


def test_open_connections_sum_over_live_pools():
    class Pool:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    before = value("vmfleet_ssh_connections_open") or 0
    a, b = Pool(2), Pool(3)
    metrics.track_pool(a)
    metrics.track_pool(b)
    assert value("vmfleet_ssh_connections_open") == before + 5
    del b
    import gc

    gc.collect()
    assert value("vmfleet_ssh_connections_open") == before + 2


def test_counts_errors_counts_and_reraises():
    kind = unique()

    @metrics.counts_errors(kind)
    def handler(fail: bool) -> str:
        if fail:
            raise RuntimeError("boom")
        return "ok"

    assert handler(False) == "ok"
    with pytest.raises(RuntimeError):
        handler(True)
    assert value("vmfleet_reconcile_errors_total", kind=kind) == 1
    assert handler.__name__ == "handler"  # kopf derives handler ids from the name


def vm_body(ns: str, name: str, **status: object) -> dict[str, object]:
    return {"metadata": {"namespace": ns, "name": name}, "spec": {"host": "h", "user": "u"},
            "status": status}


def test_observe_vm_records_reachability_and_facts_then_forgets_them():
    ns = unique()
    metrics.observe_vm(vm_body(
        ns, "vm1",
        conditions=[{"type": "Reachable", "status": "True"}],
        facts={"load1": 0.5, "memoryAvailableBytes": 1024, "rootDiskTotalBytes": 100,
               "rootDiskUsedBytes": 25},
    ))
    assert value("vmfleet_vm_up", namespace=ns, vm="vm1") == 1
    assert value("vmfleet_vm_load1", namespace=ns, vm="vm1") == 0.5
    assert value("vmfleet_vm_memory_available_bytes", namespace=ns, vm="vm1") == 1024
    assert value("vmfleet_vm_root_disk_used_ratio", namespace=ns, vm="vm1") == 0.25
    assert f"vmfleet.{ns}.vm1" in metrics.watched_queues()

    metrics.observe_vm(vm_body(ns, "vm1", conditions=[{"type": "Reachable", "status": "False"}]))
    assert value("vmfleet_vm_up", namespace=ns, vm="vm1") == 0

    metrics.observe_workers(ns, "vm1", {"replicas": 2, "readyReplicas": 1})
    assert value("vmfleet_worker_replicas", namespace=ns, vm="vm1", state="desired") == 2
    assert value("vmfleet_worker_replicas", namespace=ns, vm="vm1", state="ready") == 1

    metrics.observe_vm(vm_body(ns, "vm1"), deleted=True)
    assert value("vmfleet_vm_up", namespace=ns, vm="vm1") is None
    assert value("vmfleet_worker_replicas", namespace=ns, vm="vm1", state="ready") is None
    assert f"vmfleet.{ns}.vm1" not in metrics.watched_queues()


def test_vm_without_probe_has_no_up_sample():
    ns = unique()
    metrics.observe_vm(vm_body(ns, "vm1"))
    assert value("vmfleet_vm_up", namespace=ns, vm="vm1") is None


def test_queue_depth_is_read_at_scrape_time_and_a_broken_broker_gives_no_samples():
    ns = unique()
    metrics.watch_queue(ns, "vm1", f"q-{ns}")
    registry = CollectorRegistry()
    registry.register(metrics.QueueDepthCollector(lambda qs: {q: 7 for q in qs}, ["vmfleet.transfers"]))
    assert registry.get_sample_value("vmfleet_queue_depth", {"queue": f"q-{ns}"}) == 7
    assert registry.get_sample_value("vmfleet_queue_depth", {"queue": "vmfleet.transfers"}) == 7

    def broken(queues: list[str]) -> dict[str, int]:
        raise ConnectionError("broker down")

    registry = CollectorRegistry()
    registry.register(metrics.QueueDepthCollector(broken))
    assert registry.get_sample_value("vmfleet_queue_depth", {"queue": f"q-{ns}"}) is None
    metrics.unwatch_queue(ns, "vm1")


@pytest.mark.parametrize("raw, default, expected", [
    (None, 9807, 9807), ("", 9808, 9808), ("0", 9807, 0), ("12345", 9807, 12345),
])
def test_metrics_port_from_the_environment(raw, default, expected):
    environ = {} if raw is None else {metrics.PORT_ENV: raw}
    assert metrics.metrics_port(default, Settings.from_environment(environ)) == expected


@pytest.mark.parametrize("raw", ["http", "-1", "70000"])
def test_a_bad_port_says_what_to_do(raw):
    with pytest.raises(ValueError, match="use 0 to turn metrics off"):
        Settings.from_environment({metrics.PORT_ENV: raw})


def test_address_is_loopback_outside_a_cluster():
    assert metrics.metrics_address(Settings.from_environment({})) == "127.0.0.1"
    in_cluster = Settings.from_environment({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert metrics.metrics_address(in_cluster) == "0.0.0.0"
    chosen = Settings.from_environment({metrics.ADDRESS_ENV: "127.0.0.2"})
    assert metrics.metrics_address(chosen) == "127.0.0.2"


def test_port_zero_serves_nothing():
    assert metrics.start_metrics_server(0) is None


def test_broker_memory_is_used_over_max_and_absent_without_a_limit() -> None:
    def scrape(info: dict[str, int]) -> list[float]:
        collector = metrics.BrokerMemoryCollector(lambda: info)
        return [sample.value for family in collector.collect() for sample in family.samples]

    assert scrape({"used_memory": 64, "maxmemory": 256}) == [0.25]
    assert scrape({"used_memory": 64, "maxmemory": 0}) == []  # no limit: no ratio

    def broken() -> dict[str, int]:
        raise ConnectionError("down")

    assert [s for f in metrics.BrokerMemoryCollector(broken).collect() for s in f.samples] == []
