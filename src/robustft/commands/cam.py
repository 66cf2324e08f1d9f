"""``robustft cam``: CAM and masked-counterfactual figures of a finished run's predictor."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from robustft.cam import CounterfactualSpec, attention_rollout_cam, cam_figures, eval_mode, make_counterfactuals
from robustft.errors import DataError


def load_image(path: Path, split: Dataset, data_config: dict) -> Tensor:
    """One image file as ``[1, 3, H, W]`` model input, preprocessed as ``split`` (an evaluation split of the run)
    preprocesses its own images: an image folder's or CSV manifest's transform (resize, centre crop,
    normalise), or the built-in benchmark's resize and normalisation.

    Raises:
        DataError: the file is not a readable image.
    """
    import numpy as np

    from robustft.data.folders import _open_image
    from robustft.data.tensor_split import TensorSplit

    image = _open_image(path).convert("RGB")
    transform = getattr(split, "transform", None)
    if transform is not None:
        return transform(image)[None]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    return TensorSplit(pixels, torch.zeros(1, dtype=torch.long), data_config)[0][0][None]


def evaluation_split(splits: dict[str, Dataset]) -> Dataset:
    """The split whose preprocessing an outside image gets: ``id_test``, else any split but ``train`` (whose
    transform may augment), else ``train``."""
    for name in ("id_test", *splits):
        if name in splits and name != "train":
            return splits[name]
    return splits["train"]


def first_examples(split: Dataset, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` (image, label) pairs of any split (tensor splits, image folders, CSV manifests)."""
    pairs = [split[index] for index in range(min(count, len(split)))]
    return torch.stack([image for image, _ in pairs]), torch.as_tensor([int(label) for _, label in pairs])


def run_cam_figures(target: str, run_dir: Path, out: Path, count: int = 8, seed: int = 0) -> list[Path]:
    """CAM and counterfactual figures of a finished run's predictor, rebuilt by the run's own method.

    Args:
        target: an image file (mapped for the class the model predicts; donors for refilling are
            the run's first training images) or a split name of the run's data (the first
            ``count`` images, mapped for their labels, refilled from each other).
        run_dir: a run directory (``config.yaml`` + ``checkpoints/final.safetensors``).
        out: where the PNGs go.
        count: images taken from a split (at least 2, so there is a donor).
        seed: RNG seed of the mask and the donors.

    The mask and fill are the run's own when it trained ``masked_counterfactual``, else the
    paper's default (object mask, single fill, threshold 0.3).
    """
    from robustft.config import load_config
    from robustft.layout import FINAL_CHECKPOINT
    from robustft.methods import build_method
    from robustft.runner import prepare_run

    source = str(run_dir / "config.yaml")
    config = load_config(run_dir / "config.yaml")
    config = config.model_copy(update={"output_dir": run_dir.parent, "name": run_dir.name})
    method = build_method(config, source)
    prepared = prepare_run(config, log=lambda message: None)
    splits, names = prepared.ctx.splits, prepared.ctx.class_names
    model = method.load_predictor(prepared.model, run_dir / FINAL_CHECKPOINT, config.model.name)
    if not hasattr(model, "backbone"):
        raise DataError(
            f"cam --run {run_dir}: its {config.method.name} predictor combines several models; "
            "run cam on one of the runs it combines"
        )
    spec = method.config.spec() if hasattr(method.config, "spec") else CounterfactualSpec()
    count = max(2, count)
    device = prepared.ctx.device
    data_config = prepared.model.data_config
    if Path(target).is_file():
        image = load_image(Path(target), evaluation_split(splits), data_config).to(device)
        if "train" not in splits:
            raise DataError(f"cam {target}: the run has no train split to take refill donors from")
        donors, _ = first_examples(splits["train"], count)
        images = torch.cat([image, donors.to(device)])
        with torch.no_grad(), eval_mode(model):
            labels = model(images).argmax(1)
        shown, titles = 1, [f"predicted: {names[int(labels[0])]}"]
    elif target in splits:
        images, labels = first_examples(splits[target], count)
        images, labels = images.to(device), labels.to(device)
        shown, titles = len(labels), [f"{target}[{i}]: {names[int(label)]}" for i, label in enumerate(labels)]
    else:
        raise DataError(f"'{target}' is neither an image file nor a split of this run ({', '.join(splits)})")
    made = make_counterfactuals(model, images, labels, spec, generator=torch.Generator(device).manual_seed(seed))
    cam = made.cam if made.cam is not None else attention_rollout_cam(model, images, labels)
    mean, std = data_config.get("mean", (0.5,) * 3), data_config.get("std", (0.5,) * 3)
    return cam_figures(images[:shown], cam[:shown], made.images[:shown], made.mask[:shown], mean, std, out, titles)
