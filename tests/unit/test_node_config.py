"""The local node's configuration (vmfleet.dev.node), without starting anything: what it
promises about loopback, pulls, cgroup v1 and the chart's values."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vmfleet.dev.node import PAUSE_IMAGE, Node, chart_values


class FakeControlPlane(SimpleNamespace):
    def component_kubeconfig(self, user: str, path: Path) -> Path:
        path.write_text(user)
        return path


def fake_cp(tmp_path: Path) -> Any:
    return FakeControlPlane(apiserver_port=6443, ca_file=tmp_path / "ca.crt")


def test_chart_values_point_every_container_at_loopback(tmp_path: Path) -> None:
    values = chart_values(fake_cp(tmp_path), "localhost/vmfleet:0.1.0",
                          extra_env={"VMFLEET_HEARTBEAT_SECONDS": "1"})
    assert values["image"] == {"repository": "localhost/vmfleet", "tag": "0.1.0", "pullPolicy": "Never"}
    assert values["hostNetwork"] is True
    assert values["broker"]["bundled"]["enabled"] is False  # its image cannot be pulled
    assert values["broker"]["external"] == {"existingSecret": "broker", "secretKey": "url",
                                            "controllerSecret": "broker-controller"}
    assert "transferWorker" not in values  # the controller runs them, with workers.extraEnv
    for env in (values["controller"]["extraEnv"], values["workers"]["extraEnv"]):
        names = {e["name"]: e["value"] for e in env}
        assert names["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
        assert names["KUBERNETES_SERVICE_PORT"] == "6443"
        assert names["VMFLEET_HEARTBEAT_SECONDS"] == "1"
    assert {"name": "VMFLEET_METRICS_PORT", "value": "0"} in values["workers"]["extraEnv"]


def test_kubelet_config_loopback_cgroup_v1_and_no_anonymous(tmp_path: Path) -> None:
    node = Node(tmp_path / "node", fake_cp(tmp_path))
    node.workdir.mkdir()
    argv = node._kubelet_args(Path("/bin/vmfleet-controlplane"))
    assert "--hostname-override=127.0.0.1" in argv
    config = json.loads((node.workdir / "kubelet-config.json").read_text())
    assert config["failCgroupV1"] is False
    assert config["address"] == config["healthzBindAddress"] == "127.0.0.1"
    assert config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["authentication"]["x509"]["clientCAFile"] == str(tmp_path / "ca.crt")
    assert config["cgroupRoot"].startswith("/vmfleet-")
    assert config["containerRuntimeEndpoint"] == f"unix://{node.socket}"


def test_two_nodes_have_their_own_cgroup_roots(tmp_path: Path) -> None:
    assert Node(tmp_path / "a", None).cgroup_root != Node(tmp_path / "b", None).cgroup_root


def test_pause_image_archive(tmp_path: Path) -> None:
    pause = tmp_path / "pause"
    pause.write_bytes(b"\x7fELF-not-really")
    node = Node(tmp_path / "node", None)
    node.workdir.mkdir()
    with tarfile.open(node._pause_archive(pause)) as tar:
        (manifest,) = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert manifest["RepoTags"] == [PAUSE_IMAGE]
        config = json.loads(tar.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
        assert config["config"]["Entrypoint"] == ["/pause"]
        layer = tarfile.open(fileobj=io.BytesIO(tar.extractfile("layer.tar").read()))  # type: ignore[union-attr]
        (member,) = layer.getmembers()
        assert (member.name, member.mode, member.uid) == ("pause", 0o755, 0)
