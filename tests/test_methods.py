"""The first four methods do what they claim, mechanically, on the real benchmark."""

from __future__ import annotations

import copy

import pytest
import torch

from robustft.demo import demo_config
from robustft.evaluate import evaluate_splits
from robustft.methods import get_method, list_methods, register_method
from robustft.methods.base import Method, RunContext
from robustft.methods.linear_probe import fit_linear_probe
from robustft.runner import fit


def quiet(message: str) -> None:
    pass


def context(prepared, tmp_path) -> RunContext:
    return prepared.ctx.for_run(tmp_path, 0, quiet)


def test_registry_lists_every_method_with_documented_defaults():
    names = list_methods()
    assert {"zeroshot", "linear_probe", "finetune", "lp_ft"} <= set(names)
    for name in names:
        for field, info in get_method(name).config_cls.model_fields.items():
            assert not info.is_required(), f"{name}.{field} has no default"
            assert info.description, f"{name}.{field} has no description"


def test_registry_refuses_duplicates_and_bad_names():
    class Clash(Method):
        name = "finetune"

    class BadName(Method):
        name = "Fine-Tune"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)
    with pytest.raises(ValueError, match="lower snake case"):
        register_method(BadName)


def test_linear_probe_leaves_backbone_bit_identical(digits_prepared, tmp_path):
    model = copy.deepcopy(digits_prepared.model)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    method = get_method("linear_probe")()
    model = method.prepare(model, context(digits_prepared, tmp_path))
    assert all(not p.requires_grad for p in model.backbone.parameters())
    method.setup(model, context(digits_prepared, tmp_path))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.head.weight)


def test_fit_linear_probe_separates_separable_data():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    labels = torch.arange(3).repeat(30)
    features = centres[labels] + 0.3 * torch.randn(90, 3, generator=generator)
    weight, bias, chosen_c = fit_linear_probe((features, labels), (features, labels), 4, [0.1, 1.0])
    predictions = (features @ weight.T + bias).argmax(1)
    assert torch.equal(predictions, labels)
    assert weight.shape == (4, 3) and bias[3] < -1e3  # class 3 never seen: never predicted
    assert chosen_c in (0.1, 1.0)


def test_finetune_starts_from_the_zero_shot_model(digits_prepared, tmp_path):
    zero_shot = fit(demo_config("zeroshot", 0, tmp_path, progress=False), log=quiet, prepared=digits_prepared)
    config = demo_config("finetune", 0, tmp_path, steps=2, progress=False)
    config.optim.lr = 1e-12
    finetuned = fit(config, log=quiet, prepared=digits_prepared)
    zs, ft = zero_shot["methods"]["zeroshot"], finetuned["methods"]["finetune"]
    assert ft["id"] == pytest.approx(zs["id"])
    assert ft["ood"] == pytest.approx(zs["ood"])
    assert zs["trainable_params"] == 0
    assert ft["trainable_params"] == sum(p.numel() for p in digits_prepared.model.parameters())


def test_finetune_raises_id_accuracy(digits_prepared, tmp_path):
    """A short real fine-tune on the ID task beats the zero-shot model's ID accuracy."""
    ctx = context(digits_prepared, tmp_path)
    before = evaluate_splits(digits_prepared.model, {"id_val": ctx.splits["id_val"]}, ctx.device)
    results = fit(demo_config("finetune", 0, tmp_path, epochs=2, progress=False), log=quiet, prepared=digits_prepared)
    assert results["methods"]["finetune"]["id_val"] > before["id_val"]["accuracy"] + 1.0


def test_results_json_shape(digits_prepared, tmp_path):
    results = fit(demo_config("linear_probe", 3, tmp_path, progress=False), log=quiet, prepared=digits_prepared)
    assert set(results) == {"schema_version", "benchmark", "seed", "methods"}
    assert results["benchmark"] == "digits_shift" and results["seed"] == 3
    entry = results["methods"]["linear_probe"]
    assert isinstance(entry["id"], float) and 0 <= entry["id"] <= 100
    assert set(entry["ood"]) == {"ood_fonts", "ood_corruption", "ood_color", "ood_rotation"}
    assert entry["ood_avg"] == pytest.approx(sum(entry["ood"].values()) / 4)
    assert isinstance(entry["train_seconds"], float) and entry["trainable_params"] == 128 * 10 + 10
    assert (tmp_path / "linear_probe" / "config.yaml").is_file()
    assert (tmp_path / "linear_probe" / "results.json").is_file()
