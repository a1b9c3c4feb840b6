"""vmfleet.kube.RawApi: the controller's built-in API calls as plain JSON (no typed client
modules), against a local HTTP server that records what it is sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration

from vmfleet.kube import ApiException, Kube, RawApi

REPO = Path(__file__).resolve().parents[2]


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append({"method": self.command, "path": self.path, "body": body,
                          "type": self.headers.get("Content-Type"),
                          "auth": self.headers.get("Authorization")})
        if "missing" in self.path:
            status, answer = 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
        elif self.path.startswith("/api/v1/namespaces/ns/secrets/"):
            status, answer = 200, {"data": {"key": "aGVsbG8="}}
        else:
            status, answer = 200, {"echo": body, "status": {"readyReplicas": 2}}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def raw() -> Iterator[RawApi]:
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    conf = Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    conf.api_key = {"BearerToken": "Bearer t0k"}
    try:
        yield RawApi(ApiClient(conf))
    finally:
        server.shutdown()
        server.server_close()


def test_events_configmaps_and_secrets_go_as_json_with_the_token(raw: RawApi) -> None:
    event = {"metadata": {"name": "e1"}, "reason": "Started"}
    assert raw.create_namespaced_event("ns", event)["echo"] == event
    raw.patch_namespaced_config_map("cm", "ns", {"data": {"a": "b"}})
    kube = Kube(raw.api_client)
    assert kube.read_secret("ns", "creds") == {"key": "hello"}
    post, patch, get = Recorder.seen
    assert (post["method"], post["path"], post["type"], post["auth"]) == (
        "POST", "/api/v1/namespaces/ns/events", "application/json", "Bearer t0k")
    assert (patch["method"], patch["path"], patch["type"], patch["body"]) == (
        "PATCH", "/api/v1/namespaces/ns/configmaps/cm", "application/merge-patch+json",
        {"data": {"a": "b"}})
    assert (get["method"], get["path"]) == ("GET", "/api/v1/namespaces/ns/secrets/creds")


def test_a_deployment_is_applied_server_side_and_listed_in_pages(raw: RawApi) -> None:
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"}}
    applied = raw.apply_deployment("ns", "w", body, field_manager="vmfleet-controller")
    assert applied["status"]["readyReplicas"] == 2
    raw.list_deployments(None, "a=b,c=d", 500, "tok")
    apply, listing = Recorder.seen
    assert (apply["method"], apply["type"], apply["body"]) == (
        "PATCH", "application/apply-patch+yaml", body)
    assert apply["path"] == ("/apis/apps/v1/namespaces/ns/deployments/w"
                             "?fieldManager=vmfleet-controller&force=true")
    assert listing["path"] == "/apis/apps/v1/deployments?labelSelector=a%3Db%2Cc%3Dd&limit=500&continue=tok"


def test_an_error_answer_raises_the_clients_api_exception(raw: RawApi) -> None:
    with pytest.raises(ApiException) as caught:
        raw.read_namespaced_config_map("missing", "ns")
    assert caught.value.status == 404
    assert Kube(raw.api_client).get_config_map_data("ns", "missing") is None


@pytest.mark.skipif(not hasattr(ApiClient, "param_serialize"),
                    reason="kubernetes < 37 imports every typed API with kubernetes.client")
def test_the_controller_imports_no_typed_core_or_apps_api() -> None:
    """The point of RawApi: ~30 MiB of typed models the controller never loads."""
    code = ("import sys, controller.handlers; "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    loaded = json.loads(out)
    assert "kubernetes.client.api.core_v1_api" not in loaded
    assert "kubernetes.client.api.apps_v1_api" not in loaded
    assert "kubernetes.client.api.custom_objects_api" in loaded  # the check can fail


def test_status_writes_go_to_the_status_subresource_as_json_or_merge_patches(raw: RawApi) -> None:
    kube = Kube(raw.api_client)
    ops = [{"op": "test", "path": "/status/phase", "value": "Running"},
           {"op": "replace", "path": "/status/phase", "value": "Succeeded"}]
    kube.patch_command_status("ns", "cmd", ops)
    kube.patch_vm_status("ns", "vm1", {"status": {"phase": "Ready"}})
    command, vm = Recorder.seen
    assert (command["method"], command["path"], command["type"], command["body"]) == (
        "PATCH", "/apis/vmfleet.io/v1alpha1/namespaces/ns/remotecommands/cmd/status",
        "application/json-patch+json", ops)
    assert (vm["path"], vm["type"], vm["body"]) == (
        "/apis/vmfleet.io/v1alpha1/namespaces/ns/remotevms/vm1/status",
        "application/merge-patch+json", {"status": {"phase": "Ready"}})
