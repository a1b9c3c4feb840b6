"""remote_ftp_processing — the original guide's FTP workflow, on vmfleet.

wait for source files on vm2 → copy each file found to vm3 → process each copy on vm3.

- ``wait_for_source_files`` is a deferrable RemoteFileSensor: one RemoteCommand waits on
  vm2 (checking every ``poke_interval`` seconds, up to ``timeout``) and returns the list of
  files that exist;
- ``transfer_files`` copies each of them over SFTP to the same path on vm3 (one mapped
  task, one RemoteCommand ``transfer`` per file, parent directories created);
- ``process_files`` runs ``processor`` on vm3 once per copied file, the path passed in
  ``$FILE`` (never formatted into the shell line).

VM names, paths and the processor are DAG params with the guide's defaults. The cluster
is reached as in ``remote_vm_execution``. This file does no work at import time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Param

from vmfleet.airflow import RemoteCommandOperator, RemoteFileSensor, RemoteFileTransferOperator


def file_env(transferred: dict[str, Any]) -> dict[str, str]:
    """``$FILE`` for the processor: where a transfer wrote its file on the destination VM."""
    return {"FILE": str(transferred["to"][0]["path"])}


with DAG(
    dag_id="remote_ftp_processing",
    description="Wait for files on vm2, copy them to vm3, process them on vm3",
    schedule=None,
    start_date=datetime(2024, 5, 1),
    catchup=False,
    default_args={"owner": "vmfleet", "retries": 0, "kubernetes_conn_id": "kubernetes_default"},
    # Params keep their types in templates (lists stay lists, numbers stay numbers).
    render_template_as_native_obj=True,
    params={
        "source_vm": Param("vm2", type="string", description="RemoteVM where files arrive (FTP)"),
        "dest_vm": Param("vm3", type="string", description="RemoteVM that processes them"),
        "source_paths": Param(
            ["/home/rocky/in/sample1.txt", "/home/rocky/bon/in/sample3.txt"],
            type="array", items={"type": "string"}, minItems=1,
            description="Files to wait for on the source VM (copied to the same path on dest_vm)",
        ),
        "poke_interval": Param(120, type="integer", minimum=1, description="Seconds between checks"),
        "timeout": Param(3600, type="integer", minimum=1, description="Seconds to wait for files"),
        "processor": Param(
            "python3 /home/rocky/scripts/simple_file_manager.py", type="string",
            description='Shell line run on dest_vm for each file, as: <processor> "$FILE"',
        ),
    },
    tags=["vmfleet", "example"],
    doc_md=__doc__,
) as dag:
    wait_for_source_files = RemoteFileSensor(
        task_id="wait_for_source_files",
        vm="{{ params.source_vm }}",
        paths="{{ params.source_paths }}",
        poke_interval="{{ params.poke_interval }}",
        timeout="{{ params.timeout }}",
    )

    transfer_files = RemoteFileTransferOperator.partial(
        task_id="transfer_files",
        source_vm="{{ params.source_vm }}",
        dest_vm="{{ params.dest_vm }}",
        create_dirs=True,
    ).expand(source_path=wait_for_source_files.output)

    process_files = RemoteCommandOperator.partial(
        task_id="process_files",
        vm="{{ params.dest_vm }}",
        command='{{ params.processor }} "$FILE"',
    ).expand(env=transfer_files.output.map(file_env))
