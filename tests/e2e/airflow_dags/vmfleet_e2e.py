"""DAGs of the real-services Airflow tests (tests/e2e/test_airflow_services.py), in a DAG
bundle of their own beside the repository's dags/. Every path comes from ``params.dir``,
a directory the test made; the commands wait for ``$dir/go`` so the test decides when
they finish."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from vmfleet.airflow import RemoteCommandOperator

DEFERRED_TASKS = 20
WAIT_FOR_GO = 'while [ ! -e "{{ params.dir }}/go" ]; do sleep 0.5; done'

_ARGS = {"owner": "vmfleet", "retries": 0, "kubernetes_conn_id": "kubernetes_default"}
_PARAMS = {"dir": Param("/tmp/vmfleet-e2e", type="string", description="Where the tasks keep their files")}

with DAG(dag_id="vmfleet_e2e_many_deferred", schedule=None, start_date=datetime(2024, 5, 1),
         default_args=_ARGS, params=_PARAMS, max_active_tasks=64, tags=["vmfleet", "e2e"]):
    # Counts each start on the VM, then waits for the go file.
    RemoteCommandOperator.partial(
        task_id="wait",
        vm="vm1",
        command='echo started >> "{{ params.dir }}/$I.count"; ' + WAIT_FOR_GO + '; echo "done $I"',
    ).expand(env=[{"I": str(i)} for i in range(DEFERRED_TASKS)])

with DAG(dag_id="vmfleet_e2e_cancel", schedule=None, start_date=datetime(2024, 5, 1),
         default_args=_ARGS, params=_PARAMS, tags=["vmfleet", "e2e"]):
    # Each try writes the PID of its shell, then waits for the go file. One VM per try: on
    # one VM, the worker's cancel of one command also ended the channels of the others
    # running there (seen 2026-12-01), and a cleared task's next try starts before the
    # cancel of the previous one.
    for task_id, vm in (("marked_failed", "vm1"),
                        ("cleared", "{{ 'vm2' if ti.try_number == 1 else 'vm3' }}")):
        RemoteCommandOperator(
            task_id=task_id,
            vm=vm,
            command='echo $$ > "{{ params.dir }}/{{ ti.task_id }}-{{ ti.try_number }}.pid"; '
                    + WAIT_FOR_GO + '; echo "try {{ ti.try_number }} done"',
        )

with DAG(dag_id="vmfleet_e2e_output", schedule=None, start_date=datetime(2024, 5, 1),
         default_args=_ARGS, params=_PARAMS, tags=["vmfleet", "e2e"]):
    # Prints lines over a few seconds in three parts; the test says when the next part
    # may start (go1, go2), so it can restart the triggerer in between.
    _PART = 'for i in {}; do echo "line $i"; sleep 0.3; done'
    RemoteCommandOperator(
        task_id="print",
        vm="vm1",
        defer_after_seconds=0,
        output_checkpoint_seconds=1,
        command=" ; ".join((
            _PART.format("1 2 3 4 5"), 'echo "warning after 5" >&2',
            'while [ ! -e "{{ params.dir }}/go1" ]; do sleep 0.2; done',
            _PART.format("6 7 8 9 10"),
            'while [ ! -e "{{ params.dir }}/go2" ]; do sleep 0.2; done',
            _PART.format("11 12 13 14 15"),
        )),
    )
