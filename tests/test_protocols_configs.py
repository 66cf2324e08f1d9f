"""Every shipped config in configs/ parses, its method options are valid, and its protocol options too."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from robustft.config import parse_config, read_config_yaml
from robustft.data.protocols import get_protocol, parse_options
from robustft.domainbed import plan_domainbed
from robustft.methods import method_options

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_four_issue_configs_ship():
    assert {path.stem for path in CONFIGS} >= {
        "imagenet_vit_b16_shifts", "imagenet_16shot_saft", "domainnet_sketch_gmixout", "domainbed_moa"
    }  # fmt: skip


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "domainbed_moa"], ids=lambda p: p.stem)
def test_run_config_parses_with_valid_protocol_options(path):
    config = parse_config(read_config_yaml(path), source=str(path))
    protocol = config.data.protocol
    assert protocol is not None and config.model.source == "open_clip"
    parse_options(get_protocol(protocol.name), protocol.options)  # raises ConfigError on a bad option
    assert method_options(config) is not None
    text = path.read_text()
    assert "Recipe" in text or "recipe" in text  # each documents the paper's recipe and its reference numbers
    assert "Reference" in text


def test_domainbed_config_plans_on_a_domain_folder_replica(tmp_path):
    for domain in ("art_painting", "cartoon", "photo"):
        for name in ("dog", "horse"):
            (tmp_path / domain / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / domain / name / "0.png")
    raw = read_config_yaml(Path(__file__).parent.parent / "configs" / "domainbed_moa.yaml")
    raw["data"]["root"] = str(tmp_path)
    raw["output_dir"] = str(tmp_path / "runs")
    plan = plan_domainbed(raw, source="domainbed_moa.yaml")
    assert [m.label for m in plan.methods] == ["finetune", "lora-rank=8", "moa_kadaptation", "moa_lora"]
    assert len(plan.cells) == 3 * 3 * 4  # held-out domains x trials x methods
