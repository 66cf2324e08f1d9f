"""Dataset integrity: declared image / class counts, manifest hashes, unreadable files.

OOD benchmarks are easy to get subtly wrong: a partial ObjectNet download, a re-encoded iWildCam
image, a class folder lost in a copy. Accuracy is then reported on a different test set than the
paper's, and nothing fails. A run config may therefore declare what each split holds
(``data.expected.<split>: {images, classes, sha256, manifest}``):

- counts are checked every time data loads (``verify_counts``); a mismatch is a ``DataError`` unless
  ``data.allow_count_mismatch: true``;
- ``robustft data check CONFIG`` also hashes every file, decodes every image and compares with the
  declared hash and manifest, naming each changed, missing, extra or unreadable file.

Manifest hash (``sha256``) of an image split: the SHA-256 of its manifest text, one line per file,
``<sha256 of the file's bytes>  <path relative to the split>`` (two spaces, ``/`` separators, ``\\n``
after every line), lines sorted by path in code-point order. That is ``sha256sum``'s own format, so
``cd <split folder> && find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum``
reproduces it for a folder of images. Folder splits list their image files (the class is the
folder); CSV splits list the CSV itself (labels live there) and every image it names, relative to
the CSV's folder. The in-memory built-in benchmark hashes its uint8 image tensor and int64 labels.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from robustft.config import DataConfig, SplitExpectation
from robustft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20
# Preprocessing for a check that only reads files: no model decides it, and no image is transformed.
_CHECK_DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def count_classes(split: Dataset) -> int:
    """Distinct labels present in a split (a shifted test set may cover only some classes)."""
    return int(split.labels.unique().numel())


def count_mismatches(splits: Mapping[str, Dataset], expected: Mapping[str, SplitExpectation]) -> list[str]:
    """One line per split whose image or class count differs from ``data.expected``.

    Raises:
        ConfigError: ``data.expected`` names a split the data does not have.
    """
    problems = []
    for name, declared in expected.items():
        if name not in splits:
            raise ConfigError(f"data.expected: unknown split '{name}' (splits: {', '.join(splits)})")
        split = splits[name]
        for what, actual in (("images", len(split)), ("classes", count_classes(split))):
            wanted = getattr(declared, what)
            if wanted is not None and wanted != actual:
                problems.append(f"split '{name}' has {actual} {what} but data.expected.{name}.{what} declares {wanted}")
    return problems


def verify_counts(
    splits: Mapping[str, Dataset], expected: Mapping[str, SplitExpectation], allow_mismatch: bool = False
) -> list[str]:
    """Refuse data whose counts differ from ``data.expected`` (called whenever a run loads its data).

    Returns the mismatches (logged as warnings when ``allow_mismatch``).

    Raises:
        ConfigError: ``data.expected`` names a split the data does not have.
        DataError: a count differs and ``allow_mismatch`` is false (the first mismatch, one line).
    """
    problems = count_mismatches(splits, expected)
    if problems and not allow_mismatch:
        raise DataError(f"{problems[0]} (set data.allow_count_mismatch: true to use it anyway)")
    for problem in problems:
        logger.warning("%s (allowed by data.allow_count_mismatch)", problem)
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def split_files(split: Dataset) -> dict[str, Path]:
    """The files an image split is made of, keyed by their manifest path (relative, ``/`` separators)."""
    source = Path(split.source)
    base = source if source.is_dir() else source.parent
    files = {} if source.is_dir() else {source.name: source}
    for path in split.paths:
        files[Path(os.path.relpath(path, base)).as_posix()] = Path(path)
    return files


def manifest_text(hashes: Mapping[str, str]) -> str:
    """``sha256sum``-format manifest of ``{relative path: file hash}``, sorted by path."""
    return "".join(f"{hashes[path]}  {path}\n" for path in sorted(hashes))


def manifest_sha256(hashes: Mapping[str, str]) -> str:
    return hashlib.sha256(manifest_text(hashes).encode("utf-8")).hexdigest()


def tensor_split_sha256(split: Dataset) -> str:
    """Hash of an in-memory split: its uint8 images ``[N, 3, H, W]`` then its int64 labels, C order."""
    digest = hashlib.sha256(split.images.contiguous().numpy().tobytes())
    digest.update(split.labels.long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """``{relative path: hash}`` from a ``sha256sum``-format file; a malformed line is a DataError."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read manifest ({error})") from None
    hashes = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or not name:
            raise DataError(f"{path}:{number}: expected '<sha256>  <relative path>', got {line!r}")
        hashes[name.lstrip("*")] = digest.lower()
    return hashes


