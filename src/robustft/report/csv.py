"""leaderboard.csv: raw numbers (no rounding), one row per method, each statistic as ``_mean`` / ``_std``."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from robustft.report.tables import declared_columns, ood_splits, ordered_methods

_STATISTICS = ("id", "ood_avg", "effective_robustness", "train_seconds", "ece_id", "ece_ood_avg")
_VALUES = ("peak_memory_mb", "trainable_params", "inference_cost")


def leaderboard_csv(leaderboard: Mapping[str, Any]) -> str:
    """``method, kind``, every statistic's mean and std (ID, each OOD split, OOD average, effective
    robustness, train time, ECE), then the single values (peak memory, trainable parameters, inference cost)
    and the declared columns' mean and std. A missing value is an empty cell."""
    methods = leaderboard["methods"]
    splits = ood_splits(methods)
    statistics = [_STATISTICS[0], *splits, *_STATISTICS[1:]]
    declared = [column.key for column in declared_columns(methods)]
    header = ["method", "kind", *(f"{stat}_{part}" for stat in statistics for part in ("mean", "std")), *_VALUES]
    header += [f"{key}_{part}" for key in declared for part in ("mean", "std")]
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
        writer.writerow(cells)
    return buffer.getvalue()


def _mean_std(found: Any) -> list[Any]:
    if isinstance(found, Mapping):
        return [found.get("mean", ""), found.get("std", "")]
    return ["", ""] if found is None else [found, 0.0]
