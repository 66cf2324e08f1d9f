"""A protocol through the whole run: config -> splits with class spaces -> model -> training -> results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from robustft.config import parse_config
from robustft.runner import fit

CLASSES = [f"texture {i}" for i in range(10)]  # base: the first 5; 10 = the built-in model's classifier rows


def build_dtd(root: Path) -> Path:
    folder = root / "dtd"
    split: dict[str, list] = {}
    for part, count in {"train": 3, "val": 1, "test": 2}.items():
        split[part] = []
        for label, name in enumerate(CLASSES):
            for k in range(count):
                relative = f"{name}/{part}_{k}.png"
                (folder / "images" / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (25 * label, 10 * k, 0)).save(folder / "images" / relative)
                split[part].append([relative, label, name])
    (folder / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


@pytest.mark.parametrize("method", ["zeroshot", "finetune"])
def test_base_to_new_run_writes_base_new_and_harmonic_mean(tmp_path, method):
    root = build_dtd(tmp_path / "data")
    raw = {
        "name": method,
        "output_dir": str(tmp_path / "runs"),
        "model": {"source": "builtin", "zero_shot_head": "classifier"},
        "data": {
            "benchmark": None,
            "protocol": {"name": "coop", "root": str(root), "options": {"dataset": "dtd", "shots": 2,
                                                                          "base_to_new": True}},
            "batch_size": 4,
        },
        "method": {"name": method},
        "train": {"steps": 2, "progress": False, "device": "cpu", "checkpoint_every": 100},
    }  # fmt: skip
    config = parse_config(raw)
    results = fit(config, log=lambda message: None)
    saved = json.loads((config.run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["benchmark"] == "coop"
    entry = saved["methods"][method]
    scores = entry["base_to_new"]
    assert scores["base"] == entry["id"] and scores["new"] == entry["ood"]["ood_new"]
    base, new = scores["base"], scores["new"]
    assert scores["hm"] == pytest.approx(2 * base * new / (base + new) if base + new else 0.0)
    assert entry["macro_f1"].keys() == {"id_val", "id_test", "ood_new"}
    assert entry["steps"] == (2 if method == "finetune" else 0)
