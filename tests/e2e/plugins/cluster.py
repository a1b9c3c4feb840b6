"""Pytest plugin: the local cluster shaped like a user's (``vmfleet.dev.cluster``): one
network namespace holding the control plane, two nodes with a pod network (CNI bridge
+ host-local), kube-proxy and CoreDNS; the host reaches the API server through a
loopback relay.

Fixtures:

* ``cluster`` (module): a started ``Cluster`` (nodes ``vmfleet-node-1`` and
  ``vmfleet-node-2`` Ready), stopped with its namespace after the module that used it
  (its two nodes do not outlive it).
* ``cluster_image`` (module): the project's image (``make image``) imported into both
  nodes' containerd; its full name.
* ``cluster_redis_image`` (module): the chart's bundled broker image made from
  Debian's redis-server (``scripts/build-redis-image.sh``), imported into both nodes.
* ``cluster_vms`` (module): ``vm1``..``vm3``, sshd VMs inside the cluster's namespace on
  10.251.0.11..13 port 22, which pods reach by routing.

Skipped, with the reason, where the cluster cannot run (not root, no socat...). The
binaries and the image are built before the first test runs. Marked ``e2e``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfleet.dev import netns
from vmfleet.dev.cluster import Cluster, build_redis_image, ensure_coredns_built
from vmfleet.dev.controlplane import ensure_built
from vmfleet.dev.node import build_image, image_name, missing_requirements
from vmfleet.dev.sshd import SshdVM, stop_vms

_FIXTURES = {"cluster", "cluster_image", "cluster_redis_image", "cluster_vms"}
_archive: Path | None = None
_redis_archive: Path | None = None
_build_error: BaseException | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    global _archive, _redis_archive, _build_error
    if session.config.option.collectonly:
        return
    if not any(_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    if missing_requirements() or netns.missing_requirements():
        return
    try:
        ensure_built()
        ensure_coredns_built()
        _archive = build_image()
        if any("cluster_redis_image" in getattr(item, "fixturenames", ()) for item in session.items):
            _redis_archive = build_redis_image()
    except Exception as exc:  # noqa: BLE001 - reported by the fixture, per test
        _build_error = exc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = missing_requirements() + netns.missing_requirements()
    if missing:
        pytest.skip("the pod-network cluster cannot run here: " + "; ".join(missing))
    if _build_error is not None:
        raise RuntimeError(f"building the cluster's parts failed: {_build_error}") from _build_error
    started = Cluster(tmp_path_factory.mktemp("cluster"), exit_with_parent=True).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def cluster_image(cluster: Cluster) -> str:
    archive = _archive or build_image()
    for node in cluster.nodes:
        node.import_image(archive)
    return image_name(archive)


@pytest.fixture(scope="module")
def cluster_redis_image(cluster: Cluster) -> str:
    archive = _redis_archive or build_redis_image()
    for node in cluster.nodes:
        node.import_image(archive)
    return image_name(archive)


@pytest.fixture(scope="module")
def cluster_vms(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SshdVM]]:
    root = tmp_path_factory.mktemp("cluster-vms")
    vms: list[SshdVM] = []
    try:
        for i in (1, 2, 3):
            vm = SshdVM(f"vm{i}", root / f"vm{i}", address=netns.vm_ip(i), network=cluster.network)
            vms.append(vm)
            vm.start()
        yield vms
    finally:
        stop_vms(vms)
