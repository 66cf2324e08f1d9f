"""A finished run in the field's own formats: a timm model, an OpenCLIP checkpoint, a peft LoRA adapter.

Each export is written by the library that reads it back (timm's ``save_for_hf``, open_clip's
``open_clip_config.json`` layout, peft's ``save_pretrained``), so the files are what those libraries
expect rather than robustft's reading of their formats:

* ``timm``: ``model.safetensors`` + ``config.json`` (architecture, model_args, pretrained_cfg with the
  run's preprocessing, ``label_names``): ``timm.create_model("local-dir:DIR")``, or
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": DIR/"model.safetensors"}, ...)``.
* ``open_clip``: the whole CLIP model (tuned image tower, the run's text tower) as
  ``open_clip_model.safetensors`` + ``open_clip_config.json``, for
  ``open_clip.create_model_and_transforms("local-dir:DIR")``; the run's head (a linear layer over
  normalised image features) beside it in ``classifier.safetensors``, class names in its header.
* ``peft``: a LoRA run as ``adapter_config.json`` + ``adapter_model.safetensors`` for
  ``PeftModel.from_pretrained(base, DIR)``, the base (pretrained timm model) in ``DIR/base``.

An export goes to a temporary folder beside ``DIR`` that is renamed to ``DIR`` once complete, so a
failed export leaves nothing behind and an existing ``DIR`` with files in it is never touched.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustft.api import LoadedRun, load
from robustft.errors import ConfigError, RunDirectoryError, UnsupportedModelError

TARGETS = ("timm", "open_clip", "peft")
CLASSIFIER_FILE = "classifier.safetensors"
PEFT_BASE_DIR = "base"
# The builtin digits ViT is a timm VisionTransformer; timm rebuilds it from this registered name and its args.
BUILTIN_TIMM_ARCHITECTURE = "vit_tiny_patch16_224"


def export_run(run_dir: str | Path, target: str, out: str | Path) -> Path:
    """Export the finished run at ``run_dir`` as ``target`` (timm, open_clip, peft) into the new folder ``out``.

    Raises:
        ConfigError: an unknown target, or a run the target cannot hold (the message says why).
        RunDirectoryError: ``out`` exists and is not an empty folder.
    """
    writers: dict[str, Callable[[LoadedRun, Path, Path], None]] = {
        "timm": write_timm, "open_clip": write_open_clip, "peft": write_peft,
    }  # fmt: skip
    if target not in writers:
        raise ConfigError(f"--to {target!r}: unknown export format (known: {', '.join(TARGETS)})")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirectoryError(f"{out}: exists and is not an empty folder; refusing to write the export into it")
    loaded = load(run_dir)
    check_plain_classifier(loaded, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        writers[target](loaded, run_dir, temporary)
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


def check_plain_classifier(loaded: LoadedRun, target: str) -> None:
    """The exports hold one backbone and one linear head; an ensemble predictor has no such form."""
    from robustft.backbones.classifier import ImageClassifier

    if not isinstance(loaded.predictor, ImageClassifier):
        raise UnsupportedModelError(
            f"--to {target}: the run's {loaded.config.method.name} predictor ({type(loaded.predictor).__name__}) "
            "is not one backbone with a linear head; export one of the runs it combines"
        )


def timm_architecture(config: Any) -> tuple[str, dict[str, Any]]:
    """The registered timm name and ``create_model`` arguments that rebuild the run's backbone."""
    if config.model.source == "builtin":
        from robustft.backbones.builtin import DIGITS_VIT_ARGS

        return BUILTIN_TIMM_ARCHITECTURE, dict(DIGITS_VIT_ARGS)
    if config.model.source == "timm":
        return config.model.name, dict(config.model.model_kwargs or {})
    raise UnsupportedModelError(
        f"--to timm: model.source {config.model.source!r} is not a timm model; export it with --to open_clip"
    )


