"""-C corruptions for image folders, and the image_folder protocol that reads them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustft.config import DataConfig
from robustft.data import load_splits
from robustft.data.protocols.corruptions import CORRUPTIONS, corrupt, generate_corruptions
from robustft.errors import ConfigError, DataError

DATA_CONFIG = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
TEXTURE = np.random.default_rng(0).integers(40, 216, size=(16, 16, 3), dtype=np.uint8)


def build_folder(root: Path, classes=("cat", "dog"), per_class=2) -> Path:
    for name in classes:
        for k in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(TEXTURE, k, axis=0)).save(root / name / f"{k}.png")
    return root


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_deterministic_per_image_corruption_and_severity(name):
    first = corrupt(TEXTURE, name, 3, key="cat/0.png")
    assert first.dtype == np.uint8 and first.shape == TEXTURE.shape
    assert np.array_equal(first, corrupt(Image.fromarray(TEXTURE), name, 3, key="cat/0.png"))
    assert not np.array_equal(first, TEXTURE)
    assert not np.array_equal(first, corrupt(TEXTURE, name, 5, key="cat/0.png"))


def test_noise_depends_on_the_image_key_and_grows_with_severity():
    a, b = corrupt(TEXTURE, "gaussian_noise", 2, key=0), corrupt(TEXTURE, "gaussian_noise", 2, key=1)
    assert not np.array_equal(a, b)
    spread = [np.abs(corrupt(TEXTURE, "gaussian_noise", s, key=0).astype(float) - TEXTURE).mean() for s in range(1, 6)]
    assert spread == sorted(spread) and spread[-1] > 3 * spread[0]


def test_unknown_corruption_or_severity_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown 'frost'"):
        corrupt(TEXTURE, "frost", 1, key=0)
    with pytest.raises(ConfigError, match="severity: 6 is not one of 1..5"):
        corrupt(TEXTURE, "contrast", 6, key=0)


def test_generated_tree_is_reproducible_and_loads_as_ood_splits(tmp_path):
    build_folder(tmp_path / "train")
    build_folder(tmp_path / "test", per_class=1)
    written = generate_corruptions(tmp_path / "test", tmp_path / "test-c", ["pixelate", "shot_noise"], [1, 5])
    assert written == 2 * 2 * 2
    target = tmp_path / "test-c" / "shot_noise" / "5" / "dog" / "0.png"
    first = target.read_bytes()
    generate_corruptions(tmp_path / "test", tmp_path / "test-c", ["shot_noise"], [5])
    assert target.read_bytes() == first
    options = {"ood": {"sketch": "train"}, "corrupted": "test-c"}
    data = DataConfig(benchmark=None, protocol={"name": "image_folder", "root": tmp_path, "options": options})
    splits, names = load_splits(data, DATA_CONFIG)
    assert names == ["cat", "dog"]
    assert sorted(splits) == sorted(["train", "id_test", "ood_sketch", "ood_pixelate_1", "ood_pixelate_5",
                                     "ood_shot_noise_1", "ood_shot_noise_5"])  # fmt: skip
    assert len(splits["ood_pixelate_5"]) == 2 and splits["ood_pixelate_5"].labels.tolist() == [0, 1]


def test_missing_split_folder_names_it(tmp_path):
    build_folder(tmp_path / "train")
    data = DataConfig(benchmark=None, protocol={"name": "image_folder", "root": tmp_path, "options": {}})
    with pytest.raises(DataError, match=r"^split 'id_test': expected folder '.*/test' does not exist$"):
        load_splits(data, DATA_CONFIG)


def test_command_line_writes_the_tree_and_names_a_bad_corruption(tmp_path, capsys):
    from robustft.data.protocols.corruptions import main

    build_folder(tmp_path / "test", per_class=1)
    assert main([str(tmp_path / "test"), str(tmp_path / "out"), "--corruptions", "contrast", "--severities", "2"]) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "contrast/2/cat/0.png",
        "contrast/2/dog/0.png",
    ]
    assert main([str(tmp_path / "test"), str(tmp_path / "out"), "--corruptions", "frost"]) == 1
    assert "unknown 'frost'" in capsys.readouterr().out
