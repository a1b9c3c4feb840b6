"""vmfleet exec: argument handling, the RemoteCommand built, exit codes, printing, progress."""

from __future__ import annotations

import io

import pytest

from tests.fakes import ExecKube, obj_with, options, result, run
from vmfleet import exec as ex
from vmfleet import execprint, outcome
from vmfleet.api.models import MAX_OUTPUT_BYTES, RemoteCommandSpec

# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("argv", "vm", "selector", "command", "namespace"),
    [
        (["vm1", "--", "sh", "-c", "echo out; exit 4"], "vm1", None, ["sh", "-c", "echo out; exit 4"], None),
        (["-n", "ops", "vm1", "--", "df", "-h", "/"], "vm1", None, ["df", "-h", "/"], "ops"),
        # options after the VM name, as kubectl exec allows
        (["vm1", "-n", "ops", "--", "ls", "-l"], "vm1", None, ["ls", "-l"], "ops"),
        # everything after -- belongs to the command, even what looks like our options
        (["vm1", "--", "grep", "-n", "-l", "x", "--", "f"], "vm1", None,
         ["grep", "-n", "-l", "x", "--", "f"], None),
        (["-l", "role=web", "--", "uname", "-a"], None, "role=web", ["uname", "-a"], None),
        (["-l", "role=web", "-n", "ops", "--", "uptime"], None, "role=web", ["uptime"], "ops"),
        (["vm1", "uname"], "vm1", None, ["uname"], None),  # no options: -- may be left out
    ],
)
def test_arguments(argv, vm, selector, command, namespace):
    opts = options(*argv)
    assert (opts.vm, opts.selector, opts.argv, opts.namespace) == (vm, selector, command, namespace)


