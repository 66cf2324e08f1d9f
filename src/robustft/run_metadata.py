"""What ``final.safetensors`` says about itself: format version, model spec, class names, method.

A weights file alone cannot be used: one needs the architecture it fits, the label of each output and
the preprocessing. These go into the safetensors header's string metadata (``safe_open(...).metadata()``),
so the file is self-describing without a sidecar, and reading them never loads a tensor. Files written
before this metadata existed have only ``{"format": "pt"}``; :func:`read_final_metadata` returns None for
them and callers fall back to the run's ``config.yaml`` and data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from robustft.errors import CheckpointError

FORMAT_KEY = "robustft_format"
FORMAT_VERSION = 1
IMAGE_CLASSIFIER = "image_classifier"


@dataclass(frozen=True)
class FinalMetadata:
    """The metadata of a final checkpoint.

    Attributes:
        format_version: ``robustft_format`` (1).
        model_spec: the run's ``model:`` config section (source, name, checkpoint, model_kwargs, ...).
        class_names: one label per output, in logit order.
        method: the run's results name (``lora``, ``gmixout+vrf``).
        predictor: ``image_classifier`` for a backbone + linear head (what timm / open_clip / peft export
            take), else the predictor's class name (an ensemble).
        normalize_features: whether the head reads L2-normalised embeddings (CLIP-style heads).
        data_config: the preprocessing (timm keys: input_size, mean, std, interpolation, crop_pct, crop_mode).
    """

    format_version: int
    model_spec: dict[str, Any]
    class_names: list[str]
    method: str
    predictor: str
    normalize_features: bool
    data_config: dict[str, Any]


def final_metadata(
    predictor: nn.Module, model_spec: dict[str, Any], class_names: list[str], method: str
) -> dict[str, str]:
    """The safetensors header metadata of a run's final checkpoint (strings only: the format's rule)."""
    from robustft.backbones.classifier import ImageClassifier

    is_classifier = isinstance(predictor, ImageClassifier)
    values = {
        FORMAT_KEY: FORMAT_VERSION,
        "model_spec": model_spec,
        "class_names": list(class_names),
        "method": method,
        "predictor": IMAGE_CLASSIFIER if is_classifier else type(predictor).__name__,
        "normalize_features": bool(getattr(predictor, "normalize_features", False)),
        "data_config": getattr(predictor, "data_config", {}),
    }
    return {key: json.dumps(value) for key, value in values.items()}


def read_final_metadata(path: str | Path) -> FinalMetadata | None:
    """The metadata :func:`final_metadata` wrote, from the header only; None for a file written without it.

    Raises:
        CheckpointError: the file is missing or its header unreadable, or its metadata is of a newer format
            or not the JSON robustft writes.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # safetensors' own SafetensorError, OSError
        raise CheckpointError(f"{path}: cannot read safetensors header, truncated or corrupt ({error})") from None
    if FORMAT_KEY not in raw:
        return None
    try:
        values = {key: json.loads(value) for key, value in raw.items() if key != "format"}
    except ValueError as error:
        raise CheckpointError(f"{path}: corrupt metadata in the safetensors header ({error})") from None
    version = values[FORMAT_KEY]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: metadata {FORMAT_KEY}={version!r} is newer than this robustft reads ({FORMAT_VERSION}); "
            "upgrade robustft"
        )
    try:
        return FinalMetadata(
            format_version=version,
            model_spec=dict(values["model_spec"]),
            class_names=[str(name) for name in values["class_names"]],
            method=str(values["method"]),
            predictor=str(values["predictor"]),
            normalize_features=bool(values["normalize_features"]),
            data_config=dict(values["data_config"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: incomplete robustft metadata in the safetensors header ({error})") from None
