"""ImageNet and its five distribution shifts (the WiSE-FT / VRF table), from a local copy.

Layout under ``root`` (each folder renamable with ``options.paths``)::

    train/<wnid>/*.JPEG            ImageNet-1k train (its sorted wnids are the class order 0..999)
    val/<wnid>/*.JPEG              ImageNet-1k val, sorted into wnid folders -> id_test
    imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg   ImageNet-V2 (folders are class indices)
    sketch/<wnid>/*.JPEG           ImageNet-Sketch (all 1000 classes)
    imagenet-a/<wnid>/*.jpg        ImageNet-A (200 wnids)
    imagenet-r/<wnid>/*.jpg        ImageNet-R (200 wnids)
    objectnet-1.0/images/<folder>/*.png and objectnet-1.0/mappings/*.json   ObjectNet

Class spaces (robustft.class_spaces): V2 and Sketch use the 1000 classes as they are. IN-A and IN-R are
scored on their 200 classes only, as in Hendrycks et al. and WiSE-FT: the subset is *derived* from the
copy's wnid folders (position of each wnid among ImageNet's sorted wnids), so no index list ships and a
partial copy still scores correctly. ObjectNet (Barbu et al. 2019) keeps the 113 classes that overlap
ImageNet; a class's logit is the max over the logits of the ImageNet classes it maps to, read from the
release's ``mappings/`` files, and 2 border pixels are cropped as in WiSE-FT.

Head class names: CLIP's 1000 ImageNet names (shipped with open_clip) when the copy has the 1000
classes, else the wnids (a partial copy cannot be matched to CLIP's list by position).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from robustft.class_spaces import declare, max_over_groups, subset
from robustft.config import DataConfig, StrictModel
from robustft.data.domainbed import holdout_split, seed_hash
from robustft.data.protocols import (
    folder_samples,
    make_split,
    register_protocol,
    require_dir,
    require_file,
    subfolders,
)
from robustft.errors import DataError

Shift = Literal["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "objectnet"]
SHIFTS: tuple[str, ...] = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "objectnet")
DEFAULT_PATHS = {
    "train": "train",
    "val": "val",
    "imagenet_v2": "imagenetv2-matched-frequency-format-val",
    "imagenet_sketch": "sketch",
    "imagenet_a": "imagenet-a",
    "imagenet_r": "imagenet-r",
    "objectnet": "objectnet-1.0",
}
OBJECTNET_BORDER = 2


class ImageNetOptions(StrictModel):
    """Options of the ``imagenet`` protocol."""

    shifts: list[Shift] = Field(list(SHIFTS), description="which shifted test sets become ood_<shift> splits")
    paths: dict[str, str] = Field(
        default_factory=dict, description="folder per part (train, val, imagenet_v2, ...), relative to root"
    )
    id_val_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of train held out as id_val (seeded by id_val_seed); 0: no id_val"
    )
    id_val_seed: int = Field(0, description="seeds the id_val hold-out")
    class_names: Literal["auto", "clip", "wnids"] = Field(
        "auto", description="head class names: CLIP's ImageNet names (1000 classes), or the wnids"
    )


def _paths(root: Path, options: ImageNetOptions) -> dict[str, Path]:
    unknown = sorted(set(options.paths) - set(DEFAULT_PATHS))
    if unknown:
        raise DataError(f"data.protocol.options.paths: unknown part '{unknown[0]}' (known: {', '.join(DEFAULT_PATHS)})")
    return {part: root / options.paths.get(part, default) for part, default in DEFAULT_PATHS.items()}


def imagenet_wnids(root: Path, options: ImageNetOptions) -> list[str]:
    """ImageNet's wnids in class order: the sorted folder names of the train split."""
    train = require_dir(_paths(root, options)["train"], "imagenet train")
    wnids = [folder.name for folder in subfolders(train)]
    if not wnids:
        raise DataError(f"{train}: no class folders")
    return wnids


def head_class_names(wnids: list[str], choice: str) -> list[str]:
    """CLIP's ImageNet class names (open_clip's list, in wnid order) or the wnids themselves."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if choice == "wnids" or (choice == "auto" and len(wnids) != len(IMAGENET_CLASSNAMES)):
        return list(wnids)
    if len(wnids) != len(IMAGENET_CLASSNAMES):
        raise DataError(f"imagenet: class_names 'clip' needs the 1000 classes; the train folder has {len(wnids)}")
    return list(IMAGENET_CLASSNAMES)


def imagenet_class_names(root: Path, options: ImageNetOptions) -> list[str]:
    return head_class_names(imagenet_wnids(root, options), options.class_names)


def _wnid_subset(folder: Path, wnids: list[str], what: str) -> tuple[list[str], list[int]]:
    """The copy's wnid folders (sorted) and their ImageNet class indices: the 200-class subset of IN-A / IN-R."""
    index = {wnid: i for i, wnid in enumerate(wnids)}
    found = [sub.name for sub in subfolders(require_dir(folder, what))]
    unknown = [name for name in found if name not in index]
    if unknown:
        raise DataError(
            f"{folder / unknown[0]}: {what} folder '{unknown[0]}' is not an ImageNet wnid of the train split"
        )
    return found, [index[name] for name in found]


