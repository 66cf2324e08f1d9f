"""DomainNet sketch-to-rest on a synthetic replica (per-domain folders and split lists)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from robustft.config import DataConfig
from robustft.data import load_splits, resolve_class_names
from robustft.errors import DataError

DATA_CONFIG = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
CLASSES = ["aircraft_carrier", "bee", "zebra"]
DOMAINS = {"sketch": 4, "real": 3, "painting": 2, "clipart": 2, "quickdraw": 1}  # images per class


def build_replica(root: Path, lists: bool = True) -> Path:
    for domain, count in DOMAINS.items():
        entries = []
        for label, name in enumerate(CLASSES):
            for k in range(count):
                path = root / domain / name / f"{domain}_{label}_{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (label * 50, k * 20, 0)).save(path, "PNG")
                entries.append(f"{domain}/{name}/{path.name} {label}")
        if lists:  # the first image of each class is the test list, the rest the train list
            test = [e for e in entries if "_0.jpg" in e]
            (root / f"{domain}_test.txt").write_text("\n".join(test) + "\n")
            (root / f"{domain}_train.txt").write_text("\n".join(e for e in entries if e not in test) + "\n")
    return root


def config(root: Path, **options) -> DataConfig:
    return DataConfig(benchmark=None, protocol={"name": "domainnet", "root": root, "options": options})


def test_sketch_to_rest_with_split_lists(tmp_path):
    root = build_replica(tmp_path)
    splits, names = load_splits(config(root), DATA_CONFIG)
    assert names == ["aircraft carrier", "bee", "zebra"]  # prompt-ready names
    assert resolve_class_names(config(root)) == names
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 9, "id_test": 3, "ood_real": 3, "ood_painting": 3, "ood_clipart": 3}
    assert all("sketch" in path.parts for path in splits["train"].paths)
    assert not set(splits["train"].paths) & set(splits["id_test"].paths)
    assert splits["ood_real"].labels.tolist() == [0, 1, 2]


def test_without_lists_whole_folders_and_a_seeded_holdout(tmp_path):
    root = build_replica(tmp_path, lists=False)
    splits, _ = load_splits(config(root, test_domains=["quickdraw"], id_test_fraction=0.25), DATA_CONFIG)
    assert (len(splits["train"]), len(splits["id_test"]), len(splits["ood_quickdraw"])) == (9, 3, 3)
    again, _ = load_splits(config(root, test_domains=["quickdraw"], id_test_fraction=0.25), DATA_CONFIG)
    assert again["id_test"].paths == splits["id_test"].paths


def test_missing_test_domain_is_named(tmp_path):
    root = build_replica(tmp_path)
    with pytest.raises(DataError, match=r"^domainnet test domain 'infograph': expected folder '.*infograph'"):
        load_splits(config(root, test_domains=["infograph"]), DATA_CONFIG)
