"""No object the API server accepts can stop the controller (property-based).

Hypothesis, through ``hypothesis-jsonschema``, draws RemoteVM and RemoteCommand specs
from the generated CRDs' ``openAPIV3Schema`` (``crds/*.yaml``: what the API server
accepts, quantities as the CEL quantity library reads them) and feeds them to the
controller's entry points on hand fakes (``tests/fakes.py``): the watch handlers, the
start-up list, the loop's ticks and the status writer. Nothing may raise out of them,
and nothing may even be recorded as a per-object failure: every shape is either served
or refused with a reason (``InvalidSpec``).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as conjecture_utils
from hypothesis_jsonschema import _from_schema, from_schema

from controller import handlers
from controller.context import Context
from controller.isolate import Recorder
from controller.loop import Writer
from tests.fakes import FakeKube, controller_parts

CRDS = Path(__file__).resolve().parents[2] / "crds"
EXAMPLES = int(os.environ.get("VMFLEET_TEST_EXAMPLES", "500"))  # per kind (the floor)
MAX_ITEMS = 4  # lists and maps drawn short: shapes, not sizes, are what is tested


class _LegacyMany:
    """``many(...).more()`` as hypothesis-jsonschema 0.23 calls it, on the context-manager
    ``many`` of newer Hypothesis releases (which dropped ``more``)."""

    def __init__(self, data: Any, min_size: int, max_size: float, average_size: float) -> None:
        self._many = conjecture_utils.many(data, min_size, max_size, average_size)
        self._elements: Any = None

    def more(self) -> bool:
        if self._elements is None:
            self._many.__enter__()
            self._elements = iter(self._many)
        try:
            next(self._elements)
        except StopIteration:
            self._many.__exit__(None, None, None)
            return False
        return True

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(conjecture_utils.many, "more"):
    _from_schema.cu = SimpleNamespace(many=_LegacyMany)  # type: ignore[attr-defined]


class Failures(Recorder):
    """A recorder that remembers each per-object failure (the test asserts there is none)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def record(self, kind: str, obj: dict[str, Any] | None, doing: str, exc: BaseException) -> None:
        self.failures.append(f"{kind}: could not {doing}: {type(exc).__name__}: {exc}")


