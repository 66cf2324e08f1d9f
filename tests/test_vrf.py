"""VRF: the weight, the ZSF set, exact kNN, temperatures on id_val only, one pass per model, save and reload."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from posthoc_support import bits_equal, finetune, posthoc_run, quiet, relabelled, small_prepared
from robustft.data.tensor_split import TensorSplit
from robustft.demo import demo_config
from robustft.errors import ConfigError
from robustft.evaluate import predict
from robustft.methods import get_method
from robustft.methods.vrf import (
    ExactKnn,
    VrfPredictor,
    VrfWarning,
    fit_temperature,
    kth_distance_brute_force,
    normalised_embedding_and_logits,
    order_statistic,
    resolve_k,
    sample_weight,
    self_distances,
    to_distance,
    vrf_log_probs,
    zero_shot_failures,
)
from robustft.runner import FINAL_CHECKPOINT, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared)


@pytest.fixture(scope="module")
def finetuned_run(small, tmp_path_factory):
    return finetune(small, tmp_path_factory.mktemp("vrf"), steps=6)


@pytest.fixture(scope="module")
def vrf_small(small, finetuned_run):
    """``small`` with the first 256 training images: VRF's ZSF set comes from them (fine-tuned on all 700)."""
    train = small.ctx.splits["train"]
    subset = TensorSplit(train.images[:256], train.labels[:256], small.model.data_config, "train")
    return dataclasses.replace(small, ctx=dataclasses.replace(small.ctx, splits={**small.ctx.splits, "train": subset}))


@pytest.fixture(scope="module")
def default_vrf(vrf_small, finetuned_run, tmp_path_factory):
    """(predictor, results extras) of VRF at its defaults."""
    return finalize(vrf_small, tmp_path_factory.mktemp("vrf_default"), finetuned_run=finetuned_run)


def vrf_method(**options):
    cls = get_method("vrf")
    return cls(cls.config_cls(**options))


def finalize(small, tmp_path, **options):
    """VRF's predictor and results entry over ``small``'s splits, without the runner's evaluation."""
    method = vrf_method(**options)
    ctx = small.ctx.for_run(tmp_path, 0, quiet)
    model = method.prepare(copy.deepcopy(small.model), ctx)
    return method.finalize(model, ctx), ctx.extras


def unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_weight_decreases_monotonically_with_distance_and_is_one_half_at_a():
    distance = torch.linspace(0, 4, 401)
    for a, b in ((1.5, 0.6), (0.2, 0.05), (3.0, 2.0)):
        weight = sample_weight(distance, a, b)
        assert (weight[1:] < weight[:-1]).all()
        assert sample_weight(torch.tensor(a), a, b).item() == 0.5
    assert sample_weight(torch.tensor(float("inf")), 1.5, 0.6).item() == 0.0


def test_log_probs_are_the_log_of_the_weighted_calibrated_mixture():
    generator = torch.Generator().manual_seed(0)
    z_ft, z_zs = torch.randn(32, 10, generator=generator) * 3, torch.randn(32, 10, generator=generator) * 3
    distance = torch.rand(32, generator=generator) * 4
    out = vrf_log_probs(z_ft, z_zs, distance, 1.5, 0.6, 0.7, 1.3)
    weight = sample_weight(distance, 1.5, 0.6)[:, None]
    torch.testing.assert_close(out.exp(), weight * (z_ft / 0.7).softmax(-1) + (1 - weight) * (z_zs / 1.3).softmax(-1))
    infinite = vrf_log_probs(z_ft, z_zs, torch.full((32,), float("inf")), 1.5, 0.6, 0.7, 1.3)
    assert torch.equal(infinite, F.log_softmax(z_zs / 1.3, -1))  # no ZSF neighbour: exactly the zero-shot model


def test_zsf_set_is_finetuned_right_and_zero_shot_wrong():
    labels = torch.tensor([0, 1, 2, 3])
    finetuned = F.one_hot(torch.tensor([0, 1, 0, 3]), 4).float()
    zero_shot = F.one_hot(torch.tensor([0, 2, 2, 1]), 4).float()
    assert zero_shot_failures(finetuned, zero_shot, labels).tolist() == [False, True, False, True]


