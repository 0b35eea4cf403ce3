"""Every accelerate YAML loads, names a valid distributed type, and every file the docs point to exists."""

import re
from pathlib import Path

import pytest
import yaml
from accelerate.utils import DistributedType


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_a_valid_distributed_type(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {t.value for t in DistributedType}
    assert int(config["num_processes"]) >= 1
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] in (0, 1, 2)  # ZeRO-3 has no forward-mode AD


def test_references_in_docs_and_recipes_exist():
    texts = [ROOT / "README.md", *ROOT.glob("recipes/*.py"), *ROOT.glob("docs/*.md"), *CONFIGS]
    referenced = set()
    for path in texts:
        referenced |= set(
            re.findall(r"(accelerate_configs/[\w.-]+\.yaml|recipes/configs/[\w.-]+\.yaml)", path.read_text())
        )
    assert referenced, "no references found: the pattern is wrong"
    missing = sorted(r for r in referenced if not (ROOT / r).is_file())
    assert not missing, missing
