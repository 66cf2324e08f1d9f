"""Bad data through the command line: one `robustft: error:` line naming the culprit, exit 2, no traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from robustft.cli import _one_line, main
from robustft.data import sequential_loader
from robustft.data.folders import load_image_splits
from robustft.errors import DataError

DIGITS = [str(digit) for digit in range(10)]
DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def save(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (value, value, value)).save(path)
    return path


def truncate(path: Path) -> Path:
    noise = Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3))
    noise.save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def make_dataset(root: Path) -> dict:
    """Digit classes '0'/'1' as folders (the built-in model's 10-class head applies), a CSV OOD split."""
    for split in ("train", "test"):
        for label in ("0", "1"):
            for i in range(3):
                save(root / split / label / f"{i}.png", 40 * i + 100 * int(label))
    rows = ["path,label"] + [f"train/{label}/{i}.png,{label}" for label in ("0", "1") for i in range(3)]
    (root / "shift.csv").write_text("\n".join(rows) + "\n")
    return {
        "benchmark": None,
        "root": str(root),
        "class_names": DIGITS,
        "splits": {"train": "train", "id_test": "test", "ood_shift": "shift.csv"},
        "batch_size": 4,
    }


def write_config(tmp_path: Path, data: dict) -> Path:
    config = {
        "name": "bad",
        "output_dir": str(tmp_path / "runs"),
        "data": data,
        "method": {"name": "finetune"},
        "train": {"steps": 1, "progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["robustft", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


def assert_one_error_line(err: str, expected: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("robustft: error: ") and expected in err, err


def test_label_outside_the_class_list(tmp_path, monkeypatch, capsys) -> None:
    data = make_dataset(tmp_path)
    with open(tmp_path / "shift.csv", "a") as handle:
        handle.write("train/0/1.png,horse\n")
    code, err = run_cli(monkeypatch, capsys, "fit", str(write_config(tmp_path, data)))
    assert code == 2
    assert_one_error_line(err, f"{tmp_path / 'shift.csv'}:8: label 'horse' is not one of the 10 classes")


def test_empty_split_and_missing_path(tmp_path, monkeypatch, capsys) -> None:
    data = make_dataset(tmp_path)
    (tmp_path / "empty" / "0").mkdir(parents=True)
    data["splits"]["id_test"] = "empty"
    code, err = run_cli(monkeypatch, capsys, "fit", str(write_config(tmp_path, data)))
    assert code == 2
    assert_one_error_line(err, f"split 'id_test' ({tmp_path / 'empty'}) has no images")

    data["splits"]["id_test"] = "test"
    data["splits"]["ood_gone"] = "nowhere"
    code, err = run_cli(monkeypatch, capsys, "fit", str(write_config(tmp_path, data)))
    assert code == 2
    assert_one_error_line(err, f"split 'ood_gone': path '{tmp_path / 'nowhere'}' does not exist")


def test_truncated_image_fails_naming_it_or_is_skipped_and_counted(tmp_path, monkeypatch, capsys, caplog) -> None:
    data = make_dataset(tmp_path)
    broken = truncate(tmp_path / "train" / "1" / "2.png")
    config = write_config(tmp_path, data)
    code, err = run_cli(monkeypatch, capsys, "fit", str(config))
    assert code == 2
    assert_one_error_line(err, f"{broken}: cannot read image (image file is truncated)")

    code, err = run_cli(monkeypatch, capsys, "data", "check", str(config))
    assert code == 1
    assert f"robustft: error: split 'train': unreadable image '{broken}'" in err
    assert f"robustft: error: split 'ood_shift': unreadable image '{broken}'" in err  # the CSV uses it too

    data["on_bad_image"] = "skip"
    with caplog.at_level(logging.WARNING, logger="robustft.data.folders"):
        code, err = run_cli(monkeypatch, capsys, "fit", str(write_config(tmp_path, data)))
    assert code == 0, err
    assert f"split 'train': skipped 1 unreadable images of 6 (first: {broken})" in caplog.text
    results = json.loads((tmp_path / "runs" / "bad" / "results.json").read_text())
    assert results["methods"]["finetune"]["steps"] == 1

    data["expected"] = {"train": {"images": 6}}  # a declared count catches a skip
    code, err = run_cli(monkeypatch, capsys, "fit", str(write_config(tmp_path, data)), "--overwrite")
    assert code == 2
    assert_one_error_line(err, "split 'train' has 5 images but data.expected.train.images declares 6")


def test_an_error_raised_in_a_dataloader_worker_stays_one_line(tmp_path) -> None:
    make_dataset(tmp_path)
    broken = truncate(tmp_path / "train" / "0" / "0.png")
    splits, _ = load_image_splits({"train": "train", "id_test": "test"}, tmp_path, DIGITS, DATA_CONFIG)
    with pytest.raises(DataError) as info:
        list(sequential_loader(splits["train"], 2, num_workers=1))
    assert "Original Traceback" in str(info.value)  # what torch re-raises
    assert _one_line(info.value) == f"{broken}: cannot read image (image file is truncated)"


def test_the_process_prints_one_line_and_exits_2(tmp_path) -> None:
    data = make_dataset(tmp_path)
    data["splits"]["ood_gone"] = "nowhere"
    process = subprocess.run(
        [sys.executable, "-m", "robustft", "fit", str(write_config(tmp_path, data))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr == f"robustft: error: split 'ood_gone': path '{tmp_path / 'nowhere'}' does not exist\n"
