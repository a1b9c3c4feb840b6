"""``vmfleet get`` and ``vmfleet describe``: RemoteVMs and RemoteCommands for a person.

``get`` prints the same columns as ``kubectl get`` (the CRDs' printer columns, read from
the generated CRDs, so the two never differ); ``describe`` shows one object with its
conditions, per-VM results and recent Events. Rendering is pure and tested without a
cluster.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from .api import constants as c
from .api.reports import F
from .api.times import parse_rfc3339

KINDS = {
    "vms": "vm", "vm": "vm", c.VM_PLURAL: "vm", c.VM_SINGULAR: "vm", "rvm": "vm",
    "commands": "command", "command": "command", c.COMMAND_PLURAL: "command",
    c.COMMAND_SINGULAR: "command", "rcmd": "command",
}
RECENT_EVENTS = 10
RECENT_COMMANDS = 5


# --------------------------------------------------------------------------- columns


def printer_columns(kind: str) -> list[dict[str, Any]]:
    """The CRD's additionalPrinterColumns (what ``kubectl get`` shows)."""
    from .api import crdgen

    crd = crdgen.remotevm_crd() if kind == "vm" else crdgen.remotecommand_crd()
    return list(crd["spec"]["versions"][0]["additionalPrinterColumns"])


_FILTER = re.compile(r'^(\w+)\[\?\(@\.(\w+)=="([^"]*)"\)\]$')


def json_path(obj: Any, path: str) -> Any:
    """The small JSONPath subset printer columns use: ``.a.b`` and ``.a[?(@.k=="v")].b``."""
    value = obj
    for part in re.findall(r'(?:[^.\[]|\[[^\]]*\])+', path):
        match = _FILTER.match(part)
        if match:
            key, field, wanted = match.groups()
            items = value.get(key) if isinstance(value, dict) else None
            value = next((i for i in items or [] if isinstance(i, dict) and i.get(field) == wanted),
                         None)
        else:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return None
    return value


