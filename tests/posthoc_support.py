"""Helpers shared by the post-hoc method tests (WiSE-FT, OSE, soups, sweeps); not a test module."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from robustft.data.tensor_split import TensorSplit
from robustft.demo import demo_config
from robustft.runner import Prepared, fit

CLASSES = ["circle", "square"]


def quiet(message: str) -> None:
    pass


def bits_equal(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit: same dtype and shape, and for floats the same bit patterns (-0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
    return torch.equal(a, b)


def small_prepared(prepared: Prepared, size: int = 64) -> Prepared:
    """digits-shift with the first ``size`` images of every evaluation split (the full train split).

    The zero-shot model is shared, never modified: ``runner.fit`` deep-copies it.
    """
    splits = {
        name: split
        if name == "train"
        else TensorSplit(split.images[:size], split.labels[:size], prepared.model.data_config, name)
        for name, split in prepared.ctx.splits.items()
    }
    return Prepared(prepared.model, dataclasses.replace(prepared.ctx, splits=splits), prepared.benchmark)


def relabelled(split: TensorSplit, data_config: dict[str, Any]) -> TensorSplit:
    """The same images with every label moved to the next class (all predictions become wrong)."""
    return TensorSplit(split.images, (split.labels + 1) % 10, data_config, split.name)


def finetune(prepared: Prepared, out: Path, name: str = "finetune", lr: float = 1e-3, steps: int = 4) -> Path:
    """A short real fine-tune from the zero-shot model; returns its run directory."""
    config = demo_config("finetune", 0, out, name=name, optim={"lr": lr}, steps=steps, progress=False)
    fit(config, log=quiet, prepared=prepared)
    return config.run_dir


def posthoc_run(prepared: Prepared, out: Path, method: str, **options: Any) -> dict[str, Any]:
    """Run a post-hoc method through ``runner.fit``; returns its results.json entry."""
    options = {
        key: [str(v) for v in value] if isinstance(value, list) and key == "ingredients" else value
        for key, value in options.items()
    }
    if "finetuned_run" in options:
        options["finetuned_run"] = str(options["finetuned_run"])
    config = demo_config(method, 0, out, method_options=options, progress=False)
    return fit(config, log=quiet, prepared=prepared)["methods"][method]


def fresh_model(prepared: Prepared) -> torch.nn.Module:
    return copy.deepcopy(prepared.model)


def draw_shape(shape: str, brightness: int, rng: np.random.Generator) -> Image.Image:
    """A 32 px circle or square at a random offset, on the inverse background."""
    image = np.full((32, 32, 3), 255 - brightness, np.uint8)
    x, y = rng.integers(6, 12, size=2)
    if shape == "square":
        image[y : y + 14, x : x + 14] = brightness
    else:
        yy, xx = np.mgrid[:32, :32]
        image[(yy - y - 7) ** 2 + (xx - x - 7) ** 2 < 49] = brightness
    return Image.fromarray(image)


def write_shapes_dataset(root: Path) -> dict[str, Any]:
    """A tiny two-class image dataset (folders + a CSV manifest); returns the ``data:`` config section.

    Small enough that a whole pipeline (fit, sweep, soups, WiSE-FT) evaluates in well under a second.
    """
    rng = np.random.default_rng(0)

    def draw(shape: str, brightness: int) -> Image.Image:
        return draw_shape(shape, brightness, rng)

    for split, count in (("train", 16), ("val", 6), ("test", 6)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                draw(name, 20).save(root / split / name / f"{i}.png")
    (root / "dark").mkdir()
    rows = ["path,label"]
    for i in range(12):
        draw(CLASSES[i % 2], 120).save(root / "dark" / f"{i}.png")
        rows.append(f"dark/{i}.png,{CLASSES[i % 2]}")
    (root / "dark.csv").write_text("\n".join(rows) + "\n")
    return {
        "benchmark": None,
        "root": str(root),
        "splits": {"train": "train", "id_val": "val", "id_test": "test", "ood_dark": "dark.csv"},
        "batch_size": 8,
    }
