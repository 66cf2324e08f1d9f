"""The one training loop. It owns optimiser, schedule, precision, clipping, accumulation, logging,
checkpoints and resume; it knows nothing about any method (methods fill hooks, see methods/base.py).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from robustft import distributed
from robustft.backbones.checkpoint_files import load_state_dict_strict
from robustft.checkpoint import load_training_state, remove_stale_temporaries, save_training_state
from robustft.config import OptimConfig, TrainConfig
from robustft.data import training_loader
from robustft.errors import CheckpointError, ConfigError, RobustftError
from robustft.files import atomic_write_text
from robustft.methods.base import Method, RunContext
from robustft.precision import autocast_context, autocast_dtype
from robustft.safe_io import read_jsonl
from robustft.tracking import flat_params, open_tracker


class NonFiniteLossError(RobustftError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class OutOfMemoryError(RobustftError):
    """The GPU ran out of memory; the message names a batch size and accumulation that keep the effective batch."""


class RankMismatchError(RobustftError):
    """Ranks computed gradients for different parameters, so averaging them would be meaningless."""


@dataclass
class FitSummary:
    steps: int
    train_seconds: float
    resumed_from: int | None
    stopped_early: bool
    previous_train_seconds: float = 0.0  # spent before the checkpoint this run resumed from


def resolve_device(name: str) -> torch.device:
    """``train.device``; ``auto`` picks a GPU when there is one, and under torchrun each rank its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} but no CUDA GPU is visible to torch; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {name!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {name!r} but MPS is not available on this machine; use auto or cpu")
    return distributed.device_for_rank(device)


def out_of_memory_advice(batch_size: int, accumulation: int, device: torch.device, processes: int = 1) -> str:
    """One line: where memory ran out, and the halved micro-batch with doubled accumulation that keeps
    the effective batch (``batch_size * grad_accumulation``) and so the training recipe."""
    per_process = batch_size // processes
    where = f"out of GPU memory on {device} at data.batch_size={batch_size}"
    where += f" ({per_process} per process)" if processes > 1 else ""
    half = batch_size // 2 // processes * processes
    if half < processes or per_process < 2:
        return f"{where}: already one sample per device; use train.precision=bf16, a smaller model or more GPUs"
    return (
        f"{where} with train.grad_accumulation={accumulation}; try data.batch_size={half} with "
        f"train.grad_accumulation={accumulation * 2} (same effective batch)"
    )


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Channels-last memory helps convolutions on a GPU (cuDNN's NHWC kernels); a ViT has one patch conv at
    most and the CPU gains nothing, so only a CUDA model with several convolutions is converted."""
    return device.type == "cuda" and sum(isinstance(module, nn.Conv2d) for module in model.modules()) > 1


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

    def __init__(
        self, train: TrainConfig, optim: OptimConfig, batch_size: int, sync_every_step: bool | None = None
    ) -> None:
        self.train = train
        self.optim = optim
        self.batch_size = batch_size
        self.sync_every_step = sync_every_step
        """Fetch the loss to the host after every step (None: only on the CPU, where that costs nothing; on a
        GPU the loss stays on the device and is checked every ``train.log_every`` steps and before a checkpoint)."""
        self.channels_last = False

    def total_steps(self, num_samples: int) -> int:
        if self.train.steps is not None:
            return self.train.steps
        per_epoch = math.ceil(math.ceil(num_samples / self.batch_size) / self.train.grad_accumulation)
        return per_epoch * self.train.epochs

    def autocast(self, device: torch.device):
        return autocast_context(device, autocast_dtype(self.train.precision, device))

    def syncs_every_step(self, device: torch.device) -> bool:
        if distributed.world_size() > 1:  # the ranks agree on the loss (and on stopping) every step
            return True
        return self.sync_every_step if self.sync_every_step is not None else device.type == "cpu"

    def fit(self, method: Method, model: nn.Module, ctx: RunContext, resume: bool = False) -> FitSummary:
        train_split: Dataset = ctx.splits["train"]
        groups = method.parameter_groups(model, self.optim.weight_decay)
        if not method.trains or not groups:
            return FitSummary(0, 0.0, None, False)
        distributed.check_batch_size(self.batch_size)
        distributed.broadcast_module(model)  # every rank starts from rank 0's weights, as DDP does
        sharded = self._shard(method, model, ctx.device)
        if sharded is not None:  # train the sharded copy; its weights go back into ``model`` at the end
            model = sharded.module
            groups = method.parameter_groups(model, self.optim.weight_decay)
            if sharded.is_sharded:
                ctx.log(
                    f"train.strategy=fsdp: {sharded.units} blocks and the root sharded over {distributed.world_size()}"
                )
        main = distributed.is_main_process()
        total = self.total_steps(len(train_split))
        self.channels_last = wants_channels_last(model, ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.train.compile:
            model.compile()  # in place: state-dict keys (checkpoints) stay those of the plain model
        session = self.start(method, model, iter(()), ctx.device, total, groups=groups, bind=False)
        if sharded is None:  # torch's DDP around the method's loss, or the hand-written all-reduce
            session.gradient_sync = distributed.GradientSync(method, model, ctx.device, self.train.strategy)
            if session.gradient_sync.mode != "none":
                ctx.log(f"gradients averaged over {distributed.world_size()} processes by {session.gradient_sync.mode}")
        session.sync = self.syncs_every_step(ctx.device)
        session.reduce_gradients = sharded is None or not sharded.is_sharded  # FSDP reduces its own gradients
        optimizer, scheduler = session.optimizer, session.scheduler
        state = _TrainState(len(train_split), self.batch_size, distributed.rank(), distributed.world_size())
        checkpoint_path = ctx.run_dir / "checkpoints" / "last.pt"
        resumed_from, previous_seconds = None, 0.0
        metrics_path = ctx.run_dir / "metrics.jsonl"
        if main:  # the run directory is locked: no writer of this run is alive, its temporaries are stale
            remove_stale_temporaries(checkpoint_path)
        if resume and checkpoint_path.is_file():
            checkpoint = load_training_state(checkpoint_path)
            resumed_from = state.restore(checkpoint, model, optimizer, scheduler, method, checkpoint_path, sharded)
            previous_seconds = float(checkpoint.get("train_seconds", 0.0))
            ctx.log(f"resumed from {checkpoint_path} at step {resumed_from}")
        if main:  # lines after the checkpoint's step (all, without one) are redone: killed before or while saving
            _truncate_jsonl(metrics_path, resumed_from or 0)
        method.bind_optimizer(optimizer)
        stop_at = min(total, self.train.stop_after) if self.train.stop_after else total
        tracker = open_tracker(self.train, ctx.run_dir, enabled=main, resumed_from=resumed_from)
        if resumed_from is None:
            tracker.log_params(self._tracked_params())
        session.batches = state.batches(train_split, ctx)
        progress = _progress(total, state.step, enabled=self.train.progress and main)
        saved_at = resumed_from
        pending_losses: list[torch.Tensor] = []  # unchecked losses of the steps since the last check (GPU)
        model.train()
        start = time.perf_counter()
        while state.step < stop_at:
            session.step_index = state.step
            try:
                logs = session.step()
                state.step += 1
                logging = state.step % self.train.log_every == 0 or state.step == stop_at
                if not session.sync:
                    pending_losses.append(logs["loss"])
                    if logging or state.step % self.train.checkpoint_every == 0:
                        _check_pending(pending_losses, state.step)
                        pending_losses.clear()
                        logs = dict(zip(logs, _as_floats(list(logs.values())), strict=True)) if logging else logs
            except NonFiniteLossError as error:
                progress.close()
                tracker.close()
                kept = _kept(checkpoint_path, saved_at)
                where = "" if " at step " in str(error) else f" at step {state.step + 1}"
                raise NonFiniteLossError(f"{error}{where}; {kept}") from None
            progress.update(1)
            if main and logging:
                logs |= {"step": state.step, "lr": scheduler.get_last_lr()[0], "epoch": state.epoch()}
                _append_jsonl(metrics_path, logs)
                tracker.log_metrics(state.step, logs)
                progress.set_postfix(loss=f"{logs['loss']:.4f}")
            if state.step % self.train.checkpoint_every == 0 or state.step == stop_at:
                if main or sharded is not None:  # gathering a sharded state takes every rank
                    snapshot = state.capture(model, optimizer, scheduler, method, sharded)
                if main:
                    snapshot["train_seconds"] = previous_seconds + time.perf_counter() - start
                    save_training_state(snapshot, checkpoint_path)
                saved_at = state.step
        progress.close()
        tracker.close()
        if sharded is not None:
            sharded.write_back()
        seconds = time.perf_counter() - start
        return FitSummary(state.step, seconds, resumed_from, state.step < total, previous_seconds)

    def start(
        self,
        method: Method,
        model: nn.Module,
        batches: Iterator[WeightedBatch],
        device: torch.device,
        total_steps: int,
        groups: list[dict[str, Any]] | None = None,
        bind: bool = True,
    ) -> TrainingSession:
        """A training session of ``method`` on ``model``: its optimiser, schedule over ``total_steps`` and batches.

        ``fit`` drives one and benchmarks time one (``session.step()`` is exactly one of ``fit``'s steps),
        so no benchmark copies the loop. ``bind`` hands the optimiser to the method (``fit`` does that
        after restoring a checkpoint instead).
        """
        groups = groups if groups is not None else method.parameter_groups(model, self.optim.weight_decay)
        warmup = int(self.optim.warmup_fraction * total_steps)
        optimizer = build_optimizer(groups, self.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, total_steps, warmup, self.optim.schedule)
        )
        if bind:
            method.bind_optimizer(optimizer)
        return TrainingSession(self, method, model, optimizer, scheduler, batches, device)

    def _shard(self, method: Method, model: nn.Module, device: torch.device) -> distributed.ShardedModel | None:
        """``train.strategy=fsdp``: an FSDP2-sharded copy over several processes (one process: the model itself,
        with the same name-keyed checkpoints, so a run resumes on any number of processes)."""
        distributed.check_strategy(self.train.strategy, method.name)
        if self.train.strategy != "fsdp":
            return None
        bf16 = self.train.precision == "bf16" or (self.train.precision == "auto" and device.type == "cuda")
        return distributed.ShardedModel(model, device, torch.bfloat16 if bf16 else None)

    def _tracked_params(self) -> dict[str, Any]:
        sections = {"train": self.train.model_dump(mode="json"), "optim": self.optim.model_dump(mode="json")}
        return flat_params(sections) | {"data.batch_size": self.batch_size}

    def _step(
        self, method, model, optimizer, batches, device, step: int, reduce: bool = True, gradient_sync=None, sync=True
    ) -> dict[str, Any]:
        """One optimiser step; a GPU out-of-memory error anywhere in it becomes one line of advice."""
        try:
            return self._optimizer_step(method, model, optimizer, batches, device, step, reduce, gradient_sync, sync)
        except torch.cuda.OutOfMemoryError:
            processes = distributed.world_size()
            advice = out_of_memory_advice(self.batch_size, self.train.grad_accumulation, device, processes)
            raise OutOfMemoryError(advice) from None

    def _optimizer_step(
        self, method, model, optimizer, batches, device, step: int, reduce=True, gradient_sync=None, sync=True
    ) -> dict[str, Any]:
        """With ``sync`` the returned loss and logs are floats and a non-finite loss raises here; without, they
        stay tensors on the device (no host sync in the step) and ``fit`` checks them every few steps."""
        accumulation = self.train.grad_accumulation
        total_loss, logs = 0.0, {}
        loss_of = (
            gradient_sync.loss if gradient_sync is not None else method.loss
        )  # DDP's forward, or the method's loss itself
        for index in range(accumulation):
            images, labels, weight = next(batches)
            if self.channels_last and images.ndim == 4:
                images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            else:
                images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with (
                gradient_sync.micro_batch(last=index == accumulation - 1)
                if gradient_sync is not None
                else nullcontext()
            ):
                with self.autocast(device):
                    loss, logs = loss_of(model, (images, labels), step)
                if weight != 1.0:  # this rank's share of an unevenly split global batch (distributed only)
                    loss = loss * weight
                (loss / accumulation).backward()
            total_loss += loss.detach().float() / accumulation
        params = [p for group in optimizer.param_groups for p in group["params"]]
        reduce = reduce and not (gradient_sync is not None and gradient_sync.reduces_in_backward)  # DDP did it
        if sync:
            loss_value, logs = _reduce_over_ranks(total_loss, logs, params, reduce)  # one sync per optimiser step
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value}")
        else:
            loss_value = total_loss if isinstance(total_loss, torch.Tensor) else torch.tensor(total_loss)
        method.after_backward(model, step)
        if self.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, **logs}


WeightedBatch = tuple[torch.Tensor, torch.Tensor, float]
"""Images, labels and this rank's share of the global batch (1.0 on one process)."""


@dataclass
class TrainingSession:
    """One method's optimiser, schedule and batch stream, stepped one optimiser step at a time."""

    engine: Engine
    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[WeightedBatch]
    device: torch.device
    step_index: int = 0
    reduce_gradients: bool = True
    """All-reduce the gradients over ranks after the backward (off when FSDP reduce-scatters them itself)."""
    gradient_sync: distributed.GradientSync | None = None
    """Across processes under ``train.strategy`` ddp / allreduce: DDP around the loss, or the all-reduce after it."""
    sync: bool = True
    """Return the step's logs as floats (a host sync); ``fit`` turns it off on a GPU (``Engine.syncs_every_step``)."""

    def step(self) -> dict[str, float]:
        """One whole optimiser step as ``Engine.fit`` runs it: ``loss`` over ``grad_accumulation`` batches
        under the run's precision, backward, ``after_backward``, clipping, the optimiser and schedule, then
        ``after_step``. Returns the step's logs (``loss`` and the method's own)."""
        engine, method, model = self.engine, self.method, self.model
        logs = engine._step(
            method,
            model,
            self.optimizer,
            self.batches,
            self.device,
            self.step_index,
            self.reduce_gradients,
            self.gradient_sync,
            self.sync,
        )
        self.scheduler.step()
        method.after_step(model, self.step_index)
        self.step_index += 1
        return logs


def repeat_batch(images: torch.Tensor, labels: torch.Tensor) -> Iterator[WeightedBatch]:
    """The same batch forever, as a session's batches (benchmarks time steps on one fixed batch)."""
    return itertools.repeat((images, labels, 1.0))


def _reduce_over_ranks(total_loss: Any, logs: dict[str, Any], params: list[torch.Tensor], gradients: bool = True):
    """The step's loss and logs as floats; across ranks, also average them and the gradients.

    One small all-reduce carries the loss, the logs and the number of gradient tensors (and its
    square): every rank sees the same global loss (FSDP has reduce-scattered the gradients already:
    ``gradients`` False), so a NaN stops all ranks together, and a rank
    whose method produced gradients for other parameters is caught instead of deadlocking the
    bucketed gradient all-reduce that follows (equal sums of k and k^2 hold only when all k agree).
    """
    values = _as_floats([total_loss, *logs.values()])
    if distributed.world_size() == 1:
        return values[0], dict(zip(logs, values[1:], strict=True))
    grads = [p.grad for p in params if p.grad is not None]
    processes, count = distributed.world_size(), len(grads)
    summary = torch.tensor([*values, count, count * count], dtype=torch.float64)
    distributed.all_reduce_sum_([summary])
    if summary[-2] != processes * count or summary[-1] != processes * count * count:
        raise RankMismatchError(
            f"rank {distributed.rank()} has gradients for {count} tensors, another rank for a different number; "
            "every rank must use the same parameters in each step (a data-dependent branch in the method's loss?)"
        )
    means = (summary[:-2] / processes).tolist()
    if math.isfinite(means[0]) and gradients:
        distributed.all_reduce_mean_(grads)
    return means[0], dict(zip(logs, means[1:], strict=True))


def _as_floats(values: list[Any]) -> list[float]:
    """Python floats of numbers and scalar tensors, the tensors fetched in one device-to-host copy.

    A method may log many tensors per step (mixture-of-adapters: a share per expert per block);
    ``float()`` on each would synchronise with the GPU once per value.
    """
    positions = [i for i, value in enumerate(values) if isinstance(value, torch.Tensor)]
    floats = [value if i in positions else float(value) for i, value in enumerate(values)]
    if positions:
        device = values[positions[0]].device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # float64 keeps float() exact; MPS has none
        fetched = torch.stack([values[i].detach().to(device, dtype).reshape(()) for i in positions]).tolist()
        for i, value in zip(positions, fetched, strict=True):
            floats[i] = value
    return floats


def _check_pending(losses: list[torch.Tensor], last_step: int) -> None:
    """The losses of the steps up to ``last_step``, fetched in one copy; the first non-finite one raises."""
    values = _as_floats(losses)
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {last_step - len(values) + offset + 1}")


def _kept(checkpoint: Path, step: int | None) -> str:
    if step is None:
        return "stopped before the first checkpoint (train.checkpoint_every); lower optim.lr or set train.grad_clip"
    return f"stopped; the last good checkpoint is {checkpoint} (step {step}): lower optim.lr, then --resume"


class _TrainState:
    """Step counter and data position; captures and restores everything a resume needs.

    The data position counts *global* micro-batches, so a run may resume with another number of
    processes as long as ``data.batch_size`` (the global batch) is unchanged.
    """

    def __init__(self, num_samples: int, batch_size: int, shard: int = 0, shards: int = 1) -> None:
        self.step = 0
        self.micro_batches = 0
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.batches_per_epoch = math.ceil(num_samples / batch_size)
        self.shard, self.shards = shard, shards

    def epoch(self) -> float:
        return self.micro_batches / self.batches_per_epoch

    def batches(self, dataset: Dataset, ctx: RunContext):
        """``(images, labels, weight)``: this rank's part of each global micro-batch and its loss weight."""
        size = self.batch_size
        while True:
            epoch, start = divmod(self.micro_batches, self.batches_per_epoch)
            pin = ctx.device.type == "cuda"
            workers, shard, shards = ctx.num_workers, self.shard, self.shards
            loader = training_loader(dataset, size, ctx.seed, epoch, start, workers, shard, shards, pin)
            for images, labels in loader:
                position = self.micro_batches % self.batches_per_epoch
                global_size = min(size, self.num_samples - position * size)
                weight = distributed.batch_weight(global_size, self.shard, self.shards) if self.shards > 1 else 1.0
                self.micro_batches += 1
                yield images, labels, weight

    def capture(self, model, optimizer, scheduler, method: Method, sharded=None) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "micro_batches": self.micro_batches,
            "model": sharded.model_state() if sharded else model.state_dict(),
            "optimizer": sharded.optimizer_state(optimizer) if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "method": method.state_dict(),
            "rng": rng,
        }

    def restore(
        self, state: dict[str, Any], model, optimizer, scheduler, method: Method, path: Path, sharded=None
    ) -> int:
        """Load a checkpoint into this run; a checkpoint of another model or method is a CheckpointError."""
        required = ("step", "micro_batches", "model", "optimizer", "scheduler", "rng")
        missing = [key for key in required if key not in state]
        if missing:
            raise CheckpointError(f"{path}: not a robustft training checkpoint (missing {', '.join(missing)})")
        try:
            if sharded is not None:  # a full checkpoint scattered into this world size's shards
                sharded.load(state["model"], state["optimizer"], optimizer)
            else:
                load_state_dict_strict(model, state["model"], path, f"this run's model (method {method.name})")
                optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(
                f"{path}: its optimiser state does not match this run's parameter groups ({error}); "
                "was it written with another method or config?"
            ) from None
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state.get("method", {}))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if "python" in rng:
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in rng:
            name, keys, *rest = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        if "cuda" in rng and torch.cuda.is_available():
            if distributed.world_size() > 1:  # rank 0's GPU stream is every rank's (same seed, same draws)
                torch.cuda.set_rng_state(rng["cuda"][0], torch.cuda.current_device())
            else:
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self.micro_batches = int(state["micro_batches"])
        return self.step


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from (they will be redone), and a
    torn last line (a kill mid-append); rewritten atomically, so a kill here loses nothing."""
    if not path.is_file():
        return
    records, torn = read_jsonl(path)
    kept = [record for record in records if record.get("step", 0) <= last_step]
    if torn or len(kept) < len(records):
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    disable = None if enabled else True  # None: tqdm turns itself off when stderr is not a terminal
    return tqdm(total=total, initial=initial, disable=disable, desc="train", leave=False, dynamic_ncols=True)
