"""``vmfleet exec``: run a command on a VM (or on every VM a selector matches) from a terminal.

It creates a RemoteCommand with ``argv`` (each item quoted by the worker), watches that
one object until every VM's result is final, prints each VM's output as it was (stdout to
stdout, stderr to stderr; prefixed with ``[vm]`` when fanning out) and exits with the
remote exit code. Transport failures (the command never ran or its connection broke)
exit 255 with a message saying what went wrong. Ctrl-C deletes the RemoteCommand, which
cancels it on the VMs.

The pure parts (argument handling, the object built, waiting hints) are functions here,
exit codes and failure lines in :mod:`vmfleet.outcome`, the printing in
:mod:`vmfleet.execprint`; all are tested without a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TextIO

from .api import constants as c
from .api.constants import Phase
from .api.models import MAX_ARG, MAX_ITEMS, MAX_OUTPUT_BYTES, MAX_STDIN
from .api.output import STATUS_OUTPUT_BUDGET, tail_bytes
from .dryrunview import dry_run_exit_code, format_dry_run
from .execprint import LiveOutput, Printer, Progress
from .outcome import (
    EXIT_BROKEN_PIPE,
    EXIT_CANCELLED,
    EXIT_TRANSPORT,
    EXIT_USAGE,
    api_message,
    command_failure,
    exit_code_for,
    fan_out_exit_code,
    is_final,
)

# A finished exec object is deleted by exec itself; the TTL covers an exec that was killed.
DEFAULT_TTL_SECONDS = 120
# Output kept in status for a fan-out is shared out so the object stays far below etcd's
# size limit (1.5 MiB): about 1 MiB for all VMs' stdout and stderr tails together. The
# controller cuts every status to the same rule (vmfleet.api.output).
FAN_OUT_OUTPUT_BUDGET = STATUS_OUTPUT_BUDGET
LABEL_CREATED_BY = "app.kubernetes.io/created-by"
CREATED_BY = "vmfleet-exec"
WATCH_WINDOW_SECONDS = 15  # each watch request; between two, exec may print a waiting hint

class UsageError(ValueError):
    """The command line cannot be turned into a RemoteCommand."""


# --------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``vmfleet exec``."""
    _add_options(parser)
    parser.add_argument("words", nargs=argparse.REMAINDER, metavar="VM -- COMMAND [ARG...]",
                        help="the RemoteVM (not with -l), then -- and the command with its arguments")


