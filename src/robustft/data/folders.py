"""Image datasets from the user's disk: class-subfolder trees and CSV manifests.

Robust fine-tuning is judged on several splits at once (in-distribution validation and test, and
one or more distribution-shifted ``ood_*`` sets), so every split is loaded against one shared list
of class names. Every problem the user can fix (a stray folder, an unknown label, a missing or
broken file) raises a one-line ``DataError``/``ConfigError`` that names the file and the value.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from robustft.data.transforms import build_transform
from robustft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

Sample = tuple[Path, int, str | None]

_OOD_SPLIT = re.compile(r"ood_[A-Za-z0-9][A-Za-z0-9_-]*")
_SPLIT_ORDER = ("train", "id_val", "id_test")
# What PIL raises for unreadable files: OSError (truncated, unidentified), SyntaxError (broken PNG
# chunks), ValueError (bad headers), DecompressionBombError (absurd sizes).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _open_image(path: Path) -> Image.Image:
    """Decode ``path`` fully, turning PIL's many exception types into one clear ``DataError``."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except _IMAGE_ERRORS as error:
        raise DataError(f"{path}: cannot read image ({_reason(error)})") from None


class ImageSplit(Dataset):
    """One split: image paths, label indices, optional domains and the split's transform.

    Labels are a ``LongTensor`` so evaluators can compute metrics without iterating the images;
    ``domains`` (from a CSV's ``domain`` column) lets them report per-domain and worst-group
    accuracy. ``__getitem__`` returns ``(image_tensor, label)``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Tensor],
        name: str = "",
        source: Path | None = None,
    ) -> None:
        self.paths: list[Path] = [path for path, _, _ in samples]
        self.labels: Tensor = torch.tensor([label for _, label, _ in samples], dtype=torch.long)
        domains = [domain for _, _, domain in samples]
        self.domains: list[str] | None = None if all(d is None for d in domains) else domains
        self.transform = transform
        self.name = name
        self.source = source
        self.skipped: list[Path] = []
        """Unreadable files dropped at load (``data.on_bad_image: skip``)."""

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(_open_image(self.paths[index])), int(self.labels[index])

    def __repr__(self) -> str:
        return f"ImageSplit(name={self.name!r}, source={str(self.source)!r}, images={len(self)})"


def check_images(split: ImageSplit) -> list[Path]:
    """The split's files that PIL cannot read, so a user can fix them all before a long run.

    ``verify()`` catches corrupted PNG chunks; a full decode catches truncated JPEGs, which
    ``verify()`` does not look at.
    """
    bad = []
    for path in split.paths:
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                image.load()
        except _IMAGE_ERRORS:
            bad.append(path)
    return bad


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(path: str | Path, class_names: Sequence[str]) -> list[Sample]:
    """Samples from ``path/<class name>/**/<image>``, sorted so runs are reproducible.

    A subfolder that is not a class name is an error rather than being skipped: it is usually a
    typo or a class missing from ``class_names``, and silently dropping it would skew accuracy.
    Classes without a folder are allowed (a shifted test set may cover only some classes).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    for folder in _subfolders(path):
        if folder.name not in index:
            raise DataError(f"{folder}: folder '{folder.name}' is not one of the {len(class_names)} classes")
        files = sorted(p for p in folder.rglob("*") if _is_image(p))
        samples.extend((file, index[folder.name], None) for file in files)
    return samples


def _open_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line number, row)`` pairs of a CSV file, blank lines skipped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read CSV ({_reason(error)})") from None
    if not header:
        raise DataError(f"{path}: empty CSV, expected a header row 'path,label[,domain]'")
    return header, rows


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


def _label_index(label: str, class_names: Sequence[str], index: dict[str, int]) -> int | None:
    """A label is a class name or an integer index; a name wins if a class is literally called "3"."""
    if label in index:
        return index[label]
    try:
        number = int(label)
    except ValueError:
        return None
    return number if 0 <= number < len(class_names) else None


