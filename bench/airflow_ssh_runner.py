"""Times Airflow 3 ``dag.test()`` runs of a one-task SSHOperator DAG (``airflow_sshoperator``).

Runs in the ``.venv-airflow`` interpreter, started by ``bench/scenarios/latency.py`` once
per round with the environment it prepared (``AIRFLOW_HOME`` with a migrated sqlite DB,
and ``AIRFLOW_CONN_<ID>`` pointing at the VM with its host key pinned):

    .venv-airflow/bin/python bench/airflow_ssh_runner.py DAG_FILE DAG_ID RUNS [WARMUP]

Loads the DAG once (not timed), runs ``WARMUP`` untimed runs, then times ``RUNS`` calls of
``dag.test()`` (create the DAG run → its one task succeeded, in this process, as
``airflow dags test`` does), checks each run's task state is ``success`` and prints
``SSHOP-RESULT {"seconds": [...]}`` on its last line.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta

# The DAG the scenario writes into the DAGs folder (formatted with the connection id).
DAG_TEMPLATE = '''\
from datetime import datetime

from airflow.providers.ssh.operators.ssh import SSHOperator
from airflow.sdk import DAG

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         default_args={{"retries": 0}}):
    SSHOperator(task_id="run_true", ssh_conn_id={conn_id!r}, command="true", cmd_timeout=30)
'''


def main(argv: list[str]) -> int:
    dag_file, dag_id, runs = argv[0], argv[1], int(argv[2])
    warmup = int(argv[3]) if len(argv) > 3 else 1

    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=dag_file)
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
    # Distinct run_after per run: dag.test() replaces an earlier run of the same date.
    base = datetime.now(UTC)
    seconds: list[float] = []
    for i in range(warmup + runs):
        when = base + timedelta(milliseconds=i)
        start = time.perf_counter()
        dr = dag.test(logical_date=when, run_after=when)
        elapsed = time.perf_counter() - start
        with create_session() as session:
            states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances(session=session)}
        if str(dr.state) != "success" or states != {"run_true": "success"}:
            raise SystemExit(f"run {i}: dag run {dr.state}, tasks {states}")
        if i >= warmup:
            seconds.append(elapsed)
    print("SSHOP-RESULT " + json.dumps({"seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
