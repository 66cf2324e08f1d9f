"""iWildCam (WILDS, Koh et al. 2021) from the ``wilds`` package's local layout, scored by macro-F1.

Layout: ``root`` is the ``iwildcam_v2.0`` folder the ``wilds`` package writes: ``metadata.csv`` (columns
``split``, ``y``, ``filename``, ...), the images under ``train/<filename>`` (WILDS reads every split
from there) and ``categories.csv`` (columns ``y`` and ``name``), whose names, when present, feed the
zero-shot head. Splits: WILDS' ``train``, ``id_val``, ``id_test`` as is, and its OOD ``test`` (and,
if asked, OOD ``val``) as ``ood_test`` / ``ood_val``.

WILDS ranks iWildCam methods by macro-F1 over the classes present in each split's labels
(``wilds.common.metrics.all_metrics.F1(average='macro')`` passes ``labels=unique(y_true)`` to
sklearn), because a few abundant species dominate accuracy. Every evaluation split declares it as
its ``primary_metric`` (``macro_f1_present``); results.json then carries a ``primary`` block with
its id / ood / ood_avg next to the accuracies.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from robustft.class_spaces import declare
from robustft.config import DataConfig, StrictModel
from robustft.data.protocols import make_split, register_protocol, require_dir, require_file
from robustft.errors import DataError

WILDS_SPLITS = {"train": "train", "id_val": "id_val", "id_test": "id_test"}
PRIMARY_METRIC = "macro_f1_present"


class IWildCamOptions(StrictModel):
    """Options of the ``iwildcam`` protocol."""

    ood_splits: list[Literal["test", "val"]] = Field(["test"], description="WILDS OOD splits -> ood_<name>")
    images: str = Field("train", description="image folder relative to root (WILDS: train/ for every split)")


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with require_file(path, "iwildcam metadata").open(newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read CSV ({error})") from None


def _metadata(root: Path) -> list[dict[str, str]]:
    path = root / "metadata.csv"
    rows = _read_csv(path)
    for column in ("split", "y", "filename"):
        if rows and column not in rows[0]:
            raise DataError(f"{path}: missing column '{column}'")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def iwildcam_class_names(root: Path, options: IWildCamOptions) -> list[str]:
    """Names from ``categories.csv`` (y -> name) when present, else ``category <y>``; C = max(y) + 1 as WILDS."""
    num_classes = max(int(row["y"]) for row in _metadata(root)) + 1
    names = [f"category {label}" for label in range(num_classes)]
    categories = root / "categories.csv"
    if categories.is_file():
        for row in _read_csv(categories):
            if "y" in row and row.get("name") and row["y"].strip().isdigit() and int(row["y"]) < num_classes:
                names[int(row["y"])] = row["name"].strip()
    return names


@register_protocol("iwildcam", IWildCamOptions, iwildcam_class_names)
def load_iwildcam(root: Path, options: IWildCamOptions, data_config: dict[str, Any], data: DataConfig):
    """iWildCam-WILDS: train / id_val / id_test and OOD test (ood_test); macro-F1 is every split's primary metric."""
    rows = _metadata(root)
    names = iwildcam_class_names(root, options)
    images = require_dir(root / options.images, "iwildcam images")
    by_split: dict[str, list] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append((images / row["filename"], int(row["y"]), None))
    wanted = dict(WILDS_SPLITS) | {wilds: f"ood_{wilds}" for wilds in options.ood_splits}
    splits = {}
    for wilds_name, name in wanted.items():
        if wilds_name not in by_split:
            raise DataError(f"{root / 'metadata.csv'}: no rows with split '{wilds_name}'")
        samples = by_split[wilds_name]
        missing = next((path for path, _, _ in samples if not path.is_file()), None)
        if missing is not None:
            raise DataError(f"{root / 'metadata.csv'}: image '{missing}' of split '{wilds_name}' not found")
        split = make_split(samples, data_config, name, images, train=name == "train", augment=data.augment)
        splits[name] = split if name == "train" else declare(split, primary_metric=PRIMARY_METRIC)
    return splits, names
