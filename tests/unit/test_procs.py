"""vmfleet.procs: the product's process helpers (the dev kit reuses them), and the product
does not depend on its own test environment."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vmfleet import procs
from vmfleet.dev import proc as dev_proc

REPO = Path(__file__).resolve().parents[2]


def test_a_timeout_carries_the_last_error_it_saw():
    calls = []

    def predicate() -> bool:
        calls.append(1)
        raise ConnectionRefusedError(111, f"refused #{len(calls)}")

    with pytest.raises(TimeoutError) as caught:
        procs.wait_until(predicate, timeout=0.2, interval=0.02, what="the server")
    error = caught.value
    assert isinstance(error, procs.WaitTimeout)
    assert isinstance(error.last_error, ConnectionRefusedError)
    assert error.__cause__ is error.last_error  # printed with its traceback
    assert f"refused #{len(calls)}" in str(error.last_error)
    assert str(error).startswith("Timed out after 0s waiting for the server (last error: ")


def test_a_timeout_without_errors_has_none():
    with pytest.raises(procs.WaitTimeout) as caught:
        procs.wait_until(lambda: False, timeout=0.05, interval=0.01, what="nothing")
    assert caught.value.last_error is None and caught.value.__cause__ is None
    assert str(caught.value) == "Timed out after 0s waiting for nothing"


def test_wait_until_returns_the_first_truthy_value():
    values = iter([None, 0, "ready"])
    assert procs.wait_until(lambda: next(values), timeout=5, interval=0.001) == "ready"


def test_the_dev_kit_uses_the_products_helpers():
    assert dev_proc.ManagedProcess is procs.ManagedProcess
    assert dev_proc.wait_until is procs.wait_until


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_the_product_does_not_import_the_dev_kit():
    offenders = []
    for root in ("vmfleet", "controller", "remote_tasks"):
        for path in (REPO / root).rglob("*.py"):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("vmfleet", "dev") or rel == Path("vmfleet/cli.py"):
                continue  # the dev kit itself; the CLI's `vmfleet dev` loads it on demand
            if any(name == "vmfleet.dev" or name.startswith("vmfleet.dev.") for name in _imports(path)):
                offenders.append(str(rel))
    assert offenders == []
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, controller, remote_tasks.app; "
         "print(sorted(m for m in sys.modules if m.startswith('vmfleet.dev')))"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]"


def test_a_managed_process_runs_in_its_own_group_and_stops(tmp_path):
    proc = procs.ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                                tmp_path / "sleeper.log").start()
    try:
        assert proc.running()
        procs.write_pid_file(proc, tmp_path / "sleeper.pgid")
        assert procs.stop_pid_file(tmp_path / "sleeper.pgid", grace=5)
        procs.wait_until(lambda: not proc.running(), timeout=10, interval=0.05, what="exit")
        assert not (tmp_path / "sleeper.pgid").exists()
    finally:
        proc.stop(grace=1)
