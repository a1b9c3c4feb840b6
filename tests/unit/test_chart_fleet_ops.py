"""The chart's part of the fleet operations: the controller's extra permissions and the
opt-in templates-only ValidatingAdmissionPolicy."""

from __future__ import annotations

from tests.chart import find, render, rules_of


def test_the_controller_may_create_runs_and_read_templates_but_no_more():
    (role,) = find(render(), "Role", "rel-vmfleet-controller")
    rules = rules_of(role)

    def verbs(resource: str) -> set[str]:
        return {v for r in rules if resource in r["resources"] for v in r["verbs"]}

    assert "create" in verbs("remotecommands")
    assert verbs("remotecommandtemplates") == {"get"}
    assert verbs("configmaps") == {"get"}
    assert verbs("remotecroncommands") == {"get", "list", "watch"}
    assert verbs("remotecroncommands/status") == {"patch"}
    assert verbs("secrets") == set()


def test_templates_only_policy_is_opt_in_and_forbids_every_shell_field():
    assert not find(render(), "ValidatingAdmissionPolicy", "rel-vmfleet-templates-only")
    docs = render(None, "templatesOnly.enabled=true")
    (policy,) = find(docs, "ValidatingAdmissionPolicy", "rel-vmfleet-templates-only")
    (binding,) = find(docs, "ValidatingAdmissionPolicyBinding", "rel-vmfleet-templates-only")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"] == {
        "matchLabels": {"vmfleet.io/templates-only": "true"}}
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["remotecommands", "remotecroncommands"]
    command, cron = (v["expression"] for v in policy["spec"]["validations"])
    for field in ("command", "argv", "script", "transfer", "env", "stdin", "become"):
        assert f"!has(object.spec.{field})" in command
        assert f"!has(object.spec.commandTemplate.spec.{field})" in cron
    assert "has(object.spec.templateRef)" in command