def test_k_is_a_count_or_a_fraction_and_is_guarded():
    assert resolve_k(5, 100) == 5 and resolve_k(0.05, 100) == 5
    assert resolve_k(0.001, 90) == 1  # would round to 0
    assert resolve_k(500, 90) == 90  # more neighbours than members
    assert resolve_k(0.5, 0) == 0
    with pytest.raises(ConfigError, match="method.k: .*whole number"):
        demo_config("vrf", 0, Path("unused"), method_options={"k": 2.5})


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_knn_agrees_with_brute_force_torch(backend):
    members, queries = unit_vectors(200, 32, 0), unit_vectors(50, 32, 1)
    index = ExactKnn(members, CPU, backend=backend)
    assert index.backend == backend
    for k in (1, 7, 200):
        found = to_distance(index.squared_distances(queries, k)[:, -1], "squared_l2")
        torch.testing.assert_close(found, kth_distance_brute_force(queries, members, k), atol=1e-5, rtol=1e-5)
    squared_all = index.squared_distances(queries, 200)
    assert (squared_all[:, 1:] >= squared_all[:, :-1]).all()  # ascending: column k-1 is the k-th neighbour
    empty = ExactKnn(members[:0], CPU, backend=backend).squared_distances(queries, 0)
    assert torch.isinf(empty).all()


def test_loading_new_members_rebuilds_the_index():
    first, second, queries = unit_vectors(30, 8, 4), unit_vectors(30, 8, 5), unit_vectors(10, 8, 6)
    predictor = VrfPredictor(torch.nn.Identity(), torch.nn.Identity(), first, k=3, a=1.0, b=0.5)
    torch.testing.assert_close(predictor.distance(queries), kth_distance_brute_force(queries, first, 3))  # index built
    other = VrfPredictor(torch.nn.Identity(), torch.nn.Identity(), second, k=3, a=1.0, b=0.5)
    predictor.load_state_dict(other.state_dict())
    torch.testing.assert_close(predictor.distance(queries), kth_distance_brute_force(queries, second, 3))


def test_squared_and_plain_l2_give_the_documented_relation():
    members, queries = unit_vectors(120, 16, 2), unit_vectors(40, 16, 3)
    index = ExactKnn(members, CPU)
    squared = index.squared_distances(queries, 5)
    d_sq, d = to_distance(squared, "squared_l2"), to_distance(squared, "l2")
    torch.testing.assert_close(d_sq, d**2)
    assert torch.equal(d_sq[:, -1].argsort(), d[:, -1].argsort())  # kNN ranks and the ordering of d agree
    own_sq, own = self_distances(index, members, 5, "squared_l2"), self_distances(index, members, 5, "l2")
    a_sq, a = order_statistic(own_sq, 0.9), order_statistic(own, 0.9)
    assert a == pytest.approx(a_sq**0.5, rel=1e-6)  # the derived a is the same member, in either unit
    assert torch.equal(sample_weight(d[:, -1], a, 0.1) > 0.5, sample_weight(d_sq[:, -1], a_sq, 0.1) > 0.5)


def test_temperature_fit_recovers_the_generating_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=generator) * 4
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    scaled = fit_temperature(logits * 3, labels)
    assert scaled == pytest.approx(3 * fit_temperature(logits, labels), rel=1e-3)


def test_finetuned_embedding_and_logits_come_from_one_backbone_pass(vrf_small, default_vrf):
    predictor, extras = default_vrf
    assert extras["zsf_size"] > 0
    predictor = copy.deepcopy(predictor)
    calls = {"zero_shot": 0, "finetuned": 0}
    for name in calls:
        getattr(predictor, name).backbone.register_forward_hook(
            lambda module, inputs, output, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    images = vrf_small.ctx.splits["id_test"][list(range(16))][0]
    with torch.no_grad():
        out = predictor(images)
        embedding, logits = normalised_embedding_and_logits(predictor.finetuned, images)
        assert calls == {"zero_shot": 1, "finetuned": 2}  # the predictor's forward passed each backbone once
        torch.testing.assert_close(logits, predictor.finetuned(images))
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(16))
    assert out.shape == (16, 10)


def test_a_zsf_member_as_test_sample_gets_weight_near_one(default_vrf):
    trained, _ = default_vrf
    members = trained.zsf_embeddings
    predictor = VrfPredictor(trained.zero_shot, trained.finetuned, members, k=1, a=1.0, b=0.1)
    distance = predictor.distance(members)
    assert distance.max().item() < 1e-4  # each member is its own nearest neighbour
    assert sample_weight(distance, predictor.a, predictor.b).min().item() > 0.9999
    small_a = VrfPredictor(trained.zero_shot, trained.finetuned, members, k=1, a=-0.5, b=0.1)
    assert sample_weight(small_a.distance(members), small_a.a, small_a.b).max().item() < 0.01


