"""Session fixtures for vmfleet e2e tests: CRDs installed, a controller running, a namespace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import REPO, Kubectl, Namespace, start_controller, unique_namespace
from vmfleet.dev.proc import ManagedProcess, wait_until

E2E_PREFIX = "e2e"
# The namespaces the session's controller watches (its scope in Redis derives from them).
CONTROLLER_NAMESPACES = [f"{E2E_PREFIX}-*"]


@pytest.fixture(scope="session")
def kubectl(controlplane) -> Kubectl:  # type: ignore[no-untyped-def]
    return Kubectl(controlplane.kubectl, controlplane.kubeconfig)


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", str(REPO / "crds"))
    # Right after apply, `kubectl wait` can fail before the CRDs have a status: retry it.
    wait_until(
        lambda: kubectl("wait", "--for=condition=Established", "crd/remotevms.vmfleet.io",
                        "crd/remotecommands.vmfleet.io", "--timeout=60s", check=False,
                        timeout=90).returncode == 0,
        timeout=120, interval=1, what="the CRDs to be established",
    )


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
