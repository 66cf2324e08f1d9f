"""ImageNet-LT (Liu et al. 2019): a long-tailed ImageNet subset scored per many / medium / few-shot bucket.

Layout under ``root``: the ImageNet images (``train/<wnid>/*``, ``val/<wnid>/*``) and the published list
files ``ImageNet_LT_train.txt``, ``ImageNet_LT_val.txt``, ``ImageNet_LT_test.txt``, one
``<relative image path> <label>`` per line (the test list points into ImageNet val).

Buckets follow the *training* counts of each class, as in OLTR and Decoupling (Kang et al. 2020):
many-shot > 100 training images, few-shot < 20, medium-shot the rest. The evaluator reports accuracy
over the test images of each bucket's classes (``bucket_many`` ...), predicting over all classes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from robustft.class_spaces import declare
from robustft.config import DataConfig, StrictModel
from robustft.data.protocols import make_split, register_protocol, require_file
from robustft.data.protocols.imagenet import head_class_names
from robustft.errors import DataError


class ImageNetLTOptions(StrictModel):
    """Options of the ``imagenet_lt`` protocol."""

    train_list: str = Field("ImageNet_LT_train.txt", description="train list file, relative to root")
    val_list: str | None = Field("ImageNet_LT_val.txt", description="id_val list file (None: no id_val)")
    test_list: str = Field("ImageNet_LT_test.txt", description="id_test list file")
    images: str = Field(".", description="folder the listed paths are relative to, relative to root")
    many_above: int = Field(100, ge=0, description="many-shot: more than this many training images")
    few_below: int = Field(20, ge=1, description="few-shot: fewer than this many training images")
    class_names: Literal["auto", "clip", "wnids"] = Field("auto", description="as the imagenet protocol")


def read_list(path: Path) -> list[tuple[str, int]]:
    """``(relative path, label)`` pairs of a list file; a malformed line is a DataError naming it."""
    entries = []
    for number, line in enumerate(require_file(path, "list file").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise DataError(f"{path}:{number}: expected '<image path> <label>', got {line.strip()!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise DataError(f"{path}: no entries")
    return entries


def long_tail_buckets(train_labels: list[int], num_classes: int, many_above: int = 100, few_below: int = 20):
    """Class indices per bucket from the training counts: many (> many_above), few (< few_below), medium."""
    counts = Counter(train_labels)
    buckets: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for label in range(num_classes):
        count = counts.get(label, 0)
        key = "many" if count > many_above else "few" if count < few_below else "medium"
        buckets[key].append(label)
    return buckets


def _wnids(entries: list[tuple[str, int]], path: Path) -> list[str]:
    """The wnid folder of each label (the image's parent folder), one per label 0..C-1."""
    wnid_of: dict[int, str] = {}
    for relative, label in entries:
        wnid_of.setdefault(label, Path(relative).parent.name)
    missing = [label for label in range(max(wnid_of) + 1) if label not in wnid_of]
    if missing:
        raise DataError(f"{path}: label {missing[0]} has no training image")
    return [wnid_of[label] for label in range(len(wnid_of))]


def lt_class_names(root: Path, options: ImageNetLTOptions) -> list[str]:
    path = root / options.train_list
    return head_class_names(_wnids(read_list(path), path), options.class_names)


def _samples(entries, base: Path, path: Path, num_classes: int):
    samples = []
    for relative, label in entries:
        image = base / relative
        if label >= num_classes:
            raise DataError(f"{path}: label {label} outside the {num_classes} training classes")
        if not image.is_file():
            raise DataError(f"{path}: listed image '{image}' not found")
        samples.append((image, label, None))
    return samples


@register_protocol("imagenet_lt", ImageNetLTOptions, lt_class_names)
def load_imagenet_lt(root: Path, options: ImageNetLTOptions, data_config: dict[str, Any], data: DataConfig):
    """ImageNet-LT train / val / test lists; id_val and id_test report many / medium / few-shot accuracy."""
    base = root / options.images
    train_path = root / options.train_list
    train_entries = read_list(train_path)
    wnids = _wnids(train_entries, train_path)
    buckets = long_tail_buckets(
        [label for _, label in train_entries], len(wnids), options.many_above, options.few_below
    )
    splits = {
        "train": make_split(
            _samples(train_entries, base, train_path, len(wnids)),
            data_config,
            "train",
            train_path,
            train=True,
            augment=data.augment,
        )
    }
    for name, list_file in (("id_val", options.val_list), ("id_test", options.test_list)):
        if list_file is None:
            continue
        path = root / list_file
        split = make_split(_samples(read_list(path), base, path, len(wnids)), data_config, name, path)
        splits[name] = declare(split, buckets=buckets)
    return splits, head_class_names(wnids, options.class_names)
