"""``vmfleet rerun NAME --failed``: run a RemoteCommand again on the VMs that did not succeed.

The new RemoteCommand has the first one's spec with the target replaced by ``vms: [...]``
(the VMs whose result was not ``Succeeded``: failed, cancelled by ``maxFailures``, never
started), and is linked to it by the label and annotation ``vmfleet.io/rerun-of`` (the
annotation ``vmfleet.io/rerun-of-uid`` names the very object). The Airflow operator's
``only_failed=True`` uses the same functions on a task retry.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable
from typing import Any, Final, TextIO

from .api import constants as c
from .api.constants import Phase

LABEL_RERUN_OF: Final = f"{c.GROUP}/rerun-of"
ANNOTATION_RERUN_OF: Final = f"{c.GROUP}/rerun-of"
ANNOTATION_RERUN_OF_UID: Final = f"{c.GROUP}/rerun-of-uid"
_TARGET_FIELDS: Final = ("vm", "vms", "selector")
_DROPPED_FIELDS: Final = ("dryRun",)


class RerunError(ValueError):
    """The command cannot be re-run as asked."""


def not_succeeded(status: dict[str, Any] | None) -> list[str] | None:
    """The VMs whose result is not Succeeded, in the order of the results; None when the
    command has no results at all (refused before it started: every target is to run)."""
    results = (status or {}).get("results")
    if results is None:
        return None
    return [str(r["vm"]) for r in results if r.get("phase") != Phase.SUCCEEDED]


def rerun_vms(original: dict[str, Any], *, failed: bool, vms: Iterable[str] = ()) -> list[str]:
    """The VMs to run again: those that did not succeed (``failed``), limited to ``vms``
    when given; ``vms`` alone re-runs exactly those (they must be targets of the first)."""
    status = original.get("status") or {}
    wanted = list(dict.fromkeys(vms))
    targets = [str(r["vm"]) for r in status.get("results") or []]
    if status.get("phase") not in Phase.TERMINAL:
        raise RerunError(f"RemoteCommand {_ref(original)} has not finished (phase "
                         f"{status.get('phase') or 'Pending'}); wait for it or delete it first")
    if status.get("phase") == Phase.DRY_RUN:
        raise RerunError(f"RemoteCommand {_ref(original)} is a dry run: nothing ran, so there "
                         "is nothing to run again (create it without dryRun)")
    unknown = [vm for vm in wanted if vm not in targets]
    if unknown:
        raise RerunError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                         f"target of RemoteCommand {_ref(original)} (its targets: "
                         f"{', '.join(targets) or 'none'})")
    if not failed:
        if not wanted:
            raise RerunError("say which VMs to run again: --failed, --vm VM, or both")
        return wanted
    remaining = not_succeeded(status)
    if remaining is None:
        raise RerunError(f"RemoteCommand {_ref(original)} has no results: it never ran on any "
                         "VM (see its conditions); fix it and create it again")
    return [vm for vm in remaining if not wanted or vm in wanted]


def rerun_body(original: dict[str, Any], vms: list[str]) -> dict[str, Any]:
    """The new RemoteCommand: the first one's spec on ``vms``, linked to it."""
    meta = original["metadata"]
    spec = {k: copy.deepcopy(v) for k, v in (original.get("spec") or {}).items()
            if k not in _TARGET_FIELDS + _DROPPED_FIELDS}
    spec["vms"] = list(vms)
    name = str(meta["name"])
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.COMMAND_KIND,
        "metadata": {
            "generateName": f"{name[:50].rstrip('-')}-rerun-",
            "namespace": meta["namespace"],
            "labels": {LABEL_RERUN_OF: _label_value(name)},
            "annotations": {ANNOTATION_RERUN_OF: name, ANNOTATION_RERUN_OF_UID: str(meta.get("uid", ""))},
        },
        "spec": spec,
    }


def _label_value(name: str) -> str:
    """Object names may be 253 characters; label values 63."""
    return name if len(name) <= 63 else name[:63].rstrip("-.")


def _ref(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace')}/{obj['metadata'].get('name')}"


# --------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the RemoteCommand to run again")
    parser.add_argument("--failed", action="store_true",
                        help="on every VM whose result was not Succeeded (failed, cancelled "
                        "by maxFailures, never started)")
    parser.add_argument("--vm", action="append", default=[], metavar="VM",
                        help="only on this VM (repeatable; with --failed: only if it did not "
                        "succeed)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig "
                        "context's, else default)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the RemoteCommand that would be created, create nothing")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG)")


def run(args: argparse.Namespace, kube: Any, namespace: str, out: TextIO, err: TextIO) -> int:
    """Create the re-run; prints its name. 0: created (or nothing to do), 1: refused."""
    original = kube.get_command(namespace, args.name)
    if original is None:
        err.write(f"vmfleet rerun: RemoteCommand {namespace}/{args.name} not found\n")
        return 1
    try:
        vms = rerun_vms(original, failed=args.failed, vms=args.vm)
    except RerunError as exc:
        err.write(f"vmfleet rerun: {exc}\n")
        return 1
    if not vms:
        out.write(f"Every target of RemoteCommand {namespace}/{args.name} succeeded: nothing "
                  "to run again\n")
        return 0
    body = rerun_body(original, vms)
    if args.dry_run:
        import yaml

        out.write(yaml.safe_dump(body, sort_keys=False))
        return 0
    created = kube.create_command(namespace, body)
    out.write(f"Created RemoteCommand {namespace}/{created['metadata']['name']} on "
              f"{len(vms)} VM{'s' if len(vms) != 1 else ''}: {', '.join(vms)}\n")
    return 0


def main(args: argparse.Namespace) -> int:
    """``vmfleet rerun`` (wired in vmfleet.cli)."""
    import os

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    from .kube import ApiException, Kube, context_namespace

    namespace = args.namespace or context_namespace()
    try:
        return run(args, Kube(), namespace, sys.stdout, sys.stderr)
    except ApiException as exc:
        print(f"vmfleet rerun: the Kubernetes API refused a request: {exc.status} {exc.reason}",
              file=sys.stderr)
        return 1
