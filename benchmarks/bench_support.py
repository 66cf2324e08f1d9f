"""Pieces the benchmark scripts share (imported as ``bench_support``: scripts run from ``benchmarks/``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

TINY_MODEL_NAMES = ("digits", "digits_vit")


def build_model(name: str, num_classes: int = 10) -> tuple[torch.nn.Module, int]:
    """A random-init classifier and its input size: the built-in tiny ViT (``digits`` / ``digits_vit``) or any
    timm model by name (``pretrained=False``: nothing is downloaded)."""
    import timm

    from robustft.backbones.builtin import DIGITS_VIT_ARGS
    from robustft.backbones.classifier import ImageClassifier

    if name in TINY_MODEL_NAMES:
        from timm.models.vision_transformer import VisionTransformer

        backbone, size = VisionTransformer(num_classes=0, **DIGITS_VIT_ARGS), 32
    else:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        size = backbone.default_cfg["input_size"][-1]
    return ImageClassifier(backbone, torch.nn.Linear(backbone.num_features, num_classes)), size


def read_status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and population std over seeds."""
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values)}


def above_curve(point: dict[str, Any], curve: list[dict[str, Any]] | None) -> float | None:
    """OOD of ``point`` minus a mixing curve's OOD at the same ID (linear between curve points ordered by ID).

    Positive: a better trade-off than any mixing coefficient of that ensemble (WiSE-FT, OSE). None when
    there is no curve or the point's ID lies outside the curve's ID range.
    """
    if not curve:
        return None
    ordered = sorted(curve, key=lambda p: p["id"])
    for low, high in zip(ordered, ordered[1:], strict=False):
        if low["id"] <= point["id"] <= high["id"]:
            t = 0.0 if high["id"] == low["id"] else (point["id"] - low["id"]) / (high["id"] - low["id"])
            return point["ood_avg"] - (low["ood_avg"] + t * (high["ood_avg"] - low["ood_avg"]))
    return None


def engine_session(
    method: Any,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    precision: str = "auto",
    lr: float = 1e-4,
    total_steps: int = 1000,
):
    """The engine's own training session on one fixed batch: AdamW (weight decay 0.1), a constant rate,
    clipping at 1.0, ``precision`` as ``train.precision`` (auto: bf16 on GPU). ``session.step()`` is one
    step of ``robustft fit``, so a benchmark times the engine's step instead of a copy of it."""
    from robustft.config import OptimConfig, TrainConfig
    from robustft.engine import Engine, repeat_batch

    train = TrainConfig(steps=total_steps, grad_clip=1.0, precision=precision, progress=False)
    optim = OptimConfig(lr=lr, weight_decay=0.1, schedule="constant", warmup_fraction=0.0)
    engine = Engine(train, optim, len(labels))
    model.train()
    return engine.start(method, model, repeat_batch(images, labels), device, total_steps)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ timing on a shared machine


def machine_load() -> dict[str, Any]:
    """The load the machine carried when a measurement was taken: load averages and the CPU count.

    On a shared machine other jobs slow every method alike only if the methods are timed at the same
    moment, so every benchmark records this beside its numbers (and times its methods interleaved)."""
    import os

    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cpu_count": os.cpu_count()}


def interleaved_times(
    runs: dict[str, Any], warmup: int, repeats: int, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Seconds of each call of every ``runs[name]()``, the calls alternating name by name in one process.

    Round ``r`` calls every run once, starting from a different one each round (so no run always follows
    the same neighbour); ``warmup`` rounds are untimed. A change of machine load during the measurement
    then slows all runs alike, and the ratios of the per-round times stay honest. On a GPU each call is
    bracketed by synchronisations (a wall-clock time needs them)."""
    import time

    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if device is not None:
                synchronize(device)
            start = time.perf_counter()
            runs[name]()
            if device is not None:
                synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def interleaved_with_load(
    runs: dict[str, Any], warmup: int, repeats: int, device: torch.device | None = None
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``interleaved_times`` of ``runs`` and the machine's load just before and just after them
    (``{"load_before": machine_load(), "load_after": machine_load()}``), which every timing JSON records."""
    load_before = machine_load()
    times = interleaved_times(runs, warmup, repeats, device)
    return times, {"load_before": load_before, "load_after": machine_load()}


def time_summary(seconds: list[float]) -> dict[str, float]:
    """Median, minimum and mean of a run's timed calls (the minimum: the least disturbed call)."""
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "mean": statistics.mean(seconds),
        "samples": len(seconds),
    }


def ratio_summary(seconds: list[float], reference: list[float]) -> dict[str, float]:
    """``reference`` time over ``seconds`` (above 1: faster than the reference), per round then the median,
    and the ratios of the minima and of the means; the calls of one round ran back to back, so they saw the same
    load."""
    per_round = [ref / value for ref, value in zip(reference, seconds, strict=True)]
    return {
        "median": statistics.median(per_round),
        "of_min": min(reference) / min(seconds),
        "of_mean": statistics.mean(reference) / statistics.mean(seconds),
    }
