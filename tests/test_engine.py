"""The engine: resume is exact, schedule shape, NaN guard, atomic checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.engine import NonFiniteLossError, warmup_cosine
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def short_config(out, name, method="finetune", **train):
    config = demo_config(method, 0, out, steps=6, checkpoint_every=2, log_every=1, progress=False, **train)
    return config.model_copy(update={"name": name})


@pytest.mark.parametrize("method", ["finetune", "mixout"])  # mixout draws masks from the global RNG
def test_resume_after_stop_matches_uninterrupted_run(tmp_path, digits_prepared, method):
    fit(short_config(tmp_path, "full", method), log=quiet, prepared=digits_prepared)
    stopped = short_config(tmp_path, "resumed", method, stop_after=3)
    assert fit(stopped, log=quiet, prepared=digits_prepared) == {}
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "resumed" / FINAL_CHECKPOINT).exists()
    fit(short_config(tmp_path, "resumed", method), resume=True, log=quiet, prepared=digits_prepared)
    full = load_state_dict_file(tmp_path / "full" / FINAL_CHECKPOINT)
    resumed = load_state_dict_file(tmp_path / "resumed" / FINAL_CHECKPOINT)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, digits_prepared):
    """Two accumulated batches of 32 give the same update as one batch of 64 (same samples, mean loss)."""
    big = short_config(tmp_path, "big").model_copy(deep=True)
    big.train.steps, big.train.grad_clip = 1, None
    big.optim.name, big.optim.momentum, big.optim.lr = "sgd", 0.0, 0.1  # SGD: a wrong scale would show
    small = big.model_copy(deep=True, update={"name": "small"})
    small.data.batch_size, small.train.grad_accumulation = 32, 2
    for config in (big, small):
        fit(config, log=quiet, prepared=digits_prepared)
    a = load_state_dict_file(tmp_path / "big" / FINAL_CHECKPOINT)
    b = load_state_dict_file(tmp_path / "small" / FINAL_CHECKPOINT)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    base = digits_prepared.model.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the step did change the weights


def test_warmup_then_cosine():
    values = [warmup_cosine(step, total=10, warmup=2, schedule="cosine") for step in range(10)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))
    assert warmup_cosine(9, total=10, warmup=2, schedule="constant") == 1.0


def test_nan_loss_stops_with_clear_error(tmp_path, digits_prepared):
    config = short_config(tmp_path, "nan").model_copy()
    config.optim.lr = 1e30
    config.train.grad_clip = None
    with pytest.raises(NonFiniteLossError, match="loss is"):
        fit(config, log=quiet, prepared=digits_prepared)
