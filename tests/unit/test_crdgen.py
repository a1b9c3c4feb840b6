"""The generated CRDs: structural, defaulted, with the CEL rules, and checked for drift."""

import json

import yaml

from vmfleet.api import crdgen


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _schema(crd):
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schemas_are_structural():
    for crd in (crdgen.remotevm_crd(), crdgen.remotecommand_crd(),
                crdgen.remotecommandtemplate_crd(), crdgen.remotecroncommand_crd()):
        text = json.dumps(crd)
        for forbidden in ('"$ref"', '"anyOf"', '"allOf"', '"title"', '"$defs"'):
            assert forbidden not in text, forbidden
        for path, node in _walk(_schema(crd)):
            if "properties" in node or "items" in node or "additionalProperties" in node:
                assert "type" in node, f"{path} has no type"
            assert node.get("additionalProperties") is not False, path


def test_command_crd_rules_and_defaults():
    crd = crdgen.remotecommand_crd()
    spec = _schema(crd)["properties"]["spec"]
    rules = {rule["rule"] for rule in spec["x-kubernetes-validations"]}
    assert "self == oldSelf" in rules
    assert any("[has(self.vm), has(self.vms), has(self.selector)]" in rule for rule in rules)
    assert any(".filter(x, x).size() == 1" in rule for rule in rules)
    props = spec["properties"]
    assert props["successExitCodes"]["default"] == [0]
    assert props["output"]["default"] == {"maxBytes": 16384}
    source = props["transfer"]["properties"]["from"]
    assert set(source["properties"]) == {"vm", "path", "configMapKeyRef", "secretKeyRef"}
    assert any("size() == 1" in rule["rule"] for rule in source["x-kubernetes-validations"])
    results = _schema(crd)["properties"]["status"]["properties"]["results"]
    assert results["x-kubernetes-list-type"] == "map"
    assert results["x-kubernetes-list-map-keys"] == ["vm"]
    names = crd["spec"]["names"]
    assert (names["plural"], names["shortNames"]) == ("remotecommands", ["rcmd"])
    columns = [col["name"] for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Target", "Phase", "Completions", "Age"]


def test_vm_crd_is_mutable_and_pins_keys():
    crd = crdgen.remotevm_crd()
    spec = _schema(crd)["properties"]["spec"]
    assert all(rule["rule"] != "self == oldSelf" for rule in spec["x-kubernetes-validations"])
    assert spec["properties"]["hostKeyPolicy"]["enum"] == ["Pinned", "TrustOnFirstUse"]
    assert spec["properties"]["healthCheck"]["default"] == {"periodSeconds": 60, "timeoutSeconds": 10}
    workers = spec["properties"]["workers"]
    cpu = workers["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert cpu["x-kubernetes-int-or-string"] is True
    assert "type" not in cpu and cpu["minimum"] == 0
    assert cpu["pattern"].startswith("^[+]?")
    assert workers["x-kubernetes-validations"][0]["rule"] == \
        "!(has(self.replicas) && has(self.autoscale))"
    assert workers["properties"]["autoscale"]["x-kubernetes-validations"][0]["rule"] == \
        "self.minReplicas <= self.maxReplicas"
    assert crd["spec"]["names"]["shortNames"] == ["rvm"]


def test_check_detects_drift(tmp_path):
    assert crdgen.check(tmp_path) == [
        f"{tmp_path}/crds/vmfleet.io_remotevms.yaml is missing",
        f"{tmp_path}/crds/vmfleet.io_remotecommands.yaml is missing",
        f"{tmp_path}/crds/vmfleet.io_remotecommandtemplates.yaml is missing",
        f"{tmp_path}/crds/vmfleet.io_remotecroncommands.yaml is missing",
    ]
    crdgen.generate(tmp_path)
    assert crdgen.check(tmp_path) == []
    path = tmp_path / "crds" / "vmfleet.io_remotecommands.yaml"
    path.write_text(path.read_text().replace("maxBytes", "maxbytes"))
    assert crdgen.check(tmp_path) == [f"{path} does not match vmfleet/api/models.py"]


def test_committed_crds_are_current():
    assert crdgen.check() == []
    crd = yaml.safe_load(
        (crdgen.repo_root() / "crds" / "vmfleet.io_remotecommands.yaml").read_text()
    )
    assert crd == crdgen.remotecommand_crd()


def test_the_cron_crd_has_cronjobs_columns_and_short_name():
    crd = crdgen.remotecroncommand_crd()
    columns = [col["name"] for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Schedule", "Timezone", "Suspend", "Active", "Last Schedule", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["rcron"]
    spec = _schema(crd)["properties"]["spec"]["properties"]
    assert spec["concurrencyPolicy"]["enum"] == ["Allow", "Forbid", "Replace"]
    assert spec["successfulHistoryLimit"]["default"] == 3
    assert spec["failedHistoryLimit"]["default"] == 1
    assert "maxParallel" in spec["commandTemplate"]["properties"]["spec"]["properties"]


def test_every_new_field_has_a_description():
    """`kubectl explain` shows these: every property of the new kinds and fields says what it is."""
    for crd in (crdgen.remotecommandtemplate_crd(), crdgen.remotecroncommand_crd(),
                crdgen.remotecommand_crd()):
        spec = _schema(crd)["properties"]["spec"]
        for path, node in _walk(spec):
            for name, prop in (node.get("properties") or {}).items():
                if name in ("vms", "dryRun", "templateRef", "parameters", "rollout", "schedule",
                            "timeZone", "concurrencyPolicy", "startingDeadlineSeconds",
                            "suspend", "successfulHistoryLimit", "failedHistoryLimit",
                            "commandTemplate", "script", "scriptFrom", "pattern", "enum",
                            "minimum", "maximum", "default", "batchSize", "batchWaitSeconds",
                            "partitionBy", "healthGate", "maxParallel", "maxFailures"):
                    assert prop.get("description"), f"{path}.{name} has no description"
