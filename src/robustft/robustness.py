"""Effective robustness: how much OOD accuracy a method has beyond what its ID accuracy predicts.

Fine-tuning moves a model along an ID-OOD trade-off: ID accuracy rises, OOD accuracy rises less (or falls).
Following Taori et al. (2020), we fit that trade-off as a line in logit space and call the OOD accuracy above
it *effective robustness*. With the two baselines every robust fine-tuning method must beat, zero-shot (ZS)
and full fine-tuning (FT), the fit is simply the line through their (ID, OOD-average) points, so ZS and FT
have effective robustness 0 by construction and a positive value means a method beats the trade-off.

All accuracies are in percent (0-100), like results.json.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

# Accuracies of exactly 0 or 100 % have infinite logits; clip so that one perfect split stays plottable.
_CLIP_LOW, _CLIP_HIGH = 0.1, 99.9

Line = tuple[float, float]


def logit(p_percent: float | np.ndarray) -> float | np.ndarray:
    """Log-odds of an accuracy in percent; logit space is where ID-OOD accuracy trends are linear."""
    p = np.clip(np.asarray(p_percent, dtype=float), _CLIP_LOW, _CLIP_HIGH) / 100.0
    z = np.log(p / (1.0 - p))
    return float(z) if z.ndim == 0 else z


def inverse_logit(z: float | np.ndarray) -> float | np.ndarray:
    """Accuracy in percent for a log-odds value (the inverse of :func:`logit` inside the clip range)."""
    p = 100.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))
    return float(p) if p.ndim == 0 else p


def tradeoff_line(zero_shot: tuple[float, float], fine_tuned: tuple[float, float]) -> Line:
    """(slope, intercept) in logit space of the line through the ZS and FT (ID, OOD-average) points.

    This is the trade-off plain fine-tuning offers; robust methods try to land above it. When both
    baselines have the same ID accuracy the slope is undefined, so we use the horizontal line through the
    mean of their OOD logits rather than divide by zero.
    """
    x0, y0 = logit(zero_shot[0]), logit(zero_shot[1])
    x1, y1 = logit(fine_tuned[0]), logit(fine_tuned[1])
    if math.isclose(x0, x1, rel_tol=0.0, abs_tol=1e-12):
        return 0.0, (y0 + y1) / 2.0
    slope = (y1 - y0) / (x1 - x0)
    return slope, y0 - slope * x0


def effective_robustness(id_acc: float, ood_acc: float, line: Line) -> float:
    """OOD accuracy above the trade-off line at this ID accuracy, in percentage points."""
    slope, intercept = line
    return float(ood_acc - inverse_logit(slope * logit(id_acc) + intercept))


def ood_average(entry: dict[str, Any]) -> float:
    """A method's OOD average: the stored ``ood_avg``, else the unweighted mean over its OOD splits."""
    if entry.get("ood_avg") is not None:
        return float(entry["ood_avg"])
    values = list((entry.get("ood") or {}).values())
    return float(np.mean(values)) if values else math.nan


def add_effective_robustness(results: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``results`` with ``effective_robustness`` set on every method.

    Needs both the "zeroshot" and "finetune" baselines to define the line; without them there is nothing
    to measure against, so the results come back unchanged (and, as always, the input is not mutated).
    """
    methods = results.get("methods", {})
    if "zeroshot" not in methods or "finetune" not in methods:
        return results
    line = tradeoff_line(_point(methods["zeroshot"]), _point(methods["finetune"]))
    out = copy.deepcopy(results)
    for entry in out["methods"].values():
        entry["effective_robustness"] = effective_robustness(float(entry["id"]), ood_average(entry), line)
    return out


def _point(entry: dict[str, Any]) -> tuple[float, float]:
    return float(entry["id"]), ood_average(entry)