def test_empty_zsf_set_gives_the_zero_shot_model_with_a_warning(vrf_small, tmp_path):
    zero_shot_run = demo_config("zeroshot", 0, tmp_path, progress=False)
    fit(zero_shot_run, log=quiet, prepared=vrf_small)  # "fine-tuned" = zero-shot: it fixes no training image
    with pytest.warns(VrfWarning, match="zero-shot-failure set is empty"):
        predictor, extras = finalize(vrf_small, tmp_path / "vrf", finetuned_run=zero_shot_run.run_dir)
    assert extras["zsf_size"] == 0 and "warning" in extras
    for split in ("id_test", "ood_fonts"):
        mixed, _ = predict(predictor, vrf_small.ctx.splits[split], CPU)
        logits, _ = predict(vrf_small.model, vrf_small.ctx.splits[split], CPU)
        assert torch.equal(mixed.argmax(1), logits.argmax(1))
        torch.testing.assert_close(mixed, F.log_softmax(logits / extras["temperature_zero_shot"], -1))


def with_splits(prepared, splits):
    return dataclasses.replace(prepared, ctx=dataclasses.replace(prepared.ctx, splits=splits))


def test_temperatures_and_a_b_use_id_val_only(vrf_small, finetuned_run, tmp_path):
    options = {"finetuned_run": finetuned_run, "pick_on_id_val": True}
    splits, data_config = vrf_small.ctx.splits, vrf_small.model.data_config
    _, base = finalize(vrf_small, tmp_path / "base", **options)
    test_relabelled = {
        name: split if name in ("train", "id_val") else relabelled(split, data_config) for name, split in splits.items()
    }
    _, same = finalize(with_splits(vrf_small, test_relabelled), tmp_path / "test_labels", **options)
    keys = ("temperature_finetuned", "temperature_zero_shot", "a", "b", "zsf_size", "a_b_grid")
    assert {key: same[key] for key in keys} == {key: base[key] for key in keys}
    val_relabelled = {**splits, "id_val": relabelled(splits["id_val"], data_config)}
    _, moved = finalize(with_splits(vrf_small, val_relabelled), tmp_path / "val_labels", **options)
    assert moved["temperature_finetuned"] != base["temperature_finetuned"]  # id_val labels are what it reads
    without_val = {name: split for name, split in splits.items() if name != "id_val"}
    with pytest.raises(ConfigError, match="data.splits.id_val"):
        finalize(with_splits(vrf_small, without_val), tmp_path, finetuned_run=finetuned_run)


def test_vrf_run_saves_the_whole_predictor_and_reloads_identically(vrf_small, finetuned_run, default_vrf, tmp_path):
    entry = posthoc_run(vrf_small, tmp_path, "vrf", finetuned_run=finetuned_run)
    assert entry["zsf_size"] > 0 and entry["a_b_chosen_by"] == "zsf_self_distances"
    assert entry["mean_weight"]["id_test"] > entry["mean_weight"]["ood_fonts"]  # ID images sit closer to the ZSF set
    checkpoint = tmp_path / "vrf" / FINAL_CHECKPOINT
    reloaded = get_method("vrf")().load_predictor(copy.deepcopy(vrf_small.model), checkpoint, "digits_vit")
    assert reloaded.zsf_embeddings.shape[0] == entry["zsf_size"]
    assert (reloaded.k.item(), reloaded.a.item(), reloaded.temperature_finetuned.item()) == pytest.approx(
        (entry["k"], entry["a"], entry["temperature_finetuned"])
    )
    original, _ = default_vrf
    for split in ("id_test", "ood_rotation"):
        first, labels = predict(original, vrf_small.ctx.splits[split], CPU)
        second, _ = predict(reloaded, vrf_small.ctx.splits[split], CPU)
        assert bits_equal(first, second)
        assert (first.argmax(1) == labels).float().mean().item() * 100 == pytest.approx(
            entry["id"] if split == "id_test" else entry["ood"][split]
        )
    copied = copy.deepcopy(reloaded)  # the FAISS index is not copied; the copy rebuilds it
    assert bits_equal(predict(copied, vrf_small.ctx.splits["ood_rotation"], CPU)[0], second)


def test_vrf_command_passes_its_options_to_the_method(finetuned_run):
    from typer.testing import CliRunner

    from robustft.cli import app

    for option, value, key in (("--k", "2.5", "method.k"), ("--distance", "cosine", "method.distance")):
        result = CliRunner().invoke(app, ["vrf", str(finetuned_run), option, value])
        assert isinstance(result.exception, ConfigError), result.output
        assert key in str(result.exception)  # rejected by VrfConfig before any data is loaded
