"""Which host directories a local VM would hide, and so binds back (vmfleet.dev.sshd)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfleet.dev import sshd


def test_paths_under_the_private_directories_are_the_hidden_ones() -> None:
    paths = [Path("/tmp/clone"), Path("/tmp"), Path("/var/tmp/x"), Path("/root/src/vmfleet"),
             Path("/work/main"), Path("/tmpfoo"), Path("/rootless")]
    assert sshd.hidden_paths(paths, "root") == [
        Path("/tmp/clone"), Path("/tmp"), Path("/var/tmp/x"), Path("/root/src/vmfleet")]


@pytest.fixture
def clone() -> Iterator[Path]:
    """A checkout cloned under /tmp: hidden on a VM."""
    path = Path(tempfile.mkdtemp(prefix="vmfleet-clone-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_the_checkout_is_kept_visible_by_default_when_a_vm_would_hide_it(
    clone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sshd, "_CHECKOUT", clone)
    monkeypatch.setattr(sshd, "namespaces_supported", lambda: True)
    monkeypatch.setattr(sshd, "_keygen", lambda path, *a, **k: (path.write_text("k"),
                        path.with_name(path.name + ".pub").write_text("ssh-ed25519 AAAA x")))
    vm = sshd.SshdVM("vm1", tmp_path / "vm1", isolate=True)
    assert vm.visible == [clone.resolve()]
    argv = vm._argv()
    # name, work dir, home, then the count and the kept directories, then sshd.
    count = argv.index(str(vm.workdir)) + 2
    assert argv[count:count + 2] == ["1", str(clone.resolve())]
    assert vm.host_path(f"{clone}/x") == clone / "x"
    assert vm.host_path("/tmp/elsewhere") == vm.root / "tmp" / "elsewhere"
