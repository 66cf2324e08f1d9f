"""How sure a number is: 95% bootstrap confidence intervals of accuracy and paired significance tests.

A benchmark's test splits are finite: on a split of 400 images one image is 0.25 points, so two methods a point
apart may differ by chance. Every run keeps, per evaluated split, the predicted and the true label of each image
(``predictions.safetensors``, :func:`save_predictions`); from them:

- :func:`accuracy_intervals`: a percentile bootstrap interval (Efron & Tibshirani, *An Introduction to the
  Bootstrap*, 1993, ch. 13) of ID accuracy, each OOD split and the OOD average (each split resampled on its own
  images, the average taken per resample). With several seeds the resampling is hierarchical: each resample
  draws seeds with replacement, then images with replacement (the same images for every drawn seed, as they
  were scored on the same test set), so the interval holds both the test-set and the training randomness.
- :func:`paired_test`: the same resamples applied to two methods at once (the same images, the same seeds), so
  what the two share (which images are hard) cancels: method A is significantly above B when the 95% interval
  of A - B lies above 0 (one-sided level 2.5%).

``RESAMPLES`` = 1000 resamples from a fixed generator per split (``BOOTSTRAP_SEED`` and the split's name), so
the same predictions always give the same interval, and two methods scored on one split share their resamples.
All resamples are drawn and scored as whole arrays (a multinomial draw over the images' patterns of right and
wrong, :func:`resampled_accuracy`), in blocks of at most ``BLOCK_ELEMENTS`` counts to bound memory.
Accuracies are in percent, as everywhere in the results files.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from robustft.errors import DataError
from robustft.files import atomic_write

PREDICTIONS_FILE = "predictions.safetensors"
CONFIDENCE = 0.95
RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BLOCK_ELEMENTS = 1 << 22  # resample counts held at once (32 MiB of float64)
ID_SPLIT = "id_test"
_INT16_MAX = 32767

Correct = Mapping[str, Tensor]
"""Per split, a boolean ``[seeds, images]`` tensor: whether each seed's run got each image right."""


# ------------------------------------------------------------------------------------- predictions file


def save_predictions(path: Path, predictions: Mapping[str, tuple[Tensor, Tensor]]) -> Path:
    """Write ``{split: (predicted labels, true labels)}`` as safetensors (atomically).

    Keys are ``<split>/predicted`` and ``<split>/label``; labels are int16 when every class index fits (as
    int32 beyond 32767 classes), so a 10,000-image split takes 40 KB.
    """
    tensors: dict[str, Tensor] = {}
    for split, (predicted, labels) in predictions.items():
        largest = max((int(values.max()) for values in (predicted, labels) if values.numel()), default=0)
        dtype = torch.int16 if largest <= _INT16_MAX else torch.int32
        tensors[f"{split}/predicted"] = predicted.detach().to("cpu", dtype).contiguous()
        tensors[f"{split}/label"] = labels.detach().to("cpu", dtype).contiguous()
    data = save(tensors, metadata={"format": "robustft-predictions"})  # bytes: the file gets the umask's mode
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size_hint=len(data))


