"""Masked images as counterfactual samples (Xiao et al., CVPR 2023, arXiv:2303.03052; docs/methods.md).

Fine-tuning learns spurious correlations of the narrow training distribution (the object's
context, or shortcuts inside the object). The paper breaks them with counterfactual images: a
class activation map of the model being fine-tuned (the student) marks the object's patches; the
object (or its context, or random patches) is masked and refilled with patches of other images
of the batch; the student must embed these images as the frozen zero-shot model (the teacher)
does. The loss of one batch (paper, Eq. 6; official code ``FT_FD_image_mask``) is

    L = CE(f_s(x), y) + beta * MSE(g_s(x~), g_t(x~)),

with ``g`` the unnormalised image embedding, ``x~`` the counterfactual images and beta = 30.
The CAM is computed at every step from the student in eval mode for the ground-truth class
(``robustft.cam.attention_rollout_cam``); the final model is the plain student, no teacher.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from robustft.backbones.class_token import class_token_embedding
from robustft.backbones.classifier import ImageClassifier
from robustft.cam import (
    CounterfactualSpec,
    PatchLayout,
    embedding_without_patches,
    has_train_mode_randomness,
    make_counterfactuals,
    patch_layout,
)
from robustft.config import MethodConfig
from robustft.errors import ConfigError
from robustft.methods.base import Batch, Method, RunContext, record_preset, register_method

# The paper's variants, with the thresholds / rates of the official example.sh.
VARIANTS: dict[str, dict[str, Any]] = {
    "obj_mask_single_fill": {"mask": "object", "fill": "single", "threshold": 0.3},
    "ctx_mask_single_fill": {"mask": "context", "fill": "single", "threshold": 0.5},
    "rand_mask_single_fill": {"mask": "random", "fill": "single", "rate": 0.5},
    "obj_mask_multi_fill": {"mask": "object", "fill": "multi", "threshold": 0.6},
    "ctx_mask_multi_fill": {"mask": "context", "fill": "multi", "threshold": 0.3},
    "rand_mask_multi_fill": {"mask": "random", "fill": "multi", "rate": 0.5},
    "obj_mask_no_fill": {"mask": "object", "fill": "none", "threshold": 0.3},
    "ctx_mask_no_fill": {"mask": "context", "fill": "none", "threshold": 0.6},
    "rand_mask_no_fill": {"mask": "random", "fill": "none", "rate": 0.75},
}
VariantName = Literal[
    "obj_mask_single_fill", "ctx_mask_single_fill", "rand_mask_single_fill",
    "obj_mask_multi_fill", "ctx_mask_multi_fill", "rand_mask_multi_fill",
    "obj_mask_no_fill", "ctx_mask_no_fill", "rand_mask_no_fill",
]  # fmt: skip
PresetName = VariantName  # former names
PRESETS = VARIANTS


class MaskedCounterfactualConfig(MethodConfig):
    """Options; defaults are the paper's headline variant (object mask, single fill, 0.3, beta 30).

    ``variant`` names one of the paper's nine variants (``preset: <variant>``, its former spelling, still
    works); ``preset: paper`` is the headline variant with the official code's single-fill permutation and
    token-dropping no-fill.
    """

    variant: VariantName = Field(
        "obj_mask_single_fill",
        description="paper variant; sets mask, fill and threshold/rate unless those are given explicitly",
    )
    mask: Literal["object", "context", "random"] = Field(
        "object", description="patches to mask: object (cam > threshold), context (the rest), random"
    )
    fill: Literal["single", "multi", "none"] = Field(
        "single", description="refill from one other image, each patch from a random other image, or blank (0)"
    )
    threshold: float = Field(0.3, ge=0, le=1, description="CAM threshold of object/context masks (CAM / max)")
    rate: float = Field(0.5, ge=0, le=1, description="probability that a patch is masked (random mask)")
    beta: float = Field(30.0, ge=0, description="weight of the feature-distillation term on counterfactuals")
    share_cam_forward: bool = Field(
        True,
        description="task loss on the CAM forward's logits when eval and train forwards agree (no dropout/drop-path)",
    )
    allow_self_fill: bool = Field(
        False, description="single fill: plain permutation as the official code (an image may refill itself)"
    )
    no_fill: Literal["blank", "drop_tokens"] = Field(
        "blank",
        description="fill none: blank masked patches to 0, or drop their tokens (the paper: attention mask; "
        "random mask keeps exactly int(P(1-rate)) tokens)",
    )

    paper_preset: ClassVar[dict[str, Any]] = {
        "variant": "obj_mask_single_fill",
        "beta": 30.0,
        "allow_self_fill": True,
        "no_fill": "drop_tokens",
    }

    @classmethod
    def resolve_preset(cls, data: Any) -> Any:
        """``preset: <variant>`` is ``variant: <variant>``; then the paper preset; then the variant's options."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("preset") in VARIANTS:
            data["variant"] = data.pop("preset")
        data = super().resolve_preset(data)
        variant = VARIANTS.get(data.get("variant")) if "variant" in data else None
        return {**variant, **data} if variant is not None else data

    def spec(self) -> CounterfactualSpec:
        return CounterfactualSpec(
            self.mask, self.fill, self.threshold, self.rate, self.allow_self_fill, self.no_fill == "drop_tokens"
        )


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the zero-shot model: eval mode, no gradients, not a submodule of the student."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Mean squared error of unnormalised image embeddings (official ``nn.MSELoss()``: mean over B x D)."""
    return F.mse_loss(student_embedding.float(), teacher_embedding.float())


