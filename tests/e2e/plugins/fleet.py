"""Fixtures for vmfleet e2e tests: CRDs installed, a controller running, a namespace (the
session's); namespaces of a test's own, a directory every VM sees, an output store."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import REPO, Kubectl, Namespace, apply_crds, start_controller, unique_namespace
from vmfleet.dev.brokers import RedisServer, output_store
from vmfleet.dev.proc import ManagedProcess

E2E_PREFIX = "e2e"
# The namespaces the session's controller watches (its scope in Redis derives from them).
CONTROLLER_NAMESPACES = [f"{E2E_PREFIX}-*"]


@pytest.fixture(scope="session")
def kubectl(controlplane) -> Kubectl:  # type: ignore[no-untyped-def]
    return Kubectl(controlplane.kubectl, controlplane.kubeconfig)


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    apply_crds(kubectl)


@pytest.fixture(scope="session")
def controller_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controller")


@pytest.fixture(scope="session")
def controller(controlplane, redis_server, crds, controller_dir: Path) -> Iterator[ManagedProcess]:  # type: ignore[no-untyped-def]
    """The controller with the Process runtime and Redis, for namespaces ``e2e-*``."""
    proc = start_controller(controlplane.kubeconfig, redis_server.url, controller_dir,
                            CONTROLLER_NAMESPACES)
    yield proc
    proc.stop(grace=30)


@pytest.fixture
def ns(kubectl: Kubectl, controller: ManagedProcess) -> Iterator[Namespace]:
    namespace = Namespace(kubectl, unique_namespace(E2E_PREFIX)).create()
    yield namespace
    controller.check_running()
    namespace.delete()


@pytest.fixture
def own_ns(request: pytest.FixtureRequest, kubectl: Kubectl, crds: None) -> Iterator[Callable[[], Namespace]]:
    """Namespaces made on demand (``own_ns()``) for a test that runs a controller of its own,
    named ``<OWN_NS_PREFIX of the test module, else "flt">-…``; deleted at the end."""
    prefix = getattr(request.module, "OWN_NS_PREFIX", "flt")
    namespaces: list[Namespace] = []

    def make() -> Namespace:
        ns = Namespace(kubectl, unique_namespace(prefix)).create()
        namespaces.append(ns)
        return ns

    yield make
    for ns in namespaces:
        ns.delete()


@pytest.fixture
def shared_dir():  # type: ignore[no-untyped-def]
    """A directory every VM sees at the same path (outside the VMs' private /tmp)."""
    path = REPO / ".vmfleet" / "e2e-shared" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


@pytest.fixture
def shared_log(shared_dir: Path) -> Path:
    """A file in ``shared_dir`` (not made yet) the commands of a test append to."""
    return shared_dir / "runs"


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis output store of the module's own (64 MiB)."""
    server = output_store(tmp_path_factory.mktemp("output"), maxmemory="64mb").start()
    try:
        yield server
    finally:
        server.stop()
