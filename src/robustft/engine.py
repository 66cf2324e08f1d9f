"""The one training loop. It owns optimiser, schedule, precision, clipping, accumulation, logging,
checkpoints and resume; it knows nothing about any method (methods fill hooks, see methods/base.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from robustft.checkpoint import load_training_state, save_training_state
from robustft.config import OptimConfig, TrainConfig
from robustft.data import training_loader
from robustft.errors import RobustftError
from robustft.methods.base import Method, RunContext


class NonFiniteLossError(RobustftError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class FitSummary:
    steps: int
    train_seconds: float
    resumed_from: int | None
    stopped_early: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(groups: list[dict[str, Any]], config: OptimConfig) -> torch.optim.Optimizer:
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


class Engine:
    """Runs ``method`` on ``model`` over the train split; checkpoints to ``run_dir/checkpoints``."""

    def __init__(self, train: TrainConfig, optim: OptimConfig, batch_size: int) -> None:
        self.train = train
        self.optim = optim
        self.batch_size = batch_size

    def total_steps(self, num_samples: int) -> int:
        if self.train.steps is not None:
            return self.train.steps
        per_epoch = math.ceil(math.ceil(num_samples / self.batch_size) / self.train.grad_accumulation)
        return per_epoch * self.train.epochs

    def autocast(self, device: torch.device):
        precision = self.train.precision
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def fit(self, method: Method, model: nn.Module, ctx: RunContext, resume: bool = False) -> FitSummary:
        train_split: Dataset = ctx.splits["train"]
        groups = method.parameter_groups(model, self.optim.weight_decay)
        if not method.trains or not groups:
            return FitSummary(0, 0.0, None, False)
        total = self.total_steps(len(train_split))
        warmup = int(self.optim.warmup_fraction * total)
        optimizer = build_optimizer(groups, self.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, total, warmup, self.optim.schedule)
        )
        state = _TrainState(batches_per_epoch=math.ceil(len(train_split) / self.batch_size))
        checkpoint_path = ctx.run_dir / "checkpoints" / "last.pt"
        resumed_from = None
        if resume and checkpoint_path.is_file():
            resumed_from = state.restore(load_training_state(checkpoint_path), model, optimizer, scheduler, method)
            ctx.log(f"resumed from {checkpoint_path} at step {resumed_from}")
            _truncate_jsonl(ctx.run_dir / "metrics.jsonl", resumed_from)
        method.bind_optimizer(optimizer)
        stop_at = min(total, self.train.stop_after) if self.train.stop_after else total
        metrics_path = ctx.run_dir / "metrics.jsonl"
        batches = state.batches(train_split, self.batch_size, ctx)
        progress = _progress(total, state.step, enabled=self.train.progress)
        model.train()
        start = time.perf_counter()
        while state.step < stop_at:
            logs = self._step(method, model, optimizer, batches, ctx.device, state.step)
            scheduler.step()
            method.after_step(model, state.step)
            state.step += 1
            progress.update(1)
            if state.step % self.train.log_every == 0 or state.step == stop_at:
                logs |= {"step": state.step, "lr": scheduler.get_last_lr()[0], "epoch": state.epoch()}
                _append_jsonl(metrics_path, logs)
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if state.step % self.train.checkpoint_every == 0 or state.step == stop_at:
                save_training_state(state.capture(model, optimizer, scheduler, method), checkpoint_path)
        progress.close()
        return FitSummary(state.step, time.perf_counter() - start, resumed_from, state.step < total)

    def _step(self, method, model, optimizer, batches, device, step: int) -> dict[str, float]:
        accumulation = self.train.grad_accumulation
        total_loss, logs = 0.0, {}
        for _ in range(accumulation):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with self.autocast(device):
                loss, logs = method.loss(model, (images, labels), step)
            (loss / accumulation).backward()
            total_loss += loss.detach().float() / accumulation
        loss_value = float(total_loss)  # one sync per optimiser step, for logging and the NaN guard
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at this step; stopped, last good checkpoint kept (lower optim.lr?)"
            )
        method.after_backward(model, step)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, **{k: float(v) for k, v in logs.items()}}


class _TrainState:
    """Step counter and data position; captures and restores everything a resume needs."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.step = 0
        self.micro_batches = 0
        self.batches_per_epoch = batches_per_epoch

    def epoch(self) -> float:
        return self.micro_batches / self.batches_per_epoch

    def batches(self, dataset: Dataset, batch_size: int, ctx: RunContext):
        while True:
            epoch, start = divmod(self.micro_batches, self.batches_per_epoch)
            loader = training_loader(dataset, batch_size, ctx.seed, epoch, start, ctx.num_workers)
            for batch in loader:
                self.micro_batches += 1
                yield batch

    def capture(self, model, optimizer, scheduler, method: Method) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "micro_batches": self.micro_batches,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "method": method.state_dict(),
            "rng": rng,
        }

    def restore(self, state: dict[str, Any], model, optimizer, scheduler, method: Method) -> int:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.micro_batches = int(state["micro_batches"])
        return self.step


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    disable = None if enabled else True  # None: tqdm turns itself off when stderr is not a terminal
    return tqdm(total=total, initial=initial, disable=disable, desc="train", leave=False, dynamic_ncols=True)