def _for_hypothesis(node: Any) -> Any:
    """The CRD schema as JSON Schema: Kubernetes' extensions spelled out, lists short."""
    if isinstance(node, list):
        return [_for_hypothesis(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string"):
        return {"anyOf": [{"type": "integer", "minimum": node.get("minimum", 0), "maximum": 10**9},
                          {"type": "string", "maxLength": 20,
                              # a percentage where the schema names no pattern (maxParallel)
                              "pattern": node.get("pattern", r"^([1-9][0-9]?|100)%$")}]}
    out = {k: _for_hypothesis(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("description", "default")}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # the API server prunes or refuses unknown fields
    if out.get("type") == "object" and node.get("x-kubernetes-preserve-unknown-fields") \
            and "properties" not in out:
        out["maxProperties"] = MAX_ITEMS
    if "maxItems" in out or out.get("type") == "array":
        out["maxItems"] = min(int(out.get("maxItems", MAX_ITEMS)), MAX_ITEMS)
    if "maxProperties" in out or (out.get("type") == "object" and "additionalProperties" in out
                                  and out["additionalProperties"] is not False):
        out["maxProperties"] = min(int(out.get("maxProperties", MAX_ITEMS)), MAX_ITEMS)
    if out.get("type") == "string":
        out["maxLength"] = min(int(out.get("maxLength", 64)), 64)
        if "minLength" in out and out["minLength"] > out["maxLength"]:
            out["maxLength"] = out["minLength"]
    return out


@functools.cache
def spec_schema(kind: str) -> dict[str, Any]:
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return dict(_for_hypothesis(root["properties"]["spec"]))
    raise LookupError(kind)


@functools.cache
def spec_strategy(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return from_schema(spec_schema(kind))


NAMES = st.sampled_from(["vm1", "vm2", "a", "bastion", "transfers", "vm-x"])
CREATED = st.sampled_from(["2026-12-06T10:00:00Z", "2026-12-06T11:00:00Z"])


ACTIONS = ("command", "argv", "script", "transfer")


def admitted_command(spec: dict[str, Any], pick: int) -> dict[str, Any]:
    """The spec made to pass the CRD's one-of rules (CEL, which JSON Schema lacks): one
    action, and one target unless it is a transfer."""
    present = [a for a in ACTIONS if a in spec] or ["command"]
    action = present[pick % len(present)]
    spec = {k: v for k, v in spec.items() if k not in ACTIONS or k == action}
    if action == "command":
        spec.setdefault("command", "true")
    if action == "transfer":
        return {k: v for k, v in spec.items() if k not in ("vm", "selector")}
    if "vm" in spec and "selector" in spec:
        spec.pop("selector" if pick % 2 else "vm")
    if "vm" not in spec and "selector" not in spec:
        spec["vm"] = "vm1"
    return spec


def admitted_vm(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec made to pass the CRD's CEL rules (pinned keys, one sizing, min <= max)."""
    spec = copy.deepcopy(spec)
    if spec.get("hostKeyPolicy", "Pinned") == "Pinned" and not spec.get("hostKeys"):
        spec["hostKeyPolicy"] = "TrustOnFirstUse"
    workers = spec.get("workers")
    if isinstance(workers, dict):
        if "replicas" in workers and "autoscale" in workers:
            workers.pop("autoscale")
        auto = workers.get("autoscale")
        if isinstance(auto, dict) and auto.get("minReplicas", 0) > auto.get("maxReplicas", 1):
            auto["minReplicas"], auto["maxReplicas"] = auto.get("maxReplicas", 1), auto["minReplicas"]
    return spec


@st.composite
def objects(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """An object of ``kind`` the API server would store (CEL rules met), or, one time in
    five, a spec only its JSON schema admits (the controller must refuse it readably)."""
    name = draw(NAMES)
    spec = draw(spec_strategy(kind))
    if draw(st.integers(0, 4)):
        spec = admitted_vm(spec) if kind == "RemoteVM" else \
            admitted_command(spec, draw(st.integers(0, 3)))
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": kind,
            "metadata": {"namespace": "ns", "name": name, "uid": f"uid-{kind}-{name}",
                         "generation": draw(st.integers(1, 3)),
                         "creationTimestamp": draw(CREATED)},
            "spec": spec}


def run_controller(vms: list[dict[str, Any]], commands: list[dict[str, Any]]) -> list[str]:
    """Start a controller among ``vms`` and ``commands``, then change, tick, write and
    delete them: the per-object failures it recorded."""
    parts = controller_parts(FakeKube(vms=copy.deepcopy(vms), commands=copy.deepcopy(commands)))
    failures = Failures()
    parts.commands.recorder = failures
    loop = SimpleNamespace(start=lambda: None, alive=lambda: True)
    ctx = Context(kube=parts.kube, dispatcher=None, runtime=parts.runtime,  # type: ignore[arg-type]
                  state=parts.state, commands=parts.commands, fleet=parts.fleet,  # type: ignore[arg-type]
                  loop=loop, namespaces=("ns",), recorder=failures)  # type: ignore[arg-type]
    memo = SimpleNamespace(ctx=ctx)
    handlers.start(ctx)
    for obj in vms:
        changed = copy.deepcopy(obj)
        changed["metadata"]["generation"] += 1
        handlers.vm_event({"type": "MODIFIED", "object": changed}, memo=memo)
    for obj in commands:
        handlers.command_event({"type": "ADDED", "object": copy.deepcopy(obj)}, memo=memo)
    parts.fleet.tick()
    parts.commands.tick()
    Writer(parts.kube, parts.state, parts.commands, threads=1).flush(now=float("inf"))  # type: ignore[arg-type]
    for obj in vms:
        handlers.vm_event({"type": "DELETED", "object": obj}, memo=memo)
    for obj in commands:
        handlers.command_event({"type": "DELETED", "object": obj}, memo=memo)
    parts.fleet.tick()
    parts.commands.tick()
    return failures.failures


PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# What the drawn object meets: a plain VM (and the drawn command's VM, when it names
# one), and a command on each VM.
PLAIN_VM = {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM",
            "metadata": {"namespace": "ns", "name": "vm2", "uid": "uid-plain-vm2",
                         "generation": 1, "creationTimestamp": "2026-12-06T09:00:00Z"},
            "spec": {"host": "127.0.0.1", "user": "u", "hostKeyPolicy": "TrustOnFirstUse",
                     "credentialsSecretRef": {"name": "vm2-ssh"}}}


def plain_command(name: str, vm: str) -> dict[str, Any]:
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteCommand",
            "metadata": {"namespace": "ns", "name": f"on-{vm}", "uid": f"uid-on-{vm}",
                         "generation": 1, "creationTimestamp": "2026-12-06T09:00:00Z"},
            "spec": {"vm": name, "command": "true"}}


def named(vm: dict[str, Any], name: str) -> dict[str, Any]:
    return {**vm, "metadata": {**vm["metadata"], "name": name, "uid": f"uid-plain-{name}"}}


@PROFILE
@given(vm=objects("RemoteVM"))
def test_no_remotevm_the_api_accepts_stops_the_controller(vm: dict[str, Any]) -> None:
    vms = [vm] + ([PLAIN_VM] if vm["metadata"]["name"] != "vm2" else [])
    commands = [plain_command(v["metadata"]["name"], v["metadata"]["name"]) for v in vms]
    commands.append({**plain_command("vm2", "sel"), "spec": {"selector": {}, "command": "true"}})
    assert run_controller(vms, commands) == []


@PROFILE
@given(command=objects("RemoteCommand"))
def test_no_remotecommand_the_api_accepts_stops_the_controller(command: dict[str, Any]) -> None:
    spec = command["spec"]
    names = {spec.get("vm"), (spec.get("transfer") or {}).get("from", {}).get("vm"),
             *((to or {}).get("vm") for to in (spec.get("transfer") or {}).get("to") or [])}
    vms = [named(PLAIN_VM, n) for n in sorted(n for n in names if isinstance(n, str))]
    assert run_controller(vms + [PLAIN_VM] if "vm2" not in names else vms, [command]) == []