def _add_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``vmfleet exec`` (also parsed again after the VM name)."""
    parser.add_argument("-n", "--namespace",
                        help="namespace of the RemoteVMs (default: the kubeconfig context's, "
                        "else default)")
    parser.add_argument("-l", "--selector",
                        help="run on every RemoteVM matching this label selector "
                        "(e.g. role=web,zone in (a,b)); output lines are prefixed with the VM")
    parser.add_argument("--timeout", type=int, metavar="SECONDS",
                        help="end the remote command after this long (spec.timeoutSeconds)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the RemoteCommand afterwards (default: delete it)")
    parser.add_argument("-e", "--env", action="append", default=None, metavar="NAME=VALUE",
                        help="environment variable for the command (repeatable)")
    parser.add_argument("-w", "--workdir", help="directory the command starts in")
    parser.add_argument("-i", "--stdin", action="store_true",
                        help="send this process's stdin to the command (up to 256 KiB)")
    parser.add_argument("--max-bytes", type=int, metavar="BYTES",
                        help="tail of stdout and of stderr kept per VM (default: as much as "
                        f"fits, up to {MAX_OUTPUT_BYTES})")
    parser.add_argument("--dry-run", action="store_true",
                        help="run nothing: print which VMs match and which would block "
                        "(spec.dryRun); exit 1 when any would")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")


@dataclass(frozen=True)
class ExecOptions:
    argv: list[str]
    vm: str | None = None
    selector: str | None = None
    namespace: str | None = None
    timeout: int | None = None
    keep: bool = False
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    stdin: bool = False
    max_bytes: int | None = None
    kubeconfig: str | None = None
    dry_run: bool = False
    live: bool = True  # print the output as it comes (the output API), not at the end


def options_from_args(args: argparse.Namespace) -> ExecOptions:
    """Resolve ``VM [options] -- COMMAND...`` as kubectl exec does.

    argparse stops at the first positional (the VM), so options given after it are parsed
    here again; everything after ``--`` is the command, untouched.
    """
    words: list[str] = list(args.words or [])
    if "--" in words:
        split = words.index("--")
        before, command = words[:split], words[split + 1:]
        if before:
            again = argparse.ArgumentParser(prog="vmfleet exec", add_help=False)
            _add_options(again)
            again.add_argument("vm", nargs="?")
            again.set_defaults(**{k: v for k, v in vars(args).items() if k != "words"})
            try:
                parsed, extra = again.parse_known_args(before)
            except SystemExit as exc:
                raise UsageError(f"cannot parse {' '.join(before)!r}") from exc
            if extra:
                raise UsageError(f"unexpected arguments before --: {' '.join(extra)}")
            args = parsed
            vm = parsed.vm
        else:
            vm = None
    elif args.selector:
        vm, command = None, words
    else:
        vm, command = (words[0], words[1:]) if words else (None, [])

    if args.selector and vm:
        raise UsageError(f"give a VM name ({vm}) or -l SELECTOR, not both")
    if args.selector:
        parse_selector(args.selector)  # refused here, before anything is created
    if not args.selector and not vm:
        raise UsageError("name a RemoteVM (vmfleet exec VM -- COMMAND) or a selector (-l)")
    _check_command(command)
    if args.timeout is not None and args.timeout < 1:
        raise UsageError("--timeout must be at least 1 second")
    if args.max_bytes is not None and not 0 <= args.max_bytes <= MAX_OUTPUT_BYTES:
        raise UsageError(f"--max-bytes must be between 0 and {MAX_OUTPUT_BYTES}")
    return ExecOptions(
        argv=command, vm=vm, selector=args.selector, namespace=args.namespace,
        timeout=args.timeout, keep=args.keep, env=env_of(args.env or []), workdir=args.workdir,
        stdin=args.stdin,
        max_bytes=args.max_bytes, kubeconfig=args.kubeconfig,
        dry_run=bool(getattr(args, "dry_run", False)),
        live=not getattr(args, "dry_run", False),
    )


# --------------------------------------------------------------------------- the object


def _check_command(command: Sequence[str]) -> None:
    """Refuse an empty command or one the API would refuse (too many or too long items)."""
    if not command:
        raise UsageError("no command: put it after --, e.g. vmfleet exec vm1 -- df -h /")
    if len(command) > MAX_ITEMS:
        raise UsageError(f"the command has {len(command)} arguments; at most {MAX_ITEMS} are allowed")
    for arg in command:
        if len(arg) > MAX_ARG:
            raise UsageError(f"an argument is {len(arg)} characters long; at most {MAX_ARG} are "
                             "allowed (use a script RemoteCommand for long text)")


def env_of(items: Sequence[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` options as the command's env (a bad name refused)."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not c.is_env_name(name):
            raise UsageError(f"--env {item!r}: use NAME=VALUE with a name of letters, digits "
                             "and underscores, not starting with a digit")
        env[name] = value
    return env


def parse_selector(text: str) -> dict[str, Any]:
    """A kubectl label selector string as a LabelSelector object.

    ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x,y)``, ``a``, ``!a``,
    separated by commas.
    """
    terms: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for raw in terms:
        term = raw.strip()
        if not term:
            raise UsageError(f"selector {text!r} has an empty term")
        words = term.split(None, 1)
        if len(words) == 2 and words[1].split(None, 1)[0] in ("in", "notin"):
            key = words[0]
            op, rest = words[1].split(None, 1) if " " in words[1].strip() else (words[1], "")
            rest = rest.strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise UsageError(f"selector term {term!r}: write {key} {op} (value1,value2)")
            values = [v.strip() for v in rest[1:-1].split(",") if v.strip()]
            expressions.append({"key": key, "operator": "In" if op == "in" else "NotIn",
                                "values": values})
        elif "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            expressions.append({"key": key, "operator": "NotIn", "values": [value]})
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=", 1).split("=", 1))
            labels[key] = value
        elif term.startswith("!"):
            expressions.append({"key": term[1:].strip(), "operator": "DoesNotExist"})
        else:
            expressions.append({"key": term, "operator": "Exists"})
    for key in list(labels) + [e["key"] for e in expressions]:
        if not key or any(ch in key for ch in " ()=!,"):
            raise UsageError(f"selector {text!r}: {key!r} is not a label key")
    selector: dict[str, Any] = {}
    if labels:
        selector["matchLabels"] = labels
    if expressions:
        selector["matchExpressions"] = expressions
    return selector


def output_max_bytes(targets: int, requested: int | None = None) -> int:
    """Bytes of each stream's tail kept per VM: as much as the API allows for one VM, a
    share of ~1 MiB for a fan-out (2 streams per VM): ``vmfleet.api.output.tail_bytes``,
    the rule the controller applies to every status."""
    if requested is not None:
        return requested
    return tail_bytes(targets, MAX_OUTPUT_BYTES, FAN_OUT_OUTPUT_BUDGET)


def generate_name(vm: str | None) -> str:
    return f"exec-{vm[:40].rstrip('-')}-" if vm else "exec-"


def build_command(options: ExecOptions, namespace: str, targets: int = 1,
                  stdin: str | None = None) -> dict[str, Any]:
    """The RemoteCommand ``vmfleet exec`` creates."""
    spec: dict[str, Any] = {}
    if options.selector:
        spec["selector"] = parse_selector(options.selector)
    else:
        spec["vm"] = options.vm
    spec["argv"] = list(options.argv)
    if options.env:
        spec["env"] = dict(options.env)
    if options.workdir:
        spec["workingDir"] = options.workdir
    if stdin is not None:
        spec["stdin"] = stdin
    if options.timeout is not None:
        spec["timeoutSeconds"] = options.timeout
    spec["output"] = {"maxBytes": output_max_bytes(targets, options.max_bytes)}
    if not options.keep:
        spec["ttlSecondsAfterFinished"] = DEFAULT_TTL_SECONDS
    if options.dry_run:
        spec["dryRun"] = True
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.COMMAND_KIND,
        "metadata": {
            "generateName": generate_name(options.vm),
            "namespace": namespace,
            "labels": {LABEL_CREATED_BY: CREATED_BY},
        },
        "spec": spec,
    }


# --------------------------------------------------------------------------- running


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP while the command ran."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted (main thread only), restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch_until_done(kube: Any, namespace: str, name: str, resource_version: str | None,
                     on_update: Callable[[dict[str, Any]], bool],
                     on_idle: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Follow one RemoteCommand with a watch until ``on_update`` returns True.

    Returns that object, or None when the RemoteCommand was deleted. A watch the server
    ends (every WATCH_WINDOW_SECONDS; then ``on_idle`` is called) is resumed from the last
    resourceVersion; an expired one (410) starts again from a fresh read.
    """
    from .kube import ApiException

    while True:
        try:
            for kind, obj in kube.watch_command(namespace, name, resource_version,
                                                WATCH_WINDOW_SECONDS):
                if kind == "DELETED":
                    return None
                resource_version = obj["metadata"].get("resourceVersion") or resource_version
                if kind in ("ADDED", "MODIFIED") and on_update(obj):
                    return obj
        except ApiException as exc:
            if exc.status != 410:
                raise
            fresh = kube.get_command(namespace, name)
            if fresh is None:
                return None
            resource_version = fresh["metadata"]["resourceVersion"]
            if on_update(fresh):
                return fresh
        if on_idle is not None:
            on_idle()


