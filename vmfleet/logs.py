"""Reading a RemoteCommand's output: the client of the controller's aggregated API.

:func:`read_log` is what ``vmfleet logs``, ``vmfleet exec`` and the Airflow trigger read
with. It goes through the Kubernetes API server (the same credentials and the same
authorisation as ``kubectl get remotecommand``), which proxies the request to the
controller (``logs.vmfleet.io``, see :mod:`vmfleet.api.logs`); it never talks to Redis.

Records come in order per (vm, attempt). ``after``: the ``cursor`` of the last record a
reader handled; the server resumes right after it, so a reader that restarts with the
cursor it kept loses no line and sees none twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from .api.logs import CONTENT_TYPE, LogRecord, log_path

__all__ = ["LogRecord", "iter_records", "open_log", "query", "read_log",
           "records"]

#: Read timeout of one request while following: the server sends a heartbeat-free stream,
#: so this must outlast the quietest command; None waits for ever (the server ends it).
FOLLOW_READ_TIMEOUT: float | None = None
CONNECT_TIMEOUT = 10.0


class _HasApiClient(Protocol):
    api_client: Any


def query(*, vm: str | None = None, attempt: int | None = None, follow: bool = False,
          since_seconds: int | None = None, tail_lines: int | None = None,
          after: str | None = None) -> list[tuple[str, str]]:
    """The request's query parameters (only those given)."""
    params: list[tuple[str, str]] = []
    if vm is not None:
        params.append(("vm", vm))
    if attempt is not None:
        params.append(("attempt", str(int(attempt))))
    if follow:
        params.append(("follow", "true"))
    if since_seconds is not None:
        params.append(("sinceSeconds", str(int(since_seconds))))
    if tail_lines is not None:
        params.append(("tailLines", str(int(tail_lines))))
    if after:
        params.append(("after", after))
    return params


def records(chunks: Iterator[bytes]) -> Iterator[LogRecord]:
    """NDJSON records from a body read in chunks (a record may span chunks)."""
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield LogRecord.from_json(line)
    if pending.strip():
        yield LogRecord.from_json(pending)


def read_log(kube: _HasApiClient, namespace: str, name: str, *, vm: str | None = None,
             attempt: int | None = None, follow: bool = False, since_seconds: int | None = None,
             tail_lines: int | None = None, after: str | None = None) -> Iterator[LogRecord]:
    """The output of RemoteCommand ``namespace/name`` as :class:`LogRecord`\\ s.

    ``kube``: a :class:`vmfleet.kube.Kube` (anything with an ``api_client``). Without
    ``follow`` the records kept so far; with it, also what comes, until every attempt
    ended and its output was read. Raises ``kubernetes.client.ApiException`` as the API
    server answers (403: no ``get`` on the RemoteCommand; 404: no such command, or the
    output API is not installed)."""
    raw = open_log(kube, namespace, name, vm=vm, attempt=attempt, follow=follow,
                   since_seconds=since_seconds, tail_lines=tail_lines, after=after)
    try:
        yield from records(_chunks(raw))
    finally:
        raw.release_conn()


def open_log(kube: _HasApiClient, namespace: str, name: str, *, vm: str | None = None,
             attempt: int | None = None, follow: bool = False, since_seconds: int | None = None,
             tail_lines: int | None = None, after: str | None = None) -> Any:
    """The request of :func:`read_log`, answered (an ``ApiException`` if not 2xx): the
    raw response, whose body :func:`iter_records` reads. For a caller that must know
    the API answered before the first record (``vmfleet exec``)."""
    from kubernetes.client.exceptions import ApiException

    api_client = kube.api_client
    method, url, headers, _body, _post = api_client.param_serialize(
        "GET", log_path(namespace, name),
        query_params=query(vm=vm, attempt=attempt, follow=follow, since_seconds=since_seconds,
                           tail_lines=tail_lines, after=after),
        header_params={"Accept": CONTENT_TYPE}, auth_settings=["BearerToken"])
    timeout = (CONNECT_TIMEOUT, FOLLOW_READ_TIMEOUT if follow else 60.0)
    response = api_client.call_api(method, url, header_params=headers, _request_timeout=timeout)
    raw = response.response  # urllib3's, not read yet
    if not 200 <= raw.status <= 299:
        try:
            raise ApiException(http_resp=raw)
        finally:
            raw.release_conn()
    return raw


def iter_records(raw: Any) -> Iterator[LogRecord]:
    """The records of a response from :func:`open_log` (its connection released after)."""
    try:
        yield from records(_chunks(raw))
    finally:
        raw.release_conn()


def _chunks(raw: Any) -> Iterator[bytes]:
    """The body as it arrives (each chunk of a chunked response at once)."""
    if raw.chunked and raw.supports_chunked_reads():
        yield from raw.read_chunked(decode_content=True)
    else:
        yield from raw.stream(64 * 1024, decode_content=True)
