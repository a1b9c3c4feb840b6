"""House rules of the test suite itself: no test module imports from another test module
(shared fakes live in tests/fakes.py, chart helpers in tests/chart.py, e2e fixtures in
tests/e2e/plugins/ and e2e helpers in tests/e2e/fleet.py)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SCANNED = sorted(TESTS.rglob("*.py"))


def imported_test_modules(source: str) -> list[str]:
    """The test modules (``test_*``) that ``source`` imports, at any depth of the file."""
    def is_test(name: str) -> bool:
        return any(part.startswith("test_") for part in name.split("."))

    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if is_test(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found += [base] if is_test(base) else [
                f"{base}.{alias.name}" for alias in node.names if is_test(alias.name)]
    return found


def test_the_check_sees_every_form_of_import() -> None:
    source = ("import tests.unit.test_chart\n"
              "from tests.e2e.test_faults import own_ns\n"
              "from tests.unit import test_exec\n"
              "from .test_schedule import NOW\n"
              "def f():\n    from tests.unit.test_exec import run\n"
              "from tests.fakes import FakeState\n"
              "from tests.e2e.fleet import REPO\n")
    assert imported_test_modules(source) == [
        "tests.unit.test_chart", "tests.e2e.test_faults", "tests.unit.test_exec",
        ".test_schedule", "tests.unit.test_exec"]


def test_no_test_module_imports_another() -> None:
    offenders = {str(path.relative_to(TESTS)): found
                 for path in SCANNED
                 if (found := imported_test_modules(path.read_text()))}
    assert offenders == {}, "move what they share into tests/fakes.py, tests/chart.py, " \
                            "tests/e2e/fleet.py or a plugin under tests/e2e/plugins/"
