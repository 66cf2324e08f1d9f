"""Folder and CSV datasets: labels, class names, domains, transforms and every user-facing error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustft.data.folders import (
    ImageSplit,
    check_images,
    load_image_splits,
    read_csv_manifest,
    read_image_folder,
    resolve_class_names,
)
from robustft.data.transforms import build_transform
from robustft.errors import ConfigError, DataError

DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "mean": (0.4, 0.5, 0.6),
    "std": (0.2, 0.25, 0.5),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}
# (255, 0, 51) normalised with DATA_CONFIG: (1 - .4) / .2, (0 - .5) / .25, (.2 - .6) / .5
COLOUR = (255, 0, 51)
EXPECTED = (3.0, -2.0, -0.8)


def save_image(path: Path, colour: tuple[int, int, int] = COLOUR, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def make_folder(root: Path, classes: dict[str, int], suffix: str = ".png") -> Path:
    for name, count in classes.items():
        for i in range(count):
            save_image(root / name / f"img{i}{suffix}")
    return root


def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_csv_dataset(root: Path) -> Path:
    for name in ("a.png", "b.jpg", "c.png", "sub/d.png"):
        save_image(root / name)
    return write_csv(
        root / "train.csv",
        [
            "path,label,domain,extra",
            "a.png,cat,photo,x",
            "b.jpg,dog,sketch,y",
            "c.png,1,photo,z",
            "sub/d.png,0,sketch,w",
        ],
    )


def test_image_folder_labels_sorted_and_extensions(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", {"cat": 2, "dog": 3})
    save_image(root / "dog" / "UPPER.JPG")
    (root / "dog" / "notes.txt").write_text("not an image")
    samples = read_image_folder(root, ["cat", "dog"])
    assert [label for _, label, _ in samples] == [0, 0, 1, 1, 1, 1]
    assert [p.name for p, _, _ in samples] == [
        "img0.png",
        "img1.png",
        "UPPER.JPG",
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    assert all(domain is None for _, _, domain in samples)


def test_image_folder_unknown_subfolder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", {"cat": 1, "bird": 1})
    with pytest.raises(DataError, match="'bird' is not one of the 1 classes"):
        read_image_folder(root, ["cat"])


def test_csv_manifest_names_indices_domains(tmp_path: Path) -> None:
    csv_path = make_csv_dataset(tmp_path / "data")
    samples = read_csv_manifest(csv_path, ["cat", "dog"])
    assert [label for _, label, _ in samples] == [0, 1, 1, 0]
    assert [domain for _, _, domain in samples] == ["photo", "sketch", "photo", "sketch"]
    assert samples[3][0] == tmp_path / "data" / "sub" / "d.png"


def test_csv_manifest_root_overrides_csv_folder(tmp_path: Path) -> None:
    save_image(tmp_path / "images" / "a.png")
    csv_path = write_csv(tmp_path / "meta" / "m.csv", ["label,path", "cat,a.png"])
    samples = read_csv_manifest(csv_path, ["cat"], root=tmp_path / "images")
    assert samples == [(tmp_path / "images" / "a.png", 0, None)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["path,domain", "a.png,x"], r"m\.csv: missing column 'label'"),
        (["file,label", "a.png,cat"], r"m\.csv: missing column 'path'"),
        (["path,label", "a.png,cat", "a.png,horse"], r"m\.csv:3: label 'horse' is not one of the 2 classes"),
        (["path,label", "a.png,2"], r"m\.csv:2: label '2' is not one of the 2 classes"),
        (["path,label", "missing.png,cat"], r"m\.csv:2: image '.*missing\.png' not found"),
        ([], r"m\.csv: empty CSV"),
    ],
)
def test_csv_manifest_errors(tmp_path: Path, lines: list[str], message: str) -> None:
    save_image(tmp_path / "a.png")
    csv_path = write_csv(tmp_path / "m.csv", lines)
    with pytest.raises(DataError, match=message):
        read_csv_manifest(csv_path, ["cat", "dog"])


def test_resolve_class_names(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"zebra": 1, "ant": 1})
    assert resolve_class_names(None, tmp_path / "train") == ["ant", "zebra"]
    assert resolve_class_names(["b", "a"], tmp_path / "train") == ["b", "a"]
    names_file = tmp_path / "names.txt"
    names_file.write_text("dog\n\ncat\n")
    assert resolve_class_names(names_file, tmp_path / "train") == ["dog", "cat"]
    assert resolve_class_names(str(names_file), tmp_path / "train") == ["dog", "cat"]
    csv_path = write_csv(tmp_path / "named.csv", ["path,label", "a.png,dog", "b.jpg,cat", "c.png,dog"])
    assert resolve_class_names(None, csv_path) == ["cat", "dog"]
    with pytest.raises(DataError, match=r"ints\.csv: labels are integer"):
        resolve_class_names(None, write_csv(tmp_path / "ints.csv", ["path,label", "a.png,0"]))


def test_resolve_class_names_duplicates(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="duplicate class name 'cat'"):
        resolve_class_names(["cat", "dog", "cat"], tmp_path)
    names_file = tmp_path / "names.txt"
    names_file.write_text("dog\ndog\n")
    with pytest.raises(DataError, match=r"names\.txt: duplicate class name 'dog'"):
        resolve_class_names(names_file, tmp_path)


def test_load_image_splits_folder_and_csv(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"cat": 2, "dog": 1})
    make_folder(tmp_path / "test", {"dog": 1}, suffix=".jpg")
    make_csv_dataset(tmp_path / "shift")
    splits, names = load_image_splits(
        {"ood_sketch": "shift/train.csv", "id_test": "test", "train": "train"},
        tmp_path,
        None,
        DATA_CONFIG,
    )
    assert names == ["cat", "dog"]
    assert list(splits) == ["train", "id_test", "ood_sketch"]
    train, test, ood = splits["train"], splits["id_test"], splits["ood_sketch"]
    assert isinstance(train, ImageSplit) and len(train) == 3
    assert train.labels.dtype == torch.long and train.labels.tolist() == [0, 0, 1]
    assert train.domains is None and train.name == "train" and train.source == tmp_path / "train"
    assert test.labels.tolist() == [1]
    assert ood.domains == ["photo", "sketch", "photo", "sketch"]
    assert ood.source == tmp_path / "shift" / "train.csv"
    image, label = train[0]
    assert image.shape == (3, 16, 16) and label == 0
    expected = torch.tensor(EXPECTED).view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(image, expected, atol=1e-4)
    batch, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=3)))
    assert batch.shape == (3, 3, 16, 16) and labels.tolist() == [0, 0, 1]


def test_transforms_rgb_and_augment() -> None:
    grey = Image.new("L", (10, 12), 128)
    eval_tf = build_transform(DATA_CONFIG, train=False)
    train_tf = build_transform(DATA_CONFIG, train=True)
    assert torch.equal(eval_tf(grey), train_tf(grey))
    assert eval_tf(grey).shape == (3, 16, 16)
    augmented = build_transform(DATA_CONFIG, train=True, augment=True)
    assert "RandomResizedCrop" in repr(augmented)
    assert augmented(Image.new("RGBA", (20, 20))).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": "train", "id_test": "train", "val": "train"}, "unknown split name 'val'"),
        ({"train": "train", "id_test": "train", "ood_": "train"}, "unknown split name 'ood_'"),
        ({"train": "train"}, "missing required split 'id_test'"),
        ({"id_test": "train"}, "missing required split 'train'"),
    ],
)
def test_load_image_splits_config_errors(tmp_path: Path, splits: dict[str, str], message: str) -> None:
    make_folder(tmp_path / "train", {"cat": 1})
    with pytest.raises(ConfigError, match=f"data.splits: {message}"):
        load_image_splits(splits, tmp_path, None, DATA_CONFIG)


def test_load_image_splits_data_errors(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"cat": 1})
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"split 'id_test' \(.*empty\) has no images"):
        load_image_splits({"train": "train", "id_test": "empty"}, tmp_path, None, DATA_CONFIG)
    with pytest.raises(DataError, match=r"split 'ood_x': path '.*nowhere' does not exist"):
        splits = {"train": "train", "id_test": "train", "ood_x": "nowhere"}
        load_image_splits(splits, tmp_path, None, DATA_CONFIG)


def test_truncated_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "train", {"cat": 2})
    noise = Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3))
    broken = root / "cat" / "img1.png"
    noise.save(broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    splits, _ = load_image_splits({"train": "train", "id_test": "train"}, tmp_path, None, DATA_CONFIG)
    assert check_images(splits["train"]) == [broken]
    assert splits["train"][0][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"img1\.png: cannot read image \(") as info:
        splits["train"][1]
    assert "\n" not in str(info.value) and info.value.__cause__ is None
