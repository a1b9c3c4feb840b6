"""``vmfleet logs [-f] NAME``: a RemoteCommand's output, as the VMs print it and after.

Like ``kubectl logs``: ``-f`` follows until the command ended, ``--since``, ``--tail``
and ``--timestamps``; each VM's lines are prefixed ``[vm]`` on a fan-out; stdout to
stdout and stderr to stderr. The exit code is ``vmfleet exec``'s: a single VM's exit
code, on a fan-out 0 when all succeeded, else the largest (0 while it still runs). It
reads through the API server (:func:`vmfleet.logs.read_log`): who may ``get`` the
RemoteCommand may read its output, nobody else.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from .api.logs import LogRecord
from .outcome import (
    EXIT_BROKEN_PIPE,
    EXIT_CANCELLED,
    EXIT_TRANSPORT,
    EXIT_USAGE,
    api_message,
    exit_code_for,
    fan_out_exit_code,
    is_final,
    write,
)

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> int:
    """``30s``, ``5m``, ``2h``, ``1h30m`` (as ``kubectl logs --since``) in seconds."""
    found = _DURATION.fullmatch(text.strip())
    if not text.strip() or found is None or not any(found.groups()):
        raise ValueError(f"--since={text!r} is not a duration such as 30s, 5m or 2h")
    hours, minutes, seconds = (int(g or 0) for g in found.groups())
    return hours * 3600 + minutes * 60 + seconds


class LinePrinter:
    """Writes records as they come: stdout and stderr apart, ``[vm]`` before each line on
    a fan-out (a partial line's rest gets none), the time before each line with
    ``timestamps``; a VM's later attempt is announced on stderr."""

    def __init__(self, out: TextIO, err: TextIO, prefixed: bool, timestamps: bool = False) -> None:
        self.out, self.err = out, err
        self.prefixed = prefixed
        self.timestamps = timestamps
        self._mid_line: set[tuple[str, str]] = set()  # (vm, stream) with a partial line
        self._attempts: dict[str, int] = {}
        self.printed: set[str] = set()  # VMs with output shown

    def write(self, records: Iterable[LogRecord]) -> None:
        for record in records:
            stream = self.out if record.stream == "stdout" else self.err
            seen = self._attempts.get(record.vm)
            if seen is not None and record.attempt != seen:
                self.err.write(f"vmfleet: {record.vm}: attempt {record.attempt}\n")
                self._mid_line = {k for k in self._mid_line if k[0] != record.vm}
            self._attempts[record.vm] = record.attempt
            key = (record.vm, record.stream)
            head = ""
            if key not in self._mid_line:
                if self.timestamps:
                    head += record.time + " "
                if self.prefixed:
                    head += f"[{record.vm}] "
            write(stream, head + record.data)
            if record.data.endswith("\n"):
                self._mid_line.discard(key)
            else:
                self._mid_line.add(key)
            self.printed.add(record.vm)
        self.out.flush()
        self.err.flush()

    def end(self) -> None:
        """End partial lines (the command ended without a newline)."""
        if self._mid_line:
            for _vm, stream in sorted(self._mid_line):
                (self.out if stream == "stdout" else self.err).write("\n")
            self._mid_line.clear()
            self.out.flush()
            self.err.flush()


def is_fan_out(obj: dict[str, Any]) -> bool:
    spec = obj.get("spec") or {}
    if spec.get("vm"):
        return False
    results = (obj.get("status") or {}).get("results") or []
    return len(results) != 1 or bool(spec.get("selector")) or len(spec.get("vms") or []) > 1


def exit_code(obj: dict[str, Any] | None, vm: str | None) -> int:
    """``vmfleet exec``'s rule on the command's results (0 while it runs)."""
    if obj is None:
        return EXIT_CANCELLED
    results = (obj.get("status") or {}).get("results") or []
    if vm is not None:
        results = [r for r in results if r.get("vm") == vm]
    if not results or not all(is_final(r) for r in results):
        return 0
    if vm is not None or not is_fan_out(obj):
        return exit_code_for(results[0])
    return fan_out_exit_code(results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the RemoteCommand")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="print lines as they come, until the command ended")
    parser.add_argument("--vm", help="only this VM's output")
    parser.add_argument("--attempt", type=int, help="only this attempt (default: every attempt)")
    parser.add_argument("--since", help="only lines newer than this (30s, 5m, 2h)")
    parser.add_argument("--tail", type=int, help="the last N lines of each VM's attempt")
    parser.add_argument("--timestamps", action="store_true",
                        help="the time the worker read each line, before it (RFC 3339)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG)")


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``vmfleet logs`` (wired in vmfleet.cli)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        since = parse_duration(args.since) if args.since else None
    except ValueError as exc:
        err.write(f"vmfleet logs: {exc}\n")
        return EXIT_USAGE
    if args.tail is not None and args.tail < 0:
        err.write("vmfleet logs: --tail must be 0 or more\n")
        return EXIT_USAGE
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    import kubernetes
    import urllib3

    from .kube import ApiException, Kube, context_namespace
    from .logs import read_log

    namespace = args.namespace or context_namespace()
    try:
        kube = Kube()
        obj = kube.get_command(namespace, args.name)
        if obj is None:
            err.write(f"vmfleet logs: RemoteCommand {namespace}/{args.name} not found\n")
            return 1
        printer = LinePrinter(out, err, prefixed=args.vm is None and is_fan_out(obj),
                              timestamps=args.timestamps)
        for record in read_log(kube, namespace, args.name, vm=args.vm, attempt=args.attempt,
                               follow=args.follow, since_seconds=since, tail_lines=args.tail):
            printer.write([record])
        printer.end()
        return exit_code(kube.get_command(namespace, args.name), args.vm)
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except BrokenPipeError:
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ApiException as exc:
        hint = ""
        if exc.status == 404:
            hint = (" (the RemoteCommand exists: is the output API installed? "
                    "kubectl get apiservice v1alpha1.logs.vmfleet.io)")
        elif exc.status == 503:
            hint = " (the controller serving the output API is not reachable or keeps no output)"
        err.write(f"vmfleet logs: {api_message(exc)}{hint}\n")
        return 1 if exc.status in (403, 404) else EXIT_TRANSPORT
    except (kubernetes.config.ConfigException, OSError, urllib3.exceptions.HTTPError) as exc:
        err.write(f"vmfleet logs: cannot reach the Kubernetes API: {exc} "
                  "(set KUBECONFIG or --kubeconfig)\n")
        return EXIT_TRANSPORT


__all__ = ["LinePrinter", "add_arguments", "exit_code", "main", "parse_duration"]
