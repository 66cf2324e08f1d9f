"""iWildCam in the wilds package layout; macro-F1 against scikit-learn's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn

from robustft.config import DataConfig
from robustft.data import load_splits, resolve_class_names
from robustft.errors import DataError
from robustft.evaluate import evaluate_splits, macro_f1, macro_f1_present, summarize

DATA_CONFIG = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
ROWS = [  # split, y (classes 0..3; class 2 never appears in the OOD test labels)
    ("train", 0), ("train", 1), ("train", 2), ("train", 3), ("id_val", 0), ("id_val", 1),
    ("id_test", 1), ("id_test", 3), ("test", 0), ("test", 0), ("test", 1), ("test", 3), ("val", 3),
]  # fmt: skip


def build_replica(root: Path, categories: bool = True) -> Path:
    (root / "train").mkdir(parents=True)
    lines = ["split,location_remapped,y,filename"]
    for i, (split, y) in enumerate(ROWS):
        Image.new("RGB", (8, 8), (60 * y, 0, 0)).save(root / "train" / f"{i:04d}.jpg", "PNG")
        lines.append(f"{split},7,{y},{i:04d}.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    if categories:
        (root / "categories.csv").write_text("y,category_id,name\n0,0,empty\n1,3,tayassu pecari\n3,8,dasyprocta\n")
    return root


def config(root: Path, **options) -> DataConfig:
    return DataConfig(benchmark=None, protocol={"name": "iwildcam", "root": root, "options": options})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_scikit_learn(seed):
    generator = np.random.default_rng(seed)
    labels, predictions = generator.integers(0, 6, 200), generator.integers(0, 7, 200)
    labels[labels == 4] = 5  # class 4 only predicted, never true: the two conventions differ
    ours = macro_f1(torch.as_tensor(predictions), torch.as_tensor(labels), 7)
    assert ours == pytest.approx(100 * f1_score(labels, predictions, average="macro"))
    wilds = macro_f1_present(torch.as_tensor(predictions), torch.as_tensor(labels), 7)
    assert wilds == pytest.approx(100 * f1_score(labels, predictions, average="macro", labels=np.unique(labels)))
    assert wilds != pytest.approx(ours)


class Constant(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(len(images), 4)  # always class 1


def test_loader_names_and_primary_metric(tmp_path):
    root = build_replica(tmp_path)
    splits, names = load_splits(config(root), DATA_CONFIG)
    assert names == ["empty", "tayassu pecari", "category 2", "dasyprocta"]  # class 2 has no categories.csv row
    assert resolve_class_names(config(root)) == names
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 4, "id_val": 2, "id_test": 2, "ood_test": 4}
    entry = summarize(evaluate_splits(Constant(), splits, torch.device("cpu"), temperature_scaling=False))
    # OOD test labels 0, 0, 1, 3 all predicted 1: F1 of class 1 is 2/5, classes 0 and 3 score 0 -> (2/5) / 3
    assert entry["primary"]["metric"] == "macro_f1_present"
    assert entry["primary"]["ood"]["ood_test"] == pytest.approx(100 * 0.4 / 3)
    assert entry["ood"]["ood_test"] == 25.0  # accuracy stays reported


def test_missing_image_or_split_is_named(tmp_path):
    root = build_replica(tmp_path, categories=False)
    assert resolve_class_names(config(root)) == [f"category {i}" for i in range(4)]
    (root / "train" / "0011.jpg").unlink()
    with pytest.raises(DataError, match=r"metadata.csv: image '.*0011.jpg' of split 'test' not found"):
        load_splits(config(root), DATA_CONFIG)
    with pytest.raises(DataError, match=r"metadata.csv: no rows with split 'id_test'"):
        (root / "metadata.csv").write_text("split,y,filename\ntrain,0,0000.jpg\nid_val,0,0000.jpg\n")
        load_splits(config(root, ood_splits=["val"]), DATA_CONFIG)
