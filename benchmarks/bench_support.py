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
