"""Class activation maps for ViTs, patch masks and refilling: the counterfactual images of masked-image
counterfactual fine-tuning.

Xiao et al., "Masked Images Are Counterfactual Samples for Robust Fine-tuning" (CVPR 2023,
arXiv:2303.03052) mask the patches a class activation map (CAM) marks as the object (or the
context, or random ones) and refill them with patches of other images of the batch; the
fine-tuned model must then embed those images as the frozen pretrained model does. This module
holds the parts that do not depend on training, as functions on batched tensors:

- ``capture_attention``: the post-softmax attention of every block of a timm ViT or an OpenCLIP
  ViT (default blocks, ``nn.MultiheadAttention``). Fused attention (``scaled_dot_product_attention``)
  never materialises the probabilities, so the blocks run their explicit path while the context
  is open and are restored on exit; timm is not forked and the model is unchanged afterwards.
- ``attention_rollout_cam``: gradient-weighted attention rollout (Chefer et al., ICCV 2021, the
  CAM the paper uses): per block ``A = mean_heads(clamp(dy/dattn * attn, min=0))``,
  ``R <- R + A @ R`` from the identity, CAM = ``R[CLS, patches] / max``.
- ``object_mask`` / ``context_mask`` / ``random_mask`` over patches and ``refill`` (single, multi,
  none): the counterfactual images.
- ``cam_figures``: PNG overlays for ``robustft cam``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.backbones.class_token import class_token_logits
from robustft.errors import UnsupportedModelError

MaskKind = Literal["object", "context", "random"]
FillKind = Literal["single", "multi", "none"]


# --- model geometry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchLayout:
    """How a ViT cuts an image into tokens.

    Attributes:
        patch_size: ``(height, width)`` of one patch in pixels.
        num_prefix_tokens: tokens before the patches (class token first, then registers).
    """

    patch_size: tuple[int, int]
    num_prefix_tokens: int

    def grid(self, images: Tensor) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of a batch ``[B, C, H, W]``."""
        height, width = images.shape[-2:]
        rows, cols = height // self.patch_size[0], width // self.patch_size[1]
        if rows * self.patch_size[0] != height or cols * self.patch_size[1] != width:
            raise ValueError(f"image size {(height, width)} is not a multiple of the patch size {self.patch_size}")
        return rows, cols


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def patch_layout(model: nn.Module) -> PatchLayout:
    """Find the ViT inside ``model`` (timm ``VisionTransformer`` or OpenCLIP's) and read its layout.

    Raises:
        ValueError: no ViT found, or one that does not classify from a class token (the rollout
            CAM reads the class token's row, as in the paper).
    """
    for module in model.modules():
        patch_embed = getattr(module, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "patch_size") and hasattr(module, "num_prefix_tokens"):
            if getattr(module, "cls_token", None) is None or getattr(module, "global_pool", "token") != "token":
                raise UnsupportedModelError("attention-rollout CAM needs a ViT that classifies from its class token")
            return PatchLayout(_pair(patch_embed.patch_size), int(module.num_prefix_tokens))
        if hasattr(module, "class_embedding") and hasattr(module, "conv1") and hasattr(module, "patch_size"):
            if getattr(module, "pool_type", "tok") != "tok" or getattr(module, "attn_pool", None) is not None:
                raise UnsupportedModelError("attention-rollout CAM needs a ViT that classifies from its class token")
            return PatchLayout(_pair(module.patch_size), 1)
    raise UnsupportedModelError(f"no timm or OpenCLIP vision transformer found in {type(model).__name__}")


# --- attention capture ------------------------------------------------------------------------