def waiting_hint(obj: dict[str, Any], namespace: str, waited: float) -> tuple[str, str] | None:
    """(kind, text) of a hint when a command has not got anywhere after ``waited`` seconds."""
    status = obj.get("status") or {}
    name = obj["metadata"]["name"]
    results = status.get("results")
    if not results:
        if status.get("phase") in Phase.TERMINAL:
            return None
        return ("undispatched",
                f"vmfleet exec: still waiting after {waited:.0f}s: RemoteCommand {namespace}/{name} "
                f"has not been dispatched; is the vmfleet controller running and watching "
                f"namespace {namespace}?")
    queued = [str(r.get("vm")) for r in results if r.get("phase") in (Phase.PENDING, Phase.QUEUED)]
    if not queued:
        return None
    shown = ", ".join(queued[:5]) + (f" and {len(queued) - 5} more" if len(queued) > 5 else "")
    return ("queued",
            f"vmfleet exec: still queued after {waited:.0f}s on {shown}: no worker has taken "
            f"it yet (vmfleet describe vm {queued[0]} -n {namespace} shows the VM's workers)")


def done(obj: dict[str, Any]) -> bool:
    """Every VM's result is final (or the command ended with no result at all)."""
    status = obj.get("status") or {}
    results = status.get("results")
    if results:
        return all(is_final(r) for r in results)
    return status.get("phase") in Phase.TERMINAL


