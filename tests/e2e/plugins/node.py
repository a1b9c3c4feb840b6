"""Pytest plugin: a real node for the local control plane (kube-scheduler, a kubelet,
containerd and runc; see ``vmfleet.dev.node``) with the project's image imported.

Fixtures:

* ``node`` (session): a started ``Node`` named ``127.0.0.1``, Ready, stopped (with its
  pods' containers) at the end of the session.
* ``node_image`` (session): the full name of the project's image (``make image``,
  cached per machine), imported into the node's containerd.

The image is built before the first test runs, outside any test's timeout. Tests using
these fixtures are marked ``e2e``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfleet.dev.controlplane import ControlPlane
from vmfleet.dev.node import Node, build_image, image_name

_FIXTURES = {"node", "node_image"}
_archive: Path | None = None
_build_error: BaseException | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    global _archive, _build_error
    if session.config.option.collectonly:
        return
    if not any(_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    try:
        _archive = build_image()
    except Exception as exc:  # noqa: BLE001 - reported by the fixture, per test
        _build_error = exc


@pytest.fixture(scope="session")
def node(controlplane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    started = Node(tmp_path_factory.mktemp("node"), controlplane, exit_with_parent=True).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def node_image(node: Node) -> str:
    if _build_error is not None:
        raise RuntimeError(f"make image failed: {_build_error}") from _build_error
    archive = _archive or build_image()
    node.import_image(archive)
    return image_name(archive)