def test_options_after_the_vm_keep_those_given_before():
    opts = options("--timeout", "30", "vm1", "--keep", "-e", "A=1", "-e", "B=x=y", "--", "env")
    assert (opts.timeout, opts.keep, opts.env) == (30, True, {"A": "1", "B": "x=y"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--", "ls"], "name a RemoteVM"),
        (["vm1", "--"], "no command"),
        (["vm1"], "no command"),
        (["-l", "a=b", "vm1", "--", "ls"], "not both"),
        (["vm1", "--timeout", "0", "--", "ls"], "--timeout must be at least 1"),
        (["vm1", "-e", "1BAD=x", "--", "ls"], "--env '1BAD=x'"),
        (["vm1", "-e", "NOEQUALS", "--", "ls"], "NAME=VALUE"),
        (["vm1", "--max-bytes", str(MAX_OUTPUT_BYTES + 1), "--", "ls"], "--max-bytes"),
        (["vm1", "--bogus", "--", "ls"], "unexpected arguments before --: --bogus"),
        (["vm1", "extra", "--", "ls"], "unexpected arguments before --: extra"),
        (["-l", "zone in a", "--", "ls"], "selector term 'zone in a'"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(ex.UsageError, match=message.replace("(", r"\(")):
        options(*argv)


# --------------------------------------------------------------------------- the object


@pytest.mark.parametrize(
    ("text", "selector"),
    [
        ("role=web", {"matchLabels": {"role": "web"}}),
        ("role==web,zone=a", {"matchLabels": {"role": "web", "zone": "a"}}),
        ("tier!=db", {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}),
        ("zone in (a, b),env notin (dev)", {"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "env", "operator": "NotIn", "values": ["dev"]}]}),
        ("gpu,!spot", {"matchExpressions": [{"key": "gpu", "operator": "Exists"},
                                            {"key": "spot", "operator": "DoesNotExist"}]}),
        ("vmfleet.io/pool=a", {"matchLabels": {"vmfleet.io/pool": "a"}}),
    ],
)
def test_parse_selector(text, selector):
    assert ex.parse_selector(text) == selector


@pytest.mark.parametrize("text", ["", "a=b,,c", "zone in a", "a b=c"])
def test_bad_selectors(text):
    with pytest.raises(ex.UsageError):
        ex.parse_selector(text)


def test_the_remote_command_built_for_one_vm_is_a_valid_spec():
    opts = options("vm1", "--timeout", "30", "-e", "X=1", "-w", "/srv", "--", "sh", "-c", "echo $X")
    body = ex.build_command(opts, "ops")
    assert body["metadata"] == {"generateName": "exec-vm1-", "namespace": "ops",
                                "labels": {"app.kubernetes.io/created-by": "vmfleet-exec"}}
    assert body["spec"] == {
        "vm": "vm1", "argv": ["sh", "-c", "echo $X"], "env": {"X": "1"}, "workingDir": "/srv",
        "timeoutSeconds": 30, "output": {"maxBytes": MAX_OUTPUT_BYTES},
        "ttlSecondsAfterFinished": ex.DEFAULT_TTL_SECONDS,
    }
    RemoteCommandSpec.model_validate(body["spec"])  # what the API server will accept


def test_keep_sets_no_ttl_and_fan_out_shares_the_output_budget():
    body = ex.build_command(options("--keep", "-l", "role=web", "--", "uptime"), "ops", targets=8)
    spec = body["spec"]
    assert "ttlSecondsAfterFinished" not in spec and "vm" not in spec
    assert spec["selector"] == {"matchLabels": {"role": "web"}}
    assert spec["output"]["maxBytes"] == 1024 * 1024 // 16
    assert body["metadata"]["generateName"] == "exec-"
    RemoteCommandSpec.model_validate(spec)


@pytest.mark.parametrize(("targets", "requested", "expected"), [
    (1, None, MAX_OUTPUT_BYTES), (2, None, MAX_OUTPUT_BYTES), (3, None, 174762),
    (100000, None, 5), (50, 100, 100), (1, 0, 0),
])
def test_output_max_bytes(targets, requested, expected):
    assert ex.output_max_bytes(targets, requested) == expected


def test_generate_name_stays_short():
    assert ex.generate_name("a" * 60) == "exec-" + "a" * 40 + "-"


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        (result(phase="Succeeded", exitCode=0, reason="Completed"), 0),
        (result(phase="Succeeded", exitCode=1, reason="Completed"), 1),  # successExitCodes
        (result(exitCode=4, reason="ExitCode"), 4),
        (result(reason="ExitCode", message="killed by a signal?"), 255),
        (result(reason="HostKeyMismatch", message="host key does not match"), 255),
        (result(reason="AuthFailed"), 255),
        (result(reason="TransportError"), 255),
        (result(reason="VMNotFound"), 255),
        (result(reason="WorkerLost"), 255),
        (result(reason="Timeout", exitCode=143), 124),
        (result(reason="DeadlineExceeded"), 124),
        (result(phase="Cancelled", reason="Cancelled"), 130),
    ],
)
def test_exit_code_for(entry, code):
    assert outcome.exit_code_for(entry) == code


def test_fan_out_exit_code():
    ok = result(phase="Succeeded", exitCode=0)
    assert outcome.fan_out_exit_code([ok, ok]) == 0
    assert outcome.fan_out_exit_code([ok, result(exitCode=3, reason="ExitCode")]) == 3
    assert outcome.fan_out_exit_code([result(exitCode=3, reason="ExitCode"),
                                 result("vm2", reason="AuthFailed")]) == 255


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (result(phase="Succeeded", exitCode=0), None),
        (result(exitCode=4, reason="ExitCode", message="exit code 4"), None),
        (result(reason="HostKeyMismatch", message="the host key of 127.0.0.1 does not match"),
         "vmfleet: vm1: HostKeyMismatch: the host key of 127.0.0.1 does not match"),
        (result(reason="VMNotFound", message="RemoteVM ops/vm9 does not exist"),
         "vmfleet: vm1: VMNotFound: RemoteVM ops/vm9 does not exist"),
        (result(reason="WorkerLost"), "vmfleet: vm1: WorkerLost: the worker running the command was lost"),
        (result(reason="Timeout"), "vmfleet: vm1: Timeout: the command took too long and was ended"),
        (result(phase="Cancelled", reason="Cancelled"), "vmfleet: vm1: cancelled"),
    ],
)
def test_failure_message(entry, message):
    assert outcome.failure_message(entry) == message


def test_truncation_notices():
    assert outcome.truncation_notices(result(outputTruncated=False)) == []
    entry = result(outputTruncated=True, stdout="x" * 10, stdoutBytes=5000, stderr="e\n",
                   stderrBytes=2)
    assert outcome.truncation_notices(entry) == [
        "vmfleet: vm1: stdout was truncated: showing the last 10 of 5000 bytes "
        "(the full output is in the worker's log)"]


# --------------------------------------------------------------------------- printing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("a\nb\n", "[vm1] a\n[vm1] b\n"),
        ("no newline", "[vm1] no newline\n"),
        ("\n\nx\n", "[vm1] \n[vm1] \n[vm1] x\n"),
    ],
)
def test_prefix_lines(text, expected):
    assert execprint.prefix_lines("[vm1] ", text) == expected


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_printer_prints_each_vm_once_prefixed_and_in_order():
    out, err = io.StringIO(), io.StringIO()
    printer = execprint.Printer(out, err, prefixed=True, progress=execprint.Progress(err))
    running = [result("vm2", phase="Running"), result("vm1", phase="Queued")]
    printer.show(running)
    assert out.getvalue() == err.getvalue() == ""
    first = [result("vm2", phase="Succeeded", exitCode=0, stdout="two\n", stderr="warn\n"),
             result("vm1", phase="Running")]
    printer.show(first)
    printer.show(first)  # the same update again prints nothing new
    printer.show([first[0], result("vm1", exitCode=4, reason="ExitCode", stdout="one")])
    assert out.getvalue() == "[vm2] two\n[vm1] one\n"
    assert err.getvalue() == "[vm2] warn\n"


