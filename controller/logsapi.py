"""The output API: ``logs.vmfleet.io/v1alpha1``, served by the controller behind the API
server's aggregation layer (as metrics-server serves ``metrics.k8s.io``).

Who may read: the authority is Kubernetes RBAC. A CRD cannot have a ``log``
subresource, and an APIService for ``vmfleet.io/v1alpha1`` would take that group from the
CRDs, so the output has a group of its own. The API server authenticates the caller,
authorises ``get`` on ``remotecommands/log`` in ``logs.vmfleet.io`` and proxies the
request here over TLS with its front-proxy client certificate and the caller in
``X-Remote-User``/``X-Remote-Group``/``X-Remote-Extra-*``. This server

1. accepts only connections whose client certificate chains to the request-header CA
   and names an allowed front proxy (both from the ConfigMap
   ``kube-system/extension-apiserver-authentication``, which the API server publishes);
2. asks the API server, with a SubjectAccessReview, whether that caller may ``get`` the
   RemoteCommand itself in ``vmfleet.io``; 403 if not;
3. reads the output store (:mod:`vmfleet.outputstore`), following with ``XREAD BLOCK``.

Every controller replica serves it (reads only; a standby too). The controller needs
``create`` on ``subjectaccessreviews`` and ``get`` on that ConfigMap.
"""

from __future__ import annotations

import json
import logging
import ssl
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from vmfleet.api import constants as c
from vmfleet.api.constants import Phase
from vmfleet.api.logs import CONTENT_TYPE, GROUP, RESOURCE, SUBRESOURCE, VERSION, LogRecord
from vmfleet.outputstore import (
    END,
    Entry,
    Position,
    StreamRef,
    attempts_of,
    decode_cursor,
    to_records,
)

log = logging.getLogger("controller.logsapi")

AUTH_CONFIGMAP = ("kube-system", "extension-apiserver-authentication")
FOLLOW_BLOCK_MS = 1000
#: After the command finished, an attempt with no end mark (its worker was lost) is
#: waited for this long before the response ends.
LOST_END_GRACE = 5.0
#: Entries read per Redis call (each at most the worker's 64 KiB batch): a reader holds
#: about PAGE * 64 KiB of one command's output at a time, whatever its size.
PAGE = 16
BATCH_BYTES = 1024 * 1024


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class LogQuery:
    vm: str | None = None
    attempt: int | None = None
    follow: bool = False
    since_seconds: int | None = None
    tail_lines: int | None = None
    after: dict[str, Position] = field(default_factory=dict)

    @classmethod
    def parse(cls, query: str) -> LogQuery:
        """The query string; BadRequest naming what is wrong."""
        params = urllib.parse.parse_qs(query, keep_blank_values=True)

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        def number(name: str, minimum: int) -> int | None:
            raw = one(name)
            if raw is None or raw == "":
                return None
            try:
                value = int(raw)
            except ValueError:
                raise BadRequest(f"{name}={raw!r} is not a whole number") from None
            if value < minimum:
                raise BadRequest(f"{name}={raw!r}: use a value of at least {minimum}")
            return value

        follow_raw = (one("follow") or "false").lower()
        if follow_raw not in ("true", "false", "1", "0"):
            raise BadRequest(f"follow={one('follow')!r} is not true or false")
        after_raw = one("after")
        try:
            after = decode_cursor(after_raw) if after_raw else {}
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return cls(vm=one("vm") or None, attempt=number("attempt", 1),
                   follow=follow_raw in ("true", "1"), since_seconds=number("sinceSeconds", 0),
                   tail_lines=number("tailLines", 0), after=after)


def parse_path(path: str) -> tuple[str, str] | None:
    """(namespace, name) of a log path, None for any other path."""
    parts = path.strip("/").split("/")
    if (len(parts) == 8 and parts[:3] == ["apis", GROUP, VERSION] and parts[3] == "namespaces"
            and parts[5] == RESOURCE and parts[7] == SUBRESOURCE and parts[4] and parts[6]):
        return parts[4], parts[6]
    return None


def resource_list() -> dict[str, Any]:
    """Discovery of the group version: only the subresource (no resource a RESTMapper
    could take for the CRD's ``remotecommands``)."""
    return {
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{GROUP}/{VERSION}",
        "resources": [{"name": f"{RESOURCE}/{SUBRESOURCE}", "singularName": "",
                       "namespaced": True, "kind": "RemoteCommandLog", "verbs": ["get"]}],
    }


