"""charts/vmfleet rendered with the project's helm (built by scripts/install-helm.sh): the
helpers the chart's unit and e2e tests share."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "vmfleet"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = [None, *CI_VALUES]
IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]


@functools.cache
def helm_binary() -> str:
    """The project's helm (cached per machine; built from its Go module the first time)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")],
                          capture_output=True, text=True, timeout=900, check=True)
    return proc.stdout.strip().splitlines()[-1]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def render(values: Path | None = None, *sets: str, namespace: str = "fleet") -> list[dict[str, Any]]:
    return yaml.safe_load(_render(values, sets, namespace))  # a fresh copy per test


@functools.cache
def _render(values: Path | None, sets: tuple[str, ...], namespace: str) -> str:
    args = ["template", "rel", str(CHART), "--namespace", namespace]
    if values is not None:
        args += ["-f", str(values)]
    for s in sets:
        args += ["--set", s]
    return yaml.safe_dump([d for d in yaml.safe_load_all(helm(*args).stdout) if d])


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def rules_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = doc["rules"]
    return rules