def test_single_vm_output_is_written_as_it_was():
    out, err = io.StringIO(), io.StringIO()
    printer = execprint.Printer(out, err, prefixed=False, progress=execprint.Progress(err))
    printer.show([result(reason="ExitCode", exitCode=4, stdout="out\nno newline",
                         stderr="err\n\ufffd\n")])
    assert out.getvalue() == "out\nno newline"
    assert err.getvalue() == "err\n\ufffd\n"


def test_progress_line_only_on_a_terminal():
    results = [result("vm1", phase="Succeeded"), result("vm2", phase="Failed"),
               result("vm3", phase="Running"), result("vm4", phase="Queued")]
    assert execprint.Progress.text(results) == "vmfleet: 2/4 done, 1 failed, 1 running"
    quiet = io.StringIO()
    execprint.Progress(quiet).update(results)
    assert quiet.getvalue() == ""
    tty = Tty()
    progress = execprint.Progress(tty)
    progress.update(results)
    progress.update(results)  # unchanged: not written again
    progress.update(results[:1])  # a single VM: no progress line
    progress.clear()
    assert tty.getvalue() == "\r\033[Kvmfleet: 2/4 done, 1 failed, 1 running\r\033[K"


# --------------------------------------------------------------------------- the flow


def test_run_resumes_the_watch_and_deletes_the_object_afterwards():
    final = result(exitCode=4, reason="ExitCode", stdout="out\n", stderr="err\n")
    kube = ExecKube([
        [("ADDED", obj_with(11, None))],  # the server ended this watch
        [("MODIFIED", obj_with(12, [result(phase="Queued")])), ("ERROR410", {})],
        [("MODIFIED", obj_with(20, [final], phase="Failed"))],
    ])
    code, out, err = run(kube, "vm1", "--", "sh", "-c", "x")
    assert (code, out, err) == (4, "out\n", "err\n")
    assert kube.watched_from == ["10", "11", "11"]  # resumed; after 410 from a fresh read
    assert kube.deleted == ["exec-vm1-abcde"]


def test_run_keep_leaves_the_object_and_says_so():
    final = result(phase="Succeeded", exitCode=0, reason="Completed", stdout="ok\n")
    kube = ExecKube([[("MODIFIED", obj_with(12, [final]))]])
    code, out, err = run(kube, "--keep", "vm1", "--", "true")
    assert (code, out, kube.deleted) == (0, "ok\n", [])
    assert "kept RemoteCommand default/exec-vm1-abcde" in err


def test_run_transport_error_exits_255_with_a_message():
    final = result(reason="AuthFailed", message="the VM refused the key for user root")
    kube = ExecKube([[("MODIFIED", obj_with(12, [final]))]])
    code, out, err = run(kube, "vm1", "--", "true")
    assert (code, out) == (255, "")
    assert err == "vmfleet: vm1: AuthFailed: the VM refused the key for user root\n"


def test_run_fan_out_prefixes_and_summarises_failures():
    results = [result("vm1", phase="Succeeded", exitCode=0, stdout="a\n"),
               result("vm2", exitCode=3, reason="ExitCode", stdout="b\n", stderr="oops\n")]
    kube = ExecKube([[("MODIFIED", obj_with(12, results))]], vms=2)
    code, out, err = run(kube, "-l", "role=web", "--", "sh", "-c", "x")
    assert code == 3
    assert out == "[vm1] a\n[vm2] b\n"
    assert err == "[vm2] oops\nvmfleet exec: failed on 1 of 2 VMs: vm2\n"
    assert kube.created[0]["spec"]["output"]["maxBytes"] == MAX_OUTPUT_BYTES


