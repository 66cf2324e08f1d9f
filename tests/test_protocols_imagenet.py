"""ImageNet + V2 / Sketch / A / R / ObjectNet on a synthetic replica of the real layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from robustft.class_spaces import class_space_of
from robustft.config import DataConfig
from robustft.data import load_splits, resolve_class_names
from robustft.errors import DataError
from robustft.evaluate import evaluate_splits, predict

DATA_CONFIG = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
               "crop_pct": 1.0}  # fmt: skip
WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005", "n00000006"]
IN_A = ["n00000002", "n00000004", "n00000005"]  # ImageNet classes 1, 3, 4
IN_R = ["n00000001", "n00000003", "n00000004", "n00000006"]  # 0, 2, 3, 5
DECOY = 5  # a class outside IN-A's subset and every ObjectNet group


def red(index: int) -> tuple[int, int, int]:
    """Images of ImageNet class ``index`` are this colour, so ColourPredictor can tell their class."""
    return (20 * index + 10, 0, 0)


def save(path: Path, colour: tuple[int, int, int], size: int = 8, border: tuple[int, int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), border or colour)
    if border is not None:
        image.paste(Image.new("RGB", (size - 4, size - 4), colour), (2, 2))
    image.save(path)


def build_replica(root: Path) -> Path:
    for i, wnid in enumerate(WNIDS):
        for k in range(2):
            save(root / "train" / wnid / f"{wnid}_{k}.JPEG", red(i))
        save(root / "val" / wnid / f"val_{i}.JPEG", red(i))
        save(root / "imagenetv2-matched-frequency-format-val" / str(i) / f"{i}.jpeg", red(i))
        save(root / "sketch" / wnid / f"s_{i}.JPEG", red(i))
    for folder, wnids in (("imagenet-a", IN_A), ("imagenet-r", IN_R)):
        for wnid in wnids:
            for k in range(2):
                save(root / folder / wnid / f"{k}.jpg", red(WNIDS.index(wnid)))
    objectnet = root / "objectnet-1.0"
    # ObjectNet class "Chair" covers ImageNet classes 1 and 3, "Cup" class 4; "Bench" overlaps nothing.
    for folder, imagenet_class, count in (("chair", 3, 2), ("chair", 1, 1), ("cup", 4, 2), ("bench", 0, 3)):
        for k in range(count):
            save(objectnet / "images" / folder / f"{imagenet_class}_{k}.png", red(imagenet_class), 12, (255, 0, 255))
    mappings = objectnet / "mappings"
    mappings.mkdir(parents=True)
    (mappings / "folder_to_objectnet_label.json").write_text(
        json.dumps({"chair": "Chair", "cup": "Cup", "bench": "Bench"})
    )
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps({"Chair": "name b; name d", "Cup": "name e"}))
    # 2012 ids are a permutation of the pytorch indices: the line of 2012 id j names pytorch class perm[j].
    to_2012 = {0: 2, 1: 0, 2: 1, 3: 5, 4: 3, 5: 4}
    names = {0: "name a", 1: "name b", 2: "name c", 3: "name d", 4: "name e", 5: "name f"}
    lines = [names[next(p for p, j in to_2012.items() if j == line)] for line in range(6)]
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(k): v for k, v in to_2012.items()}))
    return root


class ColourPredictor(nn.Module):
    """Logits over the 6 classes peaking at the image's colour class, plus a large decoy logit on class 5."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        value = (images[:, 0].mean(dim=(1, 2)) * 0.5 + 0.5) * 255
        estimate = (value - 10) / 20
        logits = -((torch.arange(6).float() - estimate[:, None]) ** 2)
        logits[:, DECOY] += 100
        return logits


def data(root: Path, **options) -> DataConfig:
    return DataConfig(benchmark=None, protocol={"name": "imagenet", "root": root, "options": options})


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return build_replica(tmp_path_factory.mktemp("imagenet"))


def test_counts_class_names_and_class_spaces(replica):
    splits, names = load_splits(data(replica), DATA_CONFIG)
    assert names == WNIDS  # a 6-class copy cannot take CLIP's 1000 names by position
    assert resolve_class_names(data(replica)) == WNIDS
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 12, "id_test": 6, "ood_imagenet_v2": 6, "ood_imagenet_sketch": 6,
                     "ood_imagenet_a": 6, "ood_imagenet_r": 8, "ood_objectnet": 5}  # fmt: skip
    assert class_space_of(splits["ood_imagenet_a"]).indices == (1, 3, 4)  # derived from the wnid folders
    assert class_space_of(splits["ood_imagenet_r"]).indices == (0, 2, 3, 5)
    assert class_space_of(splits["ood_imagenet_v2"]).kind == "identity"
    objectnet = class_space_of(splits["ood_objectnet"])  # "bench" overlaps no ImageNet class: dropped
    assert objectnet.kind == "max_over_groups" and objectnet.groups == ((1, 3), (4,))
    assert splits["ood_objectnet"].labels.tolist() == [0, 0, 0, 1, 1]
    assert splits["ood_imagenet_v2"].labels.tolist() == list(range(6))  # V2 folders are class indices


def test_objectnet_crops_the_two_pixel_border(replica):
    splits, _ = load_splits(data(replica, shifts=["objectnet"]), DATA_CONFIG)
    image, _ = splits["ood_objectnet"][0]  # 12 px, magenta 2-px frame around a red(1) square -> 8 px, no frame
    expected = (torch.tensor(red(1)).float() / 255 - 0.5) / 0.5
    assert torch.allclose(image, expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5)


def test_evaluation_scores_in_each_splits_class_space(replica):
    splits, _ = load_splits(data(replica, shifts=["imagenet_a", "imagenet_r", "objectnet"]), DATA_CONFIG)
    metrics = evaluate_splits(ColourPredictor(), splits, torch.device("cpu"), temperature_scaling=False)
    # The decoy (class 5) wins over all 6 logits; IN-A (no class 5) and ObjectNet (5 in no group) never see it.
    assert metrics["ood_imagenet_a"]["accuracy"] == 100.0
    assert metrics["ood_objectnet"]["accuracy"] == 100.0
    assert metrics["ood_imagenet_r"]["accuracy"] == pytest.approx(100 * 2 / 8)  # class 5 is in IN-R: decoy wins
    raw_logits, labels = predict(ColourPredictor(), splits["ood_imagenet_a"], torch.device("cpu"))
    assert (raw_logits.argmax(1) == DECOY).all() and raw_logits.shape[1] == 6 and labels.max() == 2


def test_id_val_fraction_holds_out_part_of_train(replica):
    splits, _ = load_splits(data(replica, shifts=[], id_val_fraction=0.25), DATA_CONFIG)
    assert (len(splits["train"]), len(splits["id_val"])) == (9, 3)
    assert not set(splits["train"].paths) & set(splits["id_val"].paths)


def test_missing_shift_folder_is_a_one_line_error_naming_it(tmp_path, replica):
    with pytest.raises(DataError, match=r"^imagenet_r: expected folder .*nowhere") as error:
        load_splits(data(replica, shifts=["imagenet_r"], paths={"imagenet_r": "nowhere"}), DATA_CONFIG)
    assert "nowhere" in str(error.value) and "\n" not in str(error.value)


def test_clip_names_for_a_full_copy():
    from robustft.data.protocols.imagenet import head_class_names

    wnids = [f"n{i:08d}" for i in range(1000)]
    names = head_class_names(wnids, "auto")
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    with pytest.raises(DataError, match="1000 classes"):
        head_class_names(wnids[:6], "clip")
