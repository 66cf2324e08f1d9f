"""The DomainBed protocol (Gulrajani & Lopez-Paz 2021): leave-one-domain-out splits of a multi-domain dataset.

A multi-domain dataset is the built-in ``digits_domains`` benchmark or a folder per domain with a
folder per class inside (``root/<domain>/<class>/*.png``, DomainBed's layout). One run of the protocol
holds one domain out and splits every other ("training") domain into two parts with a permutation
seeded by (trial, domain), as DomainBed's ``split_dataset(env, int(len(env) * holdout_fraction),
seed_hash(trial_seed, env))``. The run's splits are:

- ``train``: the union of the kept (1 - holdout_fraction) parts of the training domains;
- ``id_val``: the union of their held-out parts. This is DomainBed's "training-domain validation set",
  the only data model selection may look at;
- ``id_test``: the same images as ``id_val``. DomainBed has no in-distribution test set; the alias
  exists because every robustft run reports an ``id`` score, and that score here is the validation
  accuracy, not a test accuracy;
- ``ood_<domain>``: every image of the held-out domain (DomainBed scores the 80% "in" part of the test
  domain; both parts are unseen, so all of it is used).

No image of the held-out domain is in ``train`` or ``id_val`` (tests/test_domainbed.py checks this on
indices, paths and image hashes). The trial changes the split, and the runner (robustft.domainbed)
also uses it to change the training seed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from robustft.config import DataConfig
from robustft.data.tensor_split import TensorSplit
from robustft.errors import DataError

_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def ood_split_name(domain: str) -> str:
    """The split that holds the held-out ``domain``: ``ood_<domain>``."""
    return f"ood_{domain}"


def seed_hash(*parts: Any) -> int:
    """A seed from any values, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.md5(repr(parts).encode()).hexdigest()
    return int(digest[:8], 16)


def holdout_split(num_samples: int, holdout_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held-out) indices of ``range(num_samples)``: the first ``int(n * holdout_fraction)`` of a
    seeded permutation are held out, as DomainBed's ``misc.split_dataset``. Both are sorted."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    held_out = int(num_samples * holdout_fraction)
    return order[held_out:].sort().values, order[:held_out].sort().values


@dataclass(frozen=True)
class DomainSplit:
    """Which images of which domain go where in one (held-out domain, trial) run; indices per domain."""

    test_domain: str
    train: dict[str, Tensor]
    id_val: dict[str, Tensor]

    @property
    def training_domains(self) -> list[str]:
        return list(self.train)


def leave_one_domain_out(
    domain_sizes: Mapping[str, int], test_domain: str, trial: int, holdout_fraction: float = 0.2
) -> DomainSplit:
    """Hold ``test_domain`` out; split every other domain into train / id_val, seeded by (trial, domain).

    Seeding by the domain's name, not its position, keeps a domain's split the same whichever domain
    is held out, as DomainBed seeds by (trial_seed, env index) over a fixed env list.
    """
    if test_domain not in domain_sizes:
        raise DataError(
            f"data.domains.test_domain: unknown domain '{test_domain}' (domains: {', '.join(domain_sizes)})"
        )
    if len(domain_sizes) < 2:
        raise DataError(f"leave-one-domain-out needs at least 2 domains, got {', '.join(domain_sizes)}")
    train, id_val = {}, {}
    for domain, size in domain_sizes.items():
        if domain == test_domain:
            continue
        kept, held_out = holdout_split(size, holdout_fraction, seed_hash(trial, domain))
        if len(kept) == 0 or len(held_out) == 0:
            raise DataError(
                f"domain '{domain}': {size} images cannot be split with holdout_fraction {holdout_fraction}"
            )
        train[domain], id_val[domain] = kept, held_out
    return DomainSplit(test_domain, train, id_val)


# ------------------------------------------------------------------------------------------ folders


def _domain_folders(root: Path) -> dict[str, Path]:
    from robustft.data.folders import _subfolders

    if not root.is_dir():
        raise DataError(f"data.root: '{root}' is not a folder (expected root/<domain>/<class>/<image>)")
    folders = {folder.name: folder for folder in _subfolders(root)}
    if len(folders) < 2:
        raise DataError(f"{root}: found {len(folders)} domain folder(s); leave-one-domain-out needs at least 2")
    for name, folder in folders.items():
        if not _DOMAIN_NAME.fullmatch(name):
            raise DataError(f"{folder}: domain name '{name}' must be letters, digits, '_' or '-' (it names a split)")
    return folders


