"""WiSE-FT: interpolate the zero-shot and fine-tuned weights (Wortsman et al., CVPR 2022, arXiv:2109.01903)."""

from __future__ import annotations

import copy

from torch import nn

from robustft.evaluate import evaluate_splits
from robustft.methods.base import PosthocMethod, RunContext, register_method
from robustft.posthoc import (
    AlphaSweepConfig,
    CurvePoint,
    WeightSpaceError,
    check_compatible,
    choose_alpha,
    composed_name,
    curve_point,
    interpolate_state_dicts,
    load_run_predictor,
    record_sweep,
)


class WiseFtConfig(AlphaSweepConfig):
    """``finetuned_run``, the ``alphas`` evaluated, and an optional fixed ``alpha``."""


@register_method
class WiseFt(PosthocMethod):
    """WiSE-FT, the weight-space ensemble ``theta(alpha) = (1 - alpha) theta_zs + alpha theta_ft``.

    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022. Fine-tuning moves the
    weights only a little from the zero-shot model, and the straight line between the two stays in a
    low-loss region, so the interpolated model combines the fine-tuned model's ID accuracy with much
    of the zero-shot model's robustness, at no extra inference cost (docs/methods.md, `wise_ft`).

    This run's prepared model is ``theta_zs``; ``theta_ft`` is ``finetuned_run``'s final checkpoint,
    which must come from the same model (architecture, head and initial weights). Every alpha is
    evaluated on every split; the predictor is ``theta`` at the alpha with the best ``id_val``
    accuracy (or the fixed ``alpha``). The curve and the oracle alphas (best ID and best OOD on test
    splits, for reference only) go to results.json and ``wise_ft_curve.{json,png}``.

    Alpha 0 and 1 are the two input models themselves, so with the run's logit cache
    (``robustft.logit_cache``) only the interior alphas are scored when those models were scored before
    (``robustft compare``), and the final evaluation of the chosen alpha reads the sweep's logits.
    """

    name = "wise_ft"
    report_sections = ("alpha_curve",)
    config_cls = WiseFtConfig

    def check_inputs(self, ctx: RunContext) -> list:
        self.config.check_alpha_pick(ctx.splits, self.name)
        return super().check_inputs(ctx)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        theta_0 = {key: value.detach().clone() for key, value in model.state_dict().items()}
        finetuned = load_run_predictor(copy.deepcopy(model), self.config.finetuned_run, ctx)
        theta_1 = {key: value.detach() for key, value in finetuned.predictor.state_dict().items()}
        try:
            check_compatible(theta_0, theta_1, f"this model and the {finetuned.method} run's predictor")
        except WeightSpaceError as error:
            raise WeightSpaceError(
                f"{error}; WiSE-FT needs a plain model of this architecture (use output_ensemble or vrf over "
                f"{finetuned.method} runs)"
            ) from None
        self.result_name = composed_name(self.name, finetuned.method)
        curve: list[CurvePoint] = []
        for alpha in self.config.sweep_alphas():
            if alpha == 0:  # theta_0 itself (the zero-shot run's predictor; its logits are usually cached)
                model.load_state_dict(theta_0)
                scored = model
            elif alpha == 1:  # the fine-tuned run's predictor, likewise
                scored = finetuned.predictor
            else:
                model.load_state_dict(interpolate_state_dicts(theta_0, theta_1, alpha))
                scored = model
            metrics = evaluate_splits(
                scored,
                ctx.splits,
                ctx.device,
                ctx.eval_batch_size,
                ctx.num_workers,
                cache=ctx.logit_cache,
                autocast_dtype=ctx.autocast_dtype,
            )
            curve.append(curve_point(alpha, metrics))
        alpha, chosen_by = choose_alpha(curve, self.config.alpha)
        model.load_state_dict(interpolate_state_dicts(theta_0, theta_1, alpha))
        ctx.extras["finetuned_run"] = str(self.config.finetuned_run)
        record_sweep(ctx, self.name, curve, alpha, chosen_by)
        return model
