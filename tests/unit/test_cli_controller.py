"""`vmfleet controller ARGS`: every argument goes to `kopf run`, options first included
(the chart runs `vmfleet controller --standalone --liveness=... --namespace=...`)."""

from __future__ import annotations

import os
import sys

import pytest

from vmfleet import cli


def test_controller_passes_options_to_kopf(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        seen.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        cli.main(["controller", "--standalone", "--liveness=http://0.0.0.0:8080/healthz",
                  "--namespace=fleet"])
    assert seen == [[sys.executable, "-m", "kopf", "run", "-m", "controller", "--standalone",
                     "--liveness=http://0.0.0.0:8080/healthz", "--namespace=fleet"]]


def test_controller_without_namespace_watches_all(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: (seen.append(argv), sys.exit(0)))
    with pytest.raises(SystemExit):
        cli.main(["controller", "--standalone"])
    assert seen[0][-2:] == ["--standalone", "--all-namespaces"]
