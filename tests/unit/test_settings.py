"""vmfleet.settings: every VMFLEET_* variable, typed, read once; the docs generated from it."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from vmfleet import cli, settings, settingsdoc
from vmfleet.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]
PRODUCT = [REPO / "vmfleet", REPO / "controller", REPO / "remote_tasks"]


def test_an_empty_environment_gives_the_defaults():
    conf = Settings.from_environment({})
    assert conf.broker_url == "redis://127.0.0.1:6379/0"
    assert conf.heartbeat_seconds == 5.0
    assert conf.worker_lost_seconds == 30.0
    assert conf.redispatch_seconds == 300.0
    assert conf.state_url is None and conf.watch_namespaces is None
    assert conf.api_connections == 32
    assert conf.max_concurrent_commands is None
    assert conf.slots_url is None
    assert conf.worker_runtime == "Process"
    assert conf.metrics_address == "127.0.0.1"
    assert conf.metrics_port is None
    assert conf.metrics_port_or(9807) == 9807


def test_in_a_cluster_the_defaults_are_the_clusters():
    conf = Settings.from_environment({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert conf.worker_runtime == "Deployment"
    assert conf.metrics_address == "0.0.0.0"


def test_values_are_typed():
    conf = Settings.from_environment({
        "VMFLEET_HEARTBEAT_SECONDS": "1.5", "VMFLEET_API_CONNECTIONS": " 3 ",
        "VMFLEET_MAX_CONCURRENT_COMMANDS": "4", "VMFLEET_METRICS_PORT": "0",
        "VMFLEET_WORKER_RUNTIME": "Deployment", "VMFLEET_SLOTS_URL": "redis://r:6379/1",
        "VMFLEET_STATE_URL": "redis://s:6379/2", "VMFLEET_WATCH_NAMESPACES": "a,b",
        "VMFLEET_BROKER_SECRET_NAME": "",  # empty: the default
    })
    assert (conf.heartbeat_seconds, conf.api_connections, conf.max_concurrent_commands) == (1.5, 3, 4)
    assert conf.metrics_port == 0 and conf.metrics_port_or(9807) == 0
    assert conf.worker_runtime == "Deployment"
    assert conf.slots_url == "redis://r:6379/1"
    assert (conf.state_url, conf.watch_namespaces) == ("redis://s:6379/2", "a,b")
    assert conf.broker_secret_name == "vmfleet-broker"


@pytest.mark.parametrize("env, raw, message", [
    ("VMFLEET_HEARTBEAT_SECONDS", "x", "VMFLEET_HEARTBEAT_SECONDS='x' is not a number"),
    ("VMFLEET_HEARTBEAT_SECONDS", "nan", "VMFLEET_HEARTBEAT_SECONDS='nan' is not a finite number"),
    ("VMFLEET_WORKER_LOST_SECONDS", "-1",
     "VMFLEET_WORKER_LOST_SECONDS='-1' is out of range: use a value at least 0"),
    ("VMFLEET_API_CONNECTIONS", "2.5", "VMFLEET_API_CONNECTIONS='2.5' is not a whole number"),
    ("VMFLEET_API_CONNECTIONS", "0",
     "VMFLEET_API_CONNECTIONS='0' is out of range: use a value at least 1"),
    ("VMFLEET_DISK_PRESSURE_RATIO", "90",
     "VMFLEET_DISK_PRESSURE_RATIO='90' is out of range: use a value between 0 and 1"),
    ("VMFLEET_METRICS_PORT", "http",
     "VMFLEET_METRICS_PORT='http' is not a whole number (use 0 to turn metrics off)"),
    ("VMFLEET_METRICS_PORT", "70000", "VMFLEET_METRICS_PORT='70000' is out of range: use a value "
     "between 0 and 65535 (use 0 to turn metrics off)"),
    ("VMFLEET_WORKER_RUNTIME", "Pod", "VMFLEET_WORKER_RUNTIME='Pod' is not one of Process, Deployment"),
])
def test_a_bad_value_is_named(env, raw, message):
    with pytest.raises(SettingsError) as caught:
        Settings.from_environment({env: raw})
    assert str(caught.value) == message


def test_every_bad_value_is_named_at_once():
    with pytest.raises(SettingsError) as caught:
        Settings.from_environment({"VMFLEET_HEARTBEAT_SECONDS": "x", "VMFLEET_API_CONNECTIONS": "y"})
    assert str(caught.value) == ("VMFLEET_API_CONNECTIONS='y' is not a whole number; "
                                 "VMFLEET_HEARTBEAT_SECONDS='x' is not a number")


def test_the_environment_is_read_at_the_composition_root_only(monkeypatch):
    """What the controller and the worker got at start stays theirs: the environment
    changing later changes nothing they hold (no module reads it again)."""
    monkeypatch.setenv("VMFLEET_HEARTBEAT_SECONDS", "7")
    conf = settings.load()
    monkeypatch.setenv("VMFLEET_HEARTBEAT_SECONDS", "9")
    assert conf.heartbeat_seconds == 7
    assert settings.load().heartbeat_seconds == 9
    assert not hasattr(settings, "current")  # no process-wide settings to fetch from anywhere


def test_every_setting_is_documented_with_its_reader():
    names = [f.metadata["env"] for f in dataclasses.fields(Settings)]
    assert len(names) == len(set(names)) == 52
    for f in dataclasses.fields(Settings):
        assert f.metadata["reader"] in settings.READERS
        doc = f.metadata["doc"]
        assert doc.endswith(".") and "\n" not in doc and len(doc) < 160, f.name
        assert settings.env_of(f.name) == f.metadata["env"]


def _literals(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for root in paths:
        for path in root.rglob("*.py"):
            if "dev" in path.relative_to(REPO).parts[1:2] or path.name == "settings.py":
                continue  # the dev kit: not product settings; settings.py names those
            found |= set(re.findall(r"[\"'](VMFLEET_[A-Z0-9_]+)[\"']", path.read_text()))
    return found


# Named by the product but not read from its environment: exported on the VM, for the
# attempt's own processes to inherit (the marker a terminate looks for).
EXPORTED_ON_THE_VM = {"VMFLEET_ATTEMPT"}


def test_every_variable_the_product_names_is_a_setting():
    declared = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    named = _literals(PRODUCT) - declared - EXPORTED_ON_THE_VM
    assert named == set(), f"read but not declared in vmfleet/settings.py: {sorted(named)}"


def test_every_variable_the_chart_sets_is_a_setting():
    declared = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    templates = REPO / "charts" / "vmfleet" / "templates"
    named = {n for p in templates.iterdir() for n in re.findall(r"name: (VMFLEET_[A-Z0-9_]+)",
                                                               p.read_text())}
    assert named and named <= declared, sorted(named - declared)


def test_readme_and_chart_docs_are_current():
    assert settingsdoc.check() == []
    readme = (REPO / "README.md").read_text()
    for d in settings.documented():
        assert f"| `{d.env}` | {d.reader} | {d.default} |" in readme
    assert "`VMFLEET_DEV_DIR`" in readme and "`VMFLEET_E2E_*`" in readme
    values = (REPO / "charts" / "vmfleet" / "values.yaml").read_text()
    assert "# VMFLEET_WORKER_LOST_SECONDS (default 30)" in values
    assert "VMFLEET_HEARTBEAT_SECONDS" not in values  # a worker's: the controller sets those


def test_drift_is_found_and_written(tmp_path):
    for name in ("README.md", "charts/vmfleet/values.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    assert settingsdoc.check(tmp_path) == []
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("| `VMFLEET_API_CONNECTIONS` | both | `32` |",
                                                 "| `VMFLEET_API_CONNECTIONS` | both | `33` |"))
    assert settingsdoc.check(tmp_path) == [f"{readme} does not match vmfleet/settings.py"]
    assert cli.main(["settings", "--check", "--root", str(tmp_path)]) == 1
    assert settingsdoc.write(tmp_path) == [readme]
    assert settingsdoc.check(tmp_path) == []
    assert readme.read_text() == (REPO / "README.md").read_text()
    readme.write_text("no markers\n")
    assert "has no" in settingsdoc.check(tmp_path)[0]


def test_cli_shows_the_values_or_names_the_bad_one(monkeypatch, capsys):
    monkeypatch.setenv("VMFLEET_KILL_GRACE_SECONDS", "1")
    assert cli.main(["settings"]) == 0
    assert "VMFLEET_KILL_GRACE_SECONDS=1.0  # worker\n" in capsys.readouterr().out
    monkeypatch.setenv("VMFLEET_WORKER_EXTRA_ENV", '[{"name": "A", "value": "1"}]')
    assert cli.main(["settings"]) == 0  # shown as it is set, not as Python
    assert 'VMFLEET_WORKER_EXTRA_ENV=[{"name": "A", "value": "1"}]  # controller\n' in \
        capsys.readouterr().out
    monkeypatch.setenv("VMFLEET_KILL_GRACE_SECONDS", "soon")
    assert cli.main(["settings"]) == 1
    assert "VMFLEET_KILL_GRACE_SECONDS='soon' is not a number" in capsys.readouterr().err
    assert cli.main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == settingsdoc.markdown()


def test_the_settings_of_worker_writes_and_per_object_timers_are_gone():
    declared = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    gone = {"VMFLEET_WORKER_SERVICE_ACCOUNT", "VMFLEET_FOLD_INTERVAL_SECONDS",
            "VMFLEET_VM_TICK_SECONDS", "VMFLEET_TRANSFER_LOST_SECONDS",
            "VMFLEET_TARGET_CACHE_SECONDS", "VMFLEET_WRITE_TRIES", "VMFLEET_VM"}
    assert declared & gone == set()
    assert {"VMFLEET_STATE_URL", "VMFLEET_WATCH_NAMESPACES", "VMFLEET_CONTROLLER_ID"} <= declared


@pytest.mark.parametrize("env, state, slots", [
    # RabbitMQ and no Redis named: no state (the controller refuses to start), no VM-wide
    # slots (the limit holds per worker replica).
    ({"VMFLEET_BROKER_URL": "amqp://guest:guest@mq//"}, None, None),
    # With RabbitMQ, the controller's VMFLEET_STATE_URL holds the slots too (it named only
    # the state before, and the VM-wide limit fell back to one per replica).
    ({"VMFLEET_BROKER_URL": "amqp://guest:guest@mq//", "VMFLEET_STATE_URL": "redis://s/2"},
     "redis://s/2", "redis://s/2"),
    ({"VMFLEET_BROKER_URL": "amqp://guest:guest@mq//", "VMFLEET_SLOTS_URL": "redis://l/3"},
     "redis://l/3", "redis://l/3"),
    ({"VMFLEET_BROKER_URL": "redis://b/0"}, "redis://b/0", "redis://b/0"),
    ({"VMFLEET_BROKER_URL": "redis://b/0", "VMFLEET_STATE_URL": "redis://s/2"},
     "redis://s/2", "redis://s/2"),
    # Each named URL wins for its own part.
    ({"VMFLEET_BROKER_URL": "redis://b/0", "VMFLEET_STATE_URL": "redis://s/2",
      "VMFLEET_SLOTS_URL": "redis://l/3"}, "redis://s/2", "redis://l/3"),
])
def test_one_rule_names_the_redis_of_the_state_and_of_the_slots(env, state, slots):
    from vmfleet.state import state_url

    conf = settings.Settings.from_environment(env)
    assert (conf.state_redis_url(), conf.slots_redis_url()) == (state, slots)
    if state is None:
        with pytest.raises(ValueError, match="VMFLEET_STATE_URL"):
            state_url(conf)
    else:
        assert state_url(conf) == state


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, True),
    # A KUBECONFIG names another way in: not the pod's service account, not "in a cluster".
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBECONFIG": "/tmp/kc"}, False),
    ({"KUBECONFIG": "/tmp/kc"}, False),
])
def test_one_in_cluster_rule_for_the_defaults_and_the_api_client(environ, expected, monkeypatch):
    import vmfleet.kube

    assert settings.in_cluster(environ) is expected
    conf = settings.Settings.from_environment(environ)
    assert conf.worker_runtime == ("Deployment" if expected else "Process")
    assert conf.metrics_address == ("0.0.0.0" if expected else "127.0.0.1")
    for name in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    loaded = []
    monkeypatch.setattr(vmfleet.kube.kubernetes.config, "load_incluster_config",
                        lambda **_: loaded.append("pod"))
    monkeypatch.setattr(vmfleet.kube.kubernetes.config, "load_kube_config",
                        lambda **_: loaded.append("kubeconfig"))
    vmfleet.kube.load_api_client(3)
    assert loaded == ["pod" if expected else "kubeconfig"]


def test_worker_extra_env_is_read_by_the_settings_parser():
    entries = [{"name": "A", "value": "1"}]
    import json

    assert settings.Settings.from_environment(
        {"VMFLEET_WORKER_EXTRA_ENV": json.dumps(entries)}).worker_extra_env == tuple(entries)
    assert settings.Settings.from_environment({}).worker_extra_env == ()
    with pytest.raises(settings.SettingsError, match="VMFLEET_WORKER_EXTRA_ENV is not JSON"):
        settings.Settings.from_environment({"VMFLEET_WORKER_EXTRA_ENV": "[{"})
    with pytest.raises(settings.SettingsError, match="JSON list of"):
        settings.Settings.from_environment({"VMFLEET_WORKER_EXTRA_ENV": '{"name": "X"}'})
