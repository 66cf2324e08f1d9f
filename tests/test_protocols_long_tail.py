"""ImageNet-LT: list files, and many / medium / few buckets that follow the training counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from robustft.class_spaces import class_space_of
from robustft.config import DataConfig
from robustft.data import load_splits
from robustft.data.protocols.imagenet_lt import long_tail_buckets
from robustft.errors import DataError
from robustft.evaluate import evaluate_splits, summarize

DATA_CONFIG = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
TRAIN_COUNTS = [7, 5, 3, 1]  # with many_above=4 and few_below=2: many {0, 1}, medium {2}, few {3}


def build_replica(root: Path) -> Path:
    lines = {"train": [], "test": []}
    for label, count in enumerate(TRAIN_COUNTS):
        wnid = f"n0000000{label}"
        for k in range(count):
            path = root / "train" / wnid / f"{wnid}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * label + 20, 0, 0)).save(path, "PNG")
            lines["train"].append(f"train/{wnid}/{path.name} {label}")
        for k in range(2):
            path = root / "val" / wnid / f"val_{label}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * label + 20, 0, 0)).save(path, "PNG")
            lines["test"].append(f"val/{wnid}/{path.name} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


class ClassZeroOrOne(nn.Module):
    """Predicts class 0 for the dark images (classes 0, 1) and class 3 for the bright ones: right for 0 and 3."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bright = images[:, 0].mean(dim=(1, 2)) > ((100 / 255) - 0.5) / 0.5
        return torch.nn.functional.one_hot(torch.where(bright, 3, 0), 4).float()


def config(root: Path, **options) -> DataConfig:
    options = {"val_list": None, "many_above": 4, "few_below": 2} | options
    return DataConfig(benchmark=None, protocol={"name": "imagenet_lt", "root": root, "options": options})


def test_buckets_follow_train_counts():
    labels = [label for label, count in enumerate(TRAIN_COUNTS) for _ in range(count)]
    assert long_tail_buckets(labels, 4, many_above=4, few_below=2) == {"many": [0, 1], "medium": [2], "few": [3]}
    standard = long_tail_buckets([0] * 101 + [1] * 100 + [2] * 20 + [3] * 19, 5)
    assert standard == {"many": [0], "medium": [1, 2], "few": [3, 4]}  # > 100, 20..100, < 20 (class 4: none)


def test_loader_and_per_bucket_accuracy(tmp_path):
    root = build_replica(tmp_path)
    splits, names = load_splits(config(root), DATA_CONFIG)
    assert names == ["n00000000", "n00000001", "n00000002", "n00000003"]
    assert (len(splits["train"]), len(splits["id_test"])) == (16, 8)
    assert class_space_of(splits["id_test"]).kind == "identity"
    metrics = evaluate_splits(ClassZeroOrOne(), splits, torch.device("cpu"), temperature_scaling=False)
    entry = summarize(metrics)
    # test images: 2 per class; correct for classes 0 and 3 only
    assert entry["buckets"]["id_test"] == {"many": 50.0, "medium": 0.0, "few": 100.0}
    assert entry["id"] == 50.0


def test_missing_listed_image_and_bad_line_are_named(tmp_path):
    root = build_replica(tmp_path)
    (root / "val" / "n00000002" / "val_2_1.JPEG").unlink()
    with pytest.raises(DataError, match=r"ImageNet_LT_test.txt: listed image '.*val_2_1.JPEG' not found"):
        load_splits(config(root), DATA_CONFIG)
    (root / "ImageNet_LT_test.txt").write_text("val/x.JPEG label\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_test.txt:1: expected '<image path> <label>'"):
        load_splits(config(root), DATA_CONFIG)
