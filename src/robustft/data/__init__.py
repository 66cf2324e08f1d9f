"""Data: the built-in benchmark, image folders, CSV manifests, and the loaders the engine uses."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from robustft.config import DataConfig
from robustft.data.tensor_split import TensorSplit
from robustft.errors import DataError


def _loader(dataset: Dataset, order: list[int], batch_size: int, num_workers: int) -> DataLoader:
    """A loader over a fixed order. It gets its own generator: a DataLoader otherwise draws its worker
    seed from the global RNG each time it is iterated, which would shift dropout / mixout masks after a
    mid-epoch resume."""
    batches = BatchSampler(order, batch_size, drop_last=False)
    generator = torch.Generator().manual_seed(len(order))
    if getattr(dataset, "supports_batch_indexing", False):
        return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers, generator=generator)
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=generator)


def sequential_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return _loader(dataset, list(range(len(dataset))), batch_size, num_workers)


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a permutation fixed by (seed, epoch), so resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def training_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, start_batch: int = 0, num_workers: int = 0
) -> DataLoader:
    """Batches of one epoch from ``start_batch`` on (the data position a checkpoint stores)."""
    order = epoch_order(len(dataset), seed, epoch)[start_batch * batch_size :]
    return _loader(dataset, order, batch_size, num_workers)


def load_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    """Named splits (train, id_val, id_test, ood_*) and the class names, for a backbone's data config."""
    if config.benchmark == "digits_shift":
        from robustft.data import digits_shift

        raw = digits_shift.build_splits()
        splits = {name: TensorSplit(x, y, data_config, name) for name, (x, y) in raw.items()}
        return splits, list(digits_shift.CLASS_NAMES)
    from robustft.data.folders import load_image_splits

    return load_image_splits(config.splits, config.root, config.class_names, data_config, config.augment)


def resolve_class_names(config: DataConfig) -> list[str]:
    """Class names before any model exists (zero-shot heads need them)."""
    if config.benchmark == "digits_shift":
        from robustft.data.digits_shift import CLASS_NAMES

        return list(CLASS_NAMES)
    from robustft.data.folders import resolve_class_names as from_folder

    if "train" not in config.splits:
        raise DataError("data.splits: missing required split 'train'")
    root = config.root
    first = config.splits["train"] if root is None else root / config.splits["train"]
    return from_folder(config.class_names, first)