def _timm_attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm ``Attention``-like modules: a ``fused_attn`` flag and an ``attn_drop`` layer.

    Their explicit path passes the post-softmax probabilities through ``attn_drop`` (identity in
    eval mode) and multiplies the result with the values, so a hook there sees the tensor that
    the output depends on.
    """
    return [
        module
        for name, module in model.named_modules()
        if "attn_pool" not in name
        and isinstance(getattr(module, "fused_attn", None), bool)
        and isinstance(getattr(module, "attn_drop", None), nn.Module)
    ]


class AttentionCapture:
    """Each block's attention probabilities, in forward order (see ``capture_attention``).

    ``tensors`` are the graph nodes the output depends on (differentiate with respect to these);
    ``per_head`` reshapes them, or their gradients, to ``[B, heads, L, L]``.
    """

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.shapes: list[torch.Size] = []

    def per_head(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        return [tensor.reshape(shape) for tensor, shape in zip(tensors, self.shapes, strict=True)]

    def _from_dropout(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.tensors.append(output)
        self.shapes.append(output.shape)

    def _from_multihead(self, module: nn.MultiheadAttention, inputs: tuple, output: tuple) -> None:
        weights = output[1]
        # With average_attn_weights=False the returned weights are a view of the [B*heads, L, L]
        # probabilities that multiply the values; only that base tensor is on the path to the output.
        self.tensors.append(weights._base if weights._base is not None else weights)
        self.shapes.append(weights.shape)


def _need_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionCapture]:
    """Record every block's attention probabilities during the forwards run inside the context.

    timm blocks are switched to their explicit (non-fused) attention path and hooked at
    ``attn_drop``; ``nn.MultiheadAttention`` (OpenCLIP's default block) is asked for per-head
    weights. On exit the fused flags are restored and the hooks removed, so the model
    computes exactly what it computed before.

    Raises:
        UnsupportedModelError: the model has no attention module this function knows.
    """
    if any(isinstance(getattr(m, "use_fsdpa", None), bool) for m in model.modules()):
        raise UnsupportedModelError(
            "OpenCLIP custom attention blocks (qk_norm, scaled cosine, ...) are not supported: their explicit "
            "attention path fails in open_clip 3.3 (bmm on 4-D tensors); use the default block type"
        )
    timm_blocks = _timm_attention_modules(model)
    multihead = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not timm_blocks and not multihead:
        raise UnsupportedModelError(f"no timm / OpenCLIP attention module found in {type(model).__name__}")
    capture = AttentionCapture()
    saved_flags = [(module, module.fused_attn) for module in timm_blocks]
    handles = []
    try:
        for module in timm_blocks:
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(capture._from_dropout))
        for module in multihead:
            handles.append(module.register_forward_pre_hook(_need_weights, with_kwargs=True))
            handles.append(module.register_forward_hook(capture._from_multihead))
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        for module, fused in saved_flags:
            module.fused_attn = fused


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# --- the CAM ----------------------------------------------------------------------------------


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021; Xiao et al. 2023, Sec. 3.2).

    Args:
        attentions: per block, attention probabilities ``[B, heads, L, L]``.
        gradients: per block, d(class score)/d(attention), same shapes.

    Returns:
        the relevance matrix ``R`` ``[B, L, L]``: ``R_0 = I``, ``R <- R + mean_h(clamp(g * a, 0)) @ R``.
    """
    batch, _, length, _ = attentions[0].shape
    relevance = torch.eye(length, device=attentions[0].device).expand(batch, length, length)
    for attention, gradient in zip(attentions, gradients, strict=True):
        weighted = (gradient.float() * attention.float()).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


def class_token_relevance(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """The class token's row of ``gradient_rollout``: ``R[:, 0]`` ``[B, L]``, without the ``L x L`` products.

    ``R = (I + W_n) ... (I + W_1)`` with ``W_l = mean_h(clamp(g_l * a_l, 0))``, so its first row is a row
    vector carried through the blocks from the last one: ``r <- e_0 + W_n[0]``, then ``r <- r + r W_l``.
    The last block's maps may hold the class token's query row only (``[B, heads, 1, L]``, from
    ``robustft.backbones.class_token``): no other row of them enters ``R[0]``.
    """
    last = (gradients[-1].float() * attentions[-1].float()).clamp(min=0).mean(dim=1)[:, 0]
    relevance = last + F.one_hot(torch.zeros_like(last[:, 0], dtype=torch.long), last.shape[-1]).to(last.dtype)
    for attention, gradient in zip(reversed(attentions[:-1]), reversed(gradients[:-1]), strict=True):
        weighted = (gradient.float() * attention.float()).clamp(min=0).mean(dim=1)
        relevance = relevance + (relevance.unsqueeze(1) @ weighted).squeeze(1)
    return relevance


class ClassActivation(NamedTuple):
    """A CAM ``[B, rows, cols]`` in [0, 1] and the logits of the forward it came from."""

    cam: Tensor
    logits: Tensor


def class_activation(
    model: nn.Module, images: Tensor, labels: Tensor, layout: PatchLayout | None = None, keep_graph: bool = False
) -> ClassActivation:
    """The class activation map of ``labels`` over the patch grid, in [0, 1], one backward per batch.

    ``model`` maps images to logits (an ``ImageClassifier`` over a timm or OpenCLIP ViT). It runs
    in eval mode (as the official code does) with attention captured; the summed ground-truth
    logits are differentiated with ``torch.autograd.grad`` with respect to the captured
    attention only, so no parameter's ``.grad`` changes. The relevance of the class token to each
    patch is divided by its per-image maximum (no minimum subtracted, as in the official code).
    Only the class token's row of the rollout is needed, so a supported ViT runs its last block for
    the class token alone (``robustft.backbones.class_token``; the same logits and CAM up to float
    rounding) and the rollout is carried as that one row (``class_token_relevance``).

    Args:
        model: the classifier.
        images: ``[B, 3, H, W]`` model inputs.
        labels: ``[B]`` class whose evidence is mapped (the ground truth during training).
        layout: the ViT's patch layout (found in ``model`` when None).
        keep_graph: keep the forward's graph so that a loss on the returned logits can be
            back-propagated into the parameters (otherwise the logits are detached).
    """
    layout = layout or patch_layout(model)
    rows, cols = layout.grid(images)
    # The input requires grad so that a graph to the attention exists whatever is frozen; a shared forward of a
    # fully trained model has one anyway, and there the loss's backward would compute an unused image gradient.
    trains_everything = all(parameter.requires_grad for parameter in model.parameters())
    probe = images.detach().requires_grad_(not (keep_graph and trains_everything))
    with torch.enable_grad(), eval_mode(model), capture_attention(model) as capture:
        logits = class_token_logits(model, probe)
        score = logits.gather(1, labels.view(-1, 1)).sum()
        gradients = torch.autograd.grad(score, capture.tensors, retain_graph=keep_graph)
    attentions = capture.per_head([tensor.detach() for tensor in capture.tensors])
    relevance = class_token_relevance(attentions, capture.per_head(gradients))
    cam = relevance[:, layout.num_prefix_tokens :].reshape(-1, rows, cols)
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-8)
    return ClassActivation(cam, logits if keep_graph else logits.detach())


def attention_rollout_cam(
    model: nn.Module, images: Tensor, labels: Tensor, layout: PatchLayout | None = None
) -> Tensor:
    """``[B, rows, cols]`` CAM of ``labels`` (see ``class_activation``)."""
    return class_activation(model, images, labels, layout).cam


# --- masks and refilling ----------------------------------------------------------------------


def object_mask(cam: Tensor, threshold: float) -> Tensor:
    """Patches the CAM marks as the object: ``cam > threshold`` (strict, as the official code)."""
    return cam > threshold


def context_mask(cam: Tensor, threshold: float) -> Tensor:
    """The complement of ``object_mask``: every patch the CAM does not mark."""
    return ~object_mask(cam, threshold)


def random_mask(
    shape: Sequence[int], rate: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """Each patch masked independently with probability ``rate`` (``[B, rows, cols]`` bool)."""
    return torch.rand(tuple(shape), device=device, generator=generator) < rate


def random_mask_exact(
    shape: Sequence[int], rate: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """Exactly ``P - int(P * (1 - rate))`` random patches masked per image (``[B, rows, cols]`` bool).

    The official random no-fill keeps ``int(P * (1 - rate))`` of the ``P`` patch tokens of every image
    (MAE-style: the lowest of ``P`` uniform noises), so every image keeps the same number of tokens.
    """
    batch, rows, cols = (int(size) for size in shape)
    patches = rows * cols
    kept = int(patches * (1 - rate))
    noise = torch.rand((batch, patches), device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank >= kept).view(batch, rows, cols)


def patch_mask(
    kind: MaskKind,
    cam: Tensor | None,
    threshold: float,
    rate: float,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dispatch to ``object_mask`` / ``context_mask`` (need ``cam``) or ``random_mask``."""
    if kind == "random":
        return random_mask(shape, rate, device, generator)
    if cam is None:
        raise ValueError(f"a '{kind}' mask needs a CAM")
    return object_mask(cam, threshold) if kind == "object" else context_mask(cam, threshold)


def patchify(images: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, rows, cols, C, ph, pw]`` (a view-friendly reshape, no copy of data order)."""
    batch, channels, height, width = images.shape
    ph, pw = patch_size
    patches = images.reshape(batch, channels, height // ph, ph, width // pw, pw)
    return patches.permute(0, 2, 4, 1, 3, 5)


def unpatchify(patches: Tensor) -> Tensor:
    """Inverse of ``patchify``."""
    batch, rows, cols, channels, ph, pw = patches.shape
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, rows * ph, cols * pw)


def single_fill_donors(
    batch: int, allow_self: bool = False, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """Donor image of each image for single-fill: ``[B]`` indices.

    Default: a random cyclic derangement (shuffle, then each image takes the next one's patches),
    so every image gets a counterfactual from exactly one *other* image, as the paper describes.
    ``allow_self=True`` draws a plain permutation like the official code, where an image can be
    its own donor (and then has no counterfactual). A batch of one is its own donor.
    """
    order = torch.randperm(batch, device=device, generator=generator)
    if allow_self:
        return order
    donors = torch.empty_like(order)
    donors[order] = order.roll(-1)
    return donors


def multi_fill_donors(
    shape: Sequence[int], device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """Donor image of each patch for multi-fill: ``[B, rows, cols]``, never the image itself (official)."""
    batch = shape[0]
    if batch < 2:
        return torch.zeros(tuple(shape), dtype=torch.long, device=device)
    shift = torch.randint(1, batch, tuple(shape), device=device, generator=generator)
    return (torch.arange(batch, device=device).view(-1, 1, 1) + shift) % batch


class Refilled(NamedTuple):
    """Counterfactual images and, per patch, the image it was taken from (``-1``: blanked)."""

    images: Tensor
    source: Tensor


def refill(
    images: Tensor,
    mask: Tensor,
    fill: FillKind,
    patch_size: tuple[int, int],
    allow_self: bool = False,
    fill_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> Refilled:
    """Replace the masked patches (Xiao et al. 2023, Sec. 3.3): the counterfactual images.

    Args:
        images: ``[B, C, H, W]`` model inputs.
        mask: ``[B, rows, cols]`` bool, True where a patch is replaced.
        fill: ``single``: every masked patch of an image from one other image of the batch (same
            position); ``multi``: each masked patch from an independently drawn other image;
            ``none``: masked patches set to ``fill_value`` (0 = the dataset mean colour for
            normalised inputs; the official no-fill variants hide the tokens from attention instead).
        patch_size: the ViT's patch size, so refilled regions are whole tokens.
        allow_self: single-fill only, see ``single_fill_donors``.
        fill_value: the ``none`` fill.
        generator: RNG for the donors (the global one when None).

    Returns:
        ``Refilled(images, source)``; ``source[b, i, j]`` is ``b`` for kept patches.
    """
    batch = images.shape[0]
    device = images.device
    patches = patchify(images, patch_size)
    own = torch.arange(batch, device=device).view(-1, 1, 1).expand(mask.shape)
    if fill == "single":
        donors = single_fill_donors(batch, allow_self, device, generator)
        source = donors.view(-1, 1, 1).expand(mask.shape)
        replacement = patches[donors]
    elif fill == "multi":
        source = multi_fill_donors(mask.shape, device, generator)
        rows = torch.arange(mask.shape[1], device=device).view(1, -1, 1)
        cols = torch.arange(mask.shape[2], device=device).view(1, 1, -1)
        replacement = patches[source, rows, cols]
    elif fill == "none":
        source = torch.full_like(own, -1)
        replacement = torch.full_like(patches, fill_value)
    else:
        raise ValueError(f"unknown fill '{fill}' (single, multi, none)")
    chosen = mask.view(*mask.shape, 1, 1, 1)
    out = unpatchify(torch.where(chosen, replacement, patches))
    return Refilled(out, torch.where(mask, source, own))


@dataclass(frozen=True)
class CounterfactualSpec:
    """Which counterfactuals to make: mask kind, fill, CAM threshold, random rate, how no-fill hides patches.

    ``drop_tokens`` (no-fill only): the masked patches are dropped from the ViT's tokens (the paper) instead
    of blanked to 0; a random mask then keeps exactly ``int(P * (1 - rate))`` tokens per image.
    """

    mask: MaskKind = "object"
    fill: FillKind = "single"
    threshold: float = 0.3
    rate: float = 0.5
    allow_self_fill: bool = False
    drop_tokens: bool = False

    @property
    def drops_tokens(self) -> bool:
        return self.drop_tokens and self.fill == "none"


class Counterfactuals(NamedTuple):
    """Counterfactual images, their patch mask and sources, the CAM and its forward's logits (or None)."""

    images: Tensor
    mask: Tensor
    source: Tensor
    cam: Tensor | None
    logits: Tensor | None


def make_counterfactuals(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    spec: CounterfactualSpec,
    layout: PatchLayout | None = None,
    keep_graph: bool = False,
    generator: torch.Generator | None = None,
) -> Counterfactuals:
    """CAM (unless the mask is random), patch mask and refill for one batch.

    ``keep_graph`` returns the CAM forward's logits with their graph (see ``class_activation``);
    otherwise ``logits`` is None.
    """
    layout = layout or patch_layout(model)
    rows, cols = layout.grid(images)
    cam = logits = None
    if spec.mask != "random":
        cam, logits = class_activation(model, images, labels, layout, keep_graph)
    shape = (images.shape[0], rows, cols)
    if spec.mask == "random" and spec.drops_tokens:
        mask = random_mask_exact(shape, spec.rate, images.device, generator)
    else:
        mask = patch_mask(spec.mask, cam, spec.threshold, spec.rate, shape, images.device, generator)
    with torch.no_grad():
        refilled = refill(
            images.detach(), mask, spec.fill, layout.patch_size, spec.allow_self_fill, generator=generator
        )
    return Counterfactuals(refilled.images, mask, refilled.source, cam, logits if keep_graph else None)


def kept_token_mask(dropped: Tensor, num_prefix_tokens: int) -> Tensor:
    """``[B, prefix + P]`` bool, True for the tokens that stay: every prefix token and the patches not dropped."""
    prefix = torch.ones(dropped.shape[0], num_prefix_tokens, dtype=torch.bool, device=dropped.device)
    return torch.cat([prefix, ~dropped.flatten(1)], dim=1)


def embedding_without_patches(model: nn.Module, images: Tensor, dropped: Tensor) -> Tensor:
    """The unnormalised image embedding of ``model`` (an ``ImageClassifier``) computed as if the ``dropped``
    patches (``[B, rows, cols]`` bool) were not in the image at all: the no-fill counterfactual of the paper.

    Every attention layer gets a key mask, so no token attends to a dropped one; the class token, which the
    embedding is read from, then depends on the kept tokens only, exactly as when they are removed from the
    sequence (images keep different numbers of tokens under an object / context mask, so one batched mask
    replaces a ragged gather). timm ViTs take the mask through ``forward_features(attn_mask=...)``; OpenCLIP
    ViTs through their transformer's ``attn_mask``.

    Raises:
        UnsupportedModelError: the backbone is neither a timm nor an OpenCLIP ViT with a class token.
    """
    backbone = getattr(model, "backbone", model)
    layout = patch_layout(backbone)
    keep = kept_token_mask(dropped, layout.num_prefix_tokens)
    visual = getattr(backbone, "visual", backbone)
    if hasattr(visual, "forward_features") and hasattr(visual, "forward_head"):
        tokens = visual.forward_features(images, attn_mask=keep[:, None, None, :])
        return visual.forward_head(tokens, pre_logits=True)
    if hasattr(visual, "_embeds") and hasattr(visual, "transformer") and hasattr(visual, "_pool"):
        if float(getattr(visual.patch_dropout, "prob", 0.0) or 0.0) > 0:
            raise UnsupportedModelError("token-dropping no-fill needs an OpenCLIP ViT without patch dropout")
        tokens = visual._embeds(images)
        heads = visual.transformer.resblocks[0].attn.num_heads
        bias = torch.zeros(keep.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(~keep, float("-inf"))
        length = keep.shape[1]
        bias = bias[:, None, None, :].expand(-1, heads, length, -1).reshape(-1, length, length)
        pooled, _ = visual._pool(visual.transformer(tokens, attn_mask=bias))
        return pooled @ visual.proj if visual.proj is not None else pooled
    raise UnsupportedModelError(f"token-dropping no-fill: no timm or OpenCLIP ViT in {type(model).__name__}")


def has_train_mode_randomness(model: nn.Module) -> bool:
    """Whether train and eval forwards can differ: active dropout, drop-path, patch dropout or batch norm.

    Checks the layers ViTs use (``nn.Dropout*``, ``nn.MultiheadAttention.dropout``, timm
    ``DropPath.drop_prob``, OpenCLIP ``PatchDropout.prob``, batch norms); when it returns False,
    an eval-mode forward computes what a train-mode forward would.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd | nn.modules.batchnorm._BatchNorm) and (
            not isinstance(module, nn.modules.dropout._DropoutNd) or module.p > 0
        ):
            return True
        if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            return True
        if any(float(getattr(module, attr, 0.0) or 0.0) > 0 for attr in ("drop_prob", "prob")):
            return True
    return False


# --- figures ----------------------------------------------------------------------------------


def cam_figures(
    images: Tensor,
    cam: Tensor,
    counterfactual: Tensor,
    mask: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out: Path,
    titles: Sequence[str] | None = None,
    prefix: str = "cam",
) -> list[Path]:
    """One PNG per image: the input, the CAM over it, the mask, and the masked-and-refilled image.

    Args:
        images, counterfactual: ``[B, 3, H, W]`` normalised model inputs.
        cam: ``[B, rows, cols]`` in [0, 1]; mask: ``[B, rows, cols]`` bool.
        mean, std: the normalisation to undo for display.
        out: folder to write into (created).
        titles: one caption per image.
    """
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_rgb(x: Tensor) -> Tensor:
        return (x.detach().float().cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1)

    size = images.shape[-2:]
    heat = F.interpolate(cam.detach().float().cpu()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    masked = F.interpolate(mask.detach().float().cpu()[:, None], size=size, mode="nearest")[:, 0]
    rgb, refilled = to_rgb(images), to_rgb(counterfactual)
    paths = []
    for i in range(images.shape[0]):
        figure = Figure(figsize=(8, 2.4), dpi=100)
        axes = figure.subplots(1, 4)
        axes[0].imshow(rgb[i].numpy())
        axes[0].set_title(titles[i] if titles else "input", fontsize=8)
        axes[1].imshow(rgb[i].numpy())
        axes[1].imshow(heat[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[1].set_title("CAM", fontsize=8)
        axes[2].imshow(masked[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(f"mask ({mask[i].float().mean().item():.0%} of patches)", fontsize=8)
        axes[3].imshow(refilled[i].numpy())
        axes[3].set_title("masked + refilled", fontsize=8)
        for axis in axes:
            axis.set_axis_off()
        figure.tight_layout()
        path = out / f"{prefix}_{i:03d}.png"
        figure.savefig(path)
        paths.append(path)
    return paths
