"""FLYP, "Finetune Like You Pretrain" (Goyal, Kumar, Garg, Kolter and Raghunathan, CVPR 2023,
arXiv:2212.00638; reference code locuslab/FLYP).

Fine-tune a CLIP-style model with the loss it was pretrained with instead of cross-entropy: each
training image is paired with a caption of its class (a prompt template filled with the class name),
and both towers are trained with CLIP's symmetric contrastive loss over the batch,

    L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2,     I, T: L2-normalised image / caption embeddings

with ``s = exp(logit_scale)`` the model's own learnt scale (Radford et al. 2021, Fig. 3; FLYP, sec. 3).
The classifier is never trained directly: when training ends the zero-shot head is rebuilt from the
*tuned* text tower over all templates, so the image and text towers stay in the geometry of
pretraining, which is where FLYP finds its OOD gains over FT and WiSE-FT.

Decisions (read in locuslab/FLYP):

- Captions: one template per sample, drawn uniformly from the run's ``model.templates`` by a
  generator seeded with the run's seed and saved in checkpoints (resume draws the same captions);
  under several processes every rank draws for the global batch and keeps its rows.
  The reference pre-writes captions to a CSV; the draw is the same idea without the file.
- Two images of one class in a batch may get the same caption; like the reference, the loss still
  treats the other pair as a negative (no de-duplication).
- ``logit_scale`` is trained and clamped to ``log(max_logit_scale)`` after each step, as in open_clip
  training; the final head carries the tuned scale (the reference's ``get_zeroshot_classifier``).
- Several processes (DDP): every rank's image and caption embeddings are gathered with their gradients
  (``distributed.gather_with_grad``) and each rank scores its own pairs against the whole global batch's,
  open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``; with the engine's per-rank loss weights
  and DDP's mean that is the gradient of the 1-process loss over the global batch (docs/distributed.md).
- The text tower is re-loaded from the run's ``model:`` section (the classifier only holds the image
  tower); a model without a text tower is refused at ``prepare`` with ``UnsupportedModelError``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from robustft import distributed
from robustft.backbones.classifier import ImageClassifier
from robustft.config import MethodConfig
from robustft.errors import UnsupportedModelError
from robustft.methods.base import Batch, Method, RunContext, register_method


class FlypConfig(MethodConfig):
    max_logit_scale: float = Field(100.0, gt=0, description="the learnt logit scale is clamped to at most this")


def clip_contrastive_loss(image_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric cross-entropy over a batch of matching (image, text) pairs (FLYP's training loss).

    Row ``i`` of both inputs is a pair. With ``S = logit_scale * image_embeddings @ text_embeddings^T``
    the loss is ``(CE(S, diag) + CE(S^T, diag)) / 2``: each image must pick its caption among the
    batch's captions, and each caption its image.

    Args:
        image_embeddings: ``[B, D]``, L2-normalised.
        text_embeddings: ``[B, D]``, L2-normalised.
        logit_scale: the multiplier ``s`` (already exponentiated), a scalar tensor or float.
    """
    logits = logit_scale * image_embeddings @ text_embeddings.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def local_contrastive_loss(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    all_image_embeddings: Tensor,
    all_text_embeddings: Tensor,
    logit_scale: Tensor | float,
    offset: int,
) -> Tensor:
    """:func:`clip_contrastive_loss`'s rows for one rank's pairs, scored against the whole global batch.

    The local pairs are rows ``offset .. offset + B_local`` of the gathered ``all_*`` embeddings; each local image
    picks its caption among all captions and each local caption its image among all images (open_clip's
    ``ClipLoss`` with ``local_loss=True``). The mean of this over ranks, each weighted by its share of the global
    batch, is :func:`clip_contrastive_loss` of the global batch.
    """
    logits_per_image = logit_scale * image_embeddings @ all_text_embeddings.T
    logits_per_text = logit_scale * text_embeddings @ all_image_embeddings.T
    targets = torch.arange(image_embeddings.shape[0], device=image_embeddings.device) + offset
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


