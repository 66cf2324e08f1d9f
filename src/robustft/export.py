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
  ``PeftModel.from_pretrained(base, DIR)``, the base (the pretrained timm model, or the pretrained OpenCLIP
  model in open_clip's local-dir layout) in ``DIR/base``.

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
    from robustft.backbones.checkpoint_files import load_state_dict_strict
    from robustft.backbones.factory import load_backbone

    config = loaded.config
    if config.model.source != "open_clip":
        raise UnsupportedModelError(
            f"--to open_clip: the run's model.source is {config.model.source!r}, which has no text tower; "
            "export it with --to timm"
        )
    model = load_backbone(config.model).clip.model
    load_state_dict_strict(
        model.visual, loaded.predictor.backbone.visual.state_dict(), run_dir, "the OpenCLIP image tower"
    )
    save_open_clip_directory(model, out, config)
    save_classifier(loaded, out)


def save_open_clip_directory(model: nn.Module, out: Path, config: Any) -> None:
    """open_clip's local-dir layout: ``open_clip_model.safetensors`` + ``open_clip_config.json``."""
    import open_clip

    from robustft.backbones.checkpoint_files import save_state_dict_file

    out.mkdir(parents=True, exist_ok=True)
    save_state_dict_file(model.state_dict(), out / "open_clip_model.safetensors")
    open_clip_config = {
        "model_cfg": open_clip_model_config(config.model.name, config.model.model_kwargs or {}),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    (out / "open_clip_config.json").write_text(json.dumps(open_clip_config, indent=2), encoding="utf-8")


def save_classifier(loaded: LoadedRun, out: Path) -> None:
    """The run's head (a linear layer over normalised image features), class names in the file's header."""
    from robustft.backbones.checkpoint_files import save_state_dict_file

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
    """peft's LoRA adapter of a LoRA run over its pretrained model (written to ``out/base``).

    The adapter's factors come from the run's ``adapter.safetensors``; a run saved without it (merged
    only, ``save_adapter: false``) has its factors recovered from the merged weights: ``W_tuned - W`` is
    exactly ``(alpha/r) B A``, of rank at most ``r``, so its rank-``r`` SVD gives factors with the same
    product (Hu et al., ICLR 2022, arXiv:2106.09685, eq. 3).

    timm base: the head travels in the adapter (``modules_to_save``), the base's head is a placeholder.
    OpenCLIP base (the whole pretrained CLIP model, open_clip's local-dir layout): an ``nn.MultiheadAttention``
    is targeted by its own name, which peft's ``lora.MultiheadAttention`` adapts on both its fused
    ``in_proj_weight`` and its ``out_proj`` with one rank and scale, the same update ``h = W x + (alpha/r) B A x``
    robustft adds there; a projection the run left alone gets ``B = 0``, so the update is exactly its own.
    The head (over normalised image features) is ``classifier.safetensors``, as in the open_clip export.
    """
    from peft import LoraConfig, get_peft_model

    from robustft.backbones.factory import load_backbone

    config = loaded.config
    if config.method.name != "lora":
        raise UnsupportedModelError(
            f"--to peft: the run's method is {config.method.name!r}; a peft adapter holds a LoRA run's update "
            "(method.name: lora); export other runs with --to timm or --to open_clip"
        )
    backbone = load_backbone(config.model)
    pretrained = backbone.backbone.state_dict()
    factors, rank, alpha, dropout = lora_factors(loaded, run_dir, pretrained)
    if config.model.source == "open_clip":
        base = backbone.clip.model
        save_open_clip_directory(base, out / PEFT_BASE_DIR, config)
        save_classifier(loaded, out)
        modules_to_save = None
    else:
        base = timm_model(loaded, pretrained, target="peft")
        _, model_args = timm_architecture(config)
        save_timm_directory(base, out / PEFT_BASE_DIR, loaded, model_args)
        modules_to_save = [classifier_name(base)]
    placements = {layer: peft_placement(base, layer) for layer in factors}
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted({target for target, _ in placements.values()}),
        modules_to_save=modules_to_save,
        bias="none",
    )
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    inner = peft_model.base_model.model
    out_proj_times = None
    with torch.no_grad():
        for layer, (factor_a, factor_b) in factors.items():
            target, holder_name = placements[layer]
            if holder_name != target:
                out_proj_times = out_proj_times or peft_out_proj_update_count()
                factor_b = factor_b / out_proj_times
            holder = inner.get_submodule(holder_name)
            holder.lora_A["default"].weight.copy_(factor_a)
            holder.lora_B["default"].weight.copy_(factor_b)
        if modules_to_save:
            head = inner.get_submodule(modules_to_save[0]).modules_to_save["default"]
            head.load_state_dict(loaded.predictor.head.state_dict())
    peft_model.peft_config["default"].base_model_name_or_path = f"local-dir:{PEFT_BASE_DIR}"
    peft_model.save_pretrained(str(out), save_embedding_layers=False)  # no vocabulary: no hub lookup of the base


def peft_out_proj_update_count() -> int:
    """How many times the installed peft's ``lora.MultiheadAttention`` adds the ``out_proj`` update ``(alpha/r) B A``.

    peft 0.21 adds it twice (its ``merge``, which its forward also runs, writes ``W + dW`` into ``out_proj`` and
    then calls ``out_proj.merge()``, which adds ``dW`` again; an open upstream fix removes the first). Measured on
    a 4-wide attention rather than keyed on the version, so the export stays exact before and after that fix;
    the adapter then holds ``B / count`` for ``out_proj``, and is meant for a peft that counts the same (its
    ``adapter_config.json`` records ``peft_version``).

    Raises:
        UnsupportedModelError: a count other than one or two (a peft whose update this export cannot express).
    """
    from peft import LoraConfig, get_peft_model

    probe = nn.Sequential()
    probe.add_module("attention", nn.MultiheadAttention(4, 1))
    wrapped = get_peft_model(probe, LoraConfig(r=1, lora_alpha=1, target_modules=["attention"]))
    layer = wrapped.base_model.model.attention
    out_proj = layer.get_base_layer().out_proj
    with torch.no_grad():
        out_proj.lora_A["default"].weight.fill_(1.0)
        out_proj.lora_B["default"].weight.fill_(1.0)
        before = out_proj.get_base_layer().weight.detach().clone()
        layer.merge()
        applied = out_proj.get_base_layer().weight.detach() - before
        layer.unmerge()
        count = round(float(applied.mean()) / float(out_proj.get_delta_weight("default").mean()))
    if count not in (1, 2):
        raise UnsupportedModelError(
            f"--to peft: the installed peft adds an nn.MultiheadAttention's out_proj LoRA update {count} times; "
            "this export cannot express the run's update for it"
        )
    return count


def peft_placement(base: nn.Module, layer: str) -> tuple[str, str]:
    """``(peft target module, module holding its lora_A/lora_B once wrapped)`` for a robustft LoRA layer.

    An ``nn.MultiheadAttention``'s ``<attention>.in_proj`` / ``<attention>.out_proj`` are both reached through
    the attention itself in peft: ``lora_A``/``lora_B`` on the wrapper for ``in_proj_weight``, and on the
    wrapped ``base_layer.out_proj`` for the output projection.
    """
    from robustft.adapters.attention import IN_PROJ
    from robustft.adapters.targets import multihead_owner

    if multihead_owner(base, layer) is None:
        return layer, layer
    attention, _, projection = layer.rpartition(".")
    return attention, attention if projection == IN_PROJ else f"{attention}.base_layer.out_proj"


def lora_factors(
    loaded: LoadedRun, run_dir: Path, pretrained: dict[str, Tensor]
) -> tuple[dict[str, tuple[Tensor, Tensor]], int, float, float]:
    """``{layer name in the backbone: (A [r, in], B [out, r])}``, rank, alpha and dropout of a LoRA run."""
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
    backbone = loaded.predictor.backbone
    targets = {name: _weight_key(backbone, name) for name in _target_layers(loaded, options.target_modules)}
    outside = [key for key in changed if key not in targets.values()]
    if outside:
        raise CheckpointError(
            f"{run_dir}: weights outside the LoRA layers differ from the pretrained model ({', '.join(outside[:3])}); "
            "not a LoRA update"
        )
    factors = {}
    for layer, key in sorted(targets.items()):
        delta = (tuned[key].cpu().double() - pretrained[key].double()) / (alpha / rank)
        left, singular, right = torch.linalg.svd(delta, full_matrices=False)
        root = singular[:rank].sqrt()
        factors[layer] = (
            (root[:, None] * right[:rank]).to(tuned[key].dtype),
            (left[:, :rank] * root).to(tuned[key].dtype),
        )
    return factors, rank, alpha, float(options.dropout)


def _target_layers(loaded: LoadedRun, patterns: list[str]) -> list[str]:
    """The run's LoRA layers, as names inside the backbone (timm names)."""
    from robustft.adapters import select_linear_layers

    return [_timm_name(name) for name in select_linear_layers(loaded.predictor, patterns)]


def _weight_key(backbone: nn.Module, layer: str) -> str:
    """The state-dict key of a LoRA layer's weight: ``<attention>.in_proj_weight`` for a fused projection."""
    from robustft.adapters.attention import IN_PROJ
    from robustft.adapters.targets import multihead_owner

    if multihead_owner(backbone, layer) is not None and layer.endswith(f".{IN_PROJ}"):
        return f"{layer.removesuffix(IN_PROJ)}in_proj_weight"
    return f"{layer}.weight"


def _timm_name(layer: str) -> str:
    return layer.removeprefix("backbone.")
