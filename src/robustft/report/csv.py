"""leaderboard.csv: raw numbers (no rounding), one row per method, each statistic as ``_mean`` / ``_std``,
then the confidence intervals and significance marks."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from robustft.report.tables import declared_columns, ood_splits, ordered_methods

_STATISTICS = ("id", "ood_avg", "effective_robustness", "train_seconds", "ece_id", "ece_ood_avg")
_VALUES = ("peak_memory_mb", "trainable_params", "inference_cost")
_INTERVALS = ("id", "ood_avg")


def leaderboard_csv(leaderboard: Mapping[str, Any]) -> str:
    """``method, kind``, every statistic's mean and std (ID, each OOD split, OOD average, effective
    robustness, train time, ECE), then the single values (peak memory, trainable parameters, inference cost)
    and the declared columns' mean and std; then the 95% interval of ID and OOD average (``id_ci_lo`` ...) and,
    per baseline tested, whether the method is significantly above it (``id_above_finetune``: true / false).
    A missing value is an empty cell."""
    methods = leaderboard["methods"]
    splits = ood_splits(methods)
    statistics = [_STATISTICS[0], *splits, *_STATISTICS[1:]]
    declared = [column.key for column in declared_columns(methods)]
    header = ["method", "kind", *(f"{stat}_{part}" for stat in statistics for part in ("mean", "std")), *_VALUES]
    header += [f"{key}_{part}" for key in declared for part in ("mean", "std")]
    baselines = list(dict.fromkeys(b for entry in methods.values() for b in (entry.get("significance") or {})))
    header += [f"{stat}_ci_{bound}" for stat in _INTERVALS for bound in ("lo", "hi")]
    header += [f"{stat}_above_{baseline}" for baseline in baselines for stat in _INTERVALS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for name in ordered_methods(methods):
        entry = methods[name]
        cells: list[Any] = [name, entry.get("kind", "")]
        for stat in [*statistics, *declared]:
            if stat in declared and stat not in (entry.get("report_columns") or []):
                cells += ["", ""]
                continue
            found = (entry.get("ood") or {}).get(stat) if stat in splits else entry.get(stat)
            cells += _mean_std(found)
            if stat == statistics[-1]:
                cells += ["" if entry.get(key) is None else entry[key] for key in _VALUES]
        intervals = entry.get("ci") or {}
        cells += [bound for stat in _INTERVALS for bound in (intervals.get(stat) or ["", ""])]
        tests = entry.get("significance") or {}
        cells += [_above(tests.get(baseline), stat) for baseline in baselines for stat in _INTERVALS]
        writer.writerow(cells)
    return buffer.getvalue()


def _above(test: Mapping[str, Any] | None, stat: str) -> Any:
    """``true`` / ``false``: significantly above the baseline on ``stat``; empty when not tested."""
    result = (test or {}).get(stat)
    return "" if result is None else str(bool(result.get("above"))).lower()


def _mean_std(found: Any) -> list[Any]:
    if isinstance(found, Mapping):
        return [found.get("mean", ""), found.get("std", "")]
    return ["", ""] if found is None else [found, 0.0]
