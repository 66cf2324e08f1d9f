"""CLIP / OpenCLIP backbones from local files, and their text zero-shot heads.

The model is built with ``pretrained=None`` (random init, nothing downloaded) and the weights come
from a local checkpoint through ``load_state_dict_file``, so unsafe pickles are refused the same
way for every backbone. The image tower becomes the classifier's backbone; the text tower is only
used to build the zero-shot head (docs/methods.md, `zeroshot`), following open_clip's
``build_zero_shot_classifier``, which builds it (templates averaged, L2-normalised, one column per class).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from torch import Tensor, nn

from robustft.backbones.builtin import GLYPH_CLIP, register_glyph_clip
from robustft.backbones.checkpoint_files import load_state_dict_file, load_state_dict_strict
from robustft.backbones.classifier import ImageClassifier, linear_head
from robustft.backbones.templates import load_templates
from robustft.errors import ConfigError

# create_model arguments that would load or download weights behind load_state_dict_file's back.
_WEIGHT_ARGS = frozenset({
    "pretrained", "load_weights", "pretrained_image", "pretrained_text", "pretrained_hf",
    "pretrained_image_path", "pretrained_text_path", "require_pretrained", "cache_dir", "weights_only", "jit",
})  # fmt: skip
# open_clip resize modes -> timm crop modes with the same geometry.
_CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


@dataclass
class OpenClipParts:
    """What the rest of robustft needs from an open_clip model.

    Attributes:
        image_encoder: images -> *unnormalised* image embeddings (the classifier normalises them).
        model: the full open_clip model; its text tower builds zero-shot heads. It shares the
            image tower with ``image_encoder``.
        tokenizer: list of strings -> token ids ``[N, context_length]``.
        logit_scale: ``exp`` of the model's learned logit scale (100 for trained CLIP models).
        data_config: preprocessing in timm's keys (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``crop_mode``).
    """

    image_encoder: nn.Module
    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    logit_scale: float
    data_config: dict[str, Any]


class OpenClipImageEncoder(nn.Module):
    """The image tower alone, so a classifier's parameters (optimiser, WiSE-FT) exclude the text tower.

    ``visual(x)`` is what ``model.encode_image(x, normalize=False)`` returns for CLIP and
    CustomTextCLIP; CoCa's tower also returns its tokens, which are dropped.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        output = self.visual(images)
        return output[0] if isinstance(output, tuple) else output