def load_predictions(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``{split: (predicted, label)}`` from a predictions file (safetensors: no code runs while reading).

    Raises:
        DataError: the file is unreadable, or a split lacks one of its two tensors or their lengths differ.
    """
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as error:
        raise DataError(f"cannot read predictions file {path}: {error}") from None
    splits = sorted({key.rsplit("/", 1)[0] for key in tensors})
    predictions = {}
    for split in splits:
        predicted, labels = tensors.get(f"{split}/predicted"), tensors.get(f"{split}/label")
        if predicted is None or labels is None or predicted.shape != labels.shape or predicted.dim() != 1:
            raise DataError(f"{path}: split {split!r} needs 1-D '{split}/predicted' and '{split}/label' of one length")
        predictions[split] = (predicted.long(), labels.long())
    return predictions


def correctness(predictions: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``{split: bool [images]}`` of one run."""
    return {split: predicted == labels for split, (predicted, labels) in predictions.items()}


def stack_seeds(runs: Sequence[Mapping[str, Tensor]], source: str = "runs") -> dict[str, Tensor]:
    """Per-run correctness stacked to ``{split: bool [seeds, images]}`` over the splits every run scored.

    Raises:
        DataError: two runs scored a split on different numbers of images (not the same test set).
    """
    shared = set.intersection(*(set(run) for run in runs)) if runs else set()
    stacked = {}
    for split in sorted(shared):
        sizes = {len(run[split]) for run in runs}
        if len(sizes) > 1:
            raise DataError(f"{source}: split {split!r} has different image counts across seeds {sorted(sizes)}")
        stacked[split] = torch.stack([run[split] for run in runs])
    return stacked


# ------------------------------------------------------------------------------------------ resampling


def _generator(split: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(BOOTSTRAP_SEED + zlib.crc32(f"{salt}:{split}".encode()))


def _resample_counts(size: int, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """``[resamples, size]`` float64 counts: how often each item is drawn, with replacement, in each resample."""
    draws = generator.integers(0, size, (resamples, size)) + np.arange(resamples)[:, None] * size
    return np.bincount(draws.ravel(), minlength=resamples * size).reshape(resamples, size).astype(np.float64)


def _seed_weights(seeds: int, resamples: int) -> np.ndarray:
    """``[resamples, seeds]`` weights summing to 1 per row: the seeds drawn with replacement (all 1/S for one)."""
    if seeds == 1:
        return np.ones((resamples, 1))
    return _resample_counts(seeds, resamples, _generator(str(seeds), "seeds")) / seeds


def resampled_accuracy(
    correct: Sequence[Tensor], split: str, seed_weights: np.ndarray, resamples: int = RESAMPLES
) -> list[np.ndarray]:
    """Each ``[seeds, images]`` correctness tensor's accuracy (%) in every resample of ``split``: ``[resamples]``.

    All tensors share the resamples (the same images, the same ``seed_weights``): that is what pairs them.
    Drawing the images with replacement is one multinomial draw over the images; images with the same pattern
    of right and wrong across every seed and tensor are interchangeable, so they are merged into one category
    first: a resample costs the number of patterns (at most 2^rows, at most the images), not the images.
    """
    rows = np.concatenate([table.detach().cpu().numpy().astype(bool) for table in correct])  # [rows, images]
    images = rows.shape[1]
    if images == 0:  # an empty split has no accuracy to resample
        return [np.full(resamples, np.nan) for _ in correct]
    patterns, counts = np.unique(rows.T, axis=0, return_counts=True)  # [patterns, rows], [patterns]
    generator = _generator(split, "images")
    block = max(1, BLOCK_ELEMENTS // len(counts))
    per_row = []
    for start in range(0, resamples, block):  # blocks of resamples, each drawn and scored as one array
        draws = generator.multinomial(images, counts / images, size=min(block, resamples - start))
        per_row.append(draws @ patterns.astype(np.float64) / images)
    accuracy = np.concatenate(per_row) * 100  # [resamples, rows]
    bounds = np.cumsum([0, *(table.shape[0] for table in correct)])
    return [(accuracy[:, lo:hi] * seed_weights).sum(1) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The central ``confidence`` percentile interval ``[lo, hi]`` of bootstrap samples."""
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [tail, 1 - tail])
    return [float(lo), float(hi)]


def _ood_splits(splits: Sequence[str]) -> list[str]:
    return sorted(split for split in splits if split.startswith("ood_"))


# --------------------------------------------------------------------------------------------- results


def accuracy_intervals(correct: Correct, resamples: int = RESAMPLES) -> dict[str, Any]:
    """``{"id": [lo, hi], "ood": {split: [lo, hi]}, "ood_avg": [lo, hi]}``: 95% intervals of accuracy (%).

    ``correct`` holds ``bool [seeds, images]`` per split (:func:`stack_seeds`; one run is one seed). The OOD
    average is the unweighted mean of the OOD splits' accuracies within each resample. A key is absent when
    its splits are.
    """
    seeds = next(iter(correct.values())).shape[0] if correct else 1
    weights = _seed_weights(seeds, resamples)
    reported = [split for split in correct if split == ID_SPLIT or split.startswith("ood_")]
    scored = [split for split in reported if correct[split].shape[1] > 0]
    samples = {split: resampled_accuracy([correct[split]], split, weights, resamples)[0] for split in scored}
    intervals: dict[str, Any] = {}
    if ID_SPLIT in samples:
        intervals["id"] = percentile_interval(samples[ID_SPLIT])
    ood = _ood_splits(list(samples))
    if ood:
        intervals["ood"] = {split: percentile_interval(samples[split]) for split in ood}
        intervals["ood_avg"] = percentile_interval(np.mean([samples[split] for split in ood], axis=0))
    return intervals


def paired_test(first: Correct, second: Correct, resamples: int = RESAMPLES) -> dict[str, dict[str, Any]]:
    """Whether ``first`` is above ``second`` on ID and on the OOD average, on the same images and seeds.

    Returns ``{"id": test, "ood_avg": test}`` (a key only when both scored its splits), each test being
    ``{"difference": mean accuracy of first minus second (points), "interval": its 95% bootstrap interval,
    "p_value": one-sided bootstrap p-value of "first is not above second", "above": interval above 0,
    "below": interval below 0}``. Seeds pair by position (seed k of both: a post-hoc run and the fine-tune it
    combines share that seed's training).

    Raises:
        DataError: the two hold different seed counts or scored a split on different image counts.
    """
    shared = sorted(set(first) & set(second))
    seeds = {first[split].shape[0] for split in shared} | {second[split].shape[0] for split in shared}
    if len(seeds) > 1:
        raise DataError(f"a paired test needs the same seeds for both methods, got seed counts {sorted(seeds)}")
    for split in shared:
        if first[split].shape != second[split].shape:
            raise DataError(
                f"a paired test needs the same images: split {split!r} has {first[split].shape[1]} "
                f"and {second[split].shape[1]} images"
            )
    weights = _seed_weights(seeds.pop() if seeds else 1, resamples)
    differences = {}
    for split in shared:
        a, b = resampled_accuracy([first[split], second[split]], split, weights, resamples)
        point = (first[split].double().mean() - second[split].double().mean()) * 100
        differences[split] = (a - b, float(point))
    tests: dict[str, dict[str, Any]] = {}
    if ID_SPLIT in differences:
        tests["id"] = _test(*differences[ID_SPLIT])
    ood = _ood_splits(shared)
    if ood:
        samples = np.mean([differences[split][0] for split in ood], axis=0)
        tests["ood_avg"] = _test(samples, sum(differences[split][1] for split in ood) / len(ood))
    return tests


def _test(samples: np.ndarray, difference: float) -> dict[str, Any]:
    interval = percentile_interval(samples)
    p_value = (1 + int((samples <= 0).sum())) / (len(samples) + 1)
    return {
        "difference": difference,
        "interval": interval,
        "p_value": p_value,
        "above": interval[0] > 0,
        "below": interval[1] < 0,
    }


def run_correctness(run_dirs: Sequence[str | Path]) -> dict[str, Tensor] | None:
    """``{split: bool [seeds, images]}`` from each run directory's predictions file; None when one has none
    (a run from before the file existed): its intervals and tests are then left out, not guessed."""
    files = [Path(run) / PREDICTIONS_FILE for run in run_dirs]
    if not files or not all(file.is_file() for file in files):
        return None
    return stack_seeds([correctness(load_predictions(file)) for file in files], ", ".join(map(str, run_dirs)))


# ----------------------------------------------------------------------------------------- leaderboard

BASELINES = ("finetune", "wise_ft")
"""What every leaderboard row is tested against: fine-tuning, and its robust post-hoc fix (WiSE-FT)."""


def leaderboard_statistics(
    runs: Mapping[str, Sequence[str | Path]], baselines: Sequence[str] = BASELINES, resamples: int = RESAMPLES
) -> dict[str, dict[str, Any]]:
    """Per method (``{name: its run directory per seed}``): ``ci`` (:func:`accuracy_intervals` over its seeds)
    and ``significance`` (``{baseline: paired_test(method, baseline)}`` for each baseline present, itself
    excluded). A method whose runs kept no predictions gets neither."""
    correct = {name: run_correctness(dirs) for name, dirs in runs.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, table in correct.items():
        if table is None:
            continue
        row: dict[str, Any] = {"ci": accuracy_intervals(table, resamples)}
        tests = {
            baseline: paired_test(table, correct[baseline], resamples)  # type: ignore[arg-type]
            for baseline in baselines
            if baseline != name and correct.get(baseline) is not None
        }
        if tests:
            row["significance"] = tests
        rows[name] = row
    return rows


def settings() -> dict[str, Any]:
    """The leaderboard's ``statistics`` record: how its intervals and tests were computed."""
    return {
        "confidence": CONFIDENCE,
        "resamples": RESAMPLES,
        "bootstrap_seed": BOOTSTRAP_SEED,
        "interval": "percentile bootstrap; several seeds: seeds, then images, drawn with replacement",
        "test": "paired bootstrap on the same images and seeds; above: the 95% interval of the difference > 0",
        "baselines": list(BASELINES),
    }