def test_run_with_a_selector_matching_nothing_creates_nothing():
    kube = ExecKube([], vms=0)
    code, _, err = run(kube, "-l", "role=none", "--", "true")
    assert code == 1 and kube.created == []
    assert "no RemoteVM in namespace default matches 'role=none'" in err


def test_run_command_that_ended_without_results():
    failed = obj_with(12, None, phase="Failed", conditions=[
        {"type": "Failed", "status": "True", "message": "the spec is invalid: bad"}])
    kube = ExecKube([[("MODIFIED", failed)]])
    code, _, err = run(kube, "vm1", "--", "true")
    assert code == 255 and err == "vmfleet exec: the spec is invalid: bad\n"


def test_run_deleted_by_someone_else():
    kube = ExecKube([[("DELETED", obj_with(12, None))]])
    code, _, err = run(kube, "vm1", "--", "sleep", "600")
    assert code == 130 and "was deleted before it finished" in err


def test_interrupt_deletes_the_command():
    def interrupted():  # type: ignore[no-untyped-def]
        yield "ADDED", obj_with(11, [result(phase="Running")])
        raise ex.Interrupted("SIGINT")

    kube = ExecKube([])
    kube.watch_command = lambda *a: interrupted()  # type: ignore[method-assign]
    code, _, err = run(kube, "vm1", "--", "sleep", "600")
    assert code == 130
    assert kube.deleted == ["exec-vm1-abcde"]
    assert "interrupted: deleting RemoteCommand default/exec-vm1-abcde" in err


def test_waiting_hints():
    assert ex.waiting_hint(obj_with(11, None), "ops", 15.2) == (
        "undispatched", "vmfleet exec: still waiting after 15s: RemoteCommand ops/exec-vm1-abcde "
        "has not been dispatched; is the vmfleet controller running and watching namespace ops?")
    queued = obj_with(12, [result("vm1", phase="Queued"), result("vm2", phase="Running")])
    assert ex.waiting_hint(queued, "ops", 30) == (
        "queued", "vmfleet exec: still queued after 30s on vm1: no worker has taken it yet "
        "(vmfleet describe vm vm1 -n ops shows the VM's workers)")
    assert ex.waiting_hint(obj_with(13, [result("vm1", phase="Running")]), "ops", 30) is None
    assert ex.waiting_hint(obj_with(13, None, phase="Failed"), "ops", 30) is None


def test_a_hint_is_printed_once_and_only_on_a_terminal():
    final = result(phase="Succeeded", exitCode=0, reason="Completed")
    windows = [[], [], [("MODIFIED", obj_with(12, [final]))]]  # two idle watch windows
    for tty, expected in ((False, 0), (True, 1)):
        kube = ExecKube([list(w) for w in windows])
        err = Tty() if tty else io.StringIO()
        code = ex.run(options("vm1", "--", "true"), kube=kube, out=io.StringIO(), err=err)
        assert code == 0
        assert err.getvalue().count("has not been dispatched") == expected


def test_default_namespace_comes_from_the_kubeconfig_context(tmp_path, monkeypatch):
    from vmfleet.kube import context_namespace

    config = tmp_path / "config"
    config.write_text("""
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts:
- {name: with-ns, context: {cluster: c, user: u, namespace: ops}}
- {name: without, context: {cluster: c, user: u}}
current-context: with-ns
""")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert context_namespace() == "ops"
    config.write_text(config.read_text().replace("current-context: with-ns",
                                                 "current-context: without"))
    assert context_namespace() == "default"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert context_namespace() == "default"


def test_a_closed_output_pipe_deletes_the_command():
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    final = result(phase="Succeeded", exitCode=0, reason="Completed", stdout="lots\n")
    kube = ExecKube([[("MODIFIED", obj_with(12, [final]))]])
    code = ex.run(options("vm1", "--", "yes"), kube=kube, out=ClosedPipe(), err=io.StringIO())
    assert code == 141 and kube.deleted == ["exec-vm1-abcde"]


def test_output_the_terminal_cannot_encode_is_replaced_not_a_crash():
    raw = io.BytesIO()
    latin1 = io.TextIOWrapper(raw, encoding="latin-1")
    printer = execprint.Printer(latin1, io.StringIO(), prefixed=False, progress=execprint.Progress(io.StringIO()))
    printer.show([result(phase="Succeeded", exitCode=0, stdout="caf\u00e9 \ufffd\n")])
    latin1.flush()
    assert raw.getvalue() == b"caf\xe9 ?\n"
