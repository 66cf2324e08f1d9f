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


IMAGENET_C = {
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "gaussian_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "spatter", "saturate",
}  # fmt: skip


def test_all_19_imagenet_c_corruptions_keep_any_image_shape():
    assert set(CORRUPTIONS) == IMAGENET_C
    tall = np.random.default_rng(1).integers(0, 256, size=(20, 12, 3), dtype=np.uint8)
    for name in CORRUPTIONS:
        for severity in (1, 5):
            out = corrupt(tall, name, severity, key="a/b.png")
            assert out.shape == tall.shape and out.dtype == np.uint8, name


def test_random_corruptions_depend_on_the_image_key():
    for name in ("glass_blur", "motion_blur", "snow", "frost", "fog", "spatter", "elastic_transform"):
        assert not np.array_equal(corrupt(TEXTURE, name, 3, key=0), corrupt(TEXTURE, name, 3, key=1)), name


def test_motion_blur_smears_a_point_along_a_one_sided_gaussian_line():
    from robustft.data.protocols.corruptions import _line_blur

    point = np.zeros((9, 15))
    point[4, 10] = 1.0
    smear = _line_blur(point, radius=3, sigma=2, angle=0)  # width 2 * 3 + 1 = 7 pixels, pointing back along x
    assert np.count_nonzero(smear) == 7 and np.flatnonzero(smear[4]).tolist() == list(range(4, 11))
    assert np.all(np.diff(smear[4, 4:11]) > 0) and smear.sum() == pytest.approx(1.0)
    vertical = _line_blur(point, radius=3, sigma=2, angle=90)
    assert np.flatnonzero(vertical[:, 10]).tolist() == [0, 1, 2, 3, 4] and np.count_nonzero(vertical) == 5


def test_weather_and_zoom_blur_act_as_their_mechanism_says():
    def roughness(image):
        return np.abs(np.diff(image.astype(float), axis=1)).mean()

    zoomed = [roughness(corrupt(TEXTURE, "zoom_blur", s, key=0)) for s in (1, 5)]
    assert zoomed[1] < zoomed[0] < roughness(TEXTURE)  # more zoom factors averaged: smoother
    fog_spread = [corrupt(TEXTURE, "fog", s, key=0).astype(float).std() for s in (1, 3, 5)]
    assert fog_spread == sorted(fog_spread, reverse=True) and fog_spread[0] < 0.5 * TEXTURE.std()  # washed out
    dark = np.full((16, 16, 3), 30, dtype=np.uint8)
    snow = [corrupt(dark, "snow", s, key=0).mean() for s in (1, 3, 5)]
    assert snow == sorted(snow) and snow[0] > 40  # flakes and the whitened scene brighten a dark image
    assert corrupt(dark, "frost", 1, key=0).mean() > 60  # 1 * image + 0.4 * ice texture


def test_noise_depends_on_the_image_key_and_grows_with_severity():
    a, b = corrupt(TEXTURE, "gaussian_noise", 2, key=0), corrupt(TEXTURE, "gaussian_noise", 2, key=1)
    assert not np.array_equal(a, b)
    spread = [np.abs(corrupt(TEXTURE, "gaussian_noise", s, key=0).astype(float) - TEXTURE).mean() for s in range(1, 6)]
    assert spread == sorted(spread) and spread[-1] > 3 * spread[0]


def test_unknown_corruption_or_severity_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown 'barrel'"):
        corrupt(TEXTURE, "barrel", 1, key=0)
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
    assert main([str(tmp_path / "test"), str(tmp_path / "out"), "--corruptions", "barrel"]) == 1
    assert "unknown 'barrel'" in capsys.readouterr().out
