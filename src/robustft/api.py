"""``robustft.load(run_dir)``: a finished run as a predictor, its class names and its eval transform.

A run whose ``final.safetensors`` carries robustft's metadata (``robustft.run_metadata``) and holds a
backbone + linear head is rebuilt from the model spec alone: no data is read and no zero-shot head is
recomputed, so loading costs one backbone build and one weights read. Any other run (an ensemble, a file
written before the metadata existed) is rebuilt the way ``robustft evaluate`` does: the run's config, its
data and its method's ``load_predictor``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustft.errors import CheckpointError, RunDirectoryError
from robustft.layout import FINAL_CHECKPOINT
from robustft.run_metadata import IMAGE_CLASSIFIER, FinalMetadata, read_final_metadata


@dataclass
class LoadedRun:
    """A finished run, ready to predict.

    Attributes:
        predictor: images ``[B, 3, H, W]`` (after ``transform``) -> logits ``[B, len(class_names)]``, in eval mode.
        class_names: the label of each logit.
        transform: PIL image -> normalised tensor, the run's eval preprocessing.
        config: the run's resolved config (``robustft.config.RunConfig``).
        metadata: the final checkpoint's metadata; None for a file written before it existed.
    """

    predictor: nn.Module
    class_names: list[str]
    transform: Callable[[Any], Tensor]
    config: Any
    metadata: FinalMetadata | None


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a finished run directory (``config.yaml`` + ``checkpoints/final.safetensors``).

    Raises:
        RunDirectoryError: ``run_dir`` is not a finished run.
        CheckpointError / ConfigError: the checkpoint or config is unreadable or does not fit the model.
    """
    from robustft.data.transforms import build_transform

    run_dir = Path(run_dir)
    config = run_config(run_dir)
    final = run_dir / FINAL_CHECKPOINT
    metadata = read_final_metadata(final)
    if metadata is not None and metadata.predictor == IMAGE_CLASSIFIER:
        predictor = classifier_from_metadata(config, metadata, final)
        class_names = metadata.class_names
    else:
        predictor, class_names = predictor_from_run(config, run_dir)
    predictor = predictor.to(device).eval().requires_grad_(False)
    data_config = getattr(predictor, "data_config", None) or (metadata.data_config if metadata else {})
    return LoadedRun(predictor, class_names, build_transform(data_config, train=False), config, metadata)


def run_config(run_dir: Path) -> Any:
    """The run's config.yaml, its output location set to where the run now lies (runs can be moved)."""
    from robustft.config import load_config

    if not (run_dir / "config.yaml").is_file() or not (run_dir / FINAL_CHECKPOINT).is_file():
        raise RunDirectoryError(
            f"{run_dir}: not a finished run (a finished run has config.yaml and {FINAL_CHECKPOINT})"
        )
    config = load_config(run_dir / "config.yaml")
    return config.model_copy(update={"output_dir": run_dir.parent, "name": run_dir.name})


def classifier_from_metadata(config: Any, metadata: FinalMetadata, final: Path) -> nn.Module:
    """Backbone from the run's model spec + the saved head, weights loaded strictly; no data needed."""
    from robustft.backbones.checkpoint_files import load_state_dict_file, load_state_dict_strict
    from robustft.backbones.classifier import ImageClassifier, linear_head
    from robustft.backbones.factory import load_backbone
    from robustft.weight_references import load_final_state

    own = load_state_dict_file(final)
    if "head.weight" not in own:
        raise CheckpointError(f"{final}: metadata says {IMAGE_CLASSIFIER} but the file has no head.weight")
    loaded = load_backbone(config.model)
    head = linear_head(own["head.weight"], own.get("head.bias"))
    model = ImageClassifier(loaded.backbone, head, metadata.normalize_features, loaded.data_config)
    state = load_final_state(final, structure=model, own=own)  # lean runs reference their backbone
    load_state_dict_strict(model, state, final, f"{config.model.source} model '{config.model.name}'")
    return model


def predictor_from_run(config: Any, run_dir: Path) -> tuple[nn.Module, list[str]]:
    """The predictor as ``robustft evaluate`` rebuilds it (the run's data and method), and the class names."""
    from robustft.methods import build_method
    from robustft.runner import check_checkpoint_classes, prepare_run

    prepared = prepare_run(config, log=lambda message: None)
    method = build_method(config, str(run_dir / "config.yaml"))
    check_checkpoint_classes(run_dir / FINAL_CHECKPOINT, prepared.ctx.class_names)
    predictor = method.load_predictor(prepared.model, run_dir / FINAL_CHECKPOINT, config.model.name)
    return predictor, list(prepared.ctx.class_names)
