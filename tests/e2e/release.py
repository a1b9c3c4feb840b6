"""charts/vmfleet installed on the pod-network cluster (vmfleet.dev.cluster) with its default
values but the images' names (and the switches a test turns on): what test_production and
test_production_logs share."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.chart import CHART, helm_binary
from tests.e2e.fleet import Kubectl, Namespace, apply_crds, unique_namespace
from vmfleet.dev.cluster import Cluster

RELEASE = "rel"


class DefaultRelease:
    """charts/vmfleet installed with its default values but the images' names."""

    def __init__(self, cluster: Cluster, kubectl: Kubectl, ns: Namespace, workdir: Path) -> None:
        self.cluster = cluster
        self.kubectl = kubectl
        self.ns = ns
        self.workdir = workdir
        self.helm = helm_binary()

    def helm_run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = self.cluster.cp.env()
        for part in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{part}_HOME"] = str(self.workdir / f"helm-{part.lower()}")
        proc = subprocess.run([self.helm, *args, "--namespace", self.ns.name,
                               "--kubeconfig", str(self.cluster.cp.kubeconfig)],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}\n{self.diagnostics()}")
        return proc

    def diagnostics(self) -> str:
        out = self.ns.k("get", "pods,deployments,rvm,rcmd", "-o", "wide", check=False).stdout
        events = self.ns.k("get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]
        logs = self.ns.k("logs", f"deployment/{RELEASE}-vmfleet-controller", "--tail=40", check=False)
        return f"{out}\n{events}\n--- controller log:\n{logs.stdout}{logs.stderr}"

    def pods(self, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl.get_json("-n", self.ns.name, "pods", "-l", selector)["items"]
        return [p for p in items if p["metadata"].get("deletionTimestamp") is None]

    def finished(self, name: str, timeout: int = 180) -> dict[str, Any]:
        try:
            return self.ns.finished(name, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


def image_values(image: str) -> dict[str, Any]:
    repository, _, tag = image.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


def new_release(cluster: Cluster, prefix: str, workdir: Path, image: str, redis_image: str,
                **switches: Any) -> DefaultRelease:
    """The CRDs applied, a namespace ``<prefix>-…`` and a release in it, not installed yet:
    its values file (``values.yaml`` in ``workdir``) names the images and sets ``switches``;
    everything else is the chart's default."""
    kubectl = Kubectl(cluster.cp.kubectl, cluster.cp.kubeconfig)
    apply_crds(kubectl)
    ns = Namespace(kubectl, unique_namespace(prefix)).create()
    rel = DefaultRelease(cluster, kubectl, ns, workdir)
    values = {"image": image_values(image),
              "broker": {"bundled": {"image": image_values(redis_image)}}, **switches}
    (rel.workdir / "values.yaml").write_text(json.dumps(values))
    return rel


def install(rel: DefaultRelease) -> None:
    """``helm install --wait`` of the release with its values file."""
    rel.helm_run("install", RELEASE, str(CHART), "-f", str(rel.workdir / "values.yaml"),
                 "--wait", "--timeout", "300s", timeout=400)