def count_targets(kube: Any, namespace: str, options: ExecOptions) -> int:
    if not options.selector:
        return 1
    from .kube import ApiException

    try:
        return len(kube.list_vms(namespace, options.selector))
    except ApiException as exc:
        if exc.status == 400:
            raise UsageError(f"invalid selector {options.selector!r}: {exc.reason}") from exc
        raise


def cancel(kube: Any, namespace: str, name: str, err: TextIO, wait: float = 60.0) -> None:
    """Delete the RemoteCommand (the controller sees the deletion and has the workers stop
    its remote processes) and wait a little for it to go; a second Ctrl-C stops waiting."""
    err.write(f"vmfleet: interrupted: deleting RemoteCommand {namespace}/{name}, "
              "which cancels it on the VMs\n")
    err.flush()
    if not kube.delete_command(namespace, name):
        return
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            if kube.get_command(namespace, name) is None:
                return
            time.sleep(0.2)
        err.write(f"vmfleet: RemoteCommand {namespace}/{name} is still being cancelled\n")
    except Interrupted:
        err.write(f"vmfleet: not waiting for RemoteCommand {namespace}/{name} to be cancelled\n")


def run(options: ExecOptions, kube: Any | None = None, out: TextIO | None = None,
        err: TextIO | None = None, stdin: TextIO | None = None,
        progress: bool | None = None) -> int:
    """Create the RemoteCommand, follow it, print its output; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    if options.kubeconfig:
        os.environ["KUBECONFIG"] = options.kubeconfig
    from .kube import Kube, context_namespace

    namespace = options.namespace or context_namespace()
    kube = kube or Kube()
    created = create(kube, namespace, options, err, stdin or sys.stdin)
    if isinstance(created, int):
        return created
    name = created["metadata"]["name"]
    printer = Printer(out, err, prefixed=bool(options.selector), progress=Progress(err, progress))
    live = LiveOutput(kube, namespace, name, printer).start() if options.live else None

    follow = Follower(created, namespace, printer, live, err)
    try:
        with interrupts_raise():
            final = watch_until_done(kube, namespace, name, created["metadata"]["resourceVersion"],
                                     follow.on_update, follow.on_idle)
    except Interrupted:
        printer.progress.clear()
        with interrupts_raise():
            cancel(kube, namespace, name, err)
        return EXIT_CANCELLED
    except BrokenPipeError:
        # Whoever read our output went away (e.g. `| head`): stop the remote command too.
        kube.delete_command(namespace, name)
        if out is sys.stdout:  # no second BrokenPipeError when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        printer.progress.clear()
    if live is not None:
        live.finish()
        if live.error == "broken pipe":
            kube.delete_command(namespace, name)
            return EXIT_BROKEN_PIPE
        if final is not None:
            printer.show((final.get("status") or {}).get("results") or [])
    return conclude(kube, options, namespace, name, final, out, err)


class Follower:
    """What ``run`` does with each version of the command the watch brings (print the
    VMs' results as they end) and between two (a waiting hint, once per kind)."""

    def __init__(self, created: dict[str, Any], namespace: str, printer: Printer,
                 live: LiveOutput | None, err: TextIO) -> None:
        self.latest, self.namespace = created, namespace
        self.printer, self.live, self.err = printer, live, err
        self.started = time.monotonic()
        self.hinted: set[str] = set()

    def on_update(self, obj: dict[str, Any]) -> bool:
        self.latest = obj
        if self.live is not None and self.printer.held and self.live.failed:
            self.printer.held = False  # no live output: each VM's tails when it ends
        self.printer.show((obj.get("status") or {}).get("results") or [])
        return done(obj)

    def on_idle(self) -> None:
        # Only for a person at a terminal: scripts get stderr as the command wrote it.
        hint = waiting_hint(self.latest, self.namespace, time.monotonic() - self.started)
        if self.printer.progress.enabled and hint and hint[0] not in self.hinted:
            self.hinted.add(hint[0])
            self.printer.progress.clear()
            self.err.write(hint[1] + "\n")
            self.err.flush()


def create(kube: Any, namespace: str, options: ExecOptions, err: TextIO,
           stdin: TextIO) -> dict[str, Any] | int:
    """Create the RemoteCommand: the object the API server returned, or the exit code
    when it was not created (a bad selector, no VM matched, stdin too large, refused)."""
    from .kube import ApiException

    try:
        targets = count_targets(kube, namespace, options)
    except UsageError as exc:
        err.write(f"vmfleet exec: {exc}\n")
        return EXIT_USAGE
    if options.selector and targets == 0:
        err.write(f"vmfleet exec: no RemoteVM in namespace {namespace} matches {options.selector!r}\n")
        return 1
    text_in = None
    if options.stdin:
        text_in = stdin.read(MAX_STDIN + 1)
        if len(text_in.encode()) > MAX_STDIN:
            err.write(f"vmfleet exec: stdin is larger than {MAX_STDIN} bytes\n")
            return EXIT_USAGE
    body = build_command(options, namespace, targets, text_in)
    try:
        return dict(kube.create_command(namespace, body))
    except ApiException as exc:
        err.write(f"vmfleet exec: cannot create the RemoteCommand in namespace {namespace}: "
                  f"{api_message(exc)}\n")
        return EXIT_TRANSPORT


def conclude(kube: Any, options: ExecOptions, namespace: str, name: str,
             final: dict[str, Any] | None, out: TextIO, err: TextIO) -> int:
    """After the command ended (``final``; None: deleted): delete it unless ``--keep``,
    and the exit code (a dry run's report printed; a fan-out's failed VMs named)."""
    if final is None:
        err.write(f"vmfleet exec: RemoteCommand {namespace}/{name} was deleted before it finished\n")
        return EXIT_CANCELLED
    if options.keep:
        err.write(f"vmfleet exec: kept RemoteCommand {namespace}/{name}\n")
    else:
        kube.delete_command(namespace, name)
    if options.dry_run:
        status = final.get("status") or {}
        out.write(format_dry_run(namespace, name, status))
        return dry_run_exit_code(status)
    results = (final.get("status") or {}).get("results") or []
    if not results:
        err.write(f"vmfleet exec: {command_failure(final)}\n")
        return EXIT_TRANSPORT
    if options.selector:
        failed = [r for r in results if r.get("phase") != Phase.SUCCEEDED]
        if failed:
            names = ", ".join(str(r.get("vm")) for r in failed)
            err.write(f"vmfleet exec: failed on {len(failed)} of {len(results)} VMs: {names}\n")
        return fan_out_exit_code(results)
    return exit_code_for(results[0])


def main(args: argparse.Namespace) -> int:
    """``vmfleet exec`` (wired in vmfleet.cli)."""
    try:
        options = options_from_args(args)
    except UsageError as exc:
        print(f"vmfleet exec: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import kubernetes
    import urllib3

    from .kube import ApiException

    try:
        return run(options)
    except KeyboardInterrupt:  # before the RemoteCommand existed
        print("vmfleet exec: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except ApiException as exc:
        print(f"vmfleet exec: the Kubernetes API refused a request: {api_message(exc)}",
              file=sys.stderr)
        return EXIT_TRANSPORT
    except (kubernetes.config.ConfigException, OSError, urllib3.exceptions.HTTPError) as exc:
        print(f"vmfleet exec: cannot reach the Kubernetes API: {exc} "
              "(set KUBECONFIG or --kubeconfig)", file=sys.stderr)
        return EXIT_TRANSPORT
