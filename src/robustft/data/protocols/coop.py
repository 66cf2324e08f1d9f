"""The CoOp few-shot protocol (Zhou et al. 2022) used by SAFT: k-shot training sets of 11 datasets.

Each dataset is read through its published split file ``split_zhou_<Name>.json`` (``{"train": [[image
path, label, class name], ...], "val": [...], "test": [...]}``, paths relative to the image folder), or
for ImageNet and FGVC-Aircraft through their own files, in CoOp's folder names under ``root``:

    imagenet/images/{train,val}/<wnid>/*, imagenet/classnames.txt ("<wnid> <name>" per line)
    caltech-101/101_ObjectCategories + split_zhou_Caltech101.json
    oxford_pets/images + split_zhou_OxfordPets.json
    stanford_cars/ (images under it) + split_zhou_StanfordCars.json
    oxford_flowers/jpg + split_zhou_OxfordFlowers.json
    food-101/images + split_zhou_Food101.json
    fgvc_aircraft/images + variants.txt, images_variant_{train,val,test}.txt ("<image id> <variant>")
    sun397/SUN397 + split_zhou_SUN397.json
    dtd/images + split_zhou_DescribableTextures.json
    eurosat/2750 + split_zhou_EuroSAT.json
    ucf101/UCF-101-midframes + split_zhou_UCF101.json

Few-shot sampling: ``shots`` = k in {1, 2, 4, 8, 16} images per class from the train split, and
min(k, 4) per class from val (CoOp's ``generate_fewshot_dataset``). Each class's images are drawn
by one permutation seeded by (seed, dataset, class), and the first k are kept, so the 1-shot set is
inside the 2-shot set, and so on. (CoOp's own pickled subsets cannot be read safely, so the draws
are robustft's, not CoOp's.)

Base-to-new (CoCoOp, Zhou et al. 2022b): classes sorted by label are split in half, the first
ceil(C/2) are *base*. Training and id_val see base classes only; ``id_test`` holds the base classes'
test images scored over the base logits, ``ood_new`` the new classes' test images scored over the
new logits (class spaces). The head covers all classes, so new classes are scored through their
zero-shot text rows; results.json gets ``base_to_new: {base, new, hm}`` (harmonic mean). As in CoOp,
training is over the base classes only: the train split declares ``subset(base)`` and the runner masks
the new logits to -inf while training (robustft.class_spaces.training_class_space), so the training
softmax normalises over base classes and the new-class head rows get no gradient.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from robustft.class_spaces import declare, subset
from robustft.config import DataConfig, StrictModel
from robustft.data.domainbed import seed_hash
from robustft.data.protocols import (
    display_name,
    image_files,
    make_split,
    register_protocol,
    require_dir,
    require_file,
    subfolders,
)
from robustft.data.protocols.imagenet import Shift
from robustft.errors import DataError

# dataset -> (folder, image folder inside it, split file)
DATASETS: dict[str, tuple[str, str, str | None]] = {
    "imagenet": ("imagenet", "images", None),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": ("fgvc_aircraft", "images", None),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
Entries = list[tuple[Path, int]]
# CoOp's folders for the ImageNet shifts (its imagenetv2.py, imagenet_sketch.py, imagenet_a.py, imagenet_r.py).
SHIFT_PATHS = {
    "imagenet_v2": "imagenetv2/imagenetv2-matched-frequency-format-val",
    "imagenet_sketch": "imagenet-sketch/images",
    "imagenet_a": "imagenet-adversarial/imagenet-a",
    "imagenet_r": "imagenet-rendition/imagenet-r",
    "objectnet": "objectnet-1.0",
}


class CoOpOptions(StrictModel):
    """Options of the ``coop`` protocol."""

    dataset: Literal[tuple(DATASETS)] = Field(description="one of the 11 CoOp datasets")  # type: ignore[valid-type]
    shots: Literal[1, 2, 4, 8, 16] | None = Field(16, description="images per class for train; None: all")
    seed: int = Field(1, description="seeds the few-shot draw (CoOp reports seeds 1, 2, 3)")
    base_to_new: bool = Field(False, description="train on the base half of the classes; test base and new")
    shifts: list[Shift] = Field([], description="imagenet only: ood_<shift> test sets (SAFT: V2, Sketch, A, R)")
    shift_paths: dict[str, str] = Field(default_factory=dict, description="folder per shift, relative to root")


def _read_split_file(path: Path, images: Path) -> tuple[dict[str, Entries], dict[int, str]]:
    try:
        raw = json.loads(require_file(path, "CoOp split file").read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    parts: dict[str, Entries] = {}
    names: dict[int, str] = {}
    for part in ("train", "val", "test"):
        if part not in raw:
            raise DataError(f"{path}: missing key '{part}'")
        parts[part] = []
        for item in raw[part]:
            if not isinstance(item, list) or len(item) != 3:
                raise DataError(f"{path}: '{part}' entry {item!r} is not [image path, label, class name]")
            parts[part].append((images / item[0], int(item[1])))
            names.setdefault(int(item[1]), str(item[2]))
    return parts, names


def _imagenet(folder: Path) -> tuple[dict[str, Entries], dict[int, str]]:
    lines = require_file(folder / "classnames.txt", "CoOp imagenet").read_text().splitlines()
    wnid_names = dict(line.strip().split(" ", 1) for line in lines if line.strip())
    wnids = sorted(wnid_names)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    parts: dict[str, Entries] = {"val": []}
    for part, sub in (("train", "train"), ("test", "val")):
        root = require_dir(folder / "images" / sub, f"CoOp imagenet {sub}")
        parts[part] = [(path, index[d.name]) for d in subfolders(root) if d.name in index for path in image_files(d)]
    return parts, {i: wnid_names[wnid] for i, wnid in enumerate(wnids)}


def _aircraft(folder: Path) -> tuple[dict[str, Entries], dict[int, str]]:
    variants = [v.strip() for v in require_file(folder / "variants.txt", "fgvc_aircraft").read_text().splitlines()]
    variants = [v for v in variants if v]
    index = {name: i for i, name in enumerate(variants)}
    parts = {}
    for part in ("train", "val", "test"):
        path = require_file(folder / f"images_variant_{part}.txt", "fgvc_aircraft")
        entries = []
        for line in path.read_text().splitlines():
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"{path}: variant '{variant}' not in variants.txt")
            entries.append((folder / "images" / f"{image_id}.jpg", index[variant]))
        parts[part] = entries
    return parts, dict(enumerate(variants))


def _read(root: Path, dataset: str) -> tuple[dict[str, Entries], list[str]]:
    folder_name, image_folder, split_file = DATASETS[dataset]
    folder = require_dir(root / folder_name, f"CoOp dataset '{dataset}'")
    if dataset == "imagenet":
        parts, names = _imagenet(folder)
    elif dataset == "fgvc_aircraft":
        parts, names = _aircraft(folder)
    else:
        parts, names = _read_split_file(folder / split_file, folder / image_folder)
    missing = [label for label in range(len(names)) if label not in names]
    if missing:
        raise DataError(f"{folder}: label {missing[0]} has no class name (labels must be 0..C-1)")
    return parts, [display_name(names[label]) for label in range(len(names))]


def coop_class_names(root: Path, options: CoOpOptions) -> list[str]:
    return _read(root, options.dataset)[1]


def few_shot(entries: Entries, shots: int, seed: int, dataset: str) -> Entries:
    """``shots`` entries per class: the first ``shots`` of a permutation seeded by (seed, dataset, class)."""
    by_label: dict[int, Entries] = {}
    for entry in entries:
        by_label.setdefault(entry[1], []).append(entry)
    chosen: Entries = []
    for label in sorted(by_label):
        items = by_label[label]
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed_hash(seed, dataset, label)))
        chosen.extend(items[i] for i in sorted(order[:shots].tolist()))
    return chosen


def _split(entries: Entries, data_config, name: str, source: Path, data: DataConfig, offset: int = 0):
    for path, _ in entries[:1]:
        if not path.is_file():
            raise DataError(f"split '{name}': image '{path}' not found")
    samples = [(path, label - offset, None) for path, label in entries]
    return make_split(samples, data_config, name, source, train=name == "train", augment=data.augment)


@register_protocol("coop", CoOpOptions, coop_class_names)
def load_coop(root: Path, options: CoOpOptions, data_config: dict[str, Any], data: DataConfig):
    """CoOp's 11 datasets: seeded k-shot train / val from the published splits, optionally base-to-new."""
    parts, names = _read(root, options.dataset)
    base = math.ceil(len(names) / 2) if options.base_to_new else len(names)
    train = [entry for entry in parts["train"] if entry[1] < base]
    val = [entry for entry in parts["val"] if entry[1] < base]
    if options.shots is not None:
        train = few_shot(train, options.shots, options.seed, options.dataset)
        val = few_shot(val, min(options.shots, 4), options.seed, options.dataset)
    source = root / DATASETS[options.dataset][0]
    splits = {"train": _split(train, data_config, "train", source, data)}
    if val:
        splits["id_val"] = _split(val, data_config, "id_val", source, data)
    test_base = [entry for entry in parts["test"] if entry[1] < base]
    splits["id_test"] = _split(test_base, data_config, "id_test", source, data)
    if options.base_to_new:
        declare(splits["train"], subset(range(base)))  # CoOp trains a base-only head
        declare(splits["id_test"], subset(range(base)))
        splits["id_test"].report_as = "base"
        if "id_val" in splits:
            declare(splits["id_val"], subset(range(base)))
        new = [entry for entry in parts["test"] if entry[1] >= base]
        splits["ood_new"] = declare(
            _split(new, data_config, "ood_new", source, data, offset=base), subset(range(base, len(names)))
        )
        splits["ood_new"].report_as = "new"
    if options.shifts:
        splits |= _imagenet_shifts(root, options, data_config)
    return splits, names


def _imagenet_shifts(root: Path, options: CoOpOptions, data_config: dict[str, Any]) -> dict[str, Any]:
    """ImageNet-V2 / -Sketch / -A / -R / ObjectNet next to a few-shot ImageNet (SAFT's table), with their class
    spaces (robustft.data.protocols.imagenet); classes are classnames.txt's wnids in sorted order."""
    from robustft.data.protocols.imagenet import load_shift

    if options.dataset != "imagenet" or options.base_to_new:
        raise DataError("data.protocol.options.shifts: ImageNet shifts need dataset imagenet without base_to_new")
    lines = require_file(root / "imagenet" / "classnames.txt", "CoOp imagenet").read_text().splitlines()
    wnids = sorted(line.split(" ", 1)[0] for line in lines if line.strip())
    paths = SHIFT_PATHS | options.shift_paths
    return {f"ood_{shift}": load_shift(shift, root / paths[shift], wnids, data_config)[0] for shift in options.shifts}
