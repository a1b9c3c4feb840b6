"""The CRD upgrade path of the README (Helm installs ``crds/`` once and never upgrades
them): ``kubectl apply --server-side --force-conflicts -f charts/vmfleet/crds/`` before
``helm upgrade``. Shown from chart 0.1.0's CRDs (commit d088c06), installed as Helm
installs them: objects written under the old schema still read, and the new fields are
accepted only once the new CRDs are applied."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.fleet import REPO, Kubectl, Namespace
from vmfleet.api.models import RemoteCommandSpec, RemoteVMSpec
from vmfleet.procs import wait_until

pytestmark = pytest.mark.e2e

OLD_CHART_COMMIT = "d088c06"  # chart 0.1.0
CRDS = ("vmfleet.io_remotevms.yaml", "vmfleet.io_remotecommands.yaml")
NAMES = ("crd/remotevms.vmfleet.io", "crd/remotecommands.vmfleet.io")


def old_crds(directory: Path) -> Path:
    directory.mkdir()
    for name in CRDS:
        text = subprocess.run(["git", "show", f"{OLD_CHART_COMMIT}:crds/{name}"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
        (directory / name).write_text(text)
    return directory


def established(kubectl: Kubectl) -> None:
    wait_until(lambda: kubectl("wait", "--for=condition=Established", *NAMES, "--timeout=30s",
                               check=False, timeout=60).returncode == 0,
               timeout=90, interval=1, what="the CRDs to be established")


def vm(ns: Namespace, name: str, **workers: object) -> dict[str, object]:
    spec: dict[str, object] = {"host": "127.0.0.1", "user": "u",
                               "credentialsSecretRef": {"name": f"{name}-ssh"},
                               "hostKeyPolicy": "TrustOnFirstUse", "paused": True}
    if workers:
        spec["workers"] = workers
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM",
            "metadata": {"name": name, "namespace": str(ns)}, "spec": spec}


def test_old_objects_read_after_the_documented_crd_upgrade(kubectl, own_ns, tmp_path):  # noqa: F811
    ns = own_ns()
    try:
        # chart 0.1.0's CRDs, whole (the session put the current ones in place first).
        kubectl("replace", "-f", str(old_crds(tmp_path / "old")))
        established(kubectl)
        kubectl.apply(vm(ns, "old-vm", replicas=2))
        ns.run("old-cmd", vm="old-vm", command="true", retries={"limit": 1})
        refused = kubectl.apply(vm(ns, "new-vm", replicas=1, terminationGracePeriodSeconds=60),
                                check=False)
        assert refused.returncode != 0 and "terminationGracePeriodSeconds" in refused.stderr

        # The README's step before `helm upgrade`.
        kubectl("apply", "--server-side", "--force-conflicts",
                "-f", str(REPO / "charts" / "vmfleet" / "crds"))
        established(kubectl)

        old_vm = ns.get("remotevm", "old-vm")
        assert old_vm["spec"]["workers"] == {"replicas": 2, "terminationGracePeriodSeconds": 300}
        assert RemoteVMSpec.model_validate(old_vm["spec"]).workers is not None
        old_cmd = ns.get("remotecommand", "old-cmd")
        assert old_cmd["spec"]["retries"]["limit"] == 1
        assert RemoteCommandSpec.model_validate(old_cmd["spec"]).retries.count_disruptions is None
        kubectl.apply(vm(ns, "new-vm", replicas=1, terminationGracePeriodSeconds=60))
        assert ns.get("remotevm", "new-vm")["spec"]["workers"]["terminationGracePeriodSeconds"] == 60
        ns.run("new-cmd", vm="new-vm", command="true", retries={"countDisruptions": True})
        assert ns.get("remotecommand", "new-cmd")["spec"]["retries"]["countDisruptions"] is True
    finally:  # the session's other tests get the current CRDs back
        kubectl("apply", "--server-side", "--force-conflicts",
                "-f", str(REPO / "charts" / "vmfleet" / "crds"), check=False)
