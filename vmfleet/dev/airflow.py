"""Airflow 3 as services on this machine, for the e2e tests and ``make bench``.

A scheduler (LocalExecutor), a dag-processor, a triggerer and an API server, started from
the virtualenv that has Airflow (``.venv-airflow``), on loopback only (the scheduler's and
the triggerer's log servers, which would listen on every address, are not started; the
API server reads the task logs from ``AIRFLOW_HOME/logs``), with their own
``AIRFLOW_HOME`` and SQLite database. :class:`AirflowApi` drives it through ``/api/v2``
with a token from the simple auth manager. Nothing here imports Airflow.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from .proc import ManagedProcess, free_port, wait_until

__all__ = ["COMPONENTS", "AirflowApi", "AirflowServices", "kubernetes_connection"]

COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
_LOCAL_BUNDLE = "airflow.dag_processing.bundles.local.LocalDagBundle"


def kubernetes_connection(kubeconfig: Path, namespace: str) -> str:
    """``AIRFLOW_CONN_KUBERNETES_DEFAULT``: a ``kubernetes`` connection to ``namespace``."""
    return json.dumps({"conn_type": "kubernetes",
                       "extra": {"kube_config_path": str(kubeconfig), "namespace": namespace}})


class AirflowApi:
    """The Airflow REST API with a bearer token from the simple auth manager."""

    def __init__(self, base: str, username: str, password: str) -> None:
        self.base = base
        self.username, self.password = username, password
        self.token: str | None = None

    def login(self) -> None:
        self.token = self.call("POST", "/auth/token",
                               {"username": self.username, "password": self.password},
                               auth=False)["access_token"]

    def call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read().decode()[:2000]}") from exc
        return json.loads(text) if text else None

    def get(self, path: str, **query: Any) -> Any:
        qs = f"?{urllib.parse.urlencode(query)}" if query else ""
        return self.call("GET", f"/api/v2{path}{qs}")

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", f"/api/v2{path}", body)

    def patch(self, path: str, body: Any) -> Any:
        return self.call("PATCH", f"/api/v2{path}", body)

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/api/v2/monitor/health", auth=False)
        return result

    # ------------------------------------------------------------------ DAG runs
    def trigger(self, dag_id: str, conf: Mapping[str, Any]) -> str:
        run = self.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": dict(conf)})
        return str(run["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self.get(f"/dags/{dag_id}/dagRuns/{run_id}")["state"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> str:
        def done() -> str | None:
            state = self.run_state(dag_id, run_id)
            return state if state in ("success", "failed") else None

        return wait_until(done, timeout=timeout, interval=1, what=f"DAG run {dag_id}/{run_id} to finish")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """``{"task_id[map_index]": task instance}``."""
        out: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            page = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100, offset=offset)
            for ti in page["task_instances"]:
                out[f"{ti['task_id']}[{ti['map_index']}]"] = ti
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page["total_entries"]:
                return out

    def states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {k: str(ti["state"]) for k, ti in self.task_instances(dag_id, run_id).items()}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1,
                 map_index: int = -1) -> list[dict[str, Any]]:
        """The task try's log as the UI shows it (the worker's and the triggerer's lines):
        one ``{"timestamp", "event", "level", …}`` per line."""
        page = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                        map_index=map_index, full_content="true")
        content: list[dict[str, Any]] = [e for e in page["content"] if isinstance(e, dict)]
        return content

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
        entry = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/"
                         "return_value", map_index=map_index)
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value


class AirflowServices:
    """The four Airflow 3 components as :class:`ManagedProcess` es (see the module docstring).

    :param bin_dir: the ``bin/`` of the virtualenv with Airflow.
    :param dags_folder: the main DAG bundle (``[core] dags_folder``).
    :param extra_bundles: ``{name: path}`` of further local DAG bundles.
    :param env: more environment (connections, ``PYTHONPATH``, ...).
    """

    def __init__(self, home: Path, bin_dir: Path, dags_folder: Path,
                 extra_bundles: Mapping[str, Path] | None = None, parallelism: int = 4,
                 env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.bin_dir = bin_dir
        self.port = free_port()
        password = secrets.token_urlsafe(16)
        home.mkdir(parents=True, exist_ok=True)
        (home / "passwords.json").write_text(json.dumps({"admin": password}))
        bundles = [{"name": "dags-folder", "classpath": _LOCAL_BUNDLE, "kwargs": {}}]
        bundles += [{"name": name, "classpath": _LOCAL_BUNDLE,
                     "kwargs": {"path": str(path), "refresh_interval": 5}}
                    for name, path in (extra_bundles or {}).items()]
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("AIRFLOW") and k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        self.env: dict[str, str] = {
            **base,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            # The default (getfqdn) waits for DNS, which this machine does not have.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "socket.gethostname",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(64),
            # A triggerer that died is replaced within seconds.
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "*",
            **(env or {}),
        }
        self.api = AirflowApi(f"http://127.0.0.1:{self.port}", "admin", password)
        self.procs: dict[str, ManagedProcess] = {}

    def log_path(self, component: str) -> Path:
        return self.home / "logs" / f"{component}.out"

    def migrate(self) -> None:
        proc = ManagedProcess("airflow-db-migrate", [str(self.bin_dir / "airflow"), "db", "migrate"],
                              self.log_path("migrate"), env=self.env, cwd=self.home).start()
        assert proc.proc is not None
        if proc.proc.wait(600) != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{proc.log_tail()}")

    def start_component(self, component: str) -> ManagedProcess:
        argv = [str(self.bin_dir / "airflow"), component]
        if component in ("scheduler", "triggerer"):
            argv.append("--skip-serve-logs")  # its log server would listen on every address
        if component == "api-server":
            argv += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        proc = ManagedProcess(f"airflow-{component}", argv, self.log_path(component),
                              env=self.env, cwd=self.home)
        self.procs[component] = proc.start()
        return proc

    def check_running(self) -> None:
        for proc in self.procs.values():
            proc.check_running()

    def healthy(self, components: Sequence[str] = ("scheduler", "triggerer", "dag_processor")) -> bool:
        health = self.api.health()
        return all((health.get(c) or {}).get("status") == "healthy" for c in components)

    def start(self, dag_ids: Sequence[str] = (), timeout: float = 300) -> AirflowServices:
        """Migrate, start every component, log in, wait for ``dag_ids`` to be parsed."""
        self.migrate()
        for component in COMPONENTS:
            self.start_component(component)

        def up() -> bool:
            self.check_running()
            try:
                return self.healthy()
            except OSError:
                return False

        wait_until(up, timeout=timeout, interval=1, what="the Airflow services to be healthy")
        self.api.login()
        for dag_id in dag_ids:
            wait_until(partial(self._parsed, dag_id), timeout=timeout, interval=1,
                       what=f"DAG {dag_id} to be parsed")
        return self

    def _parsed(self, dag_id: str) -> bool:
        try:
            return bool(self.api.get(f"/dags/{dag_id}"))
        except RuntimeError:
            return False

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop(grace=15)