def compare_manifest(actual: Mapping[str, str], declared: Mapping[str, str], split: str, manifest: Path) -> list[str]:
    """One line per changed, missing or unexpected file, naming it."""
    problems = [
        f"split '{split}': file '{name}' differs from {manifest} (sha256 {actual[name][:12]}..., "
        f"manifest {declared[name][:12]}...)"
        for name in sorted(actual.keys() & declared.keys())
        if actual[name] != declared[name]
    ]
    problems += [
        f"split '{split}': file '{name}' listed in {manifest} is missing"
        for name in sorted(declared.keys() - actual.keys())
    ]
    problems += [
        f"split '{split}': file '{name}' is not in {manifest}" for name in sorted(actual.keys() - declared.keys())
    ]
    return problems


@dataclass
class SplitReport:
    """What ``robustft data check`` found in one split."""

    name: str
    images: int
    classes: int
    sha256: str
    unreadable: list[Path] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass
class CheckReport:
    splits: list[SplitReport]
    problems: list[str]


def load_for_check(config: DataConfig) -> dict[str, Dataset]:
    """The configured splits as a run would load them, but never refused for counts nor with images skipped."""
    from robustft.data import _load_configured_splits

    splits, _ = _load_configured_splits(config.model_copy(update={"on_bad_image": "fail"}), _CHECK_DATA_CONFIG)
    return splits


def _resolve(path: Path, root: Path | None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() or root is None else Path(root).expanduser() / path


def check_split(
    name: str, split: Dataset, declared: SplitExpectation | None, root: Path | None
) -> tuple[SplitReport, list[str]]:
    """Counts, manifest hash and unreadable images of one split, compared with its declaration."""
    from robustft.data.folders import check_images

    if hasattr(split, "paths"):
        hashes = {relative: file_sha256(path) for relative, path in split_files(split).items()}
        report = SplitReport(
            name, len(split), count_classes(split), manifest_sha256(hashes), check_images(split), hashes
        )
    else:
        report = SplitReport(name, len(split), count_classes(split), tensor_split_sha256(split))
    problems = [f"split '{name}': unreadable image '{path}'" for path in report.unreadable]
    if declared is None:
        return report, problems
    problems += count_mismatches({name: split}, {name: declared})
    if declared.sha256 is not None and declared.sha256.lower() != report.sha256:
        problems.append(f"split '{name}': manifest hash {report.sha256} differs from data.expected.{name}.sha256")
    if declared.manifest is not None:
        manifest = _resolve(declared.manifest, root)
        problems += compare_manifest(report.hashes, read_manifest(manifest), name, manifest)
    return report, problems


def check_data(config: DataConfig, write_manifests: Path | None = None) -> CheckReport:
    """Everything ``robustft data check`` reports; ``write_manifests`` saves ``<split>.sha256`` files there."""
    splits = load_for_check(config)
    count_mismatches(splits, {name: SplitExpectation() for name in config.expected})  # unknown names
    reports, problems = [], []
    for name, split in splits.items():
        report, found = check_split(name, split, config.expected.get(name), config.root)
        reports.append(report)
        problems += found
        if write_manifests is not None and report.hashes:
            from robustft.files import atomic_write

            Path(write_manifests).mkdir(parents=True, exist_ok=True)
            text = manifest_text(report.hashes)
            atomic_write(Path(write_manifests) / f"{name}.sha256", lambda tmp, text=text: tmp.write_text(text))
    return CheckReport(reports, problems)


def expected_section(reports: list[SplitReport]) -> dict[str, Any]:
    """The ``data.expected`` YAML section that declares what was found (to paste into a config)."""
    return {r.name: {"images": r.images, "classes": r.classes, "sha256": r.sha256} for r in reports}
