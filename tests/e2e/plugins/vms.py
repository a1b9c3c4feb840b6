"""Pytest plugin: fake VMs (real OpenSSH sshd on loopback addresses).

Fixtures:

* ``vms`` (session): ``vm1``..``vm3`` started once, on 127.0.10.1..3. Don't stop,
  restart or re-key them — use ``make_vm`` for that.
* ``make_vm`` (function): factory ``make_vm(name=None, **SshdVM kwargs) -> SshdVM``,
  a started VM of the test's own on a fresh loopback address (127.0.11.x), stopped at
  the end of the test.

As root each VM has its own hostname, PID tree and private /tmp, /var/tmp and home
(see ``vmfleet.dev.sshd``). Tests using these fixtures are marked ``e2e``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmfleet.dev.sshd import SshdVM, start_vms, stop_vms

VM_COUNT = 3
# The second octet of every VM address (127.<B>.10.x, 127.<B>.11.x, ...): 0 by default; a
# second checkout running e2e tests at the same time on this machine sets another.
LOOPBACK_B = int(os.environ.get("VMFLEET_E2E_LOOPBACK_B", "0"))
_FIXTURES = {"vms", "make_vm"}
_make_vm_hosts = itertools.count(1)


@pytest.fixture(scope="session")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SshdVM]]:
    started = start_vms(VM_COUNT, tmp_path_factory.mktemp("vms"), subnet=f"127.{LOOPBACK_B}.10")
    try:
        yield started
    finally:
        stop_vms(started)


@pytest.fixture
def make_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SshdVM]]:
    created: list[SshdVM] = []

    def factory(name: str | None = None, *, start: bool = True, **kwargs: Any) -> SshdVM:
        n = next(_make_vm_hosts)
        if n > 254 * 200:
            raise RuntimeError("make_vm: out of loopback addresses")
        address = kwargs.pop("address", f"127.{LOOPBACK_B}.{11 + (n - 1) // 254}.{(n - 1) % 254 + 1}")
        name = name or f"testvm{n}"
        workdir = Path(tmp_path_factory.mktemp(f"vm-{name}"))
        vm = SshdVM(name, workdir, address=address, **kwargs)
        created.append(vm)
        return vm.start() if start else vm

    try:
        yield factory
    finally:
        stop_vms(created)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
