"""Any class-folder dataset with user-named OOD splits, and its generated -C corruptions.

Layout under ``root``: ``<train>/<class>/*``, ``<id_test>/<class>/*``, optionally ``<id_val>/<class>/*``,
one folder per named OOD split (``ood: {sketch: sketches}`` -> split ``ood_sketch``), and optionally
a corruption tree written by ``robustft.data.protocols.corruptions.generate_corruptions``
(``<corrupted>/<corruption>/<severity>/<class>/*.png`` -> splits ``ood_<corruption>_<severity>``).
Class names are the train folder's sorted subfolders (or ``class_names``); every split is labelled
against them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field

from robustft.config import DataConfig, StrictModel
from robustft.data.protocols import make_split, register_protocol, require_dir, subfolders
from robustft.errors import DataError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ImageFolderOptions(StrictModel):
    """Options of the ``image_folder`` protocol."""

    train: str = Field("train", description="training folder, relative to root")
    id_val: str | None = Field(None, description="in-distribution validation folder (optional)")
    id_test: str = Field("test", description="in-distribution test folder")
    ood: dict[str, str] = Field(default_factory=dict, description="OOD split name -> folder (split ood_<name>)")
    corrupted: str | None = Field(None, description="a generate_corruptions output folder: ood_<corruption>_<sev>")
    class_names: list[str] | str | None = Field(None, description="list or text file; default: train subfolders")


def folder_class_names(root: Path, options: ImageFolderOptions) -> list[str]:
    from robustft.data.folders import resolve_class_names

    return resolve_class_names(options.class_names, require_dir(root / options.train, "image_folder train"))


def _split(folder: Path, names: list[str], data_config: dict[str, Any], name: str, data: DataConfig, train=False):
    from robustft.data.folders import read_image_folder

    samples = read_image_folder(require_dir(folder, f"split '{name}'"), names)
    return make_split(samples, data_config, name, folder, train=train, augment=data.augment)


@register_protocol("image_folder", ImageFolderOptions, folder_class_names)
def load_image_folder(root: Path, options: ImageFolderOptions, data_config: dict[str, Any], data: DataConfig):
    """Class folders for train / id_val / id_test, user-named OOD folders and generated -C corruptions."""
    names = folder_class_names(root, options)
    splits = {"train": _split(root / options.train, names, data_config, "train", data, train=True)}
    if options.id_val is not None:
        splits["id_val"] = _split(root / options.id_val, names, data_config, "id_val", data)
    splits["id_test"] = _split(root / options.id_test, names, data_config, "id_test", data)
    for ood_name, folder in options.ood.items():
        if not _NAME.fullmatch(ood_name):
            raise DataError(f"data.protocol.options.ood: split name '{ood_name}' must be letters, digits, _ or -")
        splits[f"ood_{ood_name}"] = _split(root / folder, names, data_config, f"ood_{ood_name}", data)
    if options.corrupted is not None:
        tree = require_dir(root / options.corrupted, "corrupted")
        for corruption in subfolders(tree):
            for severity in subfolders(corruption):
                name = f"ood_{corruption.name}_{severity.name}"
                splits[name] = _split(severity, names, data_config, name, data)
    return splits, names
