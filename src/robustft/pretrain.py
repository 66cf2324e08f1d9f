"""Pretrain the tiny ViT "foundation model" of digits-shift (deterministic on CPU).

A fixed recipe, not a fine-tuning method: AdamW, linear warm-up then cosine decay, label
smoothing, on the endless seeded stream of ``digits_shift.pretrain_batch``. The committed
checkpoint ``assets/digits_vit.safetensors`` is this function's output with the defaults; a slow
test re-runs it and compares.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.backbones.builtin import DIGITS_DATA_CONFIG, digits_vit, packaged_checkpoint
from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.data.digits_shift import pretrain_batch


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DIGITS_DATA_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_DATA_CONFIG["std"]).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _warmup_cosine_adamw(
    named: list[tuple[str, nn.Parameter]],
    no_decay_name: str,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    steps: int,
    **adamw: Any,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay on biases, norms and parameters named ``no_decay_name``; linear warm-up, cosine."""
    decay = [p for n, p in named if p.ndim >= 2 and no_decay_name not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and no_decay_name not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, **adamw)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def pretrain_digits_vit(
    out: Path,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 200,
    weight_decay: float = 0.05,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Train ``digits_vit`` from scratch on the pretraining stream and save it as safetensors."""
    torch.manual_seed(seed)
    model = digits_vit()
    optimizer, scheduler = _warmup_cosine_adamw(
        list(model.named_parameters()), "pos_embed", lr, weight_decay, warmup_steps, steps
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        images, labels = pretrain_batch(batch_size, generator)
        loss = F.cross_entropy(model(_normalise(images)), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps} loss {running:.3f} ({time.time() - start:.0f}s)")
    save_state_dict_file(model.state_dict(), out)
    return out


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, captions: list[str]) -> Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, arXiv:2103.00020, Fig. 3) on normalised features.

    The rendered stream repeats captions within a batch ("the digit seven"), and a pair with the same
    caption is no negative, so the target of each row spreads evenly over every item with the same caption
    (with unique captions this is exactly CLIP's one-hot target).
    """
    logits = logit_scale * image_features @ text_features.t()
    index = {text: i for i, text in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([index[text] for text in captions])
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def pretrain_glyph_clip(
    out: Path,
    steps: int = 160,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 16,
    weight_decay: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 20,
    label_weight: float = 1.0,
    unlocked_blocks: int = 2,
) -> Path:
    """Train the tiny CLIP (``assets/glyph-clip.json``) from scratch on captioned renderings; save fp16 safetensors.

    Contrastive image-text pretraining on ``glyphs_shift.pretrain_batch``: AdamW, linear warm-up then cosine
    decay, gradient clipping, the logit scale clamped at 100 as in CLIP. Besides CLIP's loss over the batch's
    captions, each image is contrasted with the class-name captions of all classes ("a photo of the digit
    seven."), as UniCL does with labels (Yang et al., "Unified Contrastive Learning in Image-Text-Label
    Space", CVPR 2022, arXiv:2204.03610): within a CPU budget of about a thousand steps the full captions alone
    teach colours and fonts (easy to match) long before class shapes, and this term puts the class words first.
    The image tower starts from the built-in digits ViT (``digits_vit_as_open_clip_visual``) and, as in LiT (Zhai
    et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022, arXiv:2111.07991), is locked but
    for its last ``unlocked_blocks`` blocks, so a few hundred CPU steps suffice: the text tower learns to name
    what the image tower already separates, and the unlocked blocks learn the letters.
    Weights are stored in float16 (half the
    size; the benchmark's accuracies do not change), so the asset is this function's output with the defaults.
    """
    import open_clip

    from robustft.backbones.builtin import register_glyph_clip
    from robustft.data.glyphs_shift import CLASS_NAMES, pretrain_batch

    torch.manual_seed(seed)
    name = register_glyph_clip()
    model = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    image_tower = digits_vit_as_open_clip_visual(
        load_state_dict_file(packaged_checkpoint()), mean.flatten(), std.flatten()
    )
    model.load_state_dict(image_tower, strict=False)
    trained_blocks = {f"visual.transformer.resblocks.{i}." for i in range(6 - unlocked_blocks, 6)}
    for key, parameter in model.named_parameters():
        locked = key in image_tower and not any(key.startswith(block) for block in trained_blocks)
        parameter.requires_grad_(not locked or key.startswith("visual.ln_post"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = _warmup_cosine_adamw(
        named, "embedding", lr, weight_decay, warmup_steps, steps, betas=(0.9, 0.98), eps=1e-6
    )
    generator = torch.Generator().manual_seed(seed)
    class_prompts = tokenizer([f"a photo of the {name}." for name in CLASS_NAMES])
    model.train()
    start, running, accuracy = time.time(), 0.0, 0.0
    for step in range(steps):
        images, labels, captions = pretrain_batch(batch_size, generator)
        image_features, text_features, logit_scale = model((images.float() / 255.0 - mean) / std, tokenizer(captions))
        class_features = F.normalize(model.encode_text(class_prompts), dim=-1)
        label_loss = F.cross_entropy(logit_scale * image_features @ class_features.t(), labels)
        loss = clip_loss(image_features, text_features, logit_scale, captions) + label_weight * label_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = 0.95 * running + 0.05 * loss.item() if step else loss.item()
        if (step + 1) % log_every == 0:
            accuracy = (image_features @ class_features.t()).argmax(1).eq(labels).float().mean().item()
            log(
                f"step {step + 1}/{steps} loss {running:.3f} zero-shot batch acc {100 * accuracy:.1f} "
                f"({time.time() - start:.0f}s)"
            )
    state = {key: value.detach().to(torch.float16) for key, value in model.state_dict().items()}
    save_state_dict_file(state, out)
    return out


def digits_vit_as_open_clip_visual(state: dict[str, Tensor], mean: Tensor, std: Tensor) -> dict[str, Tensor]:
    """The digits ViT's weights (timm ``VisionTransformer``) as an open_clip ``VisionTransformer``'s ``visual.*``.

    Both are the same pre-norm ViT (CLS token, learned positions, GELU MLP); the differences are folded exactly:
    timm's fused ``qkv`` is ``nn.MultiheadAttention``'s ``in_proj`` (same [q; k; v] layout), open_clip's patch
    convolution has no bias (added to every patch position instead), and the two normalise pixels differently
    (``(x - 0.5) / 0.5`` vs open_clip's ``(x - mean) / std``, folded into the patch weights and positions). The
    projection to the joint embedding and nothing else is left to training.
    """
    scale = (2 * std).view(1, 3, 1, 1)
    weight = state["patch_embed.proj.weight"] * scale
    patch_bias = state["patch_embed.proj.bias"] + (
        state["patch_embed.proj.weight"] * (2 * mean - 1).view(1, 3, 1, 1)
    ).sum(dim=(1, 2, 3))
    positions = state["pos_embed"][0].clone()
    positions[1:] += patch_bias
    visual = {
        "visual.conv1.weight": weight,
        "visual.class_embedding": state["cls_token"].reshape(-1),
        "visual.positional_embedding": positions,
        "visual.ln_post.weight": state["norm.weight"],
        "visual.ln_post.bias": state["norm.bias"],
    }
    names = {
        "norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
        "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    }  # fmt: skip
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        for old, new in names.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        visual[f"visual.transformer.resblocks.{index}.{rest}"] = value
    return visual
