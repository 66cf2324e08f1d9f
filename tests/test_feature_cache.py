"""The feature cache: predictors sharing a backbone pay one backbone pass per split, bit-identical to a forward."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import Tensor, nn

from posthoc_support import bits_equal, finetune, quiet, small_prepared
from robustft.backbones.classifier import ImageClassifier
from robustft.data.tensor_split import TensorSplit
from robustft.evaluate import evaluate_splits, predict, predict_cached, predict_in_class_space
from robustft.feature_cache import feature_extractors
from robustft.logit_cache import LogitCache
from robustft.methods import get_method
from robustft.methods.linear_probe import LinearProbeConfig, probe_head


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared, size=48)


def with_other_head(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same backbone under another head (as a linear probe over the zero-shot model's backbone)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        other.head.weight.copy_(torch.randn(other.head.weight.shape, generator=generator))
        other.head.bias.copy_(torch.randn(other.head.bias.shape, generator=generator))
    return other


def count_backbone_batches(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    return calls


def evaluation_splits(ctx) -> dict:
    return {name: split for name, split in ctx.splits.items() if name != "train"}


def test_a_head_over_a_scored_backbone_runs_no_backbone_pass_and_gives_the_same_bits(small):
    ctx = small.ctx
    probe = with_other_head(small.model)
    fresh = evaluate_splits(probe, ctx.splits, ctx.device, 16)
    cache = LogitCache()
    evaluate_splits(small.model, ctx.splits, ctx.device, 16, cache=cache)  # the zero-shot run of a comparison
    assert cache.features.misses == len(evaluation_splits(ctx))
    twin = copy.deepcopy(probe)
    calls = count_backbone_batches(twin)
    cached = evaluate_splits(twin, ctx.splits, ctx.device, 16, cache=cache)
    assert calls == [] and cache.features.hits == len(evaluation_splits(ctx))
    assert cached == fresh  # every metric, the fitted temperature included, exactly
    features_only = LogitCache()
    features_only.features = cache.features  # a logit miss, a feature hit: the head alone runs
    for name in ("id_test", "ood_fonts"):
        dataset = ctx.splits[name]
        logits, labels = predict_cached(twin, dataset, ctx.device, 16, cache=features_only)
        expected = predict_in_class_space(probe, dataset, ctx.device, 16)
        assert bits_equal(logits, expected[0]) and torch.equal(labels, expected[1]), name
    assert calls == []


def test_features_under_autocast_keep_their_dtype_and_the_logits_their_bits(small):
    ctx = small.ctx
    dataset = ctx.splits["id_test"]
    probe = with_other_head(small.model, seed=1)
    fresh = predict(probe, dataset, ctx.device, 16, autocast_dtype=torch.bfloat16)
    cache = LogitCache()
    predict_cached(small.model, dataset, ctx.device, 16, cache=cache, autocast_dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        native = small.model.backbone(dataset[list(range(4))][0]).dtype
    (entry,) = cache.features.entries.values()
    assert entry.logits.dtype == native
    cached = predict_cached(
        probe, dataset, ctx.device, 16, cache=cache, autocast_dtype=torch.bfloat16, in_class_space=False
    )
    assert cache.features.hits == 1 and bits_equal(cached[0], fresh[0])
    predict_cached(probe, dataset, ctx.device, 16, cache=cache)  # fp32 is another entry
    assert cache.features.misses == 2


def test_another_backbone_is_another_entry(small):
    ctx = small.ctx
    dataset = ctx.splits["ood_fonts"]
    cache = LogitCache()
    predict_cached(small.model, dataset, ctx.device, 16, cache=cache)
    tuned = copy.deepcopy(small.model)
    with torch.no_grad():
        next(tuned.backbone.parameters()).view(-1)[0] += 1e-3
    logits, _ = predict_cached(tuned, dataset, ctx.device, 16, cache=cache)
    assert cache.features.misses == 2 and cache.features.hits == 0
    assert bits_equal(logits, predict_in_class_space(tuned, dataset, ctx.device, 16)[0])


def test_a_changed_forward_or_a_hook_runs_the_whole_predictor(small):
    class Doubled(ImageClassifier):
        def forward(self, images: Tensor) -> Tensor:
            return 2 * super().forward(images)

    model = small.model
    doubled = Doubled(copy.deepcopy(model.backbone), copy.deepcopy(model.head), model.normalize_features)
    assert feature_extractors(doubled) == [] and len(feature_extractors(model)) == 1
    hooked = copy.deepcopy(model)
    hooked.register_forward_hook(lambda module, inputs, output: output + 1)
    assert feature_extractors(hooked) == []
    ctx = small.ctx
    dataset = ctx.splits["id_test"]
    cache = LogitCache()
    plain, _ = predict_cached(model, dataset, ctx.device, 16, cache=cache, in_class_space=False)
    assert bits_equal(predict_cached(doubled, dataset, ctx.device, 16, cache=cache, in_class_space=False)[0], 2 * plain)
    features_only = LogitCache()
    features_only.features = cache.features  # the logit cache does not see hooks; the feature path must
    shifted = predict_cached(hooked, dataset, ctx.device, 16, cache=features_only, in_class_space=False)[0]
    assert torch.allclose(shifted, plain + 1)


def test_the_linear_probe_reads_the_backbones_features_and_fits_the_same_head(small, tmp_path):
    config = LinearProbeConfig(c_grid=[1.0], max_iter=50)
    base = small.ctx.for_run(tmp_path, 0, quiet)
    without = copy.deepcopy(small.model)
    probe_head(without, dataclasses.replace(base, logit_cache=None), config)
    ctx = dataclasses.replace(base, logit_cache=LogitCache())
    first = copy.deepcopy(small.model)
    probe_head(first, ctx, config)
    again = copy.deepcopy(small.model)
    calls = count_backbone_batches(again)
    probe_head(again, ctx, config)
    assert calls == [] and ctx.logit_cache.features.hits == 2  # train and id_val, computed by the first probe
    for model in (first, again):
        assert bits_equal(model.head.weight, without.head.weight) and bits_equal(model.head.bias, without.head.bias)


@pytest.mark.slow
def test_vrf_reads_both_models_features_and_gives_the_same_predictor_and_scores(small, tmp_path):
    """Slow (~40 s on 2 cores): a fine-tune and two VRF fits."""
    from robustft.posthoc import load_run_predictor

    run = finetune(small, tmp_path / "runs", steps=6)
    train = small.ctx.splits["train"]
    subset = TensorSplit(train.images[:256], train.labels[:256], small.model.data_config, "train")
    splits = {**small.ctx.splits, "train": subset}
    cls = get_method("vrf")

    def fitted(cache: LogitCache | None, folder: str):
        ctx = dataclasses.replace(small.ctx.for_run(tmp_path / folder, 0, quiet), splits=splits, logit_cache=cache)
        method = cls(cls.config_cls(finetuned_run=run))
        model = method.prepare(copy.deepcopy(small.model), ctx)
        return method.finalize(model, ctx), ctx

    plain, plain_ctx = fitted(None, "plain")
    plain_scores = evaluate_splits(plain, splits, plain_ctx.device, plain_ctx.eval_batch_size)
    cache = LogitCache()
    tuned = load_run_predictor(copy.deepcopy(small.model), run, None).predictor
    for scored in (small.model, tuned):  # what the zero-shot and fine-tune runs of a comparison leave in the cache
        evaluate_splits(scored, splits, small.ctx.device, small.ctx.eval_batch_size, cache=cache)
    misses = cache.features.misses
    cached, cached_ctx = fitted(cache, "cached")
    assert cache.features.misses == misses + 2  # only the train split, once per model
    state, expected = cached.state_dict(), plain.state_dict()
    assert state.keys() == expected.keys() and all(bits_equal(state[key], expected[key]) for key in state)
    assert json.dumps(cached_ctx.extras, sort_keys=True) == json.dumps(plain_ctx.extras, sort_keys=True)
    misses = cache.features.misses
    scores = evaluate_splits(cached, splits, cached_ctx.device, cached_ctx.eval_batch_size, cache=cache)
    assert cache.features.misses == misses  # the final evaluation runs no backbone
    assert scores == plain_scores
