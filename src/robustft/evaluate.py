"""Scores of a predictor over named splits: accuracy, macro-F1 and calibration per split, OOD average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustft.calibration import calibration_metrics, fit_temperature
from robustft.class_spaces import bucket_accuracy, class_space_of, predicting_in
from robustft.data import sequential_loader
from robustft.distributed import ShardView, gather_shards, world_size
from robustft.errors import DataError
from robustft.feature_cache import apply_in_batches, feature_extractors, split_features
from robustft.logit_cache import LogitCache, predictor_fingerprint
from robustft.precision import autocast_context
from robustft.progress import advance_current


@torch.no_grad()
def predict(
    predictor: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    float_output: bool = True,
) -> tuple[Tensor, Tensor]:
    """Logits ``[N, C]`` (float32, CPU) and labels ``[N]`` of a whole split, under ``autocast_dtype`` if given.

    Under torchrun each rank scores its contiguous shard and every rank receives the whole split's
    logits in order, so post-hoc choices made from them (a WiSE-FT alpha) agree on all ranks. The
    logits stay on the device until the split is done: one device-to-host copy per split, not per batch.
    ``float_output`` False keeps the outputs' own dtype (features that a head will take, ``feature_cache``).
    """
    if world_size() > 1 and not isinstance(dataset, ShardView):
        shard = ShardView(dataset)
        logits, labels = predict(predictor, shard, device, batch_size, num_workers, autocast_dtype, float_output)
        return gather_shards(logits), gather_shards(labels)
    predictor.eval()
    logits, labels = [], []
    cuda = device.type == "cuda"
    loader = sequential_loader(dataset, batch_size, num_workers, pin_memory=cuda, persistent=cuda)
    with autocast_context(device, autocast_dtype):
        for images, batch_labels in loader:
            output = predictor(images.to(device, non_blocking=True))
            logits.append(output.float() if float_output else output)
            labels.append(batch_labels)
            advance_current()  # the open progress bar, if any (robustft.progress)
    if not labels:  # an empty shard (fewer samples than ranks)
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(labels)


def predict_cached(
    predictor: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    *,
    cache: LogitCache | None = None,
    autocast_dtype: torch.dtype | None = None,
    in_class_space: bool = True,
) -> tuple[Tensor, Tensor]:
    """``predict_in_class_space`` (or plain ``predict`` with ``in_class_space`` False), read from ``cache`` when
    the same predictor content has scored the same split before (``robustft.logit_cache``).

    A predictor that combines other models' logits (an output ensemble) declares ``logit_parts()`` and
    ``combine_logits(parts)``: its logits are combined from its parts' cached logits, as its forward would
    combine them batch by batch, so an ensemble of two scored models costs no forward at all. A predictor that
    declares ``feature_extractors()`` and ``logits_from_features(features)`` has its head applied to the
    extractors' cached features (``robustft.feature_cache``): a linear probe on the zero-shot backbone costs no
    backbone pass once the zero-shot model was scored.
    """

    def uncached() -> tuple[Tensor, Tensor]:
        if in_class_space:
            return predict_in_class_space(predictor, dataset, device, batch_size, num_workers, autocast_dtype)
        return predict(predictor, dataset, device, batch_size, num_workers, autocast_dtype)

    if cache is None:
        return uncached()
    space = class_space_of(dataset) if in_class_space else None
    parts = getattr(predictor, "logit_parts", None)
    if parts is not None and (space is None or getattr(predictor, "set_class_space", None) is None):
        outputs = [
            predict_cached(
                part,
                dataset,
                device,
                batch_size,
                num_workers,
                cache=cache,
                autocast_dtype=autocast_dtype,
                in_class_space=False,
            )
            for part in parts()
        ]
        logits = predictor.combine_logits([logits for logits, _ in outputs])
        labels = outputs[0][1]
        return (space.apply(logits) if space is not None else logits), labels
    key = cache.key(predictor_fingerprint(predictor), dataset, space, batch_size, autocast_dtype)

    def compute() -> tuple[Tensor, Tensor]:
        extractors = feature_extractors(predictor) if cache.features is not None else []
        if extractors:
            return predict_from_features(
                predictor, extractors, dataset, device, batch_size, num_workers, cache, autocast_dtype, in_class_space
            )
        return uncached()

    return cache.get_or_compute(key, dataset, compute)


def backbone_features(
    extractor: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    *,
    cache: LogitCache | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``extractor``'s outputs ``[N, D]`` (CPU, its own dtype) and labels of a whole split, read from ``cache``'s
    feature store when the same extractor content has seen the same split (``robustft.feature_cache``)."""

    def compute() -> tuple[Tensor, Tensor]:
        return predict(extractor, dataset, device, batch_size, num_workers, autocast_dtype, float_output=False)

    store = cache.features if cache is not None else None
    return split_features(extractor, dataset, store, compute, batch_size, autocast_dtype)


