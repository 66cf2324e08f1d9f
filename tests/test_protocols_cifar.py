"""CIFAR-10 / -100, CIFAR-10.1 and the -C .npy layout on synthetic replicas of the published files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from robustft.config import DataConfig
from robustft.data import load_splits, resolve_class_names
from robustft.errors import DataError

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
RNG = np.random.default_rng(0)


def batch(path: Path, count: int, num_classes: int, label_key: str) -> np.ndarray:
    data = RNG.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = [int(i % num_classes) for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"data": data, label_key: labels, "batch_label": "x"}, protocol=2))
    return data


def build_cifar10(root: Path) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    arrays = {f"data_batch_{i}": batch(folder / f"data_batch_{i}", 4, 10, "labels") for i in range(1, 6)}
    arrays["test_batch"] = batch(folder / "test_batch", 6, 10, "labels")
    cifar10_1 = root / "CIFAR-10.1"
    cifar10_1.mkdir()
    np.save(cifar10_1 / "cifar10.1_v6_data.npy", RNG.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8))
    np.save(cifar10_1 / "cifar10.1_v6_labels.npy", np.arange(7) % 10)
    build_c(root / "CIFAR-10-C", ["gaussian_noise", "fog"], per_severity=3, num_classes=10)
    return arrays


def build_c(folder: Path, corruptions: list[str], per_severity: int, num_classes: int) -> None:
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(per_severity) % num_classes, 5)
    np.save(folder / "labels.npy", labels)
    for corruption in corruptions:
        images = np.zeros((5 * per_severity, 32, 32, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = np.repeat(np.arange(1, 6) * 40, per_severity)  # pixel (0, 0) red = 40 * severity
        np.save(folder / f"{corruption}.npy", images)


def config(name: str, root: Path, **options) -> DataConfig:
    return DataConfig(benchmark=None, protocol={"name": name, "root": root, "options": options})


def test_cifar10_with_10_1_and_c(tmp_path):
    arrays = build_cifar10(tmp_path)
    splits, names = load_splits(config("cifar10", tmp_path, corruptions=["gaussian_noise", "fog"]), DATA_CONFIG)
    assert names[:2] == ["airplane", "automobile"] and len(names) == 10
    assert resolve_class_names(config("cifar10", tmp_path)) == names
    assert (len(splits["train"]), len(splits["id_test"]), len(splits["ood_cifar10_1"])) == (20, 6, 7)
    c_splits = sorted(name for name in splits if name.startswith("ood_c_"))
    assert len(c_splits) == 10 and all(len(splits[name]) == 3 for name in c_splits)
    # train images are the batches in order, channel-major as CIFAR stores them
    expected = torch.from_numpy(arrays["data_batch_2"][1].reshape(3, 32, 32)).float() / 255 * 2 - 1
    assert torch.allclose(splits["train"][5][0], expected, atol=1e-6)
    # severity s is the s-th block of 10000 (here 3) rows: its marker pixel is 40 * s
    for severity in (1, 4):
        images, labels = splits[f"ood_c_fog_{severity}"][[0, 1, 2]]
        assert torch.allclose(images[:, 0, 0, 0], torch.full((3,), 40 * severity / 255 * 2 - 1))
        assert labels.tolist() == [0, 1, 2]


def test_cifar100_c_and_unknown_corruption(tmp_path):
    folder = tmp_path / "cifar-100-python"
    batch(folder / "train", 10, 100, "fine_labels")
    batch(folder / "test", 5, 100, "fine_labels")
    build_c(tmp_path / "CIFAR-100-C", ["contrast"], per_severity=2, num_classes=100)
    splits, names = load_splits(config("cifar100", tmp_path, corruptions=["contrast"], severities=[5]), DATA_CONFIG)
    assert len(names) == 100 and names[1] == "aquarium fish"
    assert set(splits) == {"train", "id_test", "ood_c_contrast_5"} and len(splits["ood_c_contrast_5"]) == 2
    with pytest.raises(DataError, match=r"npy file: expected file '.*CIFAR-100-C/frost.npy' does not exist"):
        load_splits(config("cifar100", tmp_path, corruptions=["frost"]), DATA_CONFIG)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batch(folder / "data_batch_1", 2, 10, "labels")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2: not a CIFAR python batch \(refusing to load posix.system\)"):
        load_splits(config("cifar10", tmp_path, shifts=[]), DATA_CONFIG)


def test_data_check_counts_and_hashes_memory_mapped_splits(tmp_path):
    from robustft.data.integrity import check_data

    build_cifar10(tmp_path)
    report = check_data(config("cifar10", tmp_path, corruptions=["fog"], severities=[2]))
    found = {split.name: (split.images, split.classes) for split in report.splits}
    assert found == {"train": (20, 4), "id_test": (6, 6), "ood_cifar10_1": (7, 7), "ood_c_fog_2": (3, 3)}
    assert len({split.sha256 for split in report.splits}) == 4 and report.problems == []
