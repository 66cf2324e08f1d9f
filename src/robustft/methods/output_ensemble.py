"""Output-space ensemble (OSE): mix the zero-shot and fine-tuned models' class probabilities."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.class_spaces import class_space_of
from robustft.evaluate import predict_cached, split_metrics
from robustft.methods.base import PosthocMethod, RunContext, register_method
from robustft.posthoc import (
    AlphaSweepConfig,
    CurvePoint,
    choose_alpha,
    composed_name,
    curve_point,
    finetuned_structure,
    load_run_predictor,
    record_sweep,
)


class OutputEnsembleConfig(AlphaSweepConfig):
    """``finetuned_run``, the ``alphas`` evaluated, and an optional fixed ``alpha``."""


def ensemble_log_probs(zero_shot_logits: Tensor | None, finetuned_logits: Tensor | None, alpha: float) -> Tensor:
    """``log((1 - alpha) softmax(z_zs) + alpha softmax(z_ft))``, computed stably with logsumexp.

    Log-probabilities are valid logits (same argmax, ``softmax`` recovers the mixture), so the
    ensemble is scored like any model. A side whose weight is 0 may be None (its forward is skipped);
    at alpha 0 or 1 the result is exactly ``log_softmax`` of the other side.
    """
    terms = []
    if alpha < 1:
        terms.append(F.log_softmax(_required(zero_shot_logits, "zero-shot").float(), dim=-1) + math.log1p(-alpha))
    if alpha > 0:
        terms.append(F.log_softmax(_required(finetuned_logits, "fine-tuned").float(), dim=-1) + math.log(alpha))
    return torch.logsumexp(torch.stack(terms), dim=0)


def _required(logits: Tensor | None, side: str) -> Tensor:
    if logits is None:
        raise ValueError(f"the {side} logits are needed when its weight is above 0")
    return logits


class OutputEnsemble(nn.Module):
    """The OSE predictor: two models, one mixing weight; returns log-probabilities ``[B, C]``.

    ``alpha`` is a buffer, so the saved state dict is the whole predictor (both models and the
    weight) and ``robustft evaluate`` rebuilds it without the fine-tuned run.
    """

    def __init__(self, zero_shot: nn.Module, finetuned: nn.Module, alpha: float) -> None:
        super().__init__()
        self.zero_shot = zero_shot
        self.finetuned = finetuned
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def forward(self, images: Tensor) -> Tensor:
        alpha = float(self.alpha)
        zero_shot = self.zero_shot(images) if alpha < 1 else None
        finetuned = self.finetuned(images) if alpha > 0 else None
        return ensemble_log_probs(zero_shot, finetuned, alpha)

    def logit_parts(self) -> list[nn.Module]:
        """The models whose logits ``combine_logits`` mixes (``evaluate.predict_cached`` reads theirs from cache)."""
        return [self.zero_shot, self.finetuned]

    def combine_logits(self, parts: list[Tensor]) -> Tensor:
        """``forward`` on the parts' logits of a whole split: the same row-wise maths, so the same values."""
        return ensemble_log_probs(*parts, float(self.alpha))


@register_method
class OutputEnsembleMethod(PosthocMethod):
    """OSE: ``p = (1 - alpha) softmax(z_zs) + alpha softmax(z_ft)`` (docs/methods.md, `output_ensemble`).

    The output-space counterpart of WiSE-FT that Wortsman et al. (CVPR 2022) compare against: it
    reaches a similar ID/OOD trade-off but costs two forward passes per image. Each split is passed
    through both models once (not at all when the run's logit cache holds their logits, as in
    ``robustft compare``), and the alpha sweep and the final evaluation run on those logits. The predictor is the
    ensemble at the alpha with the best ``id_val`` accuracy (or the fixed ``alpha``); the curve and
    the oracle alphas go to results.json and ``output_ensemble_curve.{json,png}``.
    """

    name = "output_ensemble"
    report_sections = ("alpha_curve",)
    config_cls = OutputEnsembleConfig

    def check_inputs(self, ctx: RunContext) -> list[Path]:
        self.config.check_alpha_pick(ctx.splits, self.name)
        return super().check_inputs(ctx)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        loaded = load_run_predictor(copy.deepcopy(model), self.config.finetuned_run, ctx)
        finetuned = loaded.predictor
        self.result_name = composed_name(self.name, loaded.method)
        cached = {}
        options = {"num_workers": ctx.num_workers, "cache": ctx.logit_cache, "autocast_dtype": ctx.autocast_dtype}
        options["in_class_space"] = False
        for split, dataset in ctx.splits.items():
            if split == "train":
                continue
            zero_shot, labels = predict_cached(model, dataset, ctx.device, ctx.eval_batch_size, **options)
            tuned, _ = predict_cached(finetuned, dataset, ctx.device, ctx.eval_batch_size, **options)
            cached[split] = (zero_shot, tuned, labels)
        curve: list[CurvePoint] = []
        for alpha in self.config.sweep_alphas():
            # mixed over the model's classes, then mapped to the split's class space, as the saved predictor is
            metrics = {
                split: split_metrics(class_space_of(ctx.splits[split]).apply(ensemble_log_probs(zs, ft, alpha)), labels)
                for split, (zs, ft, labels) in cached.items()
            }
            curve.append(curve_point(alpha, metrics))
        alpha, chosen_by = choose_alpha(curve, self.config.alpha)
        ctx.extras["finetuned_run"] = str(self.config.finetuned_run)
        record_sweep(ctx, self.name, curve, alpha, chosen_by)
        return OutputEnsemble(model, finetuned, alpha)

    def load_predictor(self, model: nn.Module, checkpoint: Path, what: str) -> nn.Module:
        ensemble = OutputEnsemble(model, finetuned_structure(model, self.config.finetuned_run), alpha=0.0)
        return super().load_predictor(ensemble, checkpoint, f"an output ensemble of {what}")
