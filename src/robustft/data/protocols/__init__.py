"""Benchmark protocols over local copies: a registry of named suites (``data.protocol.name``).

Nothing can be downloaded at run time, so every protocol maps a local root, laid out as the dataset
is published, to named splits (``train``, ``id_val``, ``id_test``, ``ood_*``), the class names of the
model's head and, per split, a class space (robustft.class_spaces): the data never reshapes the head,
the evaluator maps logits. A protocol is a function ``load(root, options, data_config, data) ->
(splits, class_names)`` registered with its options model (unknown options are errors naming
``data.protocol.options.<key>``) and a ``class_names(root, options)`` function that reads only
metadata, because zero-shot heads are built before any image is listed.

Suites: ``imagenet`` (+ V2, Sketch, A, R, ObjectNet), ``cifar10`` / ``cifar100`` (+ CIFAR-10.1,
CIFAR-10-C / -100-C), ``image_folder`` (any class-folder tree, user-named OOD splits, generated -C
corruptions), ``imagenet_lt``, ``domainnet``, ``iwildcam``, ``coop`` (few-shot / base-to-new).
docs/bring_your_own.md shows each layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch.utils.data import Dataset

from robustft.config import DataConfig, StrictModel, format_validation_errors
from robustft.errors import ConfigError, DataError

Splits = dict[str, Dataset]
LoadFn = Callable[[Path, Any, dict[str, Any], DataConfig], tuple[Splits, list[str]]]
NamesFn = Callable[[Path, Any], list[str]]


@dataclass(frozen=True)
class Protocol:
    """One registered suite: its options model, its loader and its metadata-only class names."""

    name: str
    options: type[StrictModel]
    load: LoadFn
    class_names: NamesFn
    summary: str


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, options: type[StrictModel], class_names: NamesFn) -> Callable[[LoadFn], LoadFn]:
    """Register ``load`` under ``name`` (lower snake case, unique)."""

    def decorate(load: LoadFn) -> LoadFn:
        if name in _PROTOCOLS:
            raise ValueError(f"protocol '{name}' is already registered")
        summary = (load.__doc__ or "").strip().splitlines()[0] if load.__doc__ else ""
        _PROTOCOLS[name] = Protocol(name, options, load, class_names, summary)
        return load

    return decorate


def list_protocols() -> dict[str, str]:
    """Registered protocol names and their one-line summaries."""
    return {name: protocol.summary for name, protocol in sorted(_PROTOCOLS.items())}


def get_protocol(name: str) -> Protocol:
    if name not in _PROTOCOLS:
        raise ConfigError(f"data.protocol.name: unknown protocol '{name}' (known: {', '.join(sorted(_PROTOCOLS))})")
    return _PROTOCOLS[name]


def parse_options(protocol: Protocol, raw: dict[str, Any]) -> Any:
    try:
        return protocol.options(**raw)
    except ValidationError as error:
        raise ConfigError(format_validation_errors(error, prefix=("data", "protocol", "options"))) from None


def _root(config: DataConfig) -> Path:
    root = Path(config.protocol.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.protocol.root: '{root}' is not a folder")
    return root


def load_protocol_splits(config: DataConfig, data_config: dict[str, Any]) -> tuple[Splits, list[str]]:
    """The configured protocol's splits (with their class spaces) and the head's class names."""
    protocol = get_protocol(config.protocol.name)
    options = parse_options(protocol, config.protocol.options)
    return protocol.load(_root(config), options, data_config, config)


def protocol_class_names(config: DataConfig) -> list[str]:
    """The head's class names from metadata alone (no image is listed)."""
    protocol = get_protocol(config.protocol.name)
    return protocol.class_names(_root(config), parse_options(protocol, config.protocol.options))


# ------------------------------------------------------------------------------------------ helpers


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a one-line DataError naming what was expected there."""
    if not path.is_dir():
        raise DataError(f"{what}: expected folder '{path}' does not exist")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: expected file '{path}' does not exist")
    return path


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted so runs are reproducible."""
    from robustft.data.folders import _is_image

    return sorted(path for path in folder.rglob("*") if _is_image(path))


def subfolders(folder: Path) -> list[Path]:
    from robustft.data.folders import _subfolders

    return _subfolders(folder)


def folder_samples(folder: Path, labels: dict[str, int], what: str, skip_unknown: bool = False) -> list:
    """``(path, label, None)`` samples of ``folder/<class folder>/**/<image>``, labels from ``labels``."""
    samples = []
    for sub in subfolders(require_dir(folder, what)):
        if sub.name not in labels:
            if skip_unknown:
                continue
            raise DataError(f"{sub}: {what} folder '{sub.name}' is not one of the {len(labels)} known classes")
        samples.extend((path, labels[sub.name], None) for path in image_files(sub))
    return samples


def make_split(
    samples: Sequence[tuple[Path, int, str | None]],
    data_config: dict[str, Any],
    name: str,
    source: Path,
    train: bool = False,
    augment: bool = False,
    border: int = 0,
):
    """An ImageSplit (robustft.data.folders) over ``samples``; ``border`` pixels are cropped off every side first."""
    from robustft.data.folders import ImageSplit
    from robustft.data.transforms import build_transform

    if not samples:
        raise DataError(f"split '{name}' ({source}) has no images")
    transform = build_transform(data_config, train=train, augment=augment)
    if border:
        transform = BorderCrop(border, transform)
    return ImageSplit(samples, transform, name=name, source=source)


class BorderCrop:
    """Crop ``border`` pixels from every side, then ``transform`` (a class, so it pickles into workers).

    ObjectNet's images carry a thin frame; WiSE-FT and Model Soups crop 2 pixels before resizing."""

    def __init__(self, border: int, transform: Callable) -> None:
        self.border = border
        self.transform = transform

    def __call__(self, image):
        width, height = image.size
        return self.transform(image.crop((self.border, self.border, width - self.border, height - self.border)))


def display_name(folder_name: str) -> str:
    """A class folder name as a zero-shot prompt reads it: ``aircraft_carrier`` -> ``aircraft carrier``."""
    return folder_name.replace("_", " ").strip()


def _register_builtin() -> None:
    from robustft.data.protocols import (  # noqa: F401  (registration side effects)
        cifar,
        coop,
        domainnet,
        image_folder,
        imagenet,
        imagenet_lt,
        iwildcam,
    )


_register_builtin()