def read_csv_manifest(path: str | Path, class_names: Sequence[str], root: str | Path | None = None) -> list[Sample]:
    """Samples from a CSV with a header and columns ``path,label[,domain]`` (others ignored).

    Manifests let one image pool serve several splits and carry a ``domain`` per image, which
    folder trees cannot. Relative image paths resolve against ``root`` if given, else the CSV's
    own folder, so a CSV and its images can be moved together.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    header, rows = _open_csv(path)
    for column in ("path", "label"):
        if column not in header:
            raise DataError(f"{path}: missing column '{column}' (header is {','.join(header)})")
    has_domain = "domain" in header
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[Sample] = []
    for line, row in rows:
        where = f"{path}:{line}"
        image, label, domain = _cell(row, "path"), _cell(row, "label"), _cell(row, "domain")
        if not image:
            raise DataError(f"{where}: empty path")
        label_index = _label_index(label, class_names, index)
        if label_index is None:
            raise DataError(f"{where}: label '{label}' is not one of the {len(class_names)} classes")
        if has_domain and not domain:
            raise DataError(f"{where}: empty domain")
        image_path = base / image
        if not image_path.is_file():
            raise DataError(f"{where}: image '{image_path}' not found")
        samples.append((image_path, label_index, domain if has_domain else None))
    return samples


def _check_names(names: list[str], source: str) -> list[str]:
    if not names:
        raise DataError(f"{source}: no class names")
    seen: set[str] = set()
    for name in names:
        if not name:
            raise DataError(f"{source}: empty class name")
        if name in seen:
            raise DataError(f"{source}: duplicate class name '{name}'")
        seen.add(name)
    return names


def _names_from_csv(path: Path) -> list[str]:
    header, rows = _open_csv(path)
    if "label" not in header:
        raise DataError(f"{path}: missing column 'label' (header is {','.join(header)})")
    labels = {_cell(row, "label") for _, row in rows} - {""}
    if labels and all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        raise DataError(
            f"{path}: labels are integer indices, so class names cannot be inferred; "
            "set data.class_names to a list or a text file"
        )
    return sorted(labels)


def resolve_class_names(spec: Sequence[str] | str | Path | None, first_split_path: str | Path) -> list[str]:
    """The class names every split is labelled against, in head order.

    ``spec`` is a list, a text file (one name per line, blank lines skipped) or ``None``. With
    ``None`` the names are inferred from the train split: its sorted subfolder names, or the sorted
    unique labels of its CSV (impossible when those are integer indices). Names matter beyond
    bookkeeping: zero-shot heads are built from them.
    """
    if spec is None:
        source = Path(first_split_path)
        if source.is_dir():
            return _check_names([p.name for p in _subfolders(source)], str(source))
        if source.suffix.lower() == ".csv" and source.is_file():
            return _check_names(_names_from_csv(source), str(source))
        raise DataError(f"{source}: cannot infer class names (not a folder or a .csv file)")
    if isinstance(spec, str | Path):
        try:
            lines = Path(spec).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{spec}: cannot read class names ({_reason(error)})") from None
        return _check_names([line.strip() for line in lines if line.strip()], str(spec))
    return _check_names([str(name).strip() for name in spec], "data.class_names")


def _check_split_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in _SPLIT_ORDER and not _OOD_SPLIT.fullmatch(name):
            raise ConfigError(
                f"data.splits: unknown split name '{name}' (expected train, id_val, id_test or ood_<name>)"
            )
    for required in ("train", "id_test"):
        if required not in names:
            raise ConfigError(f"data.splits: missing required split '{required}'")


def _split_path(name: str, value: str | Path, root: Path | None) -> Path:
    path = Path(value).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if not path.exists():
        raise DataError(f"split '{name}': path '{path}' does not exist")
    if not path.is_dir() and path.suffix.lower() != ".csv":
        raise DataError(f"split '{name}': '{path}' is neither a folder nor a .csv file")
    return path


def load_image_splits(
    splits: dict[str, str | Path],
    root: str | Path | None,
    class_names: Sequence[str] | str | Path | None,
    data_config: dict[str, Any],
    augment: bool = False,
    on_bad_image: Literal["fail", "skip"] = "fail",
) -> tuple[dict[str, ImageSplit], list[str]]:
    """Load every configured split against one list of class names.

    Split names are fixed (``train``, ``id_val``, ``id_test``, ``ood_<name>``) because evaluators
    tell ID from OOD results by name. Each value is a folder or a CSV, relative to ``root``; CSV
    image paths are relative to the CSV itself. Only ``train`` gets the (optionally augmented)
    training transform. Returns the splits (train, id_val, id_test, then the OOD splits in the
    given order) and the class names.

    ``on_bad_image``: ``fail`` (default) checks nothing up front; reading an unreadable image raises a
    ``DataError`` naming it (``robustft data check`` lists them all beforehand). ``skip`` decodes every
    image now, drops the unreadable ones and logs how many per split (their paths stay in
    ``split.skipped``); declared counts (``data.expected``) then catch a skip that went too far.
    """
    _check_split_names(list(splits))
    root_path = Path(root).expanduser() if root is not None else None
    paths = {name: _split_path(name, value, root_path) for name, value in splits.items()}
    names = resolve_class_names(class_names, paths["train"])
    ordered = [n for n in _SPLIT_ORDER if n in paths] + [n for n in paths if n not in _SPLIT_ORDER]
    loaded: dict[str, ImageSplit] = {}
    for name in ordered:
        path = paths[name]
        samples = read_image_folder(path, names) if path.is_dir() else read_csv_manifest(path, names)
        if not samples:
            raise DataError(f"split '{name}' ({path}) has no images")
        transform = build_transform(data_config, train=name == "train", augment=augment)
        loaded[name] = ImageSplit(samples, transform, name=name, source=path)
        if on_bad_image == "skip":
            loaded[name] = _without_unreadable(loaded[name], samples)
    return loaded, names


def _without_unreadable(split: ImageSplit, samples: list[Sample]) -> ImageSplit:
    bad = set(check_images(split))
    if not bad:
        return split
    if len(bad) == len(samples):
        raise DataError(f"split '{split.name}' ({split.source}): none of its {len(samples)} images can be read")
    kept = ImageSplit([s for s in samples if s[0] not in bad], split.transform, name=split.name, source=split.source)
    kept.skipped = sorted(bad)
    first = kept.skipped[0]
    logger.warning(
        "split '%s': skipped %d unreadable images of %d (first: %s)", split.name, len(bad), len(samples), first
    )
    return kept
