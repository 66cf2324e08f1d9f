"""SAFT, Sparse Adaptation for Fine-Tuning (Nguyen et al., ECCV 2024, arXiv:2407.03036; docs/methods.md).

Phase 1 scores every entry of the chosen tensors by the magnitude of the mean gradient of the
downstream cross-entropy at the pretrained weights ``W0``, over the whole training split,

    s = | (1/N) sum_n dCE(f(x_n; W0), y_n) / dW |,

and keeps the global top-k entries across all tensors (k = 0.1% of them in the paper). Phase 2 trains
only those entries, through the sparse core (:mod:`robustft.sparse`): gradients, weight decay and
optimiser state exist for the selected entries only, so every other entry stays bit-identical to
``W0``. The selection is saved as ``<run_dir>/saft_selection.safetensors`` (flat int64 indices per
tensor) and ``selection_path`` reuses one.

Decisions: phase 1 runs in ``prepare`` (not ``setup``) so the run's trainable-parameter count is the
selected count; the model is in eval mode for it (no dropout noise in the scores); the top-k is exact
(``torch.topk``: exactly k entries; the unofficial code's ``score >= kth`` can add ties); weight decay
follows the project's rule per tensor (selected entries of matrices decay, of biases and norms not).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import save_file
from torch import Tensor, nn

from robustft import distributed
from robustft.backbones.checkpoint_files import load_index_file
from robustft.config import MethodConfig
from robustft.errors import ConfigError
from robustft.methods.base import Method, RunContext, record_preset, register_method
from robustft.sparse import (
    Scope,
    empty_selection,
    merge_sparse,
    selected_parameters,
    sparse_parameter_groups,
    sparsify,
)

SELECTION_FILE = "saft_selection.safetensors"


class SAFTConfig(MethodConfig):
    fraction: float = Field(0.001, gt=0, le=1, description="k as a fraction of all chosen entries (paper: 0.1%)")
    scope: Scope = Field("all", description="tensors that may be selected from: linear weights, matrices or all")
    include: str = Field("", description="regex a candidate tensor's name must match (default: backbone and head)")
    exclude: str | None = Field(None, description="regex of tensor names never selected")
    selection_path: Path | None = Field(None, description="reuse a saved saft_selection.safetensors (skip phase 1)")

    paper_preset: ClassVar[dict[str, Any]] = {"fraction": 0.001, "scope": "all", "include": ""}
    """The paper's k = 0.1% of all parameters, from every tensor; its optimiser recipe (AdamW lr 5e-6,
    wd 0.1, batch 512, cosine, grad clip 1.0) is the run's ``optim`` / ``train`` section (configs/)."""

    @model_validator(mode="after")
    def _valid_regex(self) -> SAFTConfig:
        re.compile(self.include)
        re.compile(self.exclude or "")
        return self


def gradient_scores(model: nn.Module, names: list[str], batches) -> dict[str, Tensor]:
    """``|mean gradient|`` of the cross-entropy over all ``batches`` for each named parameter.

    Per-batch losses are summed (not averaged), so the result is the mean over samples, not over
    batches, whatever the batch sizes. Under torchrun each rank passes the batches of its shard and
    the sums and counts are all-reduced before the mean: the scores of the whole split.
    """
    parameters = {name: model.get_parameter(name) for name in names}
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training, needs_grad = model.training, {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    count = 0
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels, reduction="sum")
        grads = torch.autograd.grad(loss, list(parameters.values()))
        for name, grad in zip(parameters, grads, strict=True):
            totals[name] += grad.float()
        count += labels.numel()
    counted = torch.tensor([float(count)], device=next(iter(totals.values())).device)
    distributed.all_reduce_sum_([*totals.values(), counted])
    count = int(counted.item())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(needs_grad[name])
    model.train(was_training)
    return {name: (total / max(count, 1)).abs() for name, total in totals.items()}


def top_k_selection(scores: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Global top-k over all tensors: sorted flat indices per tensor (tensors with none are left out)."""
    names = list(scores)
    flat = torch.cat([scores[name].reshape(-1) for name in names])
    k = max(1, min(k, flat.numel()))
    chosen = torch.topk(flat, k, sorted=False).indices
    offsets = torch.tensor([0] + [scores[n].numel() for n in names], device=flat.device).cumsum(0)
    owner = torch.bucketize(chosen, offsets[1:], right=True)
    selection = {}
    for position in owner.unique().tolist():
        local = chosen[owner == position] - offsets[position]
        selection[names[position]] = local.sort().values
    return selection


def save_selection(selection: dict[str, Tensor], path: Path, fraction: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: index.cpu().contiguous() for name, index in selection.items()}
    save_file(tensors, str(path), metadata={"method": "saft", "fraction": repr(fraction)})
    return path


def load_selection(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """A saved selection, checked against ``model`` (names exist, indices in range)."""
    if not Path(path).is_file():
        raise ConfigError(f"method.selection_path: file not found: {path}")
    sizes = {name: parameter.numel() for name, parameter in model.named_parameters()}
    return load_index_file(path, sizes, "method.selection_path")  # integer, in range, unique; torn or unsafe named


def _shard_batches(ctx: RunContext, split: str):
    """This rank's contiguous shard of ``split`` on the run's device (the whole split in one process)."""
    from robustft.data import sequential_loader

    shard = distributed.ShardView(ctx.splits[split])
    for images, labels in sequential_loader(shard, ctx.eval_batch_size, ctx.num_workers):
        yield images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)


@register_method
class SAFT(Method):
    """SAFT (Nguyen et al., ECCV 2024): train only the top-k entries by gradient magnitude at the pretrained weights."""

    name = "saft"
    report_columns = ("active_params",)
    config_cls = SAFTConfig

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """The tensors ``scope`` / ``include`` / ``exclude`` pick must exist on this model."""
        cfg = self.config
        return empty_selection(model, "saft", cfg.scope, cfg.include, cfg.exclude)

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        names = selected_parameters(model, "saft", cfg.scope, cfg.include, cfg.exclude)
        total = sum(model.get_parameter(name).numel() for name in names)
        if cfg.selection_path is not None:
            selection = load_selection(cfg.selection_path, model)
        else:
            scores = gradient_scores(model, names, _shard_batches(ctx, "train"))
            selection = top_k_selection(scores, round(cfg.fraction * total))
            selection = distributed.broadcast_object({n: i.cpu() for n, i in selection.items()})  # rank 0's, ties
        if distributed.is_main_process():
            save_selection(selection, ctx.run_dir / SELECTION_FILE, cfg.fraction)
        device = next(model.parameters()).device
        model.requires_grad_(False)
        sparsify(model, {name: index.to(device) for name, index in selection.items()})
        selected = sum(index.numel() for index in selection.values())
        ctx.extras["active_params"] = selected
        ctx.extras["selected_tensors"] = len(selection)
        record_preset(cfg, ctx)
        ctx.log(f"saft: {selected} of {total} entries selected in {len(selection)} tensors")
        return model

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return sparse_parameter_groups(model, weight_decay)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return merge_sparse(model)
