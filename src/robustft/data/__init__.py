"""Data: the built-in benchmark, image folders, CSV manifests, and the loaders the engine uses."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from robustft.config import DataConfig
from robustft.data.tensor_split import TensorSplit
from robustft.errors import DataError

# Loader workers per process when ``data.num_workers`` is left to auto on on-disk data: enough to decode and
# augment ahead of a GPU, one core left for the main process.
MAX_AUTO_WORKERS = 8


def is_in_memory(dataset: Dataset) -> bool:
    """A split already held as tensors (batched by indexing): loader workers would only copy it."""
    return bool(getattr(dataset, "supports_batch_indexing", False))


def auto_num_workers(splits: dict[str, Dataset], cpu_count: int | None = None) -> int:
    """``data.num_workers: auto``: 0 when every split is in memory, else the CPU count less one (at most 8)."""
    if all(is_in_memory(split) for split in splits.values()):
        return 0
    cpus = cpu_count if cpu_count is not None else len(os.sched_getaffinity(0))
    return max(0, min(MAX_AUTO_WORKERS, cpus - 1))


def _loader(
    dataset: Dataset,
    order: list[int],
    batch_size: int,
    num_workers: int,
    batches: list[list[int]] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over a fixed order (or given ``batches``). It gets its own generator: a DataLoader otherwise
    draws its worker seed from the global RNG each time it is iterated, which would shift dropout / mixout
    masks after a mid-epoch resume. ``pin_memory`` (for a CUDA device) makes the host-to-device copies
    asynchronous; workers prefetch two batches each."""
    batches = BatchSampler(order, batch_size, drop_last=False) if batches is None else batches
    generator = torch.Generator().manual_seed(len(order))
    options: dict[str, Any] = {"num_workers": num_workers, "generator": generator, "pin_memory": pin_memory}
    if num_workers > 0:
        options["prefetch_factor"] = 2
    if is_in_memory(dataset):
        return DataLoader(dataset, sampler=batches, batch_size=None, **options)
    return DataLoader(dataset, batch_sampler=batches, **options)


# Evaluation loaders kept with their workers alive (``persistent``), by (dataset id, batch size, workers, pin).
_PERSISTENT: dict[tuple[int, int, int, bool], tuple[Dataset, DataLoader]] = {}


def sequential_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False, persistent: bool = False
) -> DataLoader:
    """Batches in index order. ``persistent`` with workers: one loader per split whose worker processes stay
    alive between iterations (``persistent_workers``), so the many scorings of one split in a comparison
    (every method, every WiSE-FT alpha) do not start ``num_workers`` processes each time."""
    if not persistent or num_workers == 0:
        return _loader(dataset, list(range(len(dataset))), batch_size, num_workers, pin_memory=pin_memory)
    key = (id(dataset), batch_size, num_workers, pin_memory)
    if key not in _PERSISTENT:
        batches = BatchSampler(list(range(len(dataset))), batch_size, drop_last=False)
        options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": True}
        options["generator"] = torch.Generator().manual_seed(len(dataset))  # the global RNG is not drawn from
        if is_in_memory(dataset):
            loader = DataLoader(dataset, sampler=batches, batch_size=None, **options)
        else:
            loader = DataLoader(dataset, batch_sampler=batches, **options)
        _PERSISTENT[key] = (dataset, loader)  # the dataset is held, so its id is not reused
    return _PERSISTENT[key][1]


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a permutation fixed by (seed, epoch), so resume can replay it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def training_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of one epoch from ``start_batch`` on (the data position a checkpoint stores).

    With ``world_size`` > 1 every rank walks the same seeded order in global batches of ``batch_size``
    and loads only its contiguous slice of each (``robustft.distributed.shard_batches``), so N ranks
    together see exactly the batches one process would.
    """
    order = epoch_order(len(dataset), seed, epoch)[start_batch * batch_size :]
    if world_size == 1:
        return _loader(dataset, order, batch_size, num_workers, pin_memory=pin_memory)
    from robustft.distributed import shard_batches

    batches = shard_batches(order, batch_size, rank, world_size)
    return _loader(dataset, order, batch_size, num_workers, batches=batches, pin_memory=pin_memory)


def load_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    """Named splits (train, id_val, id_test, ood_*) and the class names, for a backbone's data config.

    Splits whose image or class counts differ from ``data.expected`` are refused (``DataError``) unless
    ``data.allow_count_mismatch`` (robustft.data.integrity).
    """
    from robustft.data.integrity import verify_counts

    splits, class_names = _load_configured_splits(config, data_config)
    verify_counts(splits, config.expected, config.allow_count_mismatch)
    return splits, class_names


def _load_configured_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    if config.protocol is not None:
        from robustft.data.protocols import load_protocol_splits

        return load_protocol_splits(config, data_config)
    if config.domains is not None:
        from robustft.data.domainbed import load_domain_splits

        return load_domain_splits(config, data_config)
    if config.benchmark == "digits_shift":
        from robustft.data import digits_shift
        from robustft.data.generated_cache import cached_tensors

        packages = ("scikit-learn", "matplotlib", "pillow")  # the scans, the fonts, their rendering
        raw = cached_tensors(digits_shift.build_splits, packages)()  # generated once per version of them
        splits = {name: TensorSplit(x, y, data_config, name) for name, (x, y) in raw.items()}
        return splits, list(digits_shift.CLASS_NAMES)
    if config.benchmark == "glyphs_shift":
        return _glyphs_shift_splits(config, data_config)
    from robustft.data.folders import load_image_splits

    return load_image_splits(
        config.splits, config.root, config.class_names, data_config, config.augment, on_bad_image=config.on_bad_image
    )


def resolve_class_names(config: DataConfig) -> list[str]:
    """Class names before any model exists (zero-shot heads need them)."""
    if config.protocol is not None:
        from robustft.data.protocols import protocol_class_names

        return protocol_class_names(config)
    if config.domains is not None:
        from robustft.data.domainbed import domain_class_names

        return domain_class_names(config)
    if config.benchmark == "digits_shift":
        from robustft.data.digits_shift import CLASS_NAMES

        return list(CLASS_NAMES)
    if config.benchmark == "glyphs_shift":
        from robustft.data.glyphs_shift import benchmark_class_names

        return benchmark_class_names(config.base_to_new, config.base_classes)
    from robustft.data.folders import resolve_class_names as from_folder

    if "train" not in config.splits:
        raise DataError("data.splits: missing required split 'train'")
    root = config.root
    first = config.splits["train"] if root is None else root / config.splits["train"]
    return from_folder(config.class_names, first)


def _glyphs_shift_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    """The built-in CLIP benchmark; under ``data.base_to_new`` CoOp's base / new splits with their class spaces."""
    from robustft.class_spaces import declare, subset
    from robustft.data import glyphs_shift

    class_names = glyphs_shift.benchmark_class_names(config.base_to_new, config.base_classes)
    raw = glyphs_shift.build_splits(sizes=config.split_sizes)
    if not config.base_to_new:
        return {name: TensorSplit(x, y, data_config, name) for name, (x, y) in raw.items()}, class_names
    raw, num_base, num_classes = glyphs_shift.base_to_new_splits(raw, config.base_classes)
    splits = {name: TensorSplit(x, y, data_config, name) for name, (x, y) in raw.items()}
    for name in ("train", "id_val", "id_test"):
        declare(splits[name], subset(range(num_base)))
    declare(splits["ood_new"], subset(range(num_base, num_classes)))
    splits["id_test"].report_as = "base"
    splits["ood_new"].report_as = "new"
    return splits, class_names