def group_list() -> dict[str, Any]:
    version = {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": GROUP, "versions": [version], "preferredVersion": version}]}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass(frozen=True)
class Caller:
    user: str
    groups: tuple[str, ...]
    extra: dict[str, list[str]]
    uid: str | None = None


@dataclass(frozen=True)
class RequestHeaderAuth:
    """The front proxy's trust: its CA, allowed names and header names."""

    client_ca: str
    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)
    uid_headers: tuple[str, ...] = ("X-Remote-Uid",)

    @classmethod
    def from_configmap(cls, data: dict[str, str]) -> RequestHeaderAuth:
        def listed(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            raw = data.get(key)
            if not raw:
                return default
            try:
                return tuple(str(v) for v in json.loads(raw))
            except ValueError:
                return default

        ca = data.get("requestheader-client-ca-file") or ""
        if not ca.strip():
            raise ValueError(
                "the API server publishes no requestheader-client-ca-file in ConfigMap "
                "kube-system/extension-apiserver-authentication: start kube-apiserver with "
                "--requestheader-client-ca-file (the aggregation layer) to serve the output API")
        return cls(client_ca=ca, allowed_names=listed("requestheader-allowed-names", ()),
                   username_headers=listed("requestheader-username-headers", cls.username_headers),
                   group_headers=listed("requestheader-group-headers", cls.group_headers),
                   extra_prefixes=listed("requestheader-extra-headers-prefix", cls.extra_prefixes),
                   uid_headers=listed("requestheader-uid-headers", cls.uid_headers))

    def proxy_allowed(self, peer_cert: dict[str, Any] | None) -> bool:
        """The verified client certificate is one of the allowed front proxies."""
        if not peer_cert:
            return False
        if not self.allowed_names:
            return True
        names = {value for rdn in peer_cert.get("subject", ()) for key, value in rdn
                 if key == "commonName"}
        return bool(names & set(self.allowed_names))

    def caller(self, headers: Any) -> Caller | None:
        user = next((headers.get(h) for h in self.username_headers if headers.get(h)), None)
        if not user:
            return None
        groups = tuple(g for h in self.group_headers for g in (headers.get_all(h) or ()))
        extra: dict[str, list[str]] = {}
        for name, value in headers.items():
            for prefix in self.extra_prefixes:
                if name.lower().startswith(prefix.lower()):
                    key = urllib.parse.unquote(name[len(prefix):]).lower()
                    extra.setdefault(key, []).append(value)
        uid = next((headers.get(h) for h in self.uid_headers if headers.get(h)), None)
        return Caller(user, groups, extra, uid)


def review(caller: Caller, namespace: str, name: str) -> dict[str, Any]:
    """The SubjectAccessReview: may ``caller`` get RemoteCommand ``namespace/name``?"""
    spec: dict[str, Any] = {
        "user": caller.user, "groups": list(caller.groups), "extra": caller.extra,
        "resourceAttributes": {"namespace": namespace, "verb": "get", "group": c.GROUP,
                               "resource": c.COMMAND_PLURAL, "name": name},
    }
    if caller.uid:
        spec["uid"] = caller.uid
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


# --------------------------------------------------------------------------- reading


class OutputReader:
    """Reads one command's output from the store, as records."""

    def __init__(self, client: Any, block_ms: int = FOLLOW_BLOCK_MS,
                 clock: Callable[[], float] = time.time,
                 lost_end_grace: float = LOST_END_GRACE) -> None:
        self.client = client
        self.block_ms = block_ms
        self.clock = clock
        self.lost_end_grace = lost_end_grace

    def _selected(self, namespace: str, uid: str, q: LogQuery) -> list[StreamRef]:
        return [r for r in attempts_of(self.client, namespace, uid)
                if (q.vm is None or r.vm == q.vm) and (q.attempt is None or r.attempt == q.attempt)]

    def _since_id(self, q: LogQuery) -> str:
        if q.since_seconds is None:
            return "-"
        return f"{max(0, int((self.clock() - q.since_seconds) * 1000))}-0"

    def history(self, ref: StreamRef, q: LogQuery, positions: dict[str, Position],
                ended: set[str]) -> Iterator[LogRecord]:
        """What is kept of one attempt now; ``positions`` end after its last entry."""
        start = self._since_id(q)
        resume = q.after.get(ref.field)
        if resume is not None:
            entry_id, done = resume
            for raw_id, fields in self.client.xrange(ref.key, entry_id, entry_id):
                entry = Entry.parse(raw_id, fields)
                if entry.kind == END:
                    ended.add(ref.field)
                yield from to_records(ref, entry, positions, skip=done)
            positions.setdefault(ref.field, (entry_id, done))
            start = f"({entry_id}"
        elif q.tail_lines is not None:
            yield from self._tail(ref, q, positions, ended)
            return
        while True:
            page = self.client.xrange(ref.key, start, "+", count=PAGE)
            for raw_id, fields in page:
                entry = Entry.parse(raw_id, fields)
                if entry.kind == END:
                    ended.add(ref.field)
                yield from to_records(ref, entry, positions)
            if len(page) < PAGE:
                return
            start = f"({positions[ref.field][0]}"

    def _tail(self, ref: StreamRef, q: LogQuery, positions: dict[str, Position],
              ended: set[str]) -> Iterator[LogRecord]:
        """The last ``tailLines`` records (within ``sinceSeconds``)."""
        assert q.tail_lines is not None
        want = q.tail_lines
        since = self._since_id(q)
        entries: list[Entry] = []
        lines = 0
        end = "+"
        last: Entry | None = None
        while lines < want or last is None:
            page = self.client.xrevrange(ref.key, end, since, count=64)
            for raw_id, fields in page:
                entry = Entry.parse(raw_id, fields)
                last = last or entry
                if entry.kind == END:
                    ended.add(ref.field)
                    continue
                entries.append(entry)
                lines += len(entry.pieces())
                if lines >= want:
                    break
            if len(page) < 64 or lines >= want:
                break
            end = f"({Entry.parse(*page[-1]).id}"
        records: list[LogRecord] = []
        for entry in reversed(entries):
            records.extend(to_records(ref, entry, positions))
        if last is not None:
            positions[ref.field] = (last.id, len(last.pieces()))
        yield from records[len(records) - want:] if want else []

    def read(self, namespace: str, uid: str, q: LogQuery,
             finished: Callable[[], bool]) -> Iterator[list[LogRecord]]:
        """Batches of records: what is kept, then (``follow``) what comes, until the
        command finished and every attempt's output ended."""
        positions: dict[str, Position] = dict(q.after)
        ended: set[str] = set()
        known: dict[str, StreamRef] = {}
        for ref in self._selected(namespace, uid, q):
            known[ref.field] = ref
            yield from _batched(self.history(ref, q, positions, ended))
        if not q.follow:
            return
        finished_at: float | None = None
        while True:
            for ref in self._selected(namespace, uid, q):
                if ref.field not in known:
                    known[ref.field] = ref  # a new attempt: from its start
            open_refs = [r for r in known.values() if r.field not in ended]
            if finished_at is None and finished():
                finished_at = time.monotonic()
                continue  # list the attempts once more: all wrote before it finished
            if finished_at is not None and not open_refs:
                return
            if finished_at is not None and time.monotonic() - finished_at > self.lost_end_grace:
                # An attempt without its end mark (its worker was lost): what it wrote.
                for ref in open_refs:
                    yield from _batched(self.history(ref, self._resumed(q, positions), positions,
                                                     ended))
                return
            if not open_refs:
                time.sleep(self.block_ms / 1000)
                continue
            start = "0-0" if q.since_seconds is None else self._since_id(q)
            streams = {r.key: positions[r.field][0] if r.field in positions else start
                       for r in open_refs}
            by_key = {r.key: r for r in open_refs}
            got = self.client.xread(streams, count=PAGE, block=self.block_ms)
            batch = []
            for key, entries in got or []:
                ref = by_key[key.decode() if isinstance(key, bytes) else str(key)]
                for raw_id, fields in entries:
                    entry = Entry.parse(raw_id, fields)
                    if entry.kind == END:
                        ended.add(ref.field)
                    batch.extend(to_records(ref, entry, positions))
            if batch:
                yield batch

    @staticmethod
    def _resumed(q: LogQuery, positions: dict[str, Position]) -> LogQuery:
        """``q`` resuming after ``positions`` (whole entries read)."""
        return LogQuery(vm=q.vm, attempt=q.attempt, after={
            k: (entry_id, 1 << 30) for k, (entry_id, _) in positions.items()})


def _batched(records: Iterator[LogRecord], limit: int = BATCH_BYTES) -> Iterator[list[LogRecord]]:
    """Records in lists of about ``limit`` bytes of data (one response chunk each)."""
    batch: list[LogRecord] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record.data)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------- serving