def predict_from_features(
    predictor: nn.Module,
    extractors: list[nn.Module],
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    cache: LogitCache | None,
    autocast_dtype: torch.dtype | None,
    in_class_space: bool = True,
) -> tuple[Tensor, Tensor]:
    """What ``predict_cached`` computes, from the (cached) features of the predictor's ``extractors`` and its
    ``logits_from_features``, applied batch by batch as a forward would be (``robustft.feature_cache``)."""
    outputs = [
        backbone_features(
            extractor, dataset, device, batch_size, num_workers, cache=cache, autocast_dtype=autocast_dtype
        )
        for extractor in extractors
    ]
    labels = outputs[0][1]
    features = [output for output, _ in outputs]
    predictor.eval()
    if not in_class_space:
        return apply_in_batches(predictor.logits_from_features, features, batch_size, device, autocast_dtype), labels
    space = class_space_of(dataset)
    with predicting_in(predictor, space) as mapped_by_predictor:
        logits = apply_in_batches(predictor.logits_from_features, features, batch_size, device, autocast_dtype)
    return (logits if mapped_by_predictor else space.apply(logits)), labels


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


def macro_f1_present(predictions: Tensor, labels: Tensor, num_classes: int) -> float:
    """Macro-F1 over the classes present in ``labels`` only: WILDS' iWildCam metric (sklearn's ``f1_score`` with
    ``labels=unique(y_true)``), where a wrongly predicted absent class costs precision but adds no zero term."""
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes).double()
    support, predicted = confusion.sum(1), confusion.sum(0)
    f1 = 2 * confusion.diag() / (support + predicted).clamp_min(1)
    return float(f1[support > 0].mean() * 100)


def _macro_f1_of_logits(logits: Tensor, labels: Tensor) -> float:
    return macro_f1(logits.argmax(1), labels, logits.shape[1])


def _present_f1_of_logits(logits: Tensor, labels: Tensor) -> float:
    return macro_f1_present(logits.argmax(1), labels, logits.shape[1])