@register_method
class MaskedCounterfactual(Method):
    """FT + feature distillation on CAM-masked, refilled images (docs/methods.md, `masked_counterfactual`).

    ``prepare`` copies the zero-shot model into a frozen teacher held by the method (so it is in
    neither the optimiser nor a checkpoint; a resumed run rebuilds it from the same zero-shot
    model). ``loss`` makes the counterfactuals and returns the task and distillation terms;
    ``finalize`` drops the teacher and returns the student.

    Cost: the CAM adds an eval-mode forward and a backward to the attention maps, the
    distillation a student forward/backward and a teacher forward. When the model has no
    dropout, drop-path or batch norm, its eval-mode CAM forward *is* the training forward, so
    (``share_cam_forward``) the task loss reuses its logits instead of running the clean images
    again; the update is the same up to the fused vs explicit attention kernels' rounding. The
    embedding and the rollout's ``R[CLS]`` read only the class token's row of the last block, so
    the CAM, teacher and student forwards run that block for the class token alone
    (``robustft.backbones.class_token``: keys and values from every token; about 13% of each
    forward and backward of the 6-block digits ViT; exact up to float rounding). A step measures
    about 2.5x FT's on the digits ViT on a CPU (2.9x before; docs/benchmarks.md).
    """

    name = "masked_counterfactual"
    config_cls = MaskedCounterfactualConfig

    def __init__(self, config: MaskedCounterfactualConfig | None = None) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.layout: PatchLayout | None = None
        self.share_forward = False

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """The CAM needs a ViT whose patch layout ``robustft.cam`` can read."""
        try:
            patch_layout(model)
        except ValueError as error:
            return f"method masked_counterfactual: {error}"
        return None

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        if not isinstance(model, ImageClassifier):
            raise ConfigError(f"method masked_counterfactual needs an ImageClassifier, got {type(model).__name__}")
        try:
            self.layout = patch_layout(model)
        except ValueError as error:
            raise ConfigError(f"method masked_counterfactual: {error}") from error
        self.teacher = frozen_teacher(model)
        self.share_forward = self.config.share_cam_forward and not has_train_mode_randomness(model)
        record_preset(self.config, ctx)
        return model

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if self.teacher is None:
            raise RuntimeError("MaskedCounterfactual.loss called before prepare")
        images, labels = batch
        made = make_counterfactuals(model, images, labels, self.config.spec(), self.layout, self.share_forward)
        logits = made.logits if made.logits is not None else model(images)
        task = F.cross_entropy(logits, labels)
        if self.config.spec().drops_tokens:
            with torch.no_grad():
                target = embedding_without_patches(self.teacher, made.images, made.mask)
            student = embedding_without_patches(model, made.images, made.mask)
        else:
            with torch.no_grad():
                target = class_token_embedding(self.teacher, made.images)
            student = class_token_embedding(model, made.images)
        distill = distillation_loss(student, target)
        logs = {"loss_task": task.detach(), "loss_distill": distill.detach(), "masked": made.mask.float().mean()}
        return task + self.config.beta * distill, logs

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.teacher = None
        return model