def finished_phase(obj: dict[str, Any] | None) -> bool:
    """The command ended (or is gone): a follower may stop once its output is drained."""
    if obj is None:
        return True
    return (obj.get("status") or {}).get("phase") in Phase.TERMINAL


class LogsApi:
    """What a request needs: the caller check, the command, and the output."""

    def __init__(self, kube: Any, reader: OutputReader | None) -> None:
        self.kube = kube
        self.reader = reader

    def allowed(self, caller: Caller, namespace: str, name: str) -> bool:
        from kubernetes.client import AuthorizationV1Api

        result = AuthorizationV1Api(self.kube.api_client).create_subject_access_review(
            cast(Any, review(caller, namespace, name)))
        return bool(result.status and result.status.allowed)


class _LogHandler(BaseHTTPRequestHandler):
    """One request to the aggregated API (``_handler`` binds the API and its
    authentication to a subclass: the server makes a handler per request)."""

    api: LogsApi
    auth: RequestHeaderAuth
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.request.settimeout(30)
        try:
            self.request.do_handshake()
        finally:
            self.request.settimeout(None)
        super().setup()

    def send_json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fail(self, code: int, reason: str, message: str) -> None:
        self.send_json(code, status(code, reason, message))

    def do_GET(self) -> None:
        if not self.auth.proxy_allowed(self.connection.getpeercert()):
            self.fail(401, "Unauthorized", "only the API server's front proxy may call")
            return
        caller = self.auth.caller(self.headers)
        if caller is None:
            self.fail(401, "Unauthorized", "no authenticated user in the request headers")
            return
        path, _, query = self.path.partition("?")
        if path.rstrip("/") == "/apis":
            self.send_json(200, group_list())
            return
        if path.rstrip("/") == f"/apis/{GROUP}/{VERSION}":
            self.send_json(200, resource_list())
            return
        target = parse_path(path)
        if target is None:
            self.fail(404, "NotFound", f"the server could not find {path}")
            return
        self.serve_log(caller, *target, query)

    def serve_log(self, caller: Caller, namespace: str, name: str, query: str) -> None:
        try:
            q = LogQuery.parse(query)
        except BadRequest as exc:
            self.fail(400, "BadRequest", str(exc))
            return
        try:
            allowed = self.api.allowed(caller, namespace, name)
        except Exception as exc:  # noqa: BLE001 - no answer: no output
            log.warning("Could not review access of %s to RemoteCommand %s/%s: %s",
                        caller.user, namespace, name, exc)
            self.fail(503, "ServiceUnavailable", "could not check access; try again")
            return
        if not allowed:
            self.fail(403, "Forbidden",
                      f'remotecommands.{c.GROUP} "{name}" is forbidden: User '
                      f'"{caller.user}" cannot get resource "remotecommands" in API group '
                      f'"{c.GROUP}" in the namespace "{namespace}"')
            return
        obj = self.api.kube.get_command(namespace, name)
        if obj is None:
            self.fail(404, "NotFound", f'remotecommands.{c.GROUP} "{name}" not found')
            return
        if self.api.reader is None:
            self.fail(503, "ServiceUnavailable",
                      "this controller keeps no output (VMFLEET_OUTPUT_URL is not set)")
            return
        uid = obj["metadata"]["uid"]
        seen: dict[str, Any] = {"at": 0.0, "done": finished_phase(obj)}

        def finished() -> bool:
            if not seen["done"] and time.monotonic() - seen["at"] >= 1.0:
                seen["at"] = time.monotonic()
                fresh = self.api.kube.get_command(namespace, name)
                seen["done"] = finished_phase(fresh) or (
                    fresh is not None and fresh["metadata"]["uid"] != uid)
            return bool(seen["done"])

        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.flush()
        try:
            for batch in self.api.reader.read(namespace, uid, q, finished):
                data = "".join(r.to_json() + "\n" for r in batch).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, ssl.SSLError):
            self.close_connection = True  # the reader went away
        except Exception:
            log.exception("Reading the output of RemoteCommand %s/%s failed", namespace, name)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _handler(api: LogsApi, auth: RequestHeaderAuth) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_LogHandler,), {"api": api, "auth": auth})