class FlypModel(nn.Module):
    """What FLYP trains: the classifier (its image tower; the head is frozen and rebuilt at the end) and
    the open_clip model's text tower with its logit scale (the model's own image tower is dropped)."""

    def __init__(self, classifier: ImageClassifier, text_model: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.text_model = text_model

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.text_model.logit_scale

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text_model.encode_text(tokens, normalize=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images)


@register_method
class Flyp(Method):
    """FLYP: contrastive fine-tuning of both CLIP towers against class-prompt captions (module docstring)."""

    name = "flyp"
    config_cls = FlypConfig
    requires_text_tower = True

    def __init__(self, config: FlypConfig | None = None) -> None:
        super().__init__(config)
        self.generator = torch.Generator()
        self.templates: list[str] = []
        self.tokens: Tensor | None = None  # [classes, templates, context] caption token ids
        self.tokenizer: Any = None

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """FLYP's contrastive loss needs the text tower of a CLIP-style model."""
        if model_spec.get("source") != "open_clip":
            return (
                f"method flyp: needs a CLIP-style model with a text tower (model.source: open_clip); "
                f"model '{model_spec.get('name')}' (source {model_spec.get('source')}) has none"
            )
        return None

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        from robustft.backbones.templates import load_templates

        text_model, self.tokenizer = load_text_tower(ctx.model_spec, ctx.seed)
        if not isinstance(model, ImageClassifier):
            raise UnsupportedModelError(f"method flyp: expected an ImageClassifier, got {type(model).__name__}")
        self.templates = load_templates(ctx.model_spec.get("templates", "imagenet"))
        captions = [template.format(name) for name in ctx.class_names for template in self.templates]
        tokens = self.tokenizer(captions)
        self.tokens = tokens.view(len(ctx.class_names), len(self.templates), -1).to(ctx.device)
        self.generator.manual_seed(ctx.seed)
        model.head.requires_grad_(False)  # rebuilt from the text tower at finalize
        return FlypModel(model, text_model.to(ctx.device))

    def caption_tokens(self, labels: Tensor, offset: int = 0, total: int | None = None) -> Tensor:
        """Token ids of one caption per sample: a random template (seeded) filled with its class name.

        Under several processes the draw is for the whole global batch of ``total`` samples and this rank takes
        its rows from ``offset``, so every rank draws the captions one process draws for the same batch.
        """
        if self.tokens is None:
            raise RuntimeError("Flyp.caption_tokens called before prepare")
        total = labels.shape[0] if total is None else total
        choice = torch.randint(len(self.templates), (total,), generator=self.generator)[offset : offset + len(labels)]
        return self.tokens[labels, choice.to(labels.device, non_blocking=True)]

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        scale = model.logit_scale.exp()
        image_embeddings = F.normalize(model.classifier.image_embedding(images), dim=-1)
        if distributed.world_size() == 1:
            text_embeddings = F.normalize(model.encode_text(self.caption_tokens(labels)), dim=-1)
            loss = clip_contrastive_loss(image_embeddings, text_embeddings, scale)
        else:  # the global batch's captions, and one gather of both embeddings, in rank order
            rows = distributed.shard_sizes(labels.shape[0])
            offset = sum(rows[: distributed.rank()])
            text_embeddings = F.normalize(model.encode_text(self.caption_tokens(labels, offset, sum(rows))), dim=-1)
            pairs, _ = distributed.gather_with_grad(torch.cat([image_embeddings, text_embeddings], dim=1), rows)
            all_images, all_texts = pairs.split([image_embeddings.shape[1], text_embeddings.shape[1]], dim=1)
            loss = local_contrastive_loss(image_embeddings, text_embeddings, all_images, all_texts, scale, offset)
        return loss, {"logit_scale": model.logit_scale.detach().exp()}

    def after_step(self, model: nn.Module, step: int) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """The classifier with its head rebuilt from the tuned text tower (all templates, tuned scale)."""
        from robustft.backbones.open_clip_backbone import OpenClipParts, text_zero_shot_head

        classifier: ImageClassifier = model.classifier
        parts = OpenClipParts(
            image_encoder=classifier.backbone,
            model=model.text_model,
            tokenizer=self.tokenizer,
            logit_scale=float(model.logit_scale.detach().exp()),
            data_config=classifier.data_config,
        )
        classifier.head = text_zero_shot_head(parts, ctx.class_names, self.templates).to(ctx.device)
        return classifier

    def state_dict(self) -> dict[str, Any]:
        return {"caption_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["caption_generator"])


def load_text_tower(model_spec: dict[str, Any], seed: int) -> tuple[nn.Module, Any]:
    """The open_clip model of the run's ``model:`` section without its image tower, and its tokenizer.

    Loaded again from the same local files as the classifier; with no checkpoint (random weights) the
    run's seed is replayed so the text tower is the one that built the zero-shot head (``prepare_run``
    seeds right before loading the backbone).

    Raises:
        UnsupportedModelError: the model has no text tower (not ``model.source: open_clip``).
    """
    if model_spec.get("source") != "open_clip":
        raise UnsupportedModelError(
            f"method flyp: needs a CLIP-style model with a text tower (model.source: open_clip); "
            f"model '{model_spec.get('name')}' (source {model_spec.get('source')}) has none"
        )
    from robustft.backbones.open_clip_backbone import load_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = load_open_clip(model_spec["name"], model_spec.get("checkpoint"), model_spec.get("model_kwargs"))
    parts.model.visual = None  # the classifier's image tower is the one trained
    return parts.model, parts.tokenizer
