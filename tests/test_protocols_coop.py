"""The CoOp few-shot protocol: split_zhou files, seeded k-shot draws, base-to-new class spaces."""

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
from robustft.evaluate import evaluate_splits, summarize

DATA_CONFIG = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]  # 5 classes: base = first 3
PER_CLASS = {"train": 20, "val": 6, "test": 2}


def build_dtd(root: Path) -> Path:
    folder = root / "dtd"
    split: dict[str, list] = {}
    for part, count in PER_CLASS.items():
        split[part] = []
        for label, name in enumerate(CLASSES):
            for k in range(count):
                relative = f"{name}/{part}_{k}.jpg"
                (folder / "images" / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * label + 20, 0, 0)).save(folder / "images" / relative, "PNG")
                split[part].append([relative, label, name])
    (folder / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


def config(root: Path, **options) -> DataConfig:
    options = {"dataset": "dtd"} | options
    return DataConfig(benchmark=None, protocol={"name": "coop", "root": root, "options": options})


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return build_dtd(tmp_path_factory.mktemp("coop"))


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_k_shot_train_and_val_per_class(replica, shots):
    splits, names = load_splits(config(replica, shots=shots, seed=1), DATA_CONFIG)
    assert names == CLASSES
    assert torch.bincount(splits["train"].labels).tolist() == [shots] * 5
    assert torch.bincount(splits["id_val"].labels).tolist() == [min(shots, 4)] * 5  # CoOp: val gets min(k, 4)
    assert len(splits["id_test"]) == 10


def test_draws_are_seeded_and_nested(replica):
    def train_paths(shots, seed):
        return set(load_splits(config(replica, shots=shots, seed=seed), DATA_CONFIG)[0]["train"].paths)

    assert train_paths(4, 1) == train_paths(4, 1)
    assert train_paths(4, 1) != train_paths(4, 2)
    assert train_paths(2, 1) < train_paths(4, 1) < train_paths(16, 1)
    everything, _ = load_splits(config(replica, shots=None), DATA_CONFIG)
    assert len(everything["train"]) == 100


class ColourClassifier(nn.Module):
    """Right on every image, but with a decoy: base images also give new class 4 the top logit."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        label = (((images[:, 0].mean(dim=(1, 2)) * 0.5 + 0.5) * 255 - 20) / 40).round().long()
        logits = torch.nn.functional.one_hot(label, 5).float()
        logits[label < 3, 4] = 2.0
        return logits


def test_base_to_new_class_spaces_and_harmonic_mean(replica):
    splits, names = load_splits(config(replica, shots=2, base_to_new=True), DATA_CONFIG)
    assert names == CLASSES and resolve_class_names(config(replica, base_to_new=True)) == CLASSES
    assert splits["train"].labels.unique().tolist() == [0, 1, 2]  # base classes only
    assert class_space_of(splits["id_test"]).indices == (0, 1, 2)
    assert class_space_of(splits["ood_new"]).indices == (3, 4)
    assert splits["ood_new"].labels.tolist() == [0, 0, 1, 1]  # relabelled into the new space
    entry = summarize(evaluate_splits(ColourClassifier(), splits, torch.device("cpu"), temperature_scaling=False))
    assert entry["base_to_new"] == {"base": 100.0, "new": 100.0, "hm": 100.0}  # the decoy is outside base's space


def build_imagenet(root: Path) -> Path:
    wnids = {"n00000003": "goldfish", "n00000001": "tench", "n00000002": "great white shark"}
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    for wnid in wnids:
        for part, count in (("train", 3), ("val", 1)):
            for k in range(count):
                path = root / "imagenet" / "images" / part / wnid / f"{k}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(path, "PNG")
    for wnid in ("n00000001", "n00000003"):
        path = root / "imagenet-rendition" / "imagenet-r" / wnid / "0.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path, "PNG")
    return root


def test_few_shot_imagenet_with_its_shifts(tmp_path):
    root = build_imagenet(tmp_path)
    data = config(root, dataset="imagenet", shots=2, shifts=["imagenet_r"])
    splits, names = load_splits(data, DATA_CONFIG)
    assert names == ["tench", "great white shark", "goldfish"]  # classnames.txt names in sorted-wnid order
    assert torch.bincount(splits["train"].labels).tolist() == [2, 2, 2] and "id_val" not in splits
    assert len(splits["id_test"]) == 3
    assert class_space_of(splits["ood_imagenet_r"]).indices == (0, 2)
    with pytest.raises(DataError, match="ImageNet shifts need dataset imagenet"):
        load_splits(config(root, dataset="imagenet", base_to_new=True, shifts=["imagenet_r"]), DATA_CONFIG)


def test_base_to_new_trains_over_the_base_classes_only(replica):
    from robustft.class_spaces import training_class_space

    splits, _ = load_splits(config(replica, shots=2, base_to_new=True), DATA_CONFIG)
    space = class_space_of(splits["train"])
    assert space.indices == (0, 1, 2)
    assert class_space_of(load_splits(config(replica, shots=2), DATA_CONFIG)[0]["train"]).kind == "identity"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Linear(6, 5))
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    with training_class_space(model, space):
        logits = model(images)
        nn.functional.cross_entropy(logits, labels).backward()
    head = model[2]
    assert torch.equal(head.weight.grad[3:], torch.zeros(2, 6)) and torch.equal(head.bias.grad[3:], torch.zeros(2))
    assert head.weight.grad[:3].abs().sum() > 0
    assert torch.allclose(logits.softmax(1)[:, :3].sum(1), torch.ones(4))  # normalised over the base classes
    expected = nn.functional.cross_entropy(model(images)[:, :3], labels)  # a base-only head's loss
    assert torch.allclose(nn.functional.cross_entropy(logits, labels), expected)
    assert torch.isfinite(model(images)).all()  # closed: every class is scored again
    model.zero_grad()
    nn.functional.cross_entropy(model(images), labels).backward()
    assert head.weight.grad[3:].abs().sum() > 0  # without the restriction the new rows would move


def runner_config(root: Path, out: Path, **method):
    from robustft.config import parse_config

    raw = {
        "name": "b2n",
        "output_dir": str(out),
        "model": {"source": "builtin", "zero_shot_head": "classifier"},
        "data": {
            "benchmark": None,
            "protocol": {"name": "coop", "root": str(root), "options": {"dataset": "dtd", "shots": 2,
                                                                          "base_to_new": True}},
            "batch_size": 4,
        },
        "method": {"name": "finetune"} | method,
        "optim": {"weight_decay": 0.0},
        "train": {"steps": 2, "progress": False, "device": "cpu", "checkpoint_every": 100},
    }  # fmt: skip
    return parse_config(raw)


def test_base_to_new_fit_leaves_the_new_head_rows_untouched(tmp_path):
    from safetensors.torch import load_file

    from robustft.errors import ConfigError
    from robustft.runner import FINAL_CHECKPOINT, fit, prepare_run

    classes = [f"texture {i}" for i in range(10)]  # the built-in model's 10 classifier rows; base = first 5
    root = tmp_path / "data"
    split: dict[str, list] = {}
    for part, count in {"train": 3, "val": 1, "test": 1}.items():
        split[part] = []
        for label, name in enumerate(classes):
            for k in range(count):
                image = root / "dtd" / "images" / name / f"{part}{k}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (25 * label, 10 * k, 0)).save(image)
                split[part].append([f"{name}/{part}{k}.png", label, name])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    run = runner_config(root, tmp_path / "runs")
    before = {k: v.clone() for k, v in prepare_run(run, log=lambda message: None).model.head.state_dict().items()}
    fit(run, log=lambda message: None)
    after = load_file(run.run_dir / FINAL_CHECKPOINT)
    assert torch.equal(after["head.weight"][5:], before["weight"][5:])
    assert torch.equal(after["head.bias"][5:], before["bias"][5:])
    assert not torch.equal(after["head.weight"][:5], before["weight"][:5])  # the base rows did train
    with pytest.raises(ConfigError, match="method.label_smoothing: must be 0"):
        fit(runner_config(root, tmp_path / "smooth", label_smoothing=0.1), log=lambda message: None)
