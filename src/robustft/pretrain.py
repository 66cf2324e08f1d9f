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

import torch
import torch.nn.functional as F

from robustft.backbones.builtin import DIGITS_DATA_CONFIG, digits_vit
from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.data.digits_shift import pretrain_batch


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DIGITS_DATA_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_DATA_CONFIG["std"]).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


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
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
