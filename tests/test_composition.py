"""Composition: post-hoc methods (WiSE-FT, OSE) on top of runs of any trained method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from posthoc_support import bits_equal, quiet, small_prepared
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.evaluate import predict
from robustft.methods import get_method, method_options, registry
from robustft.methods.base import Method
from robustft.posthoc import WeightSpaceError, composed_name, load_run_predictor
from robustft.runner import FINAL_CHECKPOINT, evaluate_run, fit
from robustft.weight_references import load_final_state


class ScaledLogits(nn.Module):
    """A predictor that is not a plain model of the architecture: extra structure around it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) * self.scale


class WrappedFinetune(Method):
    """Test-only: fine-tunes, then wraps the model (as a mixture-of-adapters run keeps its adapters)."""

    name = "test_wrapped_finetune"

    def finalize(self, model, ctx):
        return ScaledLogits(model)

    def load_predictor(self, model, checkpoint, what):
        return super().load_predictor(ScaledLogits(model), checkpoint, what)


@pytest.fixture(autouse=True)
def wrapped_method_registered(monkeypatch):
    """Registered for this module's tests only, so the demo and `robustft methods` never see it."""
    monkeypatch.setitem(registry._REGISTRY, WrappedFinetune.name, WrappedFinetune)


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared)


def _train(small, out, method: str):
    config = demo_config(method, 0, out, name=method, steps=3, progress=False)
    fit(config, log=quiet, prepared=small)
    return config.run_dir


def test_composed_names_mark_the_base_method_unless_it_is_plain_fine_tuning():
    assert composed_name("vrf", "gmixout") == "gmixout+vrf"
    assert composed_name("wise_ft", "finetune") == "wise_ft"


def test_wise_ft_over_a_mixout_run_interpolates_towards_that_run(small, tmp_path):
    base = _train(small, tmp_path, "mixout")
    options = {"finetuned_run": str(base), "alphas": [0.0, 1.0], "alpha": 1.0}
    config = demo_config("wise_ft", 0, tmp_path, name="wise", method_options=options, progress=False)
    results = fit(config, log=quiet, prepared=small)
    assert list(results["methods"]) == ["mixout+wise_ft"]
    final = load_final_state(config.run_dir / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    tuned = load_state_dict_file(base / FINAL_CHECKPOINT)
    assert all(bits_equal(final[key], tuned[key]) for key in tuned)


def test_output_ensemble_over_a_wrapped_predictor_uses_its_structure_and_reloads(small, tmp_path):
    base = _train(small, tmp_path, "test_wrapped_finetune")
    loaded = load_run_predictor(copy.deepcopy(small.model), base, small.ctx)  # the shared fixture stays pristine
    assert isinstance(loaded.predictor, ScaledLogits) and loaded.method == "test_wrapped_finetune"
    options = {"finetuned_run": str(base), "alphas": [1.0]}
    config = demo_config("output_ensemble", 0, tmp_path, name="ose", method_options=options, progress=False)
    results = fit(config, log=quiet, prepared=small)
    entry = results["methods"]["test_wrapped_finetune+output_ensemble"]
    base_entry = json.loads((base / "results.json").read_text())["methods"]["test_wrapped_finetune"]
    assert entry["id"] == pytest.approx(base_entry["id"])  # alpha 1: the wrapped model's own predictions


def test_wise_ft_refuses_a_predictor_that_is_not_a_plain_model_and_names_the_alternatives(small, tmp_path):
    base = _train(small, tmp_path, "test_wrapped_finetune")
    options = {"finetuned_run": str(base), "alphas": [0.5]}
    config = demo_config("wise_ft", 0, tmp_path, name="wise", method_options=options, progress=False)
    with pytest.raises(WeightSpaceError, match="output_ensemble or vrf"):
        fit(config, log=quiet, prepared=small)


def test_evaluate_keeps_the_composed_results_name(small, tmp_path):
    base = _train(small, tmp_path, "mixout")
    options = {"finetuned_run": str(base), "alphas": [0.5]}
    config = demo_config("output_ensemble", 0, tmp_path, name="ose", method_options=options, progress=False)
    fit(config, log=quiet, prepared=small)
    assert list(evaluate_run(config.run_dir, log=quiet)["methods"]) == ["mixout+output_ensemble"]


def test_vrf_over_a_lora_run_uses_the_merged_lora_model(small, tmp_path):
    base = _train(small, tmp_path, "lora")
    config = demo_config("vrf", 0, tmp_path, name="vrf", method_options={"finetuned_run": str(base)}, progress=False)
    results = fit(config, log=quiet, prepared=small)
    assert list(results["methods"]) == ["lora+vrf"]
    merged = load_state_dict_file(base / FINAL_CHECKPOINT)
    saved = load_final_state(config.run_dir / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    finetuned = {key.removeprefix("finetuned."): value for key, value in saved.items() if key.startswith("finetuned.")}
    assert finetuned.keys() == merged.keys()  # a plain model: the adapters were merged at the LoRA run's finalize
    assert all(bits_equal(finetuned[key], merged[key]) for key in merged)


def test_vrf_over_a_mixture_of_adapters_run_keeps_the_routed_adapters_and_reloads(small, tmp_path):
    base = _train(small, tmp_path, "mixture_of_adapters")
    config = demo_config("vrf", 0, tmp_path, name="vrf", method_options={"finetuned_run": str(base)}, progress=False)
    entry = fit(config, log=quiet, prepared=small)["methods"]["mixture_of_adapters+vrf"]
    saved = load_final_state(config.run_dir / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    assert any(key.startswith("finetuned.") and "router" in key for key in saved)
    method = get_method("vrf")(method_options(config))
    predictor = method.load_predictor(copy.deepcopy(small.model), config.run_dir / FINAL_CHECKPOINT, "the model")
    logits, labels = predict(predictor, small.ctx.splits["id_test"], small.ctx.device, 64)
    assert 100 * (logits.argmax(dim=1) == labels).float().mean().item() == pytest.approx(entry["id"])
