"""``preset: paper``: each method's paper / official-code values, under the user's own options (docs/methods.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from robustft.cli import app
from robustft.config import ConfigError, parse_config, write_resolved_config
from robustft.methods import get_method, method_options, method_options_help
from robustft.methods.base import RunContext, record_preset
from robustft.methods.vrf import fit_temperature, fit_temperature_to_accuracy, resolve_k

PAPER = {
    "vrf": {"k": "official", "a": 1.5, "b": 0.6, "distance": "squared_l2", "fit_temperatures": True,
            "temperature_fit": "confidence_matches_accuracy", "pick_on_id_val": False},
    "mixout": {"p": 0.9, "granularity": "input", "gradient": "official"},
    "gmixout": {"p": 0.9, "scope": "matrices"},
    "saft": {"fraction": 0.001, "scope": "all", "include": ""},
    "masked_counterfactual": {"variant": "obj_mask_single_fill", "mask": "object", "fill": "single", "threshold": 0.3,
                              "beta": 30.0, "allow_self_fill": True, "no_fill": "drop_tokens"},
    "mixture_of_adapters": {"experts": "kadaptation", "ranks": [1, 2, 4, 8], "blocks": "even", "router_dim": 256,
                            "aux_weight": 0.01, "kron_dropout": 0.5, "head_init": "random"},
}  # fmt: skip
OVERRIDE = {
    "vrf": ("a", 0.9),
    "mixout": ("gradient", "autograd"),
    "gmixout": ("p", 0.5),
    "saft": ("fraction", 0.01),
    "masked_counterfactual": ("no_fill", "blank"),
    "mixture_of_adapters": ("kron_dropout", 0.1),
}


def options(name: str, **given):
    return get_method(name).config_cls(**given)


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_preset_resolves_to_the_papers_values(name):
    config = options(name, preset="paper")
    assert config.model_dump(include=set(PAPER[name])) == PAPER[name]
    default = options(name)
    assert default.preset == "default"
    differs = any(getattr(default, key) != value for key, value in PAPER[name].items())
    assert differs == (name not in ("gmixout", "saft"))  # robustft's GMixout and SAFT defaults are the paper's


@pytest.mark.parametrize("name", list(PAPER))
def test_the_users_own_option_overrides_the_preset(name):
    key, value = OVERRIDE[name]
    config = options(name, preset="paper", **{key: value})
    assert getattr(config, key) == value
    others = {k: v for k, v in PAPER[name].items() if k != key}
    assert config.model_dump(include=set(others)) == others


def test_masked_counterfactual_variant_under_the_paper_preset_and_the_former_spelling():
    config = options("masked_counterfactual", preset="paper", variant="rand_mask_no_fill")
    assert (config.mask, config.fill, config.rate, config.no_fill) == ("random", "none", 0.75, "drop_tokens")
    assert config.spec().drops_tokens and config.spec().allow_self_fill
    former = options("masked_counterfactual", preset="ctx_mask_multi_fill")  # `preset: <variant>` still works
    assert (former.variant, former.mask, former.fill, former.threshold) == (
        "ctx_mask_multi_fill",
        "context",
        "multi",
        0.3,
    )
    assert former.preset == "default" and former.no_fill == "blank"


def test_a_method_without_a_paper_preset_rejects_it_naming_the_key():
    with pytest.raises(ConfigError, match="method.*preset 'paper'.*no paper preset"):
        method_options(parse_config({"method": {"name": "finetune", "preset": "paper"}}))
    with pytest.raises(ConfigError, match="method.preset"):
        method_options(parse_config({"method": {"name": "gmixout", "preset": "papers"}}))


def test_resolved_config_and_results_entry_record_the_preset(tmp_path):
    config = parse_config({"method": {"name": "gmixout", "preset": "paper", "k": 20}})
    path = write_resolved_config(config, tmp_path / "config.yaml", method_options(config))
    written = yaml.safe_load(path.read_text())
    expected = {"name": "gmixout", "preset": "paper", "p": 0.9, "scope": "matrices", "k": 20}
    assert {key: written["method"][key] for key in expected} == expected
    assert method_options(parse_config(written)) == method_options(config)  # the resolved file re-reads the same
    ctx = RunContext(tmp_path, torch.device("cpu"), 0, {}, [])
    record_preset(method_options(config), ctx)
    assert ctx.extras == {"preset": "paper", "preset_options": {"p": 0.9, "scope": "matrices"}}


def test_robustft_methods_shows_the_paper_values():
    rows = {option: description for option, _, description in method_options_help(get_method("vrf"))}
    assert rows["k"].endswith("(paper: 'official')") and rows["a"].endswith("(paper: 1.5)")
    assert "preset" in rows and "(paper" not in rows["a_quantile"]
    assert "preset" not in {option for option, _, _ in method_options_help(get_method("finetune"))}
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    assert result.output.count("(paper:") >= 6 and "preset" in result.output


def test_vrf_official_k_is_round_1000_zsf_over_train_and_guarded():
    assert resolve_k("official", 300, 3000) == 100
    assert resolve_k("official", 40, 1_281_167) == 1  # would round to 0
    assert resolve_k("official", 90, 100) == 90  # more than the set: clamped
    assert resolve_k("official", 0, 100) == 0


def test_vrf_official_temperature_makes_mean_confidence_equal_accuracy():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=generator)
    logits = torch.randn(500, 10, generator=generator) * 4 + F.one_hot(labels, 10) * 3  # over-confident
    temperature = fit_temperature_to_accuracy(logits, labels)
    accuracy = (logits.argmax(1) == labels).float().mean()
    confidence = F.softmax(logits / temperature, -1).amax(-1).mean()
    assert abs(float(confidence - accuracy)) < 1e-5
    assert temperature > 1 and abs(temperature - fit_temperature(logits, labels)) > 1e-3  # not the NLL optimum
