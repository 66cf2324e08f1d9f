"""GPU-ready defaults that must not change CPU results: deferred loss checks, loader workers, eval precision."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from posthoc_support import quiet, small_prepared
from robustft.config import DataConfig
from robustft.data import auto_num_workers
from robustft.data.tensor_split import TensorSplit
from robustft.demo import demo_config
from robustft.engine import Engine, NonFiniteLossError, autocast_dtype, wants_channels_last
from robustft.evaluate import predict
from robustft.methods import build_method


@pytest.fixture(scope="module")
def small(digits_prepared):
    """128 training images (two steps of 64 per epoch), 32 per evaluation split."""
    prepared = small_prepared(digits_prepared, size=32)
    train = prepared.ctx.splits["train"]
    splits = {**prepared.ctx.splits, "train": TensorSplit(train.images[:128], train.labels[:128], {}, "train")}
    return dataclasses.replace(prepared, ctx=dataclasses.replace(prepared.ctx, splits=splits))


def train(small, out, sync: bool, optim=None, **overrides):
    """The engine's own loop on a copy of the zero-shot model; returns (model, metrics.jsonl records)."""
    options = {"steps": 4, "log_every": 2, "checkpoint_every": 2, "progress": False, **overrides}
    config = demo_config("finetune", 0, out, optim=optim, **options)
    method = build_method(config)
    model = method.prepare(copy.deepcopy(small.model), small.ctx)
    ctx = small.ctx.for_run(out, 0, quiet)
    out.mkdir(parents=True)
    engine = Engine(config.train, config.optim, config.data.batch_size, sync_every_step=sync)
    engine.fit(method, model, ctx)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return model, records


def test_deferred_loss_checks_train_bit_identically(small, tmp_path):
    synced, synced_logs = train(small, tmp_path / "synced", sync=True)
    deferred, deferred_logs = train(small, tmp_path / "deferred", sync=False)
    assert [r["step"] for r in deferred_logs] == [2, 4]
    assert synced_logs == deferred_logs  # the same losses, learning rates and epochs, logged at the same steps
    for (name, a), b in zip(synced.state_dict().items(), deferred.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_deferred_loss_checks_still_stop_on_the_first_non_finite_step(small, tmp_path):
    overrides = {"grad_clip": None}
    errors = []
    for sync in (True, False):
        config_out = tmp_path / f"sync{sync}"
        with pytest.raises(NonFiniteLossError) as caught:
            train(small, config_out, sync=sync, optim={"lr": 1e30}, **overrides)
        errors.append(str(caught.value))
        last = config_out / "checkpoints" / "last.pt"
        if last.is_file():  # a checkpoint written is never one of non-finite weights
            state = torch.load(last, weights_only=True)["model"]
            assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    step = [error.split(" at step ")[1].split(";")[0] for error in errors]
    assert step[0] == step[1], errors  # the same step is named, checked every step or every few


def test_auto_workers_only_for_on_disk_splits(small):
    assert DataConfig().num_workers == "auto"
    assert auto_num_workers(small.ctx.splits, cpu_count=16) == 0  # in memory: workers would only copy tensors

    class OnDisk(torch.utils.data.Dataset):
        def __len__(self):
            return 1

    assert auto_num_workers({"train": OnDisk()}, cpu_count=16) == 8
    assert auto_num_workers({"train": OnDisk()}, cpu_count=2) == 1
    assert auto_num_workers({"train": OnDisk()}, cpu_count=1) == 0
    with pytest.raises(ValueError, match="auto or a count"):
        DataConfig(num_workers=-1)


def test_evaluation_runs_under_the_run_precision(small):
    assert autocast_dtype("auto", torch.device("cpu")) is None and small.ctx.autocast_dtype is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    dataset = small.ctx.splits["id_test"]
    fp32, _ = predict(small.model, dataset, small.ctx.device, 16)
    bf16, _ = predict(small.model, dataset, small.ctx.device, 16, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # bf16 matmuls really ran
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() > 0.9


def test_channels_last_only_for_convolutional_models_on_a_gpu(small):
    convolutional = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    assert wants_channels_last(convolutional, torch.device("cuda"))
    assert not wants_channels_last(convolutional, torch.device("cpu"))
    assert not wants_channels_last(small.model, torch.device("cuda"))  # a ViT: one patch convolution


@pytest.mark.slow
def test_compiled_training_matches_eager(small, tmp_path):
    eager, eager_logs = train(small, tmp_path / "eager", sync=True)
    compiled, compiled_logs = train(small, tmp_path / "compiled", sync=True, compile=True)
    assert compiled_logs[-1]["loss"] == pytest.approx(eager_logs[-1]["loss"], rel=1e-3)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the plain model's keys


def test_persistent_evaluation_loader_keeps_its_workers_and_batches(small):
    from robustft.data import sequential_loader

    dataset = small.ctx.splits["id_val"]
    plain = [(images.clone(), labels.clone()) for images, labels in sequential_loader(dataset, 16)]
    loader = sequential_loader(dataset, 16, num_workers=1, persistent=True)
    assert sequential_loader(dataset, 16, num_workers=1, persistent=True) is loader and loader.persistent_workers
    for _ in range(2):  # iterated twice through the same worker process
        batches = list(loader)
        assert len(batches) == len(plain)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, plain, strict=True))
    assert sequential_loader(dataset, 16, num_workers=0, persistent=True) is not loader  # no workers: a plain loader