def _folder_class_names(folders: Mapping[str, Path], spec: Sequence[str] | str | None) -> list[str]:
    """The classes of every domain: ``spec`` if given, else the class folders, which must match across domains."""
    from robustft.data.folders import _subfolders, resolve_class_names

    first_domain, first_folder = next(iter(folders.items()))
    if spec is not None:
        return resolve_class_names(spec, first_folder)
    names = resolve_class_names(None, first_folder)
    for domain, folder in folders.items():
        found = [p.name for p in _subfolders(folder)]
        missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
        differences = [
            f"{kind} {', '.join(items)}" for kind, items in (("missing", missing), ("extra", extra)) if items
        ]
        if differences:
            what = "; ".join(differences)
            raise DataError(f"{folder}: domain '{domain}' has other classes than '{first_domain}' ({what})")
    return names


def list_domains(config: DataConfig) -> list[str]:
    """The domains of the configured multi-domain dataset, in a fixed order (built-in order, or sorted folders)."""
    if config.benchmark == "digits_domains":
        from robustft.data.digits_domains import DOMAINS

        return list(DOMAINS)
    if config.root is None:
        raise DataError("data.root: needed for domain folders (root/<domain>/<class>/)")
    return list(_domain_folders(Path(config.root).expanduser()))


def domain_class_names(config: DataConfig) -> list[str]:
    """Class names of a multi-domain dataset before any model exists (zero-shot heads need them)."""
    if config.benchmark == "digits_domains":
        from robustft.data.digits_domains import CLASS_NAMES

        return list(CLASS_NAMES)
    return _folder_class_names(_domain_folders(Path(config.root).expanduser()), config.class_names)


def load_domain_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    """The splits of one leave-one-domain-out run (see the module docstring) and the class names."""
    if config.domains is None:
        raise DataError("data.domains: not set; nothing to hold out")
    if config.benchmark == "digits_domains":
        return _builtin_splits(config, data_config)
    return _folder_splits(config, data_config)


def _assemble(
    split: DomainSplit, make: Callable[[str, dict[str, Tensor]], Dataset], held_out: Dataset
) -> dict[str, Dataset]:
    """train, id_val, id_test (the id_val object itself, see the module docstring) and ood_<held-out domain>."""
    id_val = make("id_val", split.id_val)
    return {
        "train": make("train", split.train),
        "id_val": id_val,
        "id_test": id_val,
        ood_split_name(split.test_domain): held_out,
    }


def _builtin_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    from robustft.data.digits_domains import CLASS_NAMES, build_domains

    domains = build_domains()
    options = config.domains
    split = leave_one_domain_out(
        {name: len(labels) for name, (_, labels) in domains.items()},
        options.test_domain,
        options.trial,
        options.holdout_fraction,
    )

    def make(name: str, parts: dict[str, Tensor]) -> TensorSplit:
        images = torch.cat([domains[domain][0][index] for domain, index in parts.items()])
        labels = torch.cat([domains[domain][1][index] for domain, index in parts.items()])
        return TensorSplit(images, labels, data_config, name)

    test_images, test_labels = domains[split.test_domain]
    ood = TensorSplit(test_images, test_labels, data_config, ood_split_name(split.test_domain))
    return _assemble(split, make, ood), list(CLASS_NAMES)


def _folder_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[dict[str, Dataset], list[str]]:
    from robustft.data.folders import ImageSplit, read_image_folder
    from robustft.data.transforms import build_transform

    root = Path(config.root).expanduser()
    folders = _domain_folders(root)
    class_names = _folder_class_names(folders, config.class_names)
    samples = {}
    for domain, folder in folders.items():
        found = read_image_folder(folder, class_names)
        if not found:
            raise DataError(f"{folder}: domain '{domain}' has no images")
        samples[domain] = [(path, label, domain) for path, label, _ in found]
    options = config.domains
    split = leave_one_domain_out(
        {domain: len(items) for domain, items in samples.items()},
        options.test_domain,
        options.trial,
        options.holdout_fraction,
    )

    def make(name: str, parts: dict[str, Tensor]) -> ImageSplit:
        chosen = [samples[domain][i] for domain, index in parts.items() for i in index.tolist()]
        transform = build_transform(data_config, train=name == "train", augment=config.augment)
        return ImageSplit(chosen, transform, name=name, source=root)

    eval_transform = build_transform(data_config, train=False)
    test_name = ood_split_name(split.test_domain)
    ood = ImageSplit(samples[split.test_domain], eval_transform, name=test_name, source=folders[split.test_domain])
    return _assemble(split, make, ood), class_names
