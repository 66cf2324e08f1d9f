"""Dataset integrity: declared counts refused at load, manifest hashes, `robustft data check`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from posthoc_support import write_shapes_dataset
from robustft.cli import main
from robustft.config import DataConfig, SplitExpectation
from robustft.data import load_splits
from robustft.data.integrity import (
    check_data,
    manifest_sha256,
    read_manifest,
    tensor_split_sha256,
    verify_counts,
)
from robustft.errors import ConfigError, DataError

TINY_DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["robustft", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_declared_counts_of_the_builtin_benchmark_are_enforced(digits_prepared) -> None:
    splits = digits_prepared.ctx.splits
    right = {name: SplitExpectation(images=len(split), classes=10) for name, split in splits.items()}
    assert verify_counts(splits, right) == []
    loaded, _ = load_splits(DataConfig(expected={"id_test": {"images": len(splits["id_test"])}}), TINY_DATA_CONFIG)
    assert len(loaded["id_test"]) == len(splits["id_test"])

    wrong = len(splits["ood_fonts"]) + 1
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(expected={"ood_fonts": {"images": wrong}}), TINY_DATA_CONFIG)
    message = str(info.value)
    assert message == (
        f"split 'ood_fonts' has {len(splits['ood_fonts'])} images but data.expected.ood_fonts.images declares "
        f"{wrong} (set data.allow_count_mismatch: true to use it anyway)"
    )
    allowed = DataConfig(expected={"ood_fonts": {"images": wrong, "classes": 9}}, allow_count_mismatch=True)
    loaded, _ = load_splits(allowed, TINY_DATA_CONFIG)  # evaluates anyway, with a logged warning
    assert len(loaded["ood_fonts"]) == wrong - 1
    assert len(verify_counts(splits, allowed.expected, allow_mismatch=True)) == 2  # images and classes
    with pytest.raises(ConfigError, match="data.expected: unknown split 'ood_objectnet'"):
        verify_counts(splits, {"ood_objectnet": SplitExpectation(images=1)})


def test_tensor_split_hash_follows_images_and_labels(digits_prepared) -> None:
    split = digits_prepared.ctx.splits["id_val"]
    first = tensor_split_sha256(split)
    assert first == tensor_split_sha256(split) and len(first) == 64
    original = split.labels[0].item()
    split.labels[0] = (original + 1) % 10
    try:
        assert tensor_split_sha256(split) != first
    finally:
        split.labels[0] = original
    declared = {"id_val": {"images": len(split), "classes": 10, "sha256": first}}
    report = check_data(DataConfig(expected=declared))  # `robustft data check` on the built-in benchmark
    assert report.problems == [] and {s.name: s.sha256 for s in report.splits}["id_val"] == first
    declared["id_val"]["sha256"] = "0" * 64
    assert check_data(DataConfig(expected=declared)).problems == [
        f"split 'id_val': manifest hash {first} differs from data.expected.id_val.sha256"
    ]


@pytest.fixture
def shapes(tmp_path):
    data = write_shapes_dataset(tmp_path / "shapes")
    return tmp_path, data


def test_manifest_hash_is_sha256sum_of_the_sorted_file_list(shapes) -> None:
    tmp_path, data = shapes
    report = check_data(DataConfig(**data), write_manifests=tmp_path / "manifests")
    assert report.problems == []
    by_name = {split.name: split for split in report.splits}
    assert (by_name["train"].images, by_name["train"].classes) == (32, 2)
    # the CSV split lists the CSV itself (labels live there) and its images relative to the CSV's folder
    assert set(by_name["ood_dark"].hashes) == {"dark.csv", *(f"dark/{i}.png" for i in range(12))}
    written = read_manifest(tmp_path / "manifests" / "train.sha256")
    assert written == by_name["train"].hashes and manifest_sha256(written) == by_name["train"].sha256
    if shutil.which("sha256sum"):  # the documented shell recipe gives the same hash
        recipe = "find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum"
        shell = subprocess.run(recipe, shell=True, cwd=tmp_path / "shapes" / "train", capture_output=True, text=True)
        assert shell.stdout.split()[0] == by_name["train"].sha256


def test_one_changed_file_fails_the_check_naming_it(shapes, monkeypatch, capsys) -> None:
    tmp_path, data = shapes
    first = check_data(DataConfig(**data), write_manifests=tmp_path / "manifests")
    train = next(split for split in first.splits if split.name == "train")
    data["expected"] = {
        "train": {
            "images": 32,
            "classes": 2,
            "sha256": train.sha256,
            "manifest": str(tmp_path / "manifests/train.sha256"),
        }
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", str(config))
    assert code == 0, err
    assert train.sha256 in out and "expected:" in out

    changed = tmp_path / "shapes" / "train" / "square" / "3.png"
    pixels = np.array(Image.open(changed))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(changed)
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", str(config))
    assert code == 1
    lines = err.strip().splitlines()
    assert any(line.startswith("robustft: error: split 'train': file 'square/3.png' differs from") for line in lines), (
        err
    )
    assert any("manifest hash" in line and "data.expected.train.sha256" in line for line in lines)
    assert len(lines) == 2 and "Traceback" not in err  # only the changed file is named

    (tmp_path / "shapes" / "train" / "circle" / "0.png").unlink()
    problems = check_data(DataConfig(**yaml.safe_load(config.read_text())["data"])).problems
    assert "split 'train': file 'circle/0.png' listed in" in "\n".join(problems)
    assert "split 'train' has 31 images but data.expected.train.images declares 32" in problems
