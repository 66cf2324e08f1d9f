"""WiSE-FT: exact endpoints, a convex combination per tensor, refusals, and an alpha pick blind to test labels."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import timm
import torch
import yaml

from posthoc_support import bits_equal, finetune, posthoc_run, quiet, relabelled, small_prepared
from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.errors import CheckpointError, ConfigError
from robustft.evaluate import evaluate_splits
from robustft.methods.wise_ft import WiseFt, WiseFtConfig
from robustft.posthoc import (
    CurvePoint,
    WeightSpaceError,
    choose_alpha,
    interpolate_state_dicts,
    oracle_alpha,
    pick_alpha_on_id_val,
)
from robustft.report import write_report
from robustft.runner import FINAL_CHECKPOINT
from robustft.weight_references import load_final_state


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared)


@pytest.fixture(scope="module")
def finetuned_run(small, tmp_path_factory):
    return finetune(small, tmp_path_factory.mktemp("wise_ft"))


@pytest.fixture(scope="module")
def thetas(small, finetuned_run):
    theta_0 = {key: value.clone() for key, value in small.model.state_dict().items()}
    return theta_0, load_state_dict_file(finetuned_run / FINAL_CHECKPOINT)


# ------------------------------------------------------------------------------------------- the maths


def test_theta_0_and_theta_1_are_the_models_bit_for_bit(small, thetas):
    theta_0, theta_1 = thetas
    assert sum(not torch.equal(theta_0[k], theta_1[k]) for k in theta_0) > len(theta_0) // 2  # FT moved them
    for alpha, expected in ((0.0, theta_0), (1.0, theta_1)):
        mixed = interpolate_state_dicts(theta_0, theta_1, alpha)
        assert list(mixed) == list(theta_0)
        assert all(bits_equal(mixed[key], expected[key]) for key in expected), alpha
    images = small.ctx.splits["id_test"][list(range(32))][0]
    model, finetuned = copy.deepcopy(small.model).eval(), copy.deepcopy(small.model).eval()
    finetuned.load_state_dict(theta_1)
    model.load_state_dict(interpolate_state_dicts(theta_0, theta_1, 1.0))
    with torch.no_grad():
        assert bits_equal(model(images), finetuned(images))
        model.load_state_dict(interpolate_state_dicts(theta_0, theta_1, 0.0))
        assert bits_equal(model(images), small.model.eval()(images))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.75])
def test_interpolation_is_the_convex_combination_tensor_by_tensor(thetas, alpha):
    theta_0, theta_1 = thetas
    mixed = interpolate_state_dicts(theta_0, theta_1, alpha)
    for key, t0 in theta_0.items():
        t1 = theta_1[key]
        assert mixed[key].dtype == t0.dtype and mixed[key].shape == t0.shape
        torch.testing.assert_close(mixed[key], (1 - alpha) * t0 + alpha * t1, rtol=1e-6, atol=1e-7)
        low, high = torch.minimum(t0, t1), torch.maximum(t0, t1)
        assert bool(((mixed[key] >= low) & (mixed[key] <= high)).all()), key  # on the segment
    assert not any(mixed[k] is theta_0[k] or mixed[k] is theta_1[k] for k in mixed)  # copies, not views


def test_interpolation_is_exact_on_representable_values():
    mixed = interpolate_state_dicts({"w": torch.zeros(3)}, {"w": torch.full((3,), 2.0)}, 0.25)
    assert torch.equal(mixed["w"], torch.full((3,), 0.5))
    half = interpolate_state_dicts(
        {"w": torch.ones(2, dtype=torch.bfloat16)}, {"w": torch.full((2,), 3.0, dtype=torch.bfloat16)}, 0.5
    )
    assert half["w"].dtype == torch.bfloat16 and torch.equal(half["w"], torch.full((2,), 2.0, dtype=torch.bfloat16))


def test_integer_buffers_are_kept_only_when_equal_and_counters_are_mixed():
    theta_0 = {"w": torch.zeros(2), "index": torch.arange(4), "bn.num_batches_tracked": torch.tensor(10)}
    theta_1 = {"w": torch.ones(2), "index": torch.arange(4), "bn.num_batches_tracked": torch.tensor(30)}
    mixed = interpolate_state_dicts(theta_0, theta_1, 0.25)
    assert torch.equal(mixed["index"], torch.arange(4)) and mixed["index"].dtype == torch.int64
    assert mixed["bn.num_batches_tracked"].item() == 15 and mixed["bn.num_batches_tracked"].dtype == torch.int64
    for alpha in (0.0, 0.5, 1.0):  # the refusal does not depend on alpha
        with pytest.raises(WeightSpaceError, match="'index' differs"):
            interpolate_state_dicts(theta_0, {**theta_1, "index": torch.arange(4).flip(0)}, alpha)


def test_mismatched_architectures_and_heads_are_refused_naming_the_keys():
    theta_0 = {"backbone.w": torch.zeros(4, 3), "head.weight": torch.zeros(10, 3), "head.bias": torch.zeros(10)}
    other_head = {**theta_0, "head.weight": torch.zeros(5, 3), "head.bias": torch.zeros(5)}
    with pytest.raises(WeightSpaceError) as info:
        interpolate_state_dicts(theta_0, other_head, 0.5)
    message = str(info.value)
    assert "2 shape mismatches" in message and "head.weight (10, 3) vs (5, 3)" in message and "\n" not in message
    with pytest.raises(WeightSpaceError, match=r"1 missing keys \(backbone.w\); 1 unexpected keys \(backbone.v\)"):
        interpolate_state_dicts(
            theta_0, {**{k: v for k, v in theta_0.items() if k != "backbone.w"}, "backbone.v": torch.zeros(4, 3)}, 0.5
        )


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224"])
def test_interpolation_works_for_timm_backbones_with_batchnorm_and_attention(name):
    """Real timm state dicts, BatchNorm running stats and step counters included, load back strictly."""
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    theta_0 = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    theta_1 = model.state_dict()
    counters = [key for key in theta_0 if key.endswith("num_batches_tracked")]
    assert bool(counters) == (name == "resnet10t")
    mixed = interpolate_state_dicts(theta_0, theta_1, 0.5)
    model.load_state_dict(mixed, strict=True)
    assert all(mixed[key].item() == 1 for key in counters)  # 0 and 2 steps: round(1.0)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


# ----------------------------------------------------------------------------------------- the picks


def _point(alpha: float, id_val: float | None, id_test: float, ood: float) -> CurvePoint:
    return CurvePoint(alpha=alpha, id=id_test, ood_avg=ood, ood={"ood_x": ood}, id_val=id_val)


def test_pick_on_id_val_breaks_ties_towards_zero_shot_and_ignores_test_numbers():
    curve = [
        _point(0.0, 80.0, 70.0, 90.0),
        _point(0.3, 85.0, 75.0, 80.0),
        _point(0.6, 85.0, 99.0, 60.0),
        _point(1.0, 84.0, 98.0, 50.0),
    ]
    assert pick_alpha_on_id_val(curve) == 0.3
    assert oracle_alpha(curve, "id") == 0.6 and oracle_alpha(curve, "ood_avg") == 0.0
    assert choose_alpha(curve, None) == (0.3, "id_val") and choose_alpha(curve, 0.6) == (0.6, "config")
    scrambled = [dataclasses.replace(p, id=100.0 - p.id, ood_avg=0.0) for p in curve]
    assert pick_alpha_on_id_val(scrambled) == 0.3
    with pytest.raises(ConfigError, match="method.alpha"):
        pick_alpha_on_id_val([_point(0.5, None, 90.0, 90.0)])


def test_alpha_picked_on_id_val_does_not_change_when_test_labels_are_perturbed(small, finetuned_run, tmp_path):
    method = WiseFt(WiseFtConfig(finetuned_run=finetuned_run, alphas=[0.0, 0.5, 1.0]))

    def sweep(splits, name):
        ctx = dataclasses.replace(small.ctx.for_run(tmp_path / name, 0, quiet), splits=splits)
        method.finalize(method.prepare(copy.deepcopy(small.model), ctx), ctx)
        return ctx.extras

    data_config = small.model.data_config
    perturbed_splits = {
        name: relabelled(split, data_config) if name == "id_test" or name.startswith("ood_") else split
        for name, split in small.ctx.splits.items()
    }
    honest, perturbed = sweep(small.ctx.splits, "honest"), sweep(perturbed_splits, "perturbed")
    assert [p["id_val"] for p in perturbed["curve"]] == [p["id_val"] for p in honest["curve"]]
    assert all(p["id"] < 20 < 60 < q["id"] for p, q in zip(perturbed["curve"], honest["curve"], strict=True))
    assert perturbed["alpha"] == honest["alpha"]


# --------------------------------------------------------------------------------------- the method


def test_wise_ft_run_sweeps_picks_and_saves_the_chosen_model(small, finetuned_run, thetas, tmp_path):
    entry = posthoc_run(small, tmp_path, "wise_ft", finetuned_run=finetuned_run, alphas=[0.0, 0.5, 1.0])
    curve = {point["alpha"]: point for point in entry["curve"]}
    assert list(curve) == [0.0, 0.5, 1.0]
    assert entry["alpha"] == max(curve, key=lambda a: (curve[a]["id_val"], -a)) and entry["alpha_chosen_on"] == "id_val"
    chosen = curve[entry["alpha"]]
    assert (entry["id"], entry["ood"], entry["id_val"]) == (chosen["id"], chosen["ood"], chosen["id_val"])
    finetuned = json.loads((finetuned_run / "results.json").read_text())["methods"]["finetune"]
    assert (curve[1.0]["id"], curve[1.0]["ood"]) == (finetuned["id"], finetuned["ood"])  # theta(1) is FT
    zero_shot = evaluate_splits(small.model, small.ctx.splits, small.ctx.device)
    assert curve[0.0]["id"] == zero_shot["id_test"]["accuracy"]  # theta(0) is ZS
    assert entry["trainable_params"] == 0 and entry["finetuned_run"] == str(finetuned_run)
    saved = load_final_state(tmp_path / "wise_ft" / FINAL_CHECKPOINT, initial_state=small.model.state_dict())
    expected = interpolate_state_dicts(*thetas, entry["alpha"])
    assert all(bits_equal(saved[key], expected[key]) for key in expected)
    on_disk = json.loads((tmp_path / "wise_ft" / "wise_ft_curve.json").read_text())
    assert on_disk["curve"] == entry["curve"] and on_disk["oracle_alpha_ood"] == entry["oracle_alpha_ood"]
    assert (tmp_path / "wise_ft" / "wise_ft_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_wise_ft_refuses_a_run_with_another_head(small, finetuned_run, tmp_path):
    other = tmp_path / "other_head"
    (other / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "results.json"):
        (other / name).write_text((finetuned_run / name).read_text())
    state = load_state_dict_file(finetuned_run / FINAL_CHECKPOINT)
    state["head.weight"], state["head.bias"] = state["head.weight"][:5].clone(), state["head.bias"][:5].clone()
    save_state_dict_file(state, other / FINAL_CHECKPOINT)
    with pytest.raises(CheckpointError) as info:
        posthoc_run(small, tmp_path, "wise_ft", finetuned_run=other, alphas=[0.5])
    message = str(info.value)
    assert str(other / FINAL_CHECKPOINT) in message and "head.weight (5, 128) vs (10, 128)" in message
    assert "\n" not in message


def test_wise_ft_refuses_a_run_from_another_initialisation(small, finetuned_run, tmp_path):
    other = tmp_path / "other_init"
    (other / "checkpoints").mkdir(parents=True)
    config = yaml.safe_load((finetuned_run / "config.yaml").read_text())
    config["model"]["checkpoint"] = str(tmp_path / "another_pretrained.safetensors")
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    (other / "results.json").write_text("{}")
    save_state_dict_file(load_state_dict_file(finetuned_run / FINAL_CHECKPOINT), other / FINAL_CHECKPOINT)
    with pytest.raises(ConfigError, match=r"starts from another model .*model.checkpoint"):
        posthoc_run(small, tmp_path, "wise_ft", finetuned_run=other, alphas=[0.5])


def test_wise_ft_needs_its_inputs_before_any_work(small, tmp_path):
    with pytest.raises(ConfigError, match="method.finetuned_run"):
        posthoc_run(small, tmp_path, "wise_ft")
    with pytest.raises(CheckpointError, match="not found"):
        posthoc_run(small, tmp_path, "wise_ft", finetuned_run=tmp_path)
    no_val = dataclasses.replace(
        small, ctx=dataclasses.replace(small.ctx, splits={k: v for k, v in small.ctx.splits.items() if k != "id_val"})
    )
    with pytest.raises(ConfigError, match="no id_val split"):
        posthoc_run(no_val, tmp_path, "wise_ft", finetuned_run=tmp_path)


def test_report_shows_the_sweep_picks_and_curve_figures(tmp_path):
    curve = [
        {"alpha": a, "id": 80 + 15 * a, "ood_avg": 90 - 10 * (a - 0.3) ** 2, "ood": {}, "id_val": 80 + 14 * a}
        for a in (0.0, 0.5, 1.0)
    ]
    entry = {
        "id": 87.5,
        "ood": {"ood_x": 89.6},
        "ood_avg": 89.6,
        "alpha": 0.5,
        "alpha_chosen_on": "id_val",
        "oracle_alpha_id": 1.0,
        "oracle_alpha_ood": 0.0,
        "curve": curve,
    }
    soup = {"id": 90.0, "ood": {"ood_x": 80.0}, "ood_avg": 80.0, "ingredients": ["a", "b", "c"], "kept": ["a"]}
    results = {"benchmark": "digits", "seed": 0, "methods": {"wise_ft": entry, "greedy_soup": soup}}
    text = write_report(results, tmp_path).read_text()
    assert "| wise_ft | 0.5 | id_val | 87.50 | 89.60 | 1 | 0 |" in text
    assert "![wise_ft: ID vs OOD over alpha](wise_ft_curve.png)" in text
    assert "| greedy_soup | 3 | 1 | 90.00 | 80.00 |" in text
    png = tmp_path / "wise_ft_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".svg").is_file()
    assert (
        "Mixing-coefficient"
        not in write_report({**results, "methods": {"greedy_soup": soup}}, tmp_path / "plain").read_text()
    )
