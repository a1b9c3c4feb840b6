"""remote_vm_execution — the original guide's first workflow, on vmfleet.

check every VM → one command on each VM → a parallel run on three VMs → a file transfer
test (create on vm1, copy to vm2, read it back on vm2) → cleanup on vm1 and vm2.

Every task creates one RemoteCommand and waits for it in the triggerer (no worker slot
held while the VMs work). VM names and paths are DAG params with the guide's defaults.
The cluster is reached through the Airflow connection ``kubernetes_default`` (type
``kubernetes``: ``in_cluster``, ``kube_config_path``, ``cluster_context``, ``namespace``);
without it, through the in-cluster config or ``$KUBECONFIG``, namespace ``default``.
This file does no work at import time.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param, TaskGroup

from vmfleet.airflow import RemoteCommandOperator, RemoteFileTransferOperator

VM1, VM2, VM3 = "{{ params.vm1 }}", "{{ params.vm2 }}", "{{ params.vm3 }}"

with DAG(
    dag_id="remote_vm_execution",
    description="Health check, a command per VM, a parallel run and a VM-to-VM file transfer",
    schedule=None,
    start_date=datetime(2024, 5, 1),
    catchup=False,
    default_args={"owner": "vmfleet", "retries": 0, "kubernetes_conn_id": "kubernetes_default"},
    params={
        "vm1": Param("vm1", type="string", description="First RemoteVM (source of the transfer)"),
        "vm2": Param("vm2", type="string", description="Second RemoteVM (transfer destination)"),
        "vm3": Param("vm3", type="string", description="Third RemoteVM"),
        "test_file": Param("/tmp/test_file.txt", type="string", description="Created on vm1"),
        "received_file": Param("/tmp/received_file.txt", type="string",
                               description="Where the transfer writes it on vm2"),
    },
    tags=["vmfleet", "example"],
    doc_md=__doc__,
) as dag:
    # One RemoteCommand fanned out to every RemoteVM of the namespace (an empty selector).
    check_all_vms = RemoteCommandOperator(
        task_id="check_all_vms",
        selector={},
        command="hostname && uptime && df -h / | tail -n 1",
        timeout_seconds=60,
    )

    with TaskGroup("on_each_vm") as on_each_vm:
        RemoteCommandOperator(task_id="vm1_uptime", vm=VM1, command="hostname && uptime")
        RemoteCommandOperator(task_id="vm2_disk", vm=VM2, command="df -h /")
        RemoteCommandOperator(task_id="vm3_memory", vm=VM3, command="free -m")

    # Three commands on three VMs at once: one mapped task, one RemoteCommand per VM.
    parallel_run = RemoteCommandOperator.partial(
        task_id="parallel_run", timeout_seconds=120
    ).expand_kwargs([
        {"vm": VM1, "command": "hostname && date"},
        {"vm": VM2, "command": "df -h"},
        {"vm": VM3, "command": "ps aux | wc -l"},
    ])

    with TaskGroup("file_transfer_test") as file_transfer_test:
        create = RemoteCommandOperator(
            task_id="create_test_file", vm=VM1,
            command='echo "test content $(date)" > "$TEST_FILE"',
            env={"TEST_FILE": "{{ params.test_file }}"},
        )
        transfer = RemoteFileTransferOperator(
            task_id="transfer", source_vm=VM1, source_path="{{ params.test_file }}",
            dest_vm=VM2, dest_path="{{ params.received_file }}", create_dirs=True,
        )
        verify = RemoteCommandOperator(
            task_id="verify", vm=VM2, argv=["cat", "{{ params.received_file }}"],
        )
        create >> transfer >> verify

    # Runs whatever happened before, so a failed transfer leaves no files behind.
    cleanup_test_files = RemoteCommandOperator.partial(
        task_id="cleanup_test_files", trigger_rule="all_done",
        argv=["rm", "-f", "{{ params.test_file }}", "{{ params.received_file }}"],
    ).expand(vm=[VM1, VM2])

    check_all_vms >> on_each_vm >> parallel_run >> file_transfer_test >> cleanup_test_files