def human_duration(seconds: float) -> str:
    """As kubectl's AGE column (k8s.io/apimachinery duration.HumanDuration)."""
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years = hours // (24 * 365)
    if years < 8:
        days = (hours // 24) % 365
        return f"{years}y{days}d" if days else f"{years}y"
    return f"{years}y"


def age(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return "<unknown>"
    return human_duration((now - parse_rfc3339(timestamp)).total_seconds())


def cell(value: Any, type_: str, now: datetime) -> str:
    if value is None:
        return "<unknown>" if type_ == "date" else ""
    if type_ == "date":
        return age(str(value), now)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Columns padded as kubectl's tabwriter does (3 spaces between columns)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        text = "   ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True))
        lines.append(indent + text.rstrip())
    return "\n".join(lines) + "\n"


def get_table(kind: str, items: Sequence[dict[str, Any]], now: datetime, wide: bool = False,
              namespace_column: bool = False) -> str:
    columns = [col for col in printer_columns(kind) if wide or not col.get("priority")]
    header = (["NAMESPACE"] if namespace_column else []) + ["NAME"] + [
        col["name"].upper() for col in columns]
    rows = []
    for item in sorted(items, key=lambda i: (i["metadata"].get("namespace", ""),
                                             i["metadata"]["name"])):
        row = ([item["metadata"].get("namespace", "")] if namespace_column else []) + [
            item["metadata"]["name"]]
        row += [cell(json_path(item, col["jsonPath"]), col["type"], now) for col in columns]
        rows.append(row)
    return table(header, rows)


# --------------------------------------------------------------------------- describe


def _fields(pairs: Sequence[tuple[str, Any]], indent: str = "") -> str:
    shown = [(k, v) for k, v in pairs if v not in (None, "", [], {})]
    if not shown:
        return ""
    width = max(len(k) for k, _ in shown) + 2
    return "".join(f"{indent}{(k + ':').ljust(width)}{v}\n" for k, v in shown)


def _labels(meta: dict[str, Any]) -> str:
    labels = meta.get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def _when(timestamp: str | None, now: datetime) -> str | None:
    if not timestamp:
        return None
    return f"{timestamp} ({age(timestamp, now)} ago)"


def _duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return ""
    seconds = (parse_rfc3339(end) - parse_rfc3339(start)).total_seconds()
    return f"{seconds:.3f}s" if seconds < 10 else human_duration(seconds)


def conditions_section(conditions: Sequence[dict[str, Any]] | None, now: datetime) -> str:
    if not conditions:
        return "Conditions:  <none>\n"
    rows = [[cond.get("type", ""), cond.get("status", ""), cond.get("reason") or "",
             age(cond.get("lastTransitionTime"), now) if cond.get("lastTransitionTime") else "",
             cond.get("message") or ""] for cond in conditions]
    return "Conditions:\n" + table(["Type", "Status", "Reason", "Age", "Message"], rows, "  ")


def events_section(events: Sequence[dict[str, Any]], now: datetime) -> str:
    if not events:
        return "Events:  <none>\n"
    rows = []
    for event in list(events)[-RECENT_EVENTS:]:
        when = (event.get("lastTimestamp") or event.get("eventTime")
                or (event.get("metadata") or {}).get("creationTimestamp"))
        count = event.get("count") or 1
        seen = age(when, now) + (f" (x{count})" if count > 1 else "")
        source = (event.get("reportingComponent") or (event.get("source") or {}).get("component")
                  or "")
        rows.append([event.get("type") or "", event.get("reason") or "", seen, source,
                     (event.get("message") or "").strip()])
    return "Events:\n" + table(["Type", "Reason", "Age", "From", "Message"], rows, "  ")


def _target(spec: dict[str, Any]) -> str:
    if spec.get("vm"):
        return str(spec["vm"])
    selector = spec.get("selector") or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op, key = expr.get("operator"), expr.get("key")
        values = ",".join(expr.get("values") or [])
        terms.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": f"{key}", "DoesNotExist": f"!{key}"}.get(op, f"{key} {op}"))
    if selector:
        return "selector " + (",".join(terms) or "<everything>")
    transfer = spec.get("transfer") or {}
    if transfer:
        source = transfer.get("from") or {}
        dests = ", ".join(f"{d.get('vm')}:{d.get('path')}" for d in transfer.get("to") or [])
        return f"transfer {source.get('vm')}:{source.get('path')} -> {dests}"
    return ""


def _action(spec: dict[str, Any]) -> str:
    if spec.get("argv"):
        return "argv: " + shlex.join(spec["argv"])
    if spec.get("command"):
        return "command: " + str(spec["command"])
    if spec.get("script"):
        lines = str(spec["script"]).splitlines()
        return f"script: {len(lines)} line{'s' if len(lines) != 1 else ''}"
    if spec.get("transfer"):
        return "transfer"
    return ""


def describe_command(obj: dict[str, Any], events: Sequence[dict[str, Any]], now: datetime) -> str:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    status = obj.get("status") or {}
    summary = status.get("summary") or {}
    out = _fields([
        ("Name", meta["name"]),
        ("Namespace", meta.get("namespace")),
        ("Labels", _labels(meta)),
        ("Created", _when(meta.get("creationTimestamp"), now)),
        ("Target", _target(spec)),
        ("Action", _action(spec)),
        ("Env", ", ".join(sorted(spec.get("env") or {}))),  # names only: values may be secret
        ("Working dir", spec.get("workingDir")),
        ("Timeout", f"{spec['timeoutSeconds']}s" if spec.get("timeoutSeconds") else None),
        ("Deadline", f"{spec['activeDeadlineSeconds']}s" if spec.get("activeDeadlineSeconds")
         else None),
        ("TTL after finished", f"{spec['ttlSecondsAfterFinished']}s"
         if spec.get("ttlSecondsAfterFinished") is not None else None),
        ("Phase", status.get("phase") or "Pending"),
        ("Completions", status.get("completions")),
        ("Summary", ", ".join(f"{k} {summary[k]}" for k in
                              ("targets", "pending", "running", "succeeded", "failed", "cancelled")
                              if summary.get(k)) if summary else None),
        ("Started", _when(status.get(F.START_TIME), now)),
        ("Completed", _when(status.get(F.COMPLETION_TIME), now)),
        ("Deleting", _when(meta.get("deletionTimestamp"), now)),
    ])
    out += conditions_section(status.get("conditions"), now)
    results = status.get("results") or []
    if results:
        rows = [[r.get("vm", ""), r.get("phase", ""), str(r.get("attempt", "")),
                 "" if r.get("exitCode") is None else str(r["exitCode"]), r.get("reason") or "",
                 _duration(r.get(F.START_TIME), r.get(F.COMPLETION_TIME)),
                 _output_size(r), r.get("worker") or "", _one_line(r.get("message"))]
                for r in results]
        out += "Results:\n" + table(["VM", "Phase", "Attempt", "Exit", "Reason", "Duration",
                                     "Output", "Worker", "Message"], rows, "  ")
    else:
        out += "Results:  <none>\n"
    out += events_section(events, now)
    return out


def _output_size(result: dict[str, Any]) -> str:
    if result.get("stdoutBytes") is None and result.get("stderrBytes") is None:
        return ""
    text = f"{result.get('stdoutBytes') or 0}B/{result.get('stderrBytes') or 0}B"
    return text + (" (tail)" if result.get("outputTruncated") else "")


def _one_line(text: str | None, limit: int = 120) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _bytes(n: Any) -> str | None:
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return None  # not reached


def describe_vm(obj: dict[str, Any], events: Sequence[dict[str, Any]],
                commands: Sequence[dict[str, Any]], now: datetime) -> str:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    status = obj.get("status") or {}
    facts = status.get("facts") or {}
    workers = status.get("workers") or {}
    host_key = status.get("hostKey") or {}
    workers_spec = spec.get("workers") or {}
    autoscale = workers_spec.get("autoscale") or {}
    sizing = (f"{workers_spec['replicas']} (fixed)" if workers_spec.get("replicas") is not None
              else f"autoscale {autoscale.get('minReplicas', 0)}..{autoscale.get('maxReplicas', 1)}"
              if autoscale else "1 (default)")
    out = _fields([
        ("Name", meta["name"]),
        ("Namespace", meta.get("namespace")),
        ("Labels", _labels(meta)),
        ("Created", _when(meta.get("creationTimestamp"), now)),
        ("Description", spec.get("description")),
        ("Address", f"{spec.get('user')}@{spec.get('host')}:{spec.get('port', 22)}"),
        ("Credentials", (spec.get("credentialsSecretRef") or {}).get("name")),
        ("Host key policy", spec.get("hostKeyPolicy", c.HOST_KEY_PINNED)
         + (f" ({len(spec.get('hostKeys') or [])} keys)" if spec.get("hostKeys") else "")),
        ("Host key seen", host_key.get("fingerprint")),
        ("Proxy jump", (spec.get("proxyJump") or {}).get("vm")),
        ("Queue", spec.get("queue") or workers.get("queue")
         or c.default_queue(meta.get("namespace", ""), meta["name"])),
        ("Max concurrent", spec.get("maxConcurrentCommands", 2)),
        ("Paused", "true" if spec.get("paused") else None),
        ("Workers", f"{sizing}; {workers.get('runtime') or '?'} runtime, "
         f"{workers.get('readyReplicas') or 0}/{workers.get('replicas') or 0} ready"
         + (f", queue depth {workers['queueDepth']}" if workers.get("queueDepth") is not None
            else "")),
    ])
    out += conditions_section(status.get("conditions"), now)
    if facts:
        out += "Facts:\n" + facts_fields(facts, now)
    recent = recent_commands(commands, meta["name"])
    if recent:
        rows = [[item["metadata"]["name"], result.get("phase", ""),
                 "" if result.get("exitCode") is None else str(result["exitCode"]),
                 result.get("reason") or "", age(item["metadata"].get("creationTimestamp"), now)]
                for item, result in recent]
        out += "Recent commands:\n" + table(["Name", "Phase", "Exit", "Reason", "Age"], rows, "  ")
    out += events_section(events, now)
    return out


def facts_fields(facts: dict[str, Any], now: datetime) -> str:
    """A RemoteVM's ``status.facts`` as ``describe`` shows them (indented fields)."""
    load = [facts.get(k) for k in ("load1", "load5", "load15")]
    memory = (f"{_bytes(facts.get('memoryAvailableBytes'))} available of "
              f"{_bytes(facts.get('memoryTotalBytes'))}"
              if facts.get("memoryTotalBytes") is not None else None)
    disk = (f"{_bytes(facts.get('rootDiskUsedBytes'))} used of "
            f"{_bytes(facts.get('rootDiskTotalBytes'))}"
            if facts.get("rootDiskTotalBytes") is not None else None)
    return _fields([
        ("Hostname", facts.get("hostname")),
        ("OS", facts.get("os")),
        ("Kernel", facts.get("kernel")),
        ("Uptime", human_duration(facts["uptimeSeconds"])
         if facts.get("uptimeSeconds") is not None else None),
        ("Load", " ".join("" if v is None else str(v) for v in load) if any(
            v is not None for v in load) else None),
        ("Memory", memory),
        ("Root disk", disk),
        ("Last probe", _when(facts.get("lastProbeTime"), now)),
        ("Probe latency", f"{facts['probeLatencySeconds']:.3f}s"
         if facts.get("probeLatencySeconds") is not None else None),
    ], "  ")


def recent_commands(commands: Sequence[dict[str, Any]], vm: str
                    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The newest RemoteCommands with a result on this VM, newest first."""
    found = []
    for item in commands:
        for result in (item.get("status") or {}).get("results") or []:
            if result.get("vm") == vm:
                found.append((item, result))
    found.sort(key=lambda pair: str(pair[0]["metadata"].get("creationTimestamp") or ""),
               reverse=True)
    return found[:RECENT_COMMANDS]


# --------------------------------------------------------------------------- commands


def add_get_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(KINDS), metavar="vms|commands",
                        help="vms (remotevms, rvm) or commands (remotecommands, rcmd)")
    parser.add_argument("names", nargs="*", help="only these objects")
    _common(parser)
    parser.add_argument("-l", "--selector", help="label selector")
    parser.add_argument("-A", "--all-namespaces", action="store_true")
    parser.add_argument("-o", "--output", choices=["wide"], help="wide: the extra columns too")


def add_describe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(KINDS), metavar="vm|command")
    parser.add_argument("name")
    _common(parser)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace",
                        help="namespace (default: the kubeconfig context's, else default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")


def _setup(args: argparse.Namespace) -> tuple[Any, str]:
    import os

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    from .kube import Kube, context_namespace

    return Kube(), args.namespace or context_namespace()


def _list_all(kube: Any, kind: str, selector: str | None) -> list[dict[str, Any]]:
    plural = c.VM_PLURAL if kind == "vm" else c.COMMAND_PLURAL
    result = kube.custom.list_cluster_custom_object(c.GROUP, c.VERSION, plural,
                                                    label_selector=selector or "")
    return list(result.get("items", []))


def get(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    kind = KINDS[args.kind]
    kube, namespace = _setup(args)
    if args.all_namespaces:
        items = _list_all(kube, kind, args.selector)
    elif kind == "vm":
        items = kube.list_vms(namespace, args.selector)
    else:
        items = kube.list_commands(namespace, args.selector)
    if args.names:
        wanted = set(args.names)
        items = [i for i in items if i["metadata"]["name"] in wanted]
        missing = wanted - {i["metadata"]["name"] for i in items}
        for name in sorted(missing):
            print(f"vmfleet get: {_kind_name(kind)} {name!r} not found in namespace {namespace}",
                  file=sys.stderr)
        if missing and not items:
            return 1
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {namespace}"
        print(f"No {_kind_name(kind)}s found in {where}.", file=sys.stderr)
        return 0
    out.write(get_table(kind, items, datetime.now(UTC), wide=args.output == "wide",
                        namespace_column=args.all_namespaces))
    return 1 if args.names and len(items) < len(set(args.names)) else 0


def describe(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    kind = KINDS[args.kind]
    kube, namespace = _setup(args)
    now = datetime.now(UTC)
    if kind == "vm":
        obj = kube.get_vm(namespace, args.name)
    else:
        obj = kube.get_command(namespace, args.name)
    if obj is None:
        print(f"vmfleet describe: {_kind_name(kind)} {args.name!r} not found in namespace "
              f"{namespace}", file=sys.stderr)
        return 1
    events = kube.list_events(namespace, c.VM_KIND if kind == "vm" else c.COMMAND_KIND, args.name)
    if kind == "vm":
        out.write(describe_vm(obj, events, kube.list_commands(namespace), now))
    else:
        out.write(describe_command(obj, events, now))
    return 0


def _kind_name(kind: str) -> str:
    return c.VM_KIND if kind == "vm" else c.COMMAND_KIND


def main_get(args: argparse.Namespace) -> int:
    return _guarded("get", get, args)


def main_describe(args: argparse.Namespace) -> int:
    return _guarded("describe", describe, args)


def _guarded(what: str, func: Any, args: argparse.Namespace) -> int:
    import kubernetes
    import urllib3

    from .kube import ApiException

    try:
        return int(func(args))
    except ApiException as exc:
        print(f"vmfleet {what}: the Kubernetes API refused the request: {exc.status} {exc.reason}",
              file=sys.stderr)
        return 1
    except (kubernetes.config.ConfigException, OSError, urllib3.exceptions.HTTPError) as exc:
        print(f"vmfleet {what}: cannot reach the Kubernetes API: {exc} "
              "(set KUBECONFIG or --kubeconfig)", file=sys.stderr)
        return 1
