"""Pytest plugin: the local Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager and a kubectl of the same version; see
``vmfleet.dev.controlplane``).

Fixtures:

* ``controlplane`` (session): a started ``ControlPlane`` in a temporary directory,
  stopped at the end of the session. Its components also stop by themselves if the
  test process dies. Use ``controlplane.kubectl_run(...)``, ``.kubectl`` (path),
  ``.kubeconfig``, ``.server``, ``.token``, ``.api_get(path)``.
* ``kubeconfig`` (session): path of the admin kubeconfig (nothing global is set:
  pass it on explicitly).
* ``namespace`` (function): the name of a fresh namespace for this test, deleted
  afterwards (without waiting for its finalization).

Tests using these fixtures are marked ``e2e``. The binary is built (once per machine)
before the first test runs, outside any test's timeout.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfleet.dev.controlplane import ControlPlane, ensure_built

_FIXTURES = {"controlplane", "kubeconfig", "namespace"}
_build_error: BaseException | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binary now if a selected test needs it: a cold build takes minutes,
    which must not count against the first test's timeout."""
    global _build_error
    if session.config.option.collectonly:
        return
    if not any("controlplane" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    try:
        ensure_built()
    except Exception as exc:  # noqa: BLE001 - reported by the fixture, per test
        _build_error = exc


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if _build_error is not None:
        raise RuntimeError(f"building the control plane failed: {_build_error}") from _build_error
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"), exit_with_parent=True)
    cp.start(timeout=180)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(controlplane: ControlPlane) -> Path:
    return controlplane.kubeconfig


@pytest.fixture
def namespace(controlplane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    # Namespace names are DNS labels: lower case, at most 63 characters.
    base = "".join(c if c.isascii() and c.isalnum() else "-" for c in request.node.name.lower())
    name = f"t-{base[:40].strip('-')}-{uuid.uuid4().hex[:6]}"
    controlplane.kubectl_run("create", "namespace", name)
    try:
        yield name
    finally:
        controlplane.check_running()
        controlplane.kubectl_run(
            "delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False
        )
