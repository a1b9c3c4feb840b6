"""Fleet operations end to end: percentages, the ``vms`` target, dry runs, re-runs of what
failed, templates, schedules and waves — checked on the VMs themselves."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from tests.e2e.fleet import REPO, Namespace, assert_no_tracebacks, max_overlap

pytestmark = pytest.mark.e2e


def capture(name: str, text: str) -> None:
    """Keep real output for the README (.vmfleet/ is not committed)."""
    out = REPO / ".vmfleet" / "readme-output"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)


def test_percentages_of_ten_vms(ns: Namespace, make_vm, shared_dir, controller_dir):
    fleet = [make_vm(f"pct{i}") for i in range(10)]
    ns.add_vms(fleet, labels={"role": "pct"})
    log = shared_dir / "intervals"
    ns.run("thirty", selector={"matchLabels": {"role": "pct"}}, maxParallel="30%",
           script=f"s=$(date +%s%N); sleep 3; echo \"$(hostname) $s $(date +%s%N)\" >> {log}\n")
    # 10% of 10 = 1 at a time, so the failures come one by one: it stops at 20% = 2.
    ns.run("twenty", selector={"matchLabels": {"role": "pct"}}, maxParallel="10%",
           maxFailures="20%", command="exit 7")

    obj = ns.finished("thirty", timeout=180)
    assert (obj["status"]["phase"], obj["status"]["completions"]) == ("Succeeded", "10/10")
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(host for host, *_ in lines) == sorted(vm.name for vm in fleet)
    peak = max_overlap([(int(start), int(end)) for _, start, end in lines])
    assert peak == 3, f"{peak} ran at once"

    obj = ns.finished("twenty", timeout=120)
    results = obj["status"]["results"]
    assert obj["status"]["phase"] == "Failed"
    assert [r["reason"] for r in results].count("ExitCode") == 2
    cancelled = [r for r in results if r["phase"] == "Cancelled"]
    assert len(cancelled) == 8
    assert {r["message"] for r in cancelled} == {
        "not started: 2 VMs failed (maxFailures 20% of 10 = 2)"}
    assert_no_tracebacks(controller_dir / "controller.log")


def test_vms_target_runs_on_exactly_the_named_vms(ns: Namespace, vms):
    ns.add_vms(vms)
    ns.run("two", vms=["vm1", "vm3", "nosuchvm"], command="hostname")
    obj = ns.finished("two", timeout=90)
    results = {r["vm"]: r for r in obj["status"]["results"]}
    assert set(results) == {"vm1", "vm3", "nosuchvm"}
    assert results["vm1"]["phase"] == results["vm3"]["phase"] == "Succeeded"
    assert results["nosuchvm"]["reason"] == "VMNotFound"
    assert obj["status"]["target"] == "vm1,vm3,nosuchvm"
    refused = ns.k("apply", "-f", "-", check=False, input=__import__("yaml").safe_dump(
        ns.command("both", vm="vm1", vms=["vm2"], command="true")))
    assert refused.returncode != 0
    assert "exactly one target must be set: vm, vms or selector" in refused.stderr


def vmfleet_cli(kubectl, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": kubectl.kubeconfig, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "vmfleet.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO, check=False)


def test_dry_run_runs_nothing_and_says_what_would_block(ns: Namespace, vms, shared_dir, kubectl):
    ns.add_vms(vms[:2], labels={"role": "dry"})
    ns.k("patch", "remotevm", "vm2", "--type=merge", "-p", '{"spec":{"paused":true}}')
    marker = shared_dir / "ran"
    ns.run("dry", selector={"matchLabels": {"role": "dry"}}, dryRun=True, maxFailures="50%",
           become={"user": "root"}, command=f"touch {marker}")
    obj = ns.finished("dry", timeout=60)
    status = obj["status"]
    assert status["phase"] == "DryRun"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert set(conditions) == {"Finished"}
    assert (conditions["Finished"]["status"], conditions["Finished"]["reason"]) == ("True", "DryRun")
    dry = status["dryRun"]
    assert dry["matched"] == ["vm1", "vm2"]
    assert {b["vm"]: b["reason"] for b in dry["blocked"]} == {
        "vm1": "BecomeNotAllowed", "vm2": "Paused"}
    assert dry["maxFailures"] == 1
    assert "reaching maxFailures (50% of 2 = 1)" in dry["budget"]
    assert "results" not in status
    assert not marker.exists()
    # `kubectl wait --for=condition=Complete` must not mistake it for success.
    waited = ns.k("wait", "--for=condition=Complete", "remotecommand/dry", "--timeout=2s",
                  check=False, timeout=30)
    assert waited.returncode != 0

    ns.k("patch", "remotevm", "vm2", "--type=merge", "-p", '{"spec":{"paused":false}}')
    cli = vmfleet_cli(kubectl, "exec", "--dry-run", "-n", str(ns), "-l", "role=dry", "--",
                      "touch", str(marker))
    assert cli.stdout.startswith("Dry run of RemoteCommand "), cli.stdout + cli.stderr
    assert "Matched 2 VMs: vm1, vm2" in cli.stdout
    assert not marker.exists()
    capture("dry-run.txt", cli.stdout + "\n" + ns.k("get", "rcmd", "dry", "-o", "yaml").stdout)


def test_rerun_failed_targets_exactly_the_vms_that_did_not_succeed(ns: Namespace, vms, kubectl,
                                                                   shared_dir):
    ns.add_vms(vms)
    fixed = shared_dir / "fixed"
    # vm2 fails until it is fixed; maxParallel 1 and maxFailures 1 leave vm3 never started.
    ns.run("first", vms=["vm1", "vm2", "vm3"], maxParallel=1, maxFailures=1,
           command=f'test "$(hostname)" != vm2 || test -e {fixed}')
    first = ns.finished("first", timeout=90)
    phases = {r["vm"]: r["phase"] for r in first["status"]["results"]}
    assert phases == {"vm1": "Succeeded", "vm2": "Failed", "vm3": "Cancelled"}
    fixed.write_text("")
    cli = vmfleet_cli(kubectl, "rerun", "first", "--failed", "-n", str(ns))
    assert cli.returncode == 0, cli.stderr
    assert "on 2 VMs: vm2, vm3" in cli.stdout
    name = cli.stdout.split(f"{ns}/", 1)[1].split()[0]
    again = ns.finished(name, timeout=90)
    assert again["spec"]["vms"] == ["vm2", "vm3"]
    assert again["metadata"]["labels"]["vmfleet.io/rerun-of"] == "first"
    assert again["metadata"]["annotations"]["vmfleet.io/rerun-of-uid"] == first["metadata"]["uid"]
    assert {r["vm"]: r["phase"] for r in again["status"]["results"]} == {
        "vm2": "Succeeded", "vm3": "Succeeded"}
    capture("rerun.txt", cli.stdout + "\n" + ns.k("get", "rcmd").stdout)
    listed = ns.k("get", "rcmd", "-l", "vmfleet.io/rerun-of=first", "-o", "name").stdout.split()
    assert listed == [f"remotecommand.vmfleet.io/{name}"]


def _template(ns: Namespace, name: str, **spec) -> dict:
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteCommandTemplate",
            "metadata": {"name": name, "namespace": str(ns)}, "spec": spec}


def _established(kubectl, *crds: str) -> None:
    from vmfleet.dev.proc import wait_until

    wait_until(lambda: kubectl("wait", "--for=condition=Established", *[f"crd/{c}" for c in crds],
                               "--timeout=30s", check=False, timeout=60).returncode == 0,
               timeout=90, interval=1, what="the new CRDs")


def test_templates_check_parameters_and_pass_hostile_values_literally(ns: Namespace, vms, kubectl):
    _established(kubectl, "remotecommandtemplates.vmfleet.io")
    ns.add_vms(vms[:1])
    ns.kubectl.apply(_template(
        ns, "echo-args", script='printf "%s|%s|%s\\n" "$VERSION" "$HOSTILE" "$COUNT"\n',
        parameters=[{"name": "VERSION", "pattern": "^[0-9]+\\.[0-9]+$"},
                    {"name": "HOSTILE", "description": "anything at all"},
                    {"name": "COUNT", "type": "integer", "minimum": 1, "default": 3}]))
    ns.run("bad", vm="vm1", templateRef={"name": "echo-args"},
           parameters={"VERSION": "1.2; id", "HOSTILE": "x"})
    hostile = "; rm -rf / $(id) `id` \"' \\"
    ns.run("good", vm="vm1", templateRef={"name": "echo-args"},
           parameters={"VERSION": "1.25", "HOSTILE": hostile})
    bad = ns.finished("bad", timeout=60)
    assert bad["status"]["phase"] == "Failed"
    failed = next(c for c in bad["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"] == "parameter VERSION: '1.2; id' does not match the pattern ^[0-9]+\\.[0-9]+$"
    assert not bad["status"].get("results")
    good = ns.finished("good", timeout=90)
    (result,) = good["status"]["results"]
    assert good["status"]["phase"] == "Succeeded", good["status"]
    assert result["stdout"] == f"1.25|{hostile}|3\n"
    record = good["status"]["template"]
    import hashlib

    capture("templates.txt", ns.k("get", "rcmd").stdout + "\n"
            + ns.k("get", "rcmd", "bad", "-o", "jsonpath={.status.conditions}").stdout + "\n"
            + ns.k("get", "rcmd", "good", "-o", "jsonpath={.status.results[0].stdout}").stdout)

    script = 'printf "%s|%s|%s\\n" "$VERSION" "$HOSTILE" "$COUNT"\n'
    assert record["sha256"] == hashlib.sha256(script.encode()).hexdigest()
    assert record["script"] == script
    # Editing the template never changes a command already made.
    ns.k("patch", "remotecommandtemplate", "echo-args", "--type=merge", "-p",
         '{"spec":{"script":"echo changed\\n"}}')
    assert ns.get("rcmd", "good")["status"]["template"]["script"] == script
    # Names that would change the shell's behaviour are refused by the API server.
    refused = ns.k("apply", "-f", "-", check=False, input=__import__("yaml").safe_dump(
        ns.command("ld", vm="vm1", templateRef={"name": "echo-args"}, parameters={"LD_PRELOAD": "x"})))
    assert refused.returncode != 0 and "LD_PRELOAD" in refused.stderr


def test_templates_only_admission_policy(ns: Namespace, kubectl):
    import yaml

    from tests.chart import helm
    from vmfleet.dev.proc import wait_until

    rendered = helm("template", "e2e-tonly", str(REPO / "charts" / "vmfleet"),
                    "--set", "templatesOnly.enabled=true",
                    "--set", f"templatesOnly.namespaceSelector.matchLabels.vmfleet\\.io/templates-only={ns}",
                    "-s", "templates/templates-only-admission-policy.yaml").stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    for obj in objects:
        obj["metadata"]["name"] = f"{obj['metadata']['name']}-{ns}"
        if obj["kind"] == "ValidatingAdmissionPolicyBinding":
            obj["spec"]["policyName"] = f"{obj['spec']['policyName']}-{ns}"
    kubectl.apply(*objects)
    try:
        ns.kubectl("label", "namespace", str(ns), f"vmfleet.io/templates-only={ns}")
        shell = ns.command("shell", vm="vm1", command="id")

        def refused() -> bool:
            proc = ns.k("apply", "--dry-run=server", "-f", "-", check=False,
                        input=yaml.safe_dump(shell))
            return proc.returncode != 0 and "runs RemoteCommandTemplates only" in proc.stderr

        wait_until(refused, timeout=60, interval=1, what="the policy to refuse a shell command")
        allowed = ns.k("apply", "--dry-run=server", "-f", "-", check=False, input=yaml.safe_dump(
            ns.command("tpl", vm="vm1", templateRef={"name": "restart"},
                       parameters={"SERVICE": "nginx"})))
        assert allowed.returncode == 0, allowed.stderr
        env = ns.k("apply", "--dry-run=server", "-f", "-", check=False, input=yaml.safe_dump(
            ns.command("tplenv", vm="vm1", templateRef={"name": "restart"}, env={"A": "1"})))
        assert env.returncode != 0 and "env" in env.stderr
    finally:
        for obj in objects:
            kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], check=False)


def _cron(ns: Namespace, name: str, policy: str, vm: str, script: str) -> dict:
    return {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteCronCommand",
            "metadata": {"name": name, "namespace": str(ns)},
            "spec": {"schedule": "* * * * *", "concurrencyPolicy": policy,
                     "startingDeadlineSeconds": 40,
                     "commandTemplate": {"metadata": {"labels": {"cron-test": name}},
                                         "spec": {"vm": vm, "script": script}}}}


def _runs(ns: Namespace, name: str) -> list[dict]:
    items = ns.kubectl.get_json("-n", str(ns), "rcmd", "-l", f"vmfleet.io/cron={name}")["items"]
    return sorted(items, key=lambda o: o["metadata"]["name"])


def _events(ns: Namespace, name: str) -> list[dict]:
    items = ns.kubectl.get_json("-n", str(ns), "events", "--field-selector",
                                f"involvedObject.name={name}")["items"]
    return items


def test_cron_runs_forbid_skips_and_replace_kills_the_previous_run(ns: Namespace, vms, kubectl,
                                                                   shared_dir):
    import time as _time

    from vmfleet.dev.proc import wait_until

    _established(kubectl, "remotecroncommands.vmfleet.io")
    ns.add_vms(vms[:2])
    pids = shared_dir / "pids"
    # Created late in a minute: the first run starts within seconds, the second a minute on.
    wait_until(lambda: 45 <= _time.time() % 60 < 55, timeout=65, interval=0.5,
               what="a late second of the minute")
    ns.kubectl.apply(
        _cron(ns, "forbid", "Forbid", "vm1", "sleep 100\n"),
        _cron(ns, "replace", "Replace", "vm2", f"echo $$ >> {pids}\nexec sleep 601\n"),
    )
    wait_until(lambda: len(_runs(ns, "forbid")) == 1 and len(_runs(ns, "replace")) == 1,
               timeout=45, interval=1, what="the first run of each")
    first_forbid, first_replace = _runs(ns, "forbid")[0], _runs(ns, "replace")[0]
    minute = int(first_forbid["metadata"]["annotations"]["vmfleet.io/scheduled-at"][14:16])
    assert first_forbid["metadata"]["name"].startswith("forbid-")
    assert first_forbid["metadata"]["ownerReferences"][0]["kind"] == "RemoteCronCommand"
    assert first_forbid["metadata"]["labels"]["cron-test"] == "forbid"
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 1, timeout=30,
               interval=0.5, what="the first replace run to start on vm2")
    (old_pid,) = pids.read_text().split()

    # The next minute: Replace stops the first run on the VM, deletes it and starts the next.
    wait_until(lambda: [r["metadata"]["name"] for r in _runs(ns, "replace")]
               and _runs(ns, "replace")[0]["metadata"]["name"] != first_replace["metadata"]["name"],
               timeout=100, interval=1, what="the replace run to be replaced")
    wait_until(lambda: len(pids.read_text().split()) == 2, timeout=30, interval=0.5,
               what="the second replace run to start on vm2")
    new_pid = pids.read_text().split()[1]
    vm2 = vms[1]
    assert vm2.run(f"kill -0 {old_pid}")[0] != 0, "the replaced run's process still runs"
    assert vm2.run(f"kill -0 {new_pid}")[0] == 0
    assert [r["metadata"]["name"] for r in _runs(ns, "replace")] == [
        f"replace-{int(first_replace['metadata']['name'].split('-')[1]) + 1}"]
    assert "ReplacedRunning" not in {e["reason"] for e in _events(ns, "replace")}

    # Forbid: the first run still runs, so the second minute started nothing.
    forbid = ns.get("rcron", "forbid")
    assert [r["metadata"]["name"] for r in _runs(ns, "forbid")] == [first_forbid["metadata"]["name"]]
    assert forbid["status"]["active"] == [{"name": first_forbid["metadata"]["name"],
                                           "uid": first_forbid["metadata"]["uid"]}]
    assert int(forbid["status"]["lastScheduleTime"][14:16]) == minute
    wait_until(lambda: "AlreadyActive" in {e["reason"] for e in _events(ns, "forbid")},
               timeout=20, interval=1, what="the AlreadyActive event")
    capture("cron.txt", ns.k("get", "rcron").stdout + "\n" + ns.k("get", "rcmd").stdout + "\n"
            + ns.k("get", "events", "--field-selector", "involvedObject.kind=RemoteCronCommand").stdout)
    columns = ns.k("get", "rcron", "forbid").stdout.split("\n")[0].split()
    assert columns == ["NAME", "SCHEDULE", "TIMEZONE", "SUSPEND", "ACTIVE", "LAST", "SCHEDULE", "AGE"]
    ns.k("delete", "rcron", "forbid", "replace", "--wait=false")


def test_rollout_goes_one_wave_and_one_label_value_at_a_time(ns: Namespace, make_vm, shared_dir):
    fleet = [make_vm(f"wave{i}") for i in range(4)]
    ns.add_vms(fleet[:2], labels={"role": "wave", "zone": "a"})
    ns.add_vms(fleet[2:3], labels={"role": "wave", "zone": "b"})
    ns.add_vms(fleet[3:], labels={"role": "wave"})
    log = shared_dir / "waves"
    ns.run("waves", selector={"matchLabels": {"role": "wave"}},
           rollout={"partitionBy": "zone", "batchSize": 2, "healthGate": {"timeoutSeconds": 90}},
           script=f"s=$(date +%s%N); sleep 1; echo \"$(hostname) $s $(date +%s%N)\" >> {log}\n")
    obj = ns.finished("waves", timeout=240)
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert {r["vm"]: r["wave"] for r in status["results"]} == {
        "wave0": 0, "wave1": 0, "wave2": 1, "wave3": 2}
    assert status["rollout"]["waves"] == 3 and "stopped" not in status["rollout"]
    capture("rollout.txt", ns.k("get", "rcmd", "waves", "-o", "jsonpath={.status.rollout}").stdout
            + "\n" + ns.k("get", "rcmd", "waves", "-o",
                           "jsonpath={range .status.results[*]}{.vm} wave {.wave} {.phase}{'\\n'}{end}").stdout)
    spans = {host: (int(s), int(e)) for host, s, e in (line.split() for line in log.read_text().splitlines())}
    waves = [["wave0", "wave1"], ["wave2"], ["wave3"]]
    for earlier, later in itertools.pairwise(waves):
        assert max(spans[h][1] for h in earlier) < min(spans[h][0] for h in later), spans


@pytest.mark.parametrize("path", [
    "remotecommand.spec.vms", "remotecommand.spec.maxParallel", "remotecommand.spec.dryRun",
    "remotecommand.spec.templateRef", "remotecommand.spec.parameters",
    "remotecommand.spec.rollout.partitionBy", "remotecommand.spec.rollout.healthGate",
    "remotecommand.status.dryRun.blocked", "remotecommand.status.template.sha256",
    "remotecommandtemplate.spec.parameters.pattern", "remotecommandtemplate.spec.scriptFrom",
    "rcron.spec.concurrencyPolicy", "rcron.spec.startingDeadlineSeconds",
    "rcron.spec.commandTemplate.spec.maxFailures", "rcron.status.lastSuccessfulTime",
])
def test_kubectl_explain_documents_the_new_fields(kubectl, crds, path):
    _established(kubectl, "remotecommandtemplates.vmfleet.io", "remotecroncommands.vmfleet.io")
    out = kubectl("explain", path).stdout
    description = out.split("DESCRIPTION:", 1)[1].strip()
    assert description and "<empty>" not in description, out
