"""Scores of a predictor over named splits: accuracy, macro-F1 and calibration per split, OOD average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustft.calibration import calibration_metrics, fit_temperature
from robustft.data import sequential_loader
from robustft.distributed import ShardView, gather_shards, world_size


@torch.no_grad()
def predict(
    predictor: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256, num_workers: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` (float32, CPU) and labels ``[N]`` of a whole split.

    Under torchrun each rank scores its contiguous shard and every rank receives the whole split's
    logits in order, so post-hoc choices made from them (a WiSE-FT alpha) agree on all ranks.
    """
    if world_size() > 1 and not isinstance(dataset, ShardView):
        logits, labels = predict(predictor, ShardView(dataset), device, batch_size, num_workers)
        return gather_shards(logits), gather_shards(labels)
    predictor.eval()
    logits, labels = [], []
    for images, batch_labels in sequential_loader(dataset, batch_size, num_workers):
        logits.append(predictor(images.to(device, non_blocking=True)).float())
        labels.append(batch_labels)
    if not labels:  # an empty shard (fewer samples than ranks)
        return torch.empty(0), torch.empty(0, dtype=torch.long)
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


def split_metrics(logits: Tensor, labels: Tensor, temperature: float | None = None) -> dict[str, float]:
    """Accuracy, macro-F1, calibration (``ece`` in percent, ``nll`` in nats) of one split.

    With a ``temperature`` (fitted on ``id_val``, see ``evaluate_splits``) the calibration of
    ``logits / temperature`` is added as ``ece_ts`` / ``nll_ts``; accuracy does not change with it.
    """
    metrics = {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits.argmax(1), labels, logits.shape[1]),
        "num_samples": int(len(labels)),
        **calibration_metrics(logits, labels),
    }
    if temperature is not None:
        scaled = calibration_metrics(logits / temperature, labels)
        metrics |= {"ece_ts": scaled["ece"], "nll_ts": scaled["nll"], "temperature": temperature}
    return metrics


def evaluate_splits(
    predictor: nn.Module,
    splits: dict[str, Dataset],
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    temperature_scaling: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics for every split except ``train``.

    With ``temperature_scaling`` and an ``id_val`` split, one temperature is fitted on ``id_val``'s
    logits and labels alone (``calibration.fit_temperature``) before any other split is scored, and
    every split also reports its calibration after dividing by it (``ece_ts``, ``nll_ts``). Test
    labels never reach the fit. Splits are predicted one at a time, so only one split's logits are held.
    """
    cached: dict[str, tuple[Tensor, Tensor]] = {}
    temperature = None
    if temperature_scaling and "id_val" in splits:
        cached["id_val"] = predict(predictor, splits["id_val"], device, batch_size, num_workers)
        temperature = fit_temperature(*cached["id_val"])
    metrics = {}
    for name, dataset in splits.items():
        if name == "train":
            continue
        output = cached.pop(name, None) or predict(predictor, dataset, device, batch_size, num_workers)
        metrics[name] = split_metrics(*output, temperature=temperature)
    return metrics


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
    for key in ("ece", "nll", "ece_ts", "nll_ts"):  # calibration per split (issue 11)
        values = {name: m[key] for name, m in metrics.items() if key in m}
        if values:
            entry[key] = values
    if "temperature" in metrics.get("id_val", {}):
        entry["temperature"] = metrics["id_val"]["temperature"]
    return entry
