"""Output-space ensembles: the mixture maths, exact endpoints, one forward per model, save and reload."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from posthoc_support import bits_equal, finetune, posthoc_run, small_prepared
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.evaluate import evaluate_splits, predict
from robustft.logit_cache import LogitCache
from robustft.methods import get_method
from robustft.methods.output_ensemble import OutputEnsemble, ensemble_log_probs
from robustft.runner import FINAL_CHECKPOINT
from robustft.weight_references import load_final_state


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared)


@pytest.fixture(scope="module")
def finetuned_run(small, tmp_path_factory):
    return finetune(small, tmp_path_factory.mktemp("ose"))


@pytest.fixture(scope="module")
def models(small, finetuned_run):
    finetuned = copy.deepcopy(small.model)
    finetuned.load_state_dict(load_state_dict_file(finetuned_run / FINAL_CHECKPOINT))
    return small.model.eval(), finetuned.eval()


def test_log_probs_are_the_log_of_the_probability_mixture():
    generator = torch.Generator().manual_seed(0)
    z_zs, z_ft = torch.randn(64, 10, generator=generator) * 3, torch.randn(64, 10, generator=generator) * 3
    out = ensemble_log_probs(z_zs, z_ft, 0.3)
    torch.testing.assert_close(out.exp(), 0.7 * z_zs.softmax(-1) + 0.3 * z_ft.softmax(-1))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(64))
    assert torch.equal(ensemble_log_probs(z_zs, None, 0.0), F.log_softmax(z_zs, -1))
    assert torch.equal(ensemble_log_probs(z_zs, z_ft, 1.0), F.log_softmax(z_ft, -1))
    extreme = ensemble_log_probs(z_zs * 1e4, z_ft * 1e4, 0.5)  # no overflow: logsumexp
    assert torch.isfinite(extreme.max(-1).values).all()
    with pytest.raises(ValueError, match="fine-tuned logits are needed"):
        ensemble_log_probs(z_zs, None, 0.5)


def test_alpha_0_and_1_reproduce_zero_shot_and_fine_tuned_predictions(small, models):
    zero_shot, finetuned = models
    for alpha, alone in ((0.0, zero_shot), (1.0, finetuned)):
        ensemble = OutputEnsemble(zero_shot, finetuned, alpha)
        for split in ("id_test", "ood_fonts"):
            mixed, labels = predict(ensemble, small.ctx.splits[split], small.ctx.device)
            logits, _ = predict(alone, small.ctx.splits[split], small.ctx.device)
            assert bits_equal(mixed, F.log_softmax(logits, -1))
            assert torch.equal(mixed.argmax(1), logits.argmax(1))


def test_an_endpoint_runs_only_one_model(small, models):
    class Unusable(torch.nn.Module):
        def forward(self, images):
            raise AssertionError("forward of a model with weight 0")

    images = small.ctx.splits["id_test"][list(range(8))][0]
    zero_shot, finetuned = models
    with torch.no_grad():
        assert OutputEnsemble(zero_shot, Unusable(), 0.0)(images).shape == (8, 10)
        assert OutputEnsemble(Unusable(), finetuned, 1.0)(images).shape == (8, 10)


def test_sweep_forwards_each_model_once_per_split(small, finetuned_run, tmp_path):
    method = get_method("output_ensemble")(
        get_method("output_ensemble").config_cls(finetuned_run=finetuned_run, alphas=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    )
    ctx = dataclasses.replace(small.ctx.for_run(tmp_path, 0, lambda message: None), logit_cache=LogitCache())
    model = method.prepare(copy.deepcopy(small.model), ctx)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))  # deepcopy keeps it
    method.finalize(model, ctx)
    evaluated = sum(len(split) for name, split in ctx.splits.items() if name != "train")
    assert sum(calls) == 2 * evaluated  # zero-shot and fine-tuned, once each, whatever the number of alphas
    assert len(ctx.extras["curve"]) == 6
    calls.clear()
    method.finalize(model, ctx)  # both models' logits are in the run's logit cache now
    assert calls == []


def test_output_ensemble_run_matches_its_endpoints_and_reloads(small, finetuned_run, tmp_path):
    entry = posthoc_run(small, tmp_path, "output_ensemble", finetuned_run=finetuned_run, alphas=[0.0, 0.5, 1.0])
    curve = {point["alpha"]: point for point in entry["curve"]}
    finetuned = json.loads((finetuned_run / "results.json").read_text())["methods"]["finetune"]
    assert (curve[1.0]["id"], curve[1.0]["ood"], curve[1.0]["id_val"]) == (
        finetuned["id"],
        finetuned["ood"],
        finetuned["id_val"],
    )
    zero_shot = evaluate_splits(small.model, small.ctx.splits, small.ctx.device)
    assert curve[0.0]["ood"] == {k: v["accuracy"] for k, v in zero_shot.items() if k.startswith("ood_")}
    assert entry["alpha"] == max(curve, key=lambda a: (curve[a]["id_val"], -a))
    chosen = curve[entry["alpha"]]
    assert (entry["id"], entry["ood"]) == (chosen["id"], chosen["ood"])  # the saved predictor is the picked one
    saved = load_final_state(tmp_path / "output_ensemble" / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    assert saved["alpha"].item() == pytest.approx(entry["alpha"])
    assert {key.split(".", 1)[0] for key in saved} == {"zero_shot", "finetuned", "alpha"}
    method = get_method("output_ensemble")()
    predictor = method.load_predictor(
        copy.deepcopy(small.model), tmp_path / "output_ensemble" / FINAL_CHECKPOINT, "digits_vit"
    )
    reloaded = evaluate_splits(predictor, small.ctx.splits, small.ctx.device)
    assert reloaded["id_test"]["accuracy"] == entry["id"]
    assert {k: v["accuracy"] for k, v in reloaded.items() if k.startswith("ood_")} == entry["ood"]
