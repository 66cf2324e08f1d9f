"""DomainNet (Peng et al. 2019): train on one domain, test on others (GMixout's sketch-to-rest setting).

Layout under ``root``: one folder per domain with a folder per class (``sketch/<class>/*.jpg``, ...) and,
optionally, the published split lists ``<domain>_train.txt`` / ``<domain>_test.txt`` (lines
``sketch/aircraft_carrier/sketch_001_000001.jpg 0``). With the lists (default when present), ``train``
is the training domain's train list, ``id_test`` its test list and ``ood_<domain>`` each test domain's
test list; without them whole folders are used (``id_test`` then needs ``id_test_fraction``).

The default is the setting of GMixout's DomainNet table (its seed-000 runs): train on Sketch, test on
Real, Painting and Clipart. Labels come from the class folder in each path, against the sorted class
folders of the training domain, so a list file's own label column is not trusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from robustft.config import DataConfig, StrictModel
from robustft.data.domainbed import holdout_split, seed_hash
from robustft.data.protocols import (
    display_name,
    folder_samples,
    make_split,
    register_protocol,
    require_dir,
    subfolders,
)
from robustft.data.protocols.imagenet_lt import read_list
from robustft.errors import DataError


class DomainNetOptions(StrictModel):
    """Options of the ``domainnet`` protocol."""

    train_domain: str = Field("sketch", description="the domain trained on (and its test list is id_test)")
    test_domains: list[str] = Field(["real", "painting", "clipart"], description="ood_<domain> splits")
    split_files: bool | None = Field(None, description="use <domain>_train/test.txt; None: when present")
    id_test_fraction: float = Field(0.2, gt=0, lt=1, description="without split files: share of train for id_test")
    seed: int = Field(0, description="seeds the hold-out without split files")


def _class_folders(root: Path, options: DomainNetOptions) -> list[str]:
    return [folder.name for folder in subfolders(require_dir(root / options.train_domain, "domainnet train domain"))]


def domainnet_class_names(root: Path, options: DomainNetOptions) -> list[str]:
    return [display_name(name) for name in _class_folders(root, options)]


def _listed(root: Path, domain: str, part: str, labels: dict[str, int]) -> list:
    path = root / f"{domain}_{part}.txt"
    samples = []
    for relative, _ in read_list(path):
        image = root / relative
        folder = image.parent.name
        if folder not in labels:
            raise DataError(f"{path}: class folder '{folder}' of '{relative}' is not a {domain} training class")
        if not image.is_file():
            raise DataError(f"{path}: listed image '{image}' not found")
        samples.append((image, labels[folder], None))
    return samples


@register_protocol("domainnet", DomainNetOptions, domainnet_class_names)
def load_domainnet(root: Path, options: DomainNetOptions, data_config: dict[str, Any], data: DataConfig):
    """DomainNet: train on one domain's folder, test on its own test list and on other domains (ood_<domain>)."""
    folders = _class_folders(root, options)
    labels = {name: i for i, name in enumerate(folders)}
    for domain in options.test_domains:
        require_dir(root / domain, f"domainnet test domain '{domain}'")
    use_files = options.split_files
    if use_files is None:
        use_files = (root / f"{options.train_domain}_train.txt").is_file()
    train_folder = root / options.train_domain
    if use_files:
        train = _listed(root, options.train_domain, "train", labels)
        test = _listed(root, options.train_domain, "test", labels)
    else:
        everything = folder_samples(train_folder, labels, "domainnet")
        kept, held = holdout_split(len(everything), options.id_test_fraction, seed_hash(options.seed, "domainnet"))
        train, test = [everything[i] for i in kept.tolist()], [everything[i] for i in held.tolist()]
    splits = {
        "train": make_split(train, data_config, "train", train_folder, train=True, augment=data.augment),
        "id_test": make_split(test, data_config, "id_test", train_folder),
    }
    for domain in options.test_domains:
        name = f"ood_{domain}"
        samples = _listed(root, domain, "test", labels) if use_files else folder_samples(root / domain, labels, domain)
        splits[name] = make_split(samples, data_config, name, root / domain)
    return splits, [display_name(name) for name in folders]
