"""Calibration under distribution shift: expected calibration error, NLL and temperature scaling.

Robust fine-tuning is usually judged by accuracy alone, but a model that is right 70% of the time
while claiming 95% confidence fails users under shift as surely as a wrong one. These pure functions
score how well a predictor's confidence matches its accuracy on each split (Guo et al., "On
Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599) and fit the one-parameter
temperature that repairs it on held-out ID data.

Every function takes *logits* ``[N, C]``; log-probabilities (what output ensembles return) are valid
logits, since ``softmax(log p) = p``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BINS = 15
# Temperatures searched: 0.01 .. 100 covers every model we have seen and keeps T finite
# when one split is separable (there NLL keeps falling as T -> 0).
TEMPERATURE_BOUNDS = (1e-2, 1e2)
_GOLDEN = (math.sqrt(5) - 1) / 2


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017, eq. 3), as a fraction in [0, 1].

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` where sample ``i`` falls into bin
    ``b`` when its top-class probability lies in ``(b / bins, (b + 1) / bins]`` and ``acc`` / ``conf``
    are the bin's mean correctness and mean confidence. Computed in one pass with ``index_add_``.

    Args:
        logits: ``[N, C]`` logits or log-probabilities.
        labels: ``[N]`` class indices.
        bins: number of equal-width bins on [0, 1]; 15 is the usual choice.
    """
    _check(logits, labels)
    if len(labels) == 0:
        return float("nan")
    probabilities = F.softmax(logits.detach().double(), dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels.to(predicted.device)).double()
    inner_edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=confidence.device)[1:-1]
    bin_index = torch.bucketize(confidence, inner_edges, right=False)
    gap = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, bin_index, confidence - correct)  # per bin: sum(conf) - sum(correct)
    return float(gap.abs().sum() / len(labels))


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the true class, in nats: a proper scoring rule, so unlike ECE
    it cannot be gamed by a predictor that outputs its average accuracy for every input."""
    _check(logits, labels)
    if len(labels) == 0:
        return float("nan")
    return float(F.cross_entropy(logits.detach().double(), labels.to(logits.device)))


def _nll_at(logits: Tensor, labels: Tensor, log_temperature: float) -> float:
    return float(F.cross_entropy(logits * math.exp(-log_temperature), labels))


def fit_temperature(
    logits: Tensor, labels: Tensor, iterations: int = 60, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature ``T`` minimising ``NLL(logits / T)`` on held-out data (Guo et al. 2017, sec. 4.2).

    The one temperature fit of robustft: evaluation's temperature scaling and VRF's calibration of its two
    models both call it (VRF with its own, narrower ``bounds``).

    Call it with ``id_val`` logits only: fitted on a test split it would report calibration the user
    could never reach. NLL is convex in ``1 / T`` (a log-sum-exp of lines minus a line), hence
    unimodal in ``log T``, so a golden-section search over ``log T`` in ``log bounds`` (0.01 .. 100) finds the
    optimum without gradients or step sizes; 60 iterations narrow the bracket to 1e-12.

    Dividing by ``T`` never changes the arg-max, so accuracy is untouched; only confidence moves.
    """
    _check(logits, labels)
    if len(labels) == 0:
        raise ValueError("fit_temperature: no samples to fit the temperature on")
    logits, labels = logits.detach().double(), labels.to(logits.device)
    low, high = math.log(bounds[0]), math.log(bounds[1])
    left, right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    left_nll, right_nll = _nll_at(logits, labels, left), _nll_at(logits, labels, right)
    for _ in range(iterations):
        if left_nll <= right_nll:
            high, right, right_nll = right, left, left_nll
            left = high - _GOLDEN * (high - low)
            left_nll = _nll_at(logits, labels, left)
        else:
            low, left, left_nll = left, right, right_nll
            right = low + _GOLDEN * (high - low)
            right_nll = _nll_at(logits, labels, right)
    return math.exp((low + high) / 2)


def calibration_metrics(logits: Tensor, labels: Tensor, bins: int = DEFAULT_BINS) -> dict[str, float]:
    """``ece`` (percent, like every accuracy in results.json) and ``nll`` (nats) of one split."""
    return {
        "ece": 100 * expected_calibration_error(logits, labels, bins),
        "nll": negative_log_likelihood(logits, labels),
    }