def _objectnet(folder: Path, wnids: list[str], data_config: dict[str, Any]):
    """ObjectNet's 113 ImageNet-overlapping classes: samples, class names and each class's ImageNet indices."""
    mappings = require_dir(folder / "mappings", "objectnet mappings")
    images = require_dir(folder / "images", "objectnet images")
    folder_to_label = _read_json(mappings / "folder_to_objectnet_label.json")
    objectnet_to_imagenet = _read_json(mappings / "objectnet_to_imagenet_1k.json")
    pytorch_to_2012 = _read_json(mappings / "pytorch_to_imagenet_2012_id.json")
    lines = require_file(mappings / "imagenet_to_label_2012_v2", "objectnet mappings").read_text().splitlines()
    index_of_2012_id = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    imagenet_index = {name.strip(): index_of_2012_id[i] for i, name in enumerate(lines) if i in index_of_2012_id}
    label_to_folder = {label: name for name, label in folder_to_label.items()}
    groups: dict[str, list[int]] = {}
    for label, names in objectnet_to_imagenet.items():
        if label not in label_to_folder:
            raise DataError(f"{mappings}: ObjectNet class '{label}' has no folder in folder_to_objectnet_label.json")
        indices = []
        for name in names.split(";"):
            if name.strip() not in imagenet_index:
                raise DataError(f"{mappings}: ImageNet class '{name.strip()}' not in imagenet_to_label_2012_v2")
            indices.append(imagenet_index[name.strip()])
        bad = [i for i in indices if i >= len(wnids)]
        if bad:
            raise DataError(f"{mappings}: ImageNet class {bad[0]} is outside the train split's {len(wnids)} classes")
        groups[label_to_folder[label]] = sorted(set(indices))
    folders = sorted(groups)
    samples = folder_samples(images, {name: i for i, name in enumerate(folders)}, "objectnet", skip_unknown=True)
    names = [folder_to_label[name] for name in folders]
    split = make_split(samples, data_config, "ood_objectnet", images, border=OBJECTNET_BORDER)
    return declare(split, max_over_groups([groups[name] for name in folders])), names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(require_file(path, "mapping file").read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def load_shift(shift: str, folder: Path, wnids: list[str], data_config: dict[str, Any]) -> tuple[Any, list[str]]:
    """One shifted test set as a split with its class space, and its own class names (for reports)."""
    name = f"ood_{shift}"
    if shift == "imagenet_v2":
        labels = {str(i): i for i in range(len(wnids))}
        return make_split(folder_samples(folder, labels, "imagenet_v2"), data_config, name, folder), wnids
    if shift == "imagenet_sketch":
        labels = {wnid: i for i, wnid in enumerate(wnids)}
        return make_split(folder_samples(folder, labels, "imagenet_sketch"), data_config, name, folder), wnids
    if shift in ("imagenet_a", "imagenet_r"):
        found, indices = _wnid_subset(folder, wnids, shift)
        samples = folder_samples(folder, {wnid: i for i, wnid in enumerate(found)}, shift)
        return declare(make_split(samples, data_config, name, folder), subset(indices)), found
    return _objectnet(folder, wnids, data_config)


@register_protocol("imagenet", ImageNetOptions, imagenet_class_names)
def load_imagenet(root: Path, options: ImageNetOptions, data_config: dict[str, Any], data: DataConfig):
    """ImageNet-1k (train, val as id_test) with ImageNet-V2, -Sketch, -A, -R and ObjectNet as ood_ splits."""
    paths = _paths(root, options)
    wnids = imagenet_wnids(root, options)
    labels = {wnid: i for i, wnid in enumerate(wnids)}
    train_samples = folder_samples(paths["train"], labels, "imagenet train")
    splits: dict[str, Any] = {}
    if options.id_val_fraction > 0:
        kept, held_out = holdout_split(len(train_samples), options.id_val_fraction, seed_hash(options.id_val_seed))
        splits["train"] = make_split(
            [train_samples[i] for i in kept.tolist()],
            data_config,
            "train",
            paths["train"],
            train=True,
            augment=data.augment,
        )
        splits["id_val"] = make_split(
            [train_samples[i] for i in held_out.tolist()], data_config, "id_val", paths["train"]
        )
    else:
        splits["train"] = make_split(
            train_samples, data_config, "train", paths["train"], train=True, augment=data.augment
        )
    val_samples = folder_samples(paths["val"], labels, "imagenet val")
    splits["id_test"] = make_split(val_samples, data_config, "id_test", paths["val"])
    for shift in options.shifts:
        splits[f"ood_{shift}"], _ = load_shift(shift, paths[shift], wnids, data_config)
    return splits, head_class_names(wnids, options.class_names)