@torch.no_grad()
def predict_in_class_space(
    predictor: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``predict``, then the logits mapped to the split's declared class space (robustft.class_spaces):
    ``[N, C_split]`` logits against the split's own labels. Use it wherever split logits meet labels."""
    space = class_space_of(dataset)
    with predicting_in(predictor, space) as mapped_by_predictor:
        logits, labels = predict(predictor, dataset, device, batch_size, num_workers, autocast_dtype)
    return (logits if mapped_by_predictor else space.apply(logits)), labels


def declared_metrics(dataset: Dataset, logits: Tensor, labels: Tensor) -> dict[str, Any]:
    """What a split declares beyond the defaults: its ``buckets`` (``bucket_<name>`` accuracies, ImageNet-LT)
    and its ``primary_metric`` (``primary`` holds its value, ``primary_metric`` its name; iWildCam)."""
    extra: dict[str, Any] = {}
    buckets = getattr(dataset, "buckets", None)
    if buckets:
        extra |= {f"bucket_{name}": value for name, value in bucket_accuracy(logits, labels, buckets).items()}
    primary = getattr(dataset, "primary_metric", None)
    if primary is not None:
        scores = {"accuracy": accuracy, "macro_f1": _macro_f1_of_logits, "macro_f1_present": _present_f1_of_logits}
        if primary not in scores:
            raise DataError(f"split declares primary_metric '{primary}' (known: {', '.join(scores)})")
        value = scores[primary](logits, labels)
        extra |= {primary: value, "primary_metric": primary, "primary": value}
    if getattr(dataset, "report_as", None) in ("base", "new"):  # CoOp base-to-new (data/protocols/coop.py)
        extra["report_as"] = dataset.report_as
    return extra


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
    predictions: dict[str, tuple[Tensor, Tensor]] | None = None,
    *,
    cache: LogitCache | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics for every split except ``train``.

    A ``predictions`` dict is filled with each split's ``(predicted labels, labels)``: what confidence
    intervals and paired tests resample (``robustft.statistics``).

    With ``temperature_scaling`` and an ``id_val`` split, one temperature is fitted on ``id_val``'s
    logits and labels alone (``calibration.fit_temperature``) before any other split is scored, and
    every split also reports its calibration after dividing by it (``ece_ts``, ``nll_ts``). Test
    labels never reach the fit. Splits are predicted one at a time, so only one split's logits are held
    (besides what ``cache`` keeps: with one, a split this predictor's content has scored is not scored again).
    """

    def scored(dataset: Dataset) -> tuple[Tensor, Tensor]:
        return predict_cached(
            predictor, dataset, device, batch_size, num_workers, cache=cache, autocast_dtype=autocast_dtype
        )

    cached: dict[str, tuple[Tensor, Tensor]] = {}
    temperature = None
    if temperature_scaling and "id_val" in splits:
        cached["id_val"] = scored(splits["id_val"])
        temperature = fit_temperature(*cached["id_val"])
    metrics = {}
    for name, dataset in splits.items():
        if name == "train":
            continue
        output = cached.pop(name, None) or scored(dataset)
        metrics[name] = split_metrics(*output, temperature=temperature) | declared_metrics(dataset, *output)
        if predictions is not None:
            predictions[name] = (output[0].argmax(1), output[1])
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
    for key in ("ece", "nll", "ece_ts", "nll_ts"):  # calibration per split
        values = {name: m[key] for name, m in metrics.items() if key in m}
        if values:
            entry[key] = values
    if "temperature" in metrics.get("id_val", {}):
        entry["temperature"] = metrics["id_val"]["temperature"]
    return entry | _declared_summary(metrics)


def _declared_summary(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-bucket accuracies, and a ``primary`` block (id / ood / ood_avg of each split's declared metric)."""
    entry: dict[str, Any] = {}
    buckets = {
        name: {key.removeprefix("bucket_"): value for key, value in m.items() if key.startswith("bucket_")}
        for name, m in metrics.items()
    }
    if any(buckets.values()):
        entry["buckets"] = {name: values for name, values in buckets.items() if values}
    if "primary" in metrics.get("id_test", {}):
        ood = {name: m["primary"] for name, m in metrics.items() if name.startswith("ood_") and "primary" in m}
        entry["primary"] = {
            "metric": metrics["id_test"]["primary_metric"],
            "id": metrics["id_test"]["primary"],
            "ood": ood,
            "ood_avg": sum(ood.values()) / len(ood) if ood else float("nan"),
        }
    roles = {m["report_as"]: m["accuracy"] for m in metrics.values() if "report_as" in m}
    if set(roles) == {"base", "new"}:
        base, new = roles["base"], roles["new"]
        entry["base_to_new"] = {"base": base, "new": new, "hm": 2 * base * new / (base + new) if base + new else 0.0}
    return entry