def server_context(cert_file: str, key_file: str, client_ca: str) -> ssl.SSLContext:
    """TLS: our serving certificate; a client certificate of the request-header CA required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as fh:
        fh.write(client_ca)
        fh.flush()
        context.load_verify_locations(cafile=fh.name)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def read_auth(kube: Any) -> RequestHeaderAuth:
    namespace, name = AUTH_CONFIGMAP
    data = kube.get_config_map_data(namespace, name)
    if data is None:
        raise ValueError(f"ConfigMap {namespace}/{name} does not exist: is the API server's "
                         "aggregation layer on (--requestheader-client-ca-file)?")
    return RequestHeaderAuth.from_configmap(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (no client certificate, a TLS error, a reset): one
        line, no traceback."""
        import sys

        exc = sys.exc_info()[1]
        log.warning("Refused a connection to the output API from %s: %s",
                    client_address[0] if client_address else "?", exc)


def serve_logs_api(kube: Any, store: Any, port: int, address: str, cert_file: str,
                   key_file: str) -> ThreadingHTTPServer:
    """Serve the output API over HTTPS in daemon threads."""
    auth = read_auth(kube)
    context = server_context(cert_file, key_file, auth.client_ca)
    reader = OutputReader(store) if store is not None else None
    server = _Server((address, port), _handler(LogsApi(kube, reader), auth))
    server.socket = context.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="vmfleet-logs-api", daemon=True).start()
    log.info("Serving the output API (%s/%s) on https://%s:%s", GROUP, VERSION, address,
             server.server_address[1])
    return server


__all__ = ["LogQuery", "OutputReader", "RequestHeaderAuth", "parse_path", "resource_list",
           "serve_logs_api"]
