"""The ``vmfleet`` command (also installed as the kubectl plugin ``kubectl-vmfleet``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _crds(args: argparse.Namespace) -> int:
    from vmfleet.api import crdgen

    root = Path(args.root) if args.root else None
    if args.action == "generate":
        for path in crdgen.generate(root):
            print(f"Wrote {path}")
        return 0
    problems = crdgen.check(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("The CRD manifests do not reflect the current API: run `vmfleet crds generate` "
              "(or `make crds`) and commit the result.", file=sys.stderr)
        return 1
    print("CRDs are current.")
    return 0


def _settings(args: argparse.Namespace) -> int:
    from vmfleet import settings, settingsdoc

    root = Path(args.root) if args.root else None
    if args.markdown:
        print(settingsdoc.markdown(), end="")
        return 0
    if args.write:
        for path in settingsdoc.write(root):
            print(f"Wrote {path}")
        return 0
    if args.check:
        problems = settingsdoc.check(root)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("The settings docs do not reflect vmfleet/settings.py: run `vmfleet settings "
                  "--write` and commit the result.", file=sys.stderr)
            return 1
        print("Settings docs are current.")
        return 0
    try:
        current = settings.Settings.from_environment()
    except settings.SettingsError as exc:
        print(exc, file=sys.stderr)
        return 1
    for doc in settings.documented():
        value = getattr(current, doc.name)
        shown = json.dumps(list(value)) if isinstance(value, tuple) else value  # as it is set
        print(f"{doc.env}={'' if value is None or value == () else shown}  # {doc.reader}")
    return 0


def _controller(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "kopf", "run", "-m", "controller", *args.kopf_args]
    if not any(a in ("-A", "--all-namespaces") or a.startswith(("-n", "--namespace"))
               for a in args.kopf_args):
        argv.append("--all-namespaces")
    os.execv(sys.executable, argv)
    return 0  # not reached


def _dev(args: argparse.Namespace) -> int:
    from vmfleet.dev import env

    if args.action == "up":
        return env.up(vms=args.vms, broker=args.broker, node=args.node, pod_network=args.pod_network)
    if args.action == "down":
        return env.down()
    if args.action == "demo":
        return env.demo()
    return env.status()


def build_parser() -> argparse.ArgumentParser:
    """The ``vmfleet`` command line. Long on purpose: one flat declaration per subcommand,
    read top to bottom as the CLI's whole surface (each subcommand's options live in its
    own module's ``add_arguments``)."""
    parser = argparse.ArgumentParser(prog="vmfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="generate or check the CRDs from the API models")
    crds.add_argument("action", choices=["generate", "check"])
    crds.add_argument("--root", help="repository root (default: this checkout)")
    crds.set_defaults(func=_crds)

    conf = sub.add_parser(
        "settings", help="the VMFLEET_* settings: their values here, or their docs",
        description="Without options: the value of every setting in this environment "
        "(exit 1 naming each bad value).")
    mode = conf.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="print the README's table")
    mode.add_argument("--write", action="store_true",
                      help="rewrite the generated parts of README.md and the chart's values.yaml")
    mode.add_argument("--check", action="store_true", help="exit 1 if those parts are out of date")
    conf.add_argument("--root", help="repository root (default: this checkout)")
    conf.set_defaults(func=_settings)

    ctl = sub.add_parser("controller", help="run the controller (kopf run -m controller)")
    ctl.add_argument("kopf_args", nargs=argparse.REMAINDER, help="passed to kopf run")
    ctl.set_defaults(func=_controller)

    dev = sub.add_parser("dev", help="the local environment (control plane, broker, sshd VMs)")
    dev.add_argument("action", choices=["up", "down", "status", "demo"])
    dev.add_argument("--vms", type=int, default=3, help="number of sshd VMs (default 3)")
    dev.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    dev.add_argument("--node", action="store_true",
                     help="add a real node (kubelet, containerd) and run the chart's pods on it "
                          "(root; builds the image)")
    dev.add_argument("--pod-network", action="store_true",
                     help="with --node: a cluster shaped like a user's instead (2 nodes, pod "
                          "network, Services, DNS, in a network namespace of its own; the chart "
                          "with its default values)")
    dev.set_defaults(func=_dev)

    from vmfleet import exec as exec_  # argument definitions only; light imports
    from vmfleet import show

    run = sub.add_parser(
        "exec", help="run a command on a VM (or on every VM of -l SELECTOR), like kubectl exec",
        description="Run COMMAND on a RemoteVM through a RemoteCommand and exit with its exit "
        "code (255: it could not run). Examples: vmfleet exec vm1 -- df -h /; "
        "vmfleet exec -l role=web -- uptime",
    )
    exec_.add_arguments(run)
    run.set_defaults(func=exec_.main)

    from vmfleet import logscli

    logs = sub.add_parser(
        "logs", help="print a RemoteCommand's output, as it runs (-f) or after, like kubectl logs",
        description="Print each VM's output of RemoteCommand NAME ([vm]-prefixed on a fan-out; "
        "stderr to stderr) and exit as vmfleet exec would. Examples: vmfleet logs -f patch; "
        "vmfleet logs patch --vm vm2 --tail 20")
    logscli.add_arguments(logs)
    logs.set_defaults(func=logscli.main)

    from vmfleet import rerun

    again = sub.add_parser(
        "rerun", help="run a RemoteCommand again on the VMs that did not succeed",
        description="Create a new RemoteCommand with NAME's spec on the VMs whose result was "
        "not Succeeded (--failed) and/or on the VMs named with --vm, labelled "
        "vmfleet.io/rerun-of=NAME. Example: vmfleet rerun nightly-patch --failed",
    )
    rerun.add_arguments(again)
    again.set_defaults(func=rerun.main)

    get = sub.add_parser("get", help="list RemoteVMs or RemoteCommands (as kubectl get)")
    show.add_get_arguments(get)
    get.set_defaults(func=show.main_get)

    describe = sub.add_parser(
        "describe", help="one RemoteVM or RemoteCommand with conditions, results and events")
    show.add_describe_arguments(describe)
    describe.set_defaults(func=show.main_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["controller"]:
        # Everything after `controller` is kopf's, options included (argparse's
        # REMAINDER refuses a first argument that looks like an option).
        return _controller(argparse.Namespace(kopf_args=args_list[1:]))
    args = build_parser().parse_args(args_list)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