def timm_model(loaded: LoadedRun, backbone_state: dict[str, Tensor], target: str = "timm") -> nn.Module:
    """A timm model of the run's architecture with ``backbone_state`` and the run's head in its classifier.

    timm applies its classifier to the raw pooled embedding; a head over L2-normalised embeddings (CLIP-style
    and class-prototype heads) has no timm equivalent, so such a run is refused.
    """
    import timm

    from robustft.backbones.checkpoint_files import load_state_dict_strict

    predictor = loaded.predictor
    if predictor.normalize_features:
        raise UnsupportedModelError(
            f"--to {target}: the run's head reads L2-normalised embeddings (a class-prototype or text head), "
            "which a timm classifier cannot express; use robustft.load, or a run with a classifier head "
            "(model.zero_shot_head: classifier)"
        )
    architecture, model_args = timm_architecture(loaded.config)
    model = timm.create_model(architecture, pretrained=False, num_classes=predictor.num_classes, **model_args)
    classifier = classifier_name(model)
    head = {f"{classifier}.{key}": value for key, value in predictor.head.state_dict().items()}
    load_state_dict_strict(model, backbone_state | head, f"{architecture} export", f"timm model '{architecture}'")
    return model


def classifier_name(model: nn.Module) -> str:
    """The dotted name of a timm model's classifier module (``head``, ``fc``, ``head.fc``)."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def write_timm(loaded: LoadedRun, run_dir: Path, out: Path) -> None:
    model = timm_model(loaded, loaded.predictor.backbone.state_dict())
    _, model_args = timm_architecture(loaded.config)
    save_timm_directory(model, out, loaded, model_args)


def save_timm_directory(model: nn.Module, out: Path, loaded: LoadedRun, model_args: dict[str, Any]) -> None:
    """timm's own ``save_for_hf``: weights + config.json with the run's preprocessing and class names."""
    from timm.models import save_for_hf

    data_config = {key: value for key, value in loaded.predictor.data_config.items() if value is not None}
    save_for_hf(
        model.eval(),
        str(out),
        model_config={"label_names": list(loaded.class_names)},
        model_args=model_args,
        safe_serialization=True,
        data_config=data_config,
    )


def write_open_clip(loaded: LoadedRun, run_dir: Path, out: Path) -> None:
    import open_clip

    from robustft.backbones.checkpoint_files import load_state_dict_strict, save_state_dict_file
    from robustft.backbones.factory import load_backbone

    config = loaded.config
    if config.model.source != "open_clip":
        raise UnsupportedModelError(
            f"--to open_clip: the run's model.source is {config.model.source!r}, which has no text tower; "
            "export it with --to timm"
        )
    clip = load_backbone(config.model).clip
    model = clip.model
    load_state_dict_strict(
        model.visual, loaded.predictor.backbone.visual.state_dict(), run_dir, "the OpenCLIP image tower"
    )
    save_state_dict_file(model.state_dict(), out / "open_clip_model.safetensors")
    open_clip_config = {
        "model_cfg": open_clip_model_config(config.model.name, config.model.model_kwargs or {}),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    (out / "open_clip_config.json").write_text(json.dumps(open_clip_config, indent=2), encoding="utf-8")
    header = {"class_names": json.dumps(list(loaded.class_names)), "method": loaded.config.method.name}
    save_state_dict_file(loaded.predictor.head.state_dict(), out / CLASSIFIER_FILE, header)


def open_clip_model_config(name: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The architecture open_clip built (its named or file config, with ``model_kwargs`` entries replacing keys)."""
    import open_clip

    from robustft.backbones.open_clip_backbone import register_open_clip_config

    registered = register_open_clip_config(name) if name.endswith(".json") else name
    model_config = copy.deepcopy(open_clip.get_model_config(registered))
    model_config.update({key: value for key, value in model_kwargs.items() if not key.startswith("force_")})
    return model_config


