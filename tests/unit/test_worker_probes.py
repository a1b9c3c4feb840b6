"""remote_tasks.probes: the files the worker pods' exec probes test."""

from __future__ import annotations

import subprocess
from pathlib import Path

from remote_tasks.probes import check_once
from vmfleet import workerprobes


def test_ready_only_while_the_broker_answers_and_alive_either_way(tmp_path: Path) -> None:
    assert check_once(lambda: True, tmp_path) is True
    assert (tmp_path / "ready").exists() and (tmp_path / "alive").exists()

    def down() -> None:
        raise ConnectionError("Connection refused")

    assert check_once(down, tmp_path) is False
    assert not (tmp_path / "ready").exists() and (tmp_path / "alive").exists()


def test_the_exec_probes_pass_and_fail_as_the_files_say(tmp_path: Path) -> None:
    def probe(command: tuple[str, ...]) -> int:
        text = [part.replace(workerprobes.PROBE_DIR, str(tmp_path)) for part in command]
        return subprocess.run(text, check=False, capture_output=True, timeout=10).returncode

    assert probe(workerprobes.READINESS_COMMAND) != 0
    assert probe(workerprobes.LIVENESS_COMMAND) != 0
    check_once(lambda: True, tmp_path)
    assert probe(workerprobes.READINESS_COMMAND) == 0
    assert probe(workerprobes.LIVENESS_COMMAND) == 0
    subprocess.run(["touch", "-d", "5 minutes ago", str(tmp_path / "alive")], check=True)
    assert probe(workerprobes.LIVENESS_COMMAND) != 0  # wedged: nothing touched it
