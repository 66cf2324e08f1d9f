"""Model Soups: average the weights of several fine-tuned runs (Wortsman et al., ICML 2022, arXiv:2203.05482)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from robustft.errors import ConfigError
from robustft.evaluate import evaluate_splits
from robustft.methods.base import PosthocMethod, RunContext, SeveralRunsInputs, register_method
from robustft.posthoc import greedy_soup, load_run_weights, uniform_soup


class SoupConfig(SeveralRunsInputs):
    """The ingredients: finished fine-tuning runs from one initialisation, or folders of them."""


class RunWeights(Sequence):
    """The final weights of finished runs, loaded from disk when indexed (one model in memory at a time).

    Each load goes through ``model`` with the strict checks of ``load_run_weights`` (same keys, shapes
    and initialisation), so a wrong ingredient fails with a one-line error naming its file.
    """

    def __init__(self, runs: list[Path], model: nn.Module, ctx: RunContext) -> None:
        self.runs, self.model, self.ctx = runs, model, ctx

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return load_run_weights(self.model, self.runs[index], self.ctx)


class _Soup(PosthocMethod):
    config_cls = SoupConfig
    several_runs = True
    report_sections = ("ingredients",)


@register_method
class UniformSoup(_Soup):
    """Uniform soup: the mean of every ingredient's weights (docs/methods.md, `uniform_soup`).

    Wortsman et al., "Model soups", ICML 2022. Runs fine-tuned from one pretrained initialisation
    with different hyper-parameters tend to share a low-error basin, so their average is often better
    than each of them, ID and OOD, at the inference cost of one model. With ingredients from another
    basin (a much larger learning rate) the uniform soup can be worse than its best ingredient; the
    greedy soup guards against that.
    """

    name = "uniform_soup"

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        runs = self.input_runs()
        model.load_state_dict(uniform_soup(RunWeights(runs, model, ctx)))
        ctx.extras["ingredients"] = [str(run) for run in runs]
        ctx.log(f"uniform soup of {len(runs)} runs")
        return model


@register_method
class GreedySoup(_Soup):
    """Greedy soup: add ingredients best-first, keep each only if ``id_val`` accuracy does not drop.

    Wortsman et al., "Model soups", ICML 2022, Algorithm 1. Ingredients are ranked by their own
    ``id_val`` accuracy and every decision is made on ``id_val``, never on a test split, so the soup's
    ``id_val`` accuracy is at least its best ingredient's and its test accuracy is an honest estimate.
    """

    name = "greedy_soup"

    def check_inputs(self, ctx: RunContext) -> list[Path]:
        if "id_val" not in ctx.splits:
            raise ConfigError("method: greedy_soup chooses ingredients on the id_val split, and this run has none")
        return super().check_inputs(ctx)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        runs = self.input_runs()
        weights = RunWeights(runs, model, ctx)

        def val_accuracy(state: dict[str, Tensor]) -> float:
            model.load_state_dict(state)
            held_out = {"id_val": ctx.splits["id_val"]}
            metrics = evaluate_splits(
                model, held_out, ctx.device, ctx.eval_batch_size, ctx.num_workers, cache=ctx.logit_cache
            )
            return metrics["id_val"]["accuracy"]

        individual = [val_accuracy(weights[i]) for i in range(len(runs))]
        result = greedy_soup(weights, individual, val_accuracy)
        model.load_state_dict(result.state_dict)
        ctx.extras |= {
            "ingredients": [str(run) for run in runs],
            "ingredient_id_val": {str(run): accuracy for run, accuracy in zip(runs, individual, strict=True)},
            "kept": [str(runs[i]) for i in result.kept],
            "soup_id_val": result.val_accuracy,
            "greedy_steps": [{**step, "ingredient": str(runs[step["ingredient"]])} for step in result.steps],
        }
        ctx.log(f"greedy soup: kept {len(result.kept)} of {len(runs)} runs, id_val {result.val_accuracy:.2f}")
        return model
