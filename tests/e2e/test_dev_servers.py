"""The local environment's servers behave like the real thing: sshd VMs and brokers."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from celery import Celery
from kombu import Connection

from vmfleet.dev.brokers import RabbitMQServer, RedisServer
from vmfleet.dev.proc import port_open, wait_until
from vmfleet.dev.sshd import SshdVM, hidden_paths, namespaces_supported, wait_for_port_closed
from vmfleet.state import State
from vmfleet.tenancy import transport_options

pytestmark = pytest.mark.e2e

needs_namespaces = pytest.mark.skipif(
    not namespaces_supported(), reason="per-VM namespaces need root and unshare"
)


# -- sshd VMs ---------------------------------------------------------------------


def test_each_vm_answers_with_pinned_host_key(vms: list[SshdVM]) -> None:
    assert [vm.name for vm in vms] == ["vm1", "vm2", "vm3"]
    assert len({vm.host for vm in vms}) == len(vms), "each VM has its own address"
    for vm in vms:
        assert vm.host.startswith("127.")
        assert vm.host_public_keys and all(k.startswith("ssh-ed25519 AAAA") for k in vm.host_public_keys)
        client = vm.ssh_client()  # RejectPolicy: only the pinned key is accepted
        try:
            _, stdout, _ = client.exec_command("hostname; id -un", timeout=10)
            hostname, user = stdout.read().decode().split()
            assert stdout.channel.recv_exit_status() == 0
        finally:
            client.close()
        assert user == vm.user
        if vm.isolated:
            assert hostname == vm.name


def test_secret_material_is_openssh_text(vms: list[SshdVM]) -> None:
    vm = vms[0]
    assert vm.user_private_key_pem.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert vm.user_public_key.startswith("ssh-ed25519 ")
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(vm.user_private_key_pem))
    assert vm.user_public_key.split()[1] == key.get_base64()


def test_wrong_pinned_host_key_is_refused(vms: list[SshdVM]) -> None:
    vm1, vm2 = vms[0], vms[1]
    with pytest.raises(paramiko.BadHostKeyException):
        vm1.ssh_client(host_keys=vm2.host_public_keys)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        vm1.ssh_client(host_keys=[])


def test_other_vm_user_key_is_refused(vms: list[SshdVM]) -> None:
    vm1, vm2 = vms[0], vms[1]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for line in vm1.known_hosts_lines():
        entry, key_type, blob = line.split()
        client.get_host_keys().add(entry, key_type, paramiko.PKey.from_type_string(key_type, _b64(blob)))
    other_key = paramiko.Ed25519Key.from_private_key(io.StringIO(vm2.user_private_key_pem))
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            vm1.host, vm1.port, username=vm1.user, pkey=other_key, timeout=10,
            allow_agent=False, look_for_keys=False,
        )
    client.close()


def test_sshd_listens_only_on_its_own_address(vms: list[SshdVM]) -> None:
    listeners = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True).stdout
    for vm in vms:
        mine = [line.split()[3] for line in listeners.splitlines() if line.split()[3].endswith(f":{vm.port}")]
        assert mine == [f"{vm.host}:{vm.port}"], listeners
        assert port_open(vm.host, vm.port)
        assert not port_open("127.0.0.1", vm.port)


def test_regenerated_host_key_takes_effect_at_restart(make_vm: Callable[..., SshdVM]) -> None:
    vm = make_vm("rekeyed")
    old = vm.host_public_keys
    vm.regenerate_host_key()
    new = vm.host_public_keys
    assert new != old
    vm.ssh_client(host_keys=old).close()  # the running sshd still has the old key
    vm.restart()
    with pytest.raises(paramiko.BadHostKeyException):
        vm.ssh_client(host_keys=old)
    assert vm.run("echo ok") == (0, b"ok\n", b"")


def test_user_key_with_passphrase(make_vm: Callable[..., SshdVM]) -> None:
    vm = make_vm("locked", key_passphrase="correct horse")
    with pytest.raises(paramiko.PasswordRequiredException):
        paramiko.Ed25519Key.from_private_key(io.StringIO(vm.user_private_key_pem))
    assert vm.run("echo ok")[0] == 0


def test_restart_keeps_address_and_keys(make_vm: Callable[..., SshdVM]) -> None:
    vm = make_vm()
    before = (vm.host, vm.port, vm.host_public_keys, vm.user_public_key)
    vm.restart()
    assert (vm.host, vm.port, vm.host_public_keys, vm.user_public_key) == before
    assert vm.run("true")[0] == 0


@pytest.mark.parametrize("isolate", [None, False], ids=["default", "no-namespaces"])
def test_kill_is_a_crashed_vm(make_vm: Callable[..., SshdVM], isolate: bool | None) -> None:
    vm = make_vm(isolate=isolate)
    marker = f"{uuid.uuid4().int % 10**6}.25"  # a sleep no one else runs
    client = vm.ssh_client()
    client.exec_command(f"sleep {marker}")
    wait_until(lambda: _pgrep(f"sleep {marker}"), 10, what="remote sleep to start")
    vm.kill()
    wait_for_port_closed(vm.host, vm.port)
    # The VM's processes die with it (own PID namespace; else found through /proc).
    wait_until(lambda: not _pgrep(f"sleep {marker}"), 10, what="remote sleep to die")
    transport = client.get_transport()
    wait_until(lambda: transport is None or not transport.is_active(), 10, what="connection to drop")
    client.close()
    vm.start()
    assert vm.run("true")[0] == 0


def test_a_vm_started_elsewhere_is_stopped_through_its_pid_file(
    make_vm: Callable[..., SshdVM],
) -> None:
    vm = make_vm()
    # Another process (e.g. `vmfleet dev down`) knows only the work dir and address.
    other = SshdVM(vm.name, vm.workdir, address=vm.host, port=vm.port)
    assert other.host_public_keys == vm.host_public_keys, "keys are reused from the work dir"
    other.stop()
    wait_for_port_closed(vm.host, vm.port)
    assert not vm.pid_file.exists()


@needs_namespaces
def test_vms_have_private_tmp(vms: list[SshdVM]) -> None:
    vm1, vm2 = vms[0], vms[1]
    name = f"/tmp/vmfleet-{uuid.uuid4().hex}"
    assert vm1.run(f"echo from-vm1 > {name}")[0] == 0
    assert vm1.host_path(name).read_bytes() == b"from-vm1\n"
    assert vm2.run(f"test -e {name}")[0] == 1
    assert not vm2.host_path(name).exists()
    vm2.host_path(name).write_bytes(b"put-on-vm2\n")
    assert vm2.run(f"cat {name}")[1] == b"put-on-vm2\n"
    # Files transferred over SFTP land in the same place.
    client = vm1.ssh_client()
    try:
        with client.open_sftp() as sftp:
            sftp.putfo(io.BytesIO(b"via-sftp"), name + ".sftp")
    finally:
        client.close()
    assert vm1.host_path(name + ".sftp").read_bytes() == b"via-sftp"


@pytest.fixture(params=["/tmp", "home"])
def clone_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory where people clone: under /tmp, or under the home directory."""
    parent = "/tmp" if request.param == "/tmp" else os.path.expanduser("~")
    path = Path(tempfile.mkdtemp(prefix="vmfleet-clone-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_namespaces
def test_a_checkout_under_a_private_directory_stays_visible_on_the_vm(
    make_vm: Callable[..., SshdVM], clone_dir: Path,
) -> None:
    # As root every VM covers /tmp and the home directory with its own; a clone there
    # (the e2e tests' shared files, the demo's) is bound back at its own path.
    (clone_dir / "shared").mkdir()
    (clone_dir / "shared" / "from-host").write_text("written on the host\n")
    vm = make_vm(visible=[clone_dir])
    assert hidden_paths([clone_dir], vm.user) == [clone_dir]
    assert vm.run(f"cat {clone_dir}/shared/from-host") == (0, b"written on the host\n", b"")
    assert vm.run(f"echo from-vm > {clone_dir}/shared/from-vm")[0] == 0
    assert (clone_dir / "shared" / "from-vm").read_text() == "from-vm\n"
    assert vm.host_path(f"{clone_dir}/shared/from-vm") == clone_dir / "shared" / "from-vm"
    # The rest of the private directory stays the VM's own.
    sibling = Path(tempfile.mkdtemp(prefix="vmfleet-not-kept-", dir=clone_dir.parent))
    try:
        assert vm.run(f"test -e {sibling}")[0] == 1
    finally:
        sibling.rmdir()
    # Without it, the clone is what the VM cannot see (what failed before).
    plain = make_vm(visible=[])
    assert plain.run(f"test -e {clone_dir}/shared/from-host")[0] == 1


# -- brokers ----------------------------------------------------------------------


@pytest.fixture(params=["redis_server", "rabbitmq_server"])
def broker(request: pytest.FixtureRequest) -> RedisServer | RabbitMQServer:
    server: RedisServer | RabbitMQServer = request.getfixturevalue(request.param)
    return server


def test_broker_urls(redis_server: RedisServer) -> None:
    assert redis_server.anonymous_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.url.startswith("redis://vmfleet-controller:")
    assert redis_server.url.endswith(f"@127.0.0.1:{redis_server.port}/0")
    listeners = subprocess.run(["ss", "-Htln"], capture_output=True, text=True, check=True).stdout
    mine = [line.split()[3] for line in listeners.splitlines() if line.split()[3].endswith(f":{redis_server.port}")]
    assert mine == [f"127.0.0.1:{redis_server.port}"]


def test_celery_message_round_trip(broker: RedisServer | RabbitMQServer) -> None:
    queue = f"vmfleet.test.{uuid.uuid4().hex[:8]}"
    url = _url(broker)
    task_id = _send_task(url, queue, "hello")
    assert _receive(url, queue) == (task_id, "hello")


def test_redis_started_elsewhere_is_stopped_through_its_pid_file(
    make_redis: Callable[..., RedisServer],
) -> None:
    redis = make_redis()
    RedisServer(redis.workdir, port=redis.port).stop()
    wait_for_port_closed(redis.host, redis.port)


def test_redis_keeps_queued_message_across_restart(make_redis: Callable[..., RedisServer]) -> None:
    redis = make_redis()
    queue = f"vmfleet.test.{uuid.uuid4().hex[:8]}"
    task_id = _send_task(_url(redis), queue, "survives restart")
    port = redis.port
    redis.restart()
    assert redis.port == port
    assert _receive(_url(redis), queue) == (task_id, "survives restart")


def test_redis_keeps_a_namespace_s_claims_across_restart(
        make_redis: Callable[..., RedisServer]) -> None:
    """A claim is a script's write, in the append-only file as a MULTI/EXEC: after a clean
    restart the attempt is still taken, so its redelivery does not run it again (with a bare
    ``user default off`` Redis 7 refused every such EXEC when replaying the file)."""
    import redis as redis_py

    server = make_redis()
    ns = f"keep-{uuid.uuid4().hex[:6]}"
    url = server.namespace_url(ns)
    admin: Any = redis_py.Redis.from_url(server.admin_url)
    admin.execute_command("ACL", "SAVE")  # as the controller does after creating a user
    admin.close()
    assert State(url).claim("uid-1", "vm1", 1, "w1", namespace=ns, delivery="first") == "claimed"
    server.restart()
    assert State(url).claim("uid-1", "vm1", 1, "w1", namespace=ns, delivery="again") == "taken"
    assert "CRITICAL" not in server.log_path.read_text()


def test_redis_keeps_queued_message_across_crash(make_redis: Callable[..., RedisServer]) -> None:
    redis = make_redis()
    queue = f"vmfleet.test.{uuid.uuid4().hex[:8]}"
    task_id = _send_task(_url(redis), queue, "survives kill")
    redis.kill()
    redis.start()
    assert _receive(_url(redis), queue) == (task_id, "survives kill")


def test_rabbitmq_keeps_queued_message_across_restart(
    make_rabbitmq: Callable[..., RabbitMQServer],
) -> None:
    rabbit = make_rabbitmq()
    queue = f"vmfleet.test.{uuid.uuid4().hex[:8]}"
    task_id = _send_task(rabbit.url, queue, "survives restart")
    rabbit.restart()
    assert _receive(rabbit.url, queue) == (task_id, "survives restart")
    beam = f"-home {rabbit.workdir / 'home'}"  # beam.smp's command line names its HOME
    assert _pgrep(beam), "the node runs as beam.smp"
    rabbit.stop()
    assert not _pgrep(beam), "no beam process left behind"
    assert not port_open("127.0.0.1", rabbit.epmd_port), "no epmd left behind"


# -- helpers ----------------------------------------------------------------------


def _url(broker: RedisServer | RabbitMQServer) -> str:
    """Redis: the namespace ``test``'s own user (what a worker of it holds)."""
    return broker.namespace_url("test") if isinstance(broker, RedisServer) else broker.url


def _options(url: str) -> dict[str, Any]:
    return transport_options("test") if url.startswith("redis://") else {}


def _send_task(url: str, queue: str, payload: str) -> str:
    """Publish a real Celery task message to ``queue`` (no worker consumes it)."""
    app = Celery("vmfleet-test", broker=url)
    app.conf.broker_transport_options = _options(url)
    try:
        result = app.send_task("vmfleet.test.echo", args=[payload], queue=queue)
        return str(result.id)
    finally:
        app.close()


def _receive(url: str, queue: str, timeout: float = 15) -> tuple[str, str]:
    with Connection(url, transport_options=_options(url)) as conn:
        simple = conn.SimpleQueue(queue)
        try:
            message = simple.get(block=True, timeout=timeout)
            message.ack()
        finally:
            simple.close()
    assert message.headers["task"] == "vmfleet.test.echo"
    args, _kwargs, _embed = message.decode()
    return str(message.headers["id"]), str(args[0])


def _pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout
    return out.split()


def _b64(blob: str) -> bytes:
    import base64

    return base64.b64decode(blob)
