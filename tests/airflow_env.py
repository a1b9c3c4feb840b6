"""The preamble of the unit test modules that import Airflow.

Airflow lives in its own virtualenv (``make airflow-venv``): elsewhere such a module
skips. Airflow reads its home when it is first imported, so the module calls
``use_airflow(__file__)`` before any Airflow import: a throwaway home, never ~/airflow.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def use_airflow(test_file: str, *also: str) -> None:
    """Skip the calling module unless Airflow (and the modules ``also``) can be imported
    here; then point Airflow at a throwaway home (unless one is set already)."""
    if any(importlib.util.find_spec(name) is None for name in ("airflow", *also)):
        module = Path(test_file).resolve().relative_to(REPO)
        pytest.skip(
            "Apache Airflow is not installed in this interpreter: run `make airflow-venv`, then "
            f"`.venv-airflow/bin/python -m pytest {module}` "
            "(`make test` runs it from .venv-airflow)",
            allow_module_level=True,
        )
    if "AIRFLOW_HOME" not in os.environ:
        home = tempfile.mkdtemp(prefix="vmfleet-airflow-unit-")
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        os.environ["AIRFLOW_HOME"] = home
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__CORE__HOSTNAME_CALLABLE", "socket.gethostname")