def write_peft(loaded: LoadedRun, run_dir: Path, out: Path) -> None:
    """peft's LoRA adapter of a LoRA run over its pretrained timm model (written to ``out/base``).

    The adapter's factors come from the run's ``adapter.safetensors``; a run saved without it (merged
    only, ``save_adapter: false``) has its factors recovered from the merged weights: ``W_tuned - W`` is
    exactly ``(alpha/r) B A``, of rank at most ``r``, so its rank-``r`` SVD gives factors with the same
    product (Hu et al., ICLR 2022, arXiv:2106.09685, eq. 3). The head travels in the adapter
    (``modules_to_save``), so the base's head is only a placeholder of the right shape.
    """
    from peft import LoraConfig, get_peft_model

    from robustft.backbones.factory import load_backbone

    config = loaded.config
    if config.method.name != "lora":
        raise UnsupportedModelError(
            f"--to peft: the run's method is {config.method.name!r}; a peft adapter holds a LoRA run's update "
            "(method.name: lora); export other runs with --to timm or --to open_clip"
        )
    if config.model.source == "open_clip":
        raise UnsupportedModelError(
            "--to peft: LoRA adapters are exported over timm models; this run's model.source is open_clip"
        )
    pretrained = load_backbone(config.model).backbone.state_dict()
    factors, rank, alpha, dropout = lora_factors(loaded, run_dir, pretrained)
    base = timm_model(loaded, pretrained, target="peft")
    _, model_args = timm_architecture(config)
    save_timm_directory(base, out / PEFT_BASE_DIR, loaded, model_args)
    classifier = classifier_name(base)
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(factors),
        modules_to_save=[classifier],
        bias="none",
    )
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for layer, (factor_a, factor_b) in factors.items():
            inner.get_submodule(layer).lora_A["default"].weight.copy_(factor_a)
            inner.get_submodule(layer).lora_B["default"].weight.copy_(factor_b)
        inner.get_submodule(classifier).modules_to_save["default"].load_state_dict(loaded.predictor.head.state_dict())
    peft_model.peft_config["default"].base_model_name_or_path = f"local-dir:{PEFT_BASE_DIR}"
    peft_model.save_pretrained(str(out), save_embedding_layers=False)  # no vocabulary: no hub lookup of the base


def lora_factors(
    loaded: LoadedRun, run_dir: Path, pretrained: dict[str, Tensor]
) -> tuple[dict[str, tuple[Tensor, Tensor]], int, float, float]:
    """``{timm layer name: (A [r, in], B [out, r])}``, rank, alpha and dropout of a LoRA run."""
    from robustft.adapters import ADAPTER_FILE, load_adapter
    from robustft.errors import CheckpointError
    from robustft.methods import method_options

    options = method_options(loaded.config)
    adapter = run_dir / ADAPTER_FILE
    if adapter.is_file():
        state, meta = load_adapter(adapter)
        factors = {_timm_name(layer): (state[f"{layer}.lora_A"], state[f"{layer}.lora_B"]) for layer in meta["layers"]}
        return factors, int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0))
    rank, alpha = int(options.rank), float(options.alpha)
    tuned = loaded.predictor.backbone.state_dict()
    changed = [key for key, value in tuned.items() if not torch.equal(value.cpu(), pretrained[key])]
    targets = {f"{name}.weight" for name in _target_layers(loaded, options.target_modules)}
    outside = [key for key in changed if key not in targets]
    if outside:
        raise CheckpointError(
            f"{run_dir}: weights outside the LoRA layers differ from the pretrained model ({', '.join(outside[:3])}); "
            "not a LoRA update"
        )
    factors = {}
    for key in sorted(targets):
        delta = (tuned[key].cpu().double() - pretrained[key].double()) / (alpha / rank)
        left, singular, right = torch.linalg.svd(delta, full_matrices=False)
        root = singular[:rank].sqrt()
        factors[key.removesuffix(".weight")] = (
            (root[:, None] * right[:rank]).to(tuned[key].dtype),
            (left[:, :rank] * root).to(tuned[key].dtype),
        )
    return factors, rank, alpha, float(options.dropout)


def _target_layers(loaded: LoadedRun, patterns: list[str]) -> list[str]:
    """The run's LoRA layers, as names inside the backbone (timm names)."""
    from robustft.adapters import select_linear_layers

    return [_timm_name(name) for name in select_linear_layers(loaded.predictor, patterns)]


def _timm_name(layer: str) -> str:
    return layer.removeprefix("backbone.")
