"""Scores of a predictor over named splits: accuracy and macro-F1 per split, OOD average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustft.data import sequential_loader


@torch.no_grad()
def predict(
    predictor: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256, num_workers: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` (float32, CPU) and labels ``[N]`` of a whole split."""
    predictor.eval()
    logits, labels = [], []
    for images, batch_labels in sequential_loader(dataset, batch_size, num_workers):
        logits.append(predictor(images.to(device, non_blocking=True)).float())
        labels.append(batch_labels)
    return torch.cat(logits).cpu(), torch.cat(labels)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean() * 100)


def macro_f1(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions (as sklearn)."""
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes).double()
    true_positive = confusion.diag()
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * true_positive / (support + predicted).clamp_min(1)
    return float(f1[present].mean() * 100)


def split_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    return {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits.argmax(1), labels, logits.shape[1]),
        "num_samples": int(len(labels)),
    }


def evaluate_splits(
    predictor: nn.Module,
    splits: dict[str, Dataset],
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, dict[str, float]]:
    """Metrics for every split except ``train``."""
    return {
        name: split_metrics(*predict(predictor, dataset, device, batch_size, num_workers))
        for name, dataset in splits.items()
        if name != "train"
    }


def summarize(metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The results.json entry of one method: ``id`` (id_test), ``ood`` per split, ``ood_avg`` (unweighted)."""
    ood = {name: m["accuracy"] for name, m in metrics.items() if name.startswith("ood_")}
    entry: dict[str, Any] = {
        "id": metrics["id_test"]["accuracy"],
        "ood": ood,
        "ood_avg": sum(ood.values()) / len(ood) if ood else float("nan"),
        "macro_f1": {name: m["macro_f1"] for name, m in metrics.items()},
    }
    if "id_val" in metrics:
        entry["id_val"] = metrics["id_val"]["accuracy"]
    return entry