def register_open_clip_config(path: str | Path) -> str:
    """Make a local model config JSON (open_clip's ``model_configs`` format) available by name.

    open_clip only builds models from named configs, so custom or tiny architectures are added to
    its registry with ``open_clip.add_model_config``; the name is the file's stem. That registry is
    open_clip's process-wide state, so a file that would replace a different config of the same name
    (e.g. a built-in one) is refused rather than silently changing what that name builds.

    Returns:
        the model name to pass to ``load_open_clip``.

    Raises:
        ConfigError: missing or invalid file, or a name clash with a different config.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name: cannot read open_clip model config {path}: {error}") from error
    if not isinstance(config, dict) or any(key not in config for key in _CONFIG_KEYS):
        raise ConfigError(f"model.name: {path} is not an open_clip model config (needs keys {_CONFIG_KEYS})")
    name = path.stem
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) != config:
            raise ConfigError(f"model.name: {path} would replace open_clip's existing config '{name}'; rename the file")
        return name
    open_clip.add_model_config(path)
    return name


def load_open_clip(
    name: str, checkpoint: str | Path | None, model_kwargs: dict[str, Any] | None = None
) -> OpenClipParts:
    """Build open_clip model ``name`` and load a local checkpoint into it (strictly).

    Args:
        name: an open_clip model name (``ViT-B-32``, ``ViT-B-16-quickgelu``; see
            ``open_clip.list_models()``; ``glyph-clip`` is the built-in tiny CLIP) or the path
            of a model config ``.json`` (registered first,
            see ``register_open_clip_config``).
        checkpoint: local weights (open_clip's ``open_clip_model.safetensors`` /
            ``open_clip_pytorch_model.bin``, or a training checkpoint wrapped in ``state_dict``
            with ``module.`` prefixes), or None for random weights.
        model_kwargs: passed to ``open_clip.create_model``: architecture overrides (``vision_cfg``,
            ``text_cfg``, ``embed_dim`` replace the config's entries) or ``force_*`` options.

    Raises:
        ConfigError: unknown model, a weight-loading argument in ``model_kwargs``, or arguments
            open_clip rejects.
        CheckpointError: the checkpoint is missing, unsafe, corrupt or does not match the model.
    """
    if name.endswith(".json"):
        name = register_open_clip_config(name)
    if name == GLYPH_CLIP:
        register_glyph_clip()
    if name not in open_clip.list_models():
        raise ConfigError(f"model.name: unknown open_clip model '{name}'; see open_clip.list_models()")
    kwargs = dict(model_kwargs or {})
    forbidden = sorted(_WEIGHT_ARGS & kwargs.keys())
    if forbidden:
        raise ConfigError(
            f"model.model_kwargs: '{forbidden[0]}' is not allowed; weights load from model.checkpoint only"
        )
    model = _create(name, kwargs, quiet=checkpoint is not None)
    if checkpoint is not None:
        state = _adapt_state_dict(model, load_state_dict_file(checkpoint))
        load_state_dict_strict(model, state, checkpoint, f"open_clip model '{name}'")
    return OpenClipParts(
        image_encoder=OpenClipImageEncoder(model.visual),
        model=model,
        tokenizer=open_clip.get_tokenizer(name, context_length=getattr(model, "context_length", None)),
        logit_scale=float(model.logit_scale.detach().exp().reshape(-1)[0]),
        data_config=_data_config(model),
    )


def _create(name: str, kwargs: dict[str, Any], quiet: bool) -> nn.Module:
    # pretrained_text/image=False: hf-text and timm towers would otherwise fetch their own weights.
    try:
        with _dropping_root_log("No pretrained weights loaded", enabled=quiet):
            return open_clip.create_model(
                name, pretrained=None, pretrained_image=False, pretrained_text=False, **kwargs
            )
    except (TypeError, ValueError, AssertionError, KeyError) as error:
        raise ConfigError(f"model.model_kwargs: open_clip cannot build '{name}' with {kwargs}: {error}") from error


@contextmanager
def _dropping_root_log(prefix: str, enabled: bool) -> Iterator[None]:
    """Drop open_clip's root-logger warning "initialized randomly", false when a checkpoint follows."""
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    if enabled:
        root.addFilter(keep)
    try:
        yield
    finally:
        if enabled:
            root.removeFilter(keep)


def _adapt_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The conversions open_clip's own ``load_checkpoint`` applies, on weights we loaded safely."""
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # old CLIP layout -> CustomTextCLIP's .text.*
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)  # checkpoint at another image size -> interpolate the grid
    resize_text_pos_embed(state, model)
    return state


def _data_config(model: nn.Module) -> dict[str, Any]:
    """open_clip's preprocess config in timm's keys. crop_pct=1.0: CLIP resizes then crops the full side."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return {
        "input_size": (3, int(height), int(width)),
        "mean": tuple(float(value) for value in cfg["mean"]),
        "std": tuple(float(value) for value in cfg["std"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": _CROP_MODES.get(cfg.get("resize_mode", "shortest"), "center"),
    }


def open_clip_classifier(parts: OpenClipParts, head: nn.Linear) -> ImageClassifier:
    """The CLIP classifier: image tower, normalised features, ``head`` (its weights hold the logit scale)."""
    return ImageClassifier(parts.image_encoder, head, normalize_features=True, data_config=parts.data_config)


def text_zero_shot_head(
    parts: OpenClipParts, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> nn.Linear:
    """The CLIP zero-shot head (docs/methods.md, `zeroshot`), as ``nn.Linear`` with zero bias.

    Row ``c`` is ``logit_scale * normalise(mean_t normalise(encode_text(template_t.format(class_c))))``,
    so on normalised image features it gives CLIP's logits. Normalising each prompt before the mean
    keeps every template's vote equal, as in open_clip's ``build_zero_shot_classifier``.

    Args:
        parts: from ``load_open_clip``.
        class_names: one name per class, in label order.
        templates: prompt templates, each with one ``{}`` (see ``templates.load_templates``).
        batch_size: at most this many prompts per text-encoder pass (whole classes per pass, at least one).

    Raises:
        ValueError: no class names. ConfigError: a template without a single ``{}``.
    """
    if not class_names:
        raise ValueError("text_zero_shot_head: class_names is empty")
    templates = load_templates(list(templates))
    classes_per_batch = max(1, batch_size // len(templates))
    device = next(parts.model.parameters()).device
    with _eval_mode(parts.model):
        columns = open_clip.build_zero_shot_classifier(
            parts.model, parts.tokenizer, list(class_names), templates, classes_per_batch, device
        )
    return linear_head(columns.T.float().cpu() * parts.logit_scale)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout in text features), then every submodule's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
