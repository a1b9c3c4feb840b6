"""controller.watch.CommandWatch: the leader's list and watch of RemoteCommands (no kopf).
Listed a page at a time, watched from the list's resourceVersion, each event applied as it
comes; an expired watch (410) lists again and reports what the new list lacks as gone."""

from __future__ import annotations

import json
import threading
from typing import Any

from controller.watch import CommandWatch
from vmfleet.kube import ApiException


def cmd(name: str, namespace: str = "ns", rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "resourceVersion": rv}}


class Response:
    """A watch response: its lines, split across chunks as a server may send them."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.chunks = [data[i:i + 7] for i in range(0, len(data), 7)]
        self.closed = False

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        yield from self.chunks

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class Custom:
    """Pages of commands for lists; scripted responses for watches."""

    def __init__(self, pages: list[tuple[list[dict[str, Any]], str | None, str]],
                 watches: list[Response | Exception]) -> None:
        self.pages = pages
        self.watches = watches
        self.calls: list[dict[str, Any]] = []

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                      plural: str, **kwargs: Any) -> Any:
        self.calls.append({"namespace": namespace, **kwargs})
        if kwargs.get("watch"):
            answer = self.watches.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        index = int(kwargs.get("_continue") or 0)
        items, token, rv = self.pages[index]
        return {"metadata": {"continue": token, "resourceVersion": rv}, "items": items}


class Kube:
    def __init__(self, custom: Custom) -> None:
        self.custom = custom


def make(custom: Custom) -> tuple[CommandWatch, list[tuple[str, str]], list[set[str]]]:
    applied: list[tuple[str, str]] = []
    gone: list[set[str]] = []
    watch = CommandWatch(Kube(custom), ("ns",), lambda ns: ns == "ns",  # type: ignore[arg-type]
                         apply=lambda kind, obj: applied.append((kind, obj["metadata"]["name"])),
                         gone=lambda scope, listed: gone.append(listed))
    return watch, applied, gone


def test_the_list_is_read_a_page_at_a_time_and_the_watch_starts_at_its_version() -> None:
    custom = Custom(pages=[([cmd("a")], "1", "100"), ([cmd("b")], None, "100")], watches=[])
    watch, _, _ = make(custom)
    assert [o["metadata"]["name"] for o in watch.list_all()] == ["a", "b"]
    assert [c.get("limit") for c in custom.calls] == [500, 500]
    assert custom.calls[1]["_continue"] == "1"
    assert watch.versions == {"ns": "100"}


def test_events_are_applied_in_order_bookmarks_move_the_version_and_other_namespaces_are_skipped(
) -> None:
    response = Response([
        {"type": "ADDED", "object": cmd("c", rv="101")},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "105"}}},
        {"type": "MODIFIED", "object": cmd("x", namespace="other", rv="106")},
        {"type": "DELETED", "object": cmd("c", rv="107")},
    ])
    custom = Custom(pages=[([], None, "100")], watches=[response])
    watch, applied, _ = make(custom)
    list(watch.list_all())
    watch._watch("ns")
    assert applied == [("ADDED", "c"), ("DELETED", "c")]
    assert watch.versions["ns"] == "107" and response.closed
    call = custom.calls[-1]
    assert (call["watch"], call["resource_version"], call["allow_watch_bookmarks"]) == \
        (True, "100", True)


def test_an_expired_watch_lists_again_and_what_the_list_lacks_is_gone() -> None:
    custom = Custom(pages=[([cmd("a"), cmd("b")], None, "100")],
                    watches=[Response([{"type": "ERROR", "object": {"code": 410}}]),
                             ApiException(status=410, reason="Gone")])
    watch, applied, gone = make(custom)
    list(watch.list_all())
    stop = threading.Event()

    def apply(kind: str, obj: dict[str, Any]) -> None:
        applied.append((kind, obj["metadata"]["name"]))
        if len(applied) >= 4:  # two relists of a and b: enough
            watch.close()
            stop.set()

    watch.apply = apply
    watch.start()
    assert stop.wait(10)
    assert applied[:4] == [("ADDED", "a"), ("ADDED", "b"), ("ADDED", "a"), ("ADDED", "b")]
    assert gone[0] == {"uid-a", "uid-b"}
