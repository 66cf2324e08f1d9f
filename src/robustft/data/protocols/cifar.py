"""CIFAR-10 / CIFAR-100 with CIFAR-10.1 and CIFAR-10-C / CIFAR-100-C, from the published files.

Layout under ``root`` (each folder renamable with ``options.paths``)::

    cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta    (cifar10; the python version)
    cifar-100-python/train, test, meta                               (cifar100)
    CIFAR-10.1/cifar10.1_v6_data.npy, cifar10.1_v6_labels.npy       (Recht et al. 2018; cifar10 only)
    CIFAR-10-C/<corruption>.npy, labels.npy                          (Hendrycks & Dietterich 2019)
    CIFAR-100-C/<corruption>.npy, labels.npy

A ``<corruption>.npy`` holds 50000 uint8 images ``[N, 32, 32, 3]``: the 10000 test images at
severity 1, then 2, ... 5; ``labels.npy`` holds their 50000 labels. Each (corruption, severity) is a
split ``ood_c_<corruption>_<severity>``, memory-mapped so 95 splits do not fill the RAM.

The python batches are pickles; they are read with an unpickler that only rebuilds numpy arrays,
so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from robustft.config import DataConfig, StrictModel
from robustft.data.domainbed import holdout_split, seed_hash
from robustft.data.protocols import display_name, register_protocol, require_dir, require_file
from robustft.data.tensor_split import TensorSplit
from robustft.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()  # noqa: SIM905
)
C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
C_TEST_SIZE = 10_000
DEFAULT_PATHS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "cifar10_1": "CIFAR-10.1",
    "cifar10_c": "CIFAR-10-C",
    "cifar100_c": "CIFAR-100-C",
}


class CifarOptions(StrictModel):
    """Options of the ``cifar10`` and ``cifar100`` protocols."""

    shifts: list[Literal["cifar10_1", "c"]] | None = Field(
        None, description="ood sets: cifar10_1 (CIFAR-10 only) and c (the -C corruptions); default: all available"
    )
    corruptions: list[str] = Field(list(C_CORRUPTIONS), description="-C corruptions to load (the 19 by default)")
    severities: list[int] = Field([1, 2, 3, 4, 5], description="-C severities to load")
    paths: dict[str, str] = Field(default_factory=dict, description="folder per part, relative to root")
    id_val_fraction: float = Field(0.0, ge=0, lt=1, description="share of train held out as id_val; 0: none")
    id_val_seed: int = 0


class _NumpyOnly(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, Any]:
    """One CIFAR python batch (a pickled dict), rebuilding nothing but numpy arrays."""
    require_file(path, "cifar batch")
    try:
        with path.open("rb") as handle:
            return _NumpyOnly(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a CIFAR python batch ({error})") from None


def _images(batch: dict[str, Any], path: Path) -> Tensor:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' should be [N, 3072] uint8, got {data.shape}")
    return torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32))


class NpySplit(TensorSplit):
    """uint8 ``[N, H, W, 3]`` images of a memory-mapped .npy (or a slice of it), converted per batch.

    ``images`` is a tensor over the mapped file (copy-on-write, so nothing is read until indexed);
    ``robustft data check`` hashes it like an in-memory split."""

    def __init__(self, images: np.ndarray, labels: Tensor, data_config: dict[str, Any], name: str = "") -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise DataError(f"split '{name}': expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        super().__init__(torch.zeros(1, 3, *images.shape[1:3], dtype=torch.uint8), labels, data_config, name)
        self.images = torch.from_numpy(images)

    def __getitem__(self, index: int | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(index, int):
            return self._to_input(self.images[index : index + 1].permute(0, 3, 1, 2))[0], self.labels[index]
        index = torch.as_tensor(index, dtype=torch.long)
        return self._to_input(self.images[index].permute(0, 3, 1, 2)), self.labels[index]


def _load_npy(path: Path) -> np.ndarray:
    require_file(path, "npy file")
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: cannot read .npy ({error})") from None


def load_c_splits(
    folder: Path, corruptions: Sequence[str], severities: Sequence[int], num_classes: int, data_config: dict[str, Any]
) -> dict[str, NpySplit]:
    """``ood_c_<corruption>_<severity>`` splits of a CIFAR-10-C / CIFAR-100-C folder (see the module docstring)."""
    require_dir(folder, "-C corruptions")
    labels = torch.from_numpy(np.array(_load_npy(folder / "labels.npy"), dtype=np.int64))
    splits = {}
    for corruption in corruptions:
        images = _load_npy(folder / f"{corruption}.npy")
        if len(images) != len(labels) or len(images) % 5:
            raise DataError(f"{folder / corruption}.npy: {len(images)} images for {len(labels)} labels (5 severities)")
        size = len(images) // 5
        for severity in severities:
            if severity not in (1, 2, 3, 4, 5):
                raise DataError(f"data.protocol.options.severities: {severity} is not one of 1..5")
            rows = slice((severity - 1) * size, severity * size)
            name = f"ood_c_{corruption}_{severity}"
            splits[name] = NpySplit(images[rows], labels[rows], data_config, name)
    if int(labels.max()) >= num_classes:
        raise DataError(f"{folder / 'labels.npy'}: label {int(labels.max())} outside the {num_classes} classes")
    return splits


def _paths(root: Path, options: CifarOptions) -> dict[str, Path]:
    unknown = sorted(set(options.paths) - set(DEFAULT_PATHS))
    if unknown:
        raise DataError(f"data.protocol.options.paths: unknown part '{unknown[0]}' (known: {', '.join(DEFAULT_PATHS)})")
    return {part: root / options.paths.get(part, default) for part, default in DEFAULT_PATHS.items()}


def _train_test(variant: str, folder: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    require_dir(folder, variant)
    if variant == "cifar10":
        names, label_key = [f"data_batch_{i}" for i in range(1, 6)], "labels"
        test_name = "test_batch"
    else:
        names, label_key, test_name = ["train"], "fine_labels", "test"

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        batches = [(read_batch(folder / name), folder / name) for name in files]
        images = torch.cat([_images(batch, path) for batch, path in batches])
        labels = torch.cat([torch.as_tensor(batch[label_key], dtype=torch.long) for batch, _ in batches])
        return images, labels

    return read(names), read([test_name])


def _load(variant: str, root: Path, options: CifarOptions, data_config: dict[str, Any]):
    paths = _paths(root, options)
    class_names = [display_name(name) for name in (CIFAR10_CLASSES if variant == "cifar10" else CIFAR100_CLASSES)]
    (train_x, train_y), (test_x, test_y) = _train_test(variant, paths[variant])
    splits: dict[str, Any] = {}
    if options.id_val_fraction > 0:
        kept, held = holdout_split(len(train_y), options.id_val_fraction, seed_hash(options.id_val_seed))
        splits["train"] = TensorSplit(train_x[kept], train_y[kept], data_config, "train")
        splits["id_val"] = TensorSplit(train_x[held], train_y[held], data_config, "id_val")
    else:
        splits["train"] = TensorSplit(train_x, train_y, data_config, "train")
    splits["id_test"] = TensorSplit(test_x, test_y, data_config, "id_test")
    shifts = options.shifts
    c_folder = paths[f"{variant}_c"]
    if shifts is None:  # every shift whose folder is present
        shifts = [s for s, p in (("cifar10_1", paths["cifar10_1"]), ("c", c_folder)) if p.is_dir()]
        shifts = [s for s in shifts if s != "cifar10_1" or variant == "cifar10"]
    if "cifar10_1" in shifts:
        if variant != "cifar10":
            raise DataError("data.protocol.options.shifts: cifar10_1 is a CIFAR-10 test set, not CIFAR-100's")
        folder = require_dir(paths["cifar10_1"], "CIFAR-10.1")
        images = _load_npy(folder / "cifar10.1_v6_data.npy")
        labels = torch.from_numpy(np.array(_load_npy(folder / "cifar10.1_v6_labels.npy"), dtype=np.int64))
        splits["ood_cifar10_1"] = NpySplit(images, labels, data_config, "ood_cifar10_1")
    if "c" in shifts:
        splits |= load_c_splits(c_folder, options.corruptions, options.severities, len(class_names), data_config)
    return splits, class_names


def _names(variant: str):
    def class_names(root: Path, options: CifarOptions) -> list[str]:
        return [display_name(name) for name in (CIFAR10_CLASSES if variant == "cifar10" else CIFAR100_CLASSES)]

    return class_names


@register_protocol("cifar10", CifarOptions, _names("cifar10"))
def load_cifar10(root: Path, options: CifarOptions, data_config: dict[str, Any], data: DataConfig):
    """CIFAR-10 (python batches) with CIFAR-10.1 and CIFAR-10-C (19 corruptions x 5 severities) as ood_ splits."""
    return _load("cifar10", root, options, data_config)


@register_protocol("cifar100", CifarOptions, _names("cifar100"))
def load_cifar100(root: Path, options: CifarOptions, data_config: dict[str, Any], data: DataConfig):
    """CIFAR-100 (python batches) with CIFAR-100-C (19 corruptions x 5 severities) as ood_ splits."""
    return _load("cifar100", root, options, data_config)
