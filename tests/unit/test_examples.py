"""Every example manifest is valid against the API models (the docs match the code)."""

from pathlib import Path

import pytest
import yaml

from vmfleet.api.kinds import RemoteCommandTemplateSpec, RemoteCronCommandSpec
from vmfleet.api.models import RemoteCommandSpec, RemoteVMSpec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
MODELS = {"RemoteVM": RemoteVMSpec, "RemoteCommand": RemoteCommandSpec,
          "RemoteCommandTemplate": RemoteCommandTemplateSpec,
          "RemoteCronCommand": RemoteCronCommandSpec}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path):
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "vmfleet.io/v1alpha1"
        MODELS[doc["kind"]].model_validate(doc["spec"])


def test_there_are_examples():
    assert len(EXAMPLES) >= 4
