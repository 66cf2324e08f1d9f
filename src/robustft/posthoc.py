"""Shared machinery of the post-hoc methods: WiSE-FT, output-space ensembles, Model Soups and VRF.

A post-hoc method trains nothing. It combines finished runs (their ``checkpoints/final.safetensors``)
with this run's zero-shot model, in weight space (WiSE-FT, soups) or in output space (OSE), into a new
predictor that is evaluated and reported like any other method. This module holds what they share:
the maths of combining state dicts (pure functions the tests call directly), loading a finished run's
weights with the checks that make combining them meaningful (same architecture, same initialisation),
and the mixing-coefficient sweep (curve, honest pick on ``id_val``, oracle picks, plot).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from robustft.config import RunConfig, parse_config
from robustft.errors import CheckpointError, ConfigError, RobustftError
from robustft.layout import FINAL_CHECKPOINT, RESULTS_FILE
from robustft.methods.base import OneRunInputs, PosthocMethod
from robustft.safe_io import read_yaml_mapping

# 0, 0.1, ..., 1.0 written as decimals (0.1 * 3 is 0.30000000000000004).
DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
# Integer buffers that count steps (BatchNorm's): they differ between any two trained models and do not
# affect the forward pass in eval mode, so they are combined like weights and rounded, not refused.
COUNTER_SUFFIXES = ("num_batches_tracked",)
# How many offending keys a mismatch message lists before "...".
_SHOWN_KEYS = 5

if TYPE_CHECKING:
    from robustft.methods.base import Method, RunContext

StateDict = Mapping[str, Tensor]


class WeightSpaceError(RobustftError):
    """State dicts cannot be combined: different architectures, heads, or differing integer buffers."""


# ------------------------------------------------------------------------------------ state-dict maths


def check_compatible(reference: StateDict, other: StateDict, what: str = "the state dicts") -> None:
    """Refuse to combine state dicts whose keys or shapes differ (another architecture or head).

    Raises:
        WeightSpaceError: one line naming the first few missing/unexpected keys and shape mismatches.
    """
    missing = [key for key in reference if key not in other]
    unexpected = [key for key in other if key not in reference]
    mismatched = [
        f"{key} {tuple(reference[key].shape)} vs {tuple(other[key].shape)}"
        for key in reference
        if key in other and reference[key].shape != other[key].shape
    ]
    found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    problems = [
        f"{len(keys)} {label} ({', '.join(keys[:_SHOWN_KEYS])}{', ...' if len(keys) > _SHOWN_KEYS else ''})"
        for label, keys in found
        if keys
    ]
    if problems:
        raise WeightSpaceError(f"cannot combine {what}: different architectures or heads: " + "; ".join(problems))


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    # float64 makes the endpoints and equal ingredients exact; MPS has no float64.
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _is_counter(key: str) -> bool:
    return key.endswith(COUNTER_SUFFIXES)


def _combinable(key: str, tensor: Tensor) -> bool:
    return tensor.is_floating_point() or _is_counter(key)


def _cast_back(value: Tensor, like: Tensor) -> Tensor:
    return (value if like.is_floating_point() else value.round()).to(like.dtype)


def interpolate_state_dicts(theta_0: StateDict, theta_1: StateDict, alpha: float) -> dict[str, Tensor]:
    """WiSE-FT's weight-space ensemble ``(1 - alpha) * theta_0 + alpha * theta_1``, tensor by tensor.

    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022 (arXiv:2109.01903): with
    ``theta_0`` the zero-shot and ``theta_1`` the fine-tuned weights of one architecture, the
    interpolated model keeps much of the zero-shot model's robustness and most of the fine-tuned
    model's ID accuracy. ``alpha`` 0 and 1 return exact copies of ``theta_0`` and ``theta_1`` (no
    rounding through the formula); in between, float tensors are mixed in float64 and cast back to
    ``theta_0``'s dtype. Step counters (``num_batches_tracked``) are mixed and rounded; any other
    integer or boolean tensor is taken from ``theta_0`` and must be equal in both.

    Raises:
        WeightSpaceError: different keys or shapes, or an integer buffer that differs.
    """
    check_compatible(theta_0, theta_1, "the zero-shot and fine-tuned weights")
    mixed = {}
    for key, t0 in theta_0.items():
        t1 = theta_1[key].to(t0.device)
        if not _combinable(key, t0):
            mixed[key] = _equal_or_refuse(key, t0, t1)
        elif alpha == 0:
            mixed[key] = t0.detach().clone()
        elif alpha == 1:
            mixed[key] = t1.detach().to(t0.dtype, copy=True)
        else:
            dtype = _accumulation_dtype(t0)
            mixed[key] = _cast_back(t0.to(dtype) * (1 - alpha) + t1.to(dtype) * alpha, t0)
    return mixed


def _equal_or_refuse(key: str, t0: Tensor, t1: Tensor) -> Tensor:
    if t0.dtype != t1.dtype or not torch.equal(t0, t1):
        raise WeightSpaceError(
            f"cannot combine weights: the {t0.dtype} tensor '{key}' differs between models and cannot be averaged"
        )
    return t0.detach().clone()


@dataclass
class SoupSum:
    """A running sum of state dicts (float64), the state of a uniform or greedy soup.

    Ingredients are added one at a time, so a soup of many large models needs the memory of about
    three models, not of all of them (the official code streams checkpoints from disk the same way).
    """

    sums: dict[str, Tensor]
    reference: dict[str, Tensor]
    count: int = 1

    @classmethod
    def of(cls, state: StateDict) -> SoupSum:
        reference = {key: tensor.detach() for key, tensor in state.items()}
        sums = {
            key: tensor.to(_accumulation_dtype(tensor)) if _combinable(key, tensor) else tensor.clone()
            for key, tensor in reference.items()
        }
        return cls(sums, reference)

    def plus(self, state: StateDict, what: str = "an ingredient") -> SoupSum:
        """A new soup with ``state`` added (this one is unchanged, so a greedy step can be undone)."""
        check_compatible(self.reference, state, f"{what} with the soup")
        sums = {}
        for key, total in self.sums.items():
            tensor = state[key].to(total.device)
            if _combinable(key, self.reference[key]):
                sums[key] = total + tensor.to(total.dtype)
            else:
                sums[key] = _equal_or_refuse(key, self.reference[key], tensor)
        return SoupSum(sums, self.reference, self.count + 1)

    def mean(self) -> dict[str, Tensor]:
        """The soup's weights, in the first ingredient's dtypes."""
        return {
            key: _cast_back(total / self.count, self.reference[key])
            if _combinable(key, self.reference[key])
            else total.clone()
            for key, total in self.sums.items()
        }


def uniform_soup(ingredients: Iterable[StateDict]) -> dict[str, Tensor]:
    """The uniform soup: the mean of the ingredients' weights, tensor by tensor.

    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
    without increasing inference time", ICML 2022 (arXiv:2203.05482). Averaging works because
    fine-tuned runs from one pretrained initialisation tend to lie in one low-error basin. Means are
    taken in float64, so a soup of identical ingredients is exactly that ingredient.

    Raises:
        WeightSpaceError: no ingredients, or ingredients of different architectures.
    """
    soup = None
    for i, state in enumerate(ingredients):
        soup = SoupSum.of(state) if soup is None else soup.plus(state, f"ingredient {i}")
    if soup is None:
        raise WeightSpaceError("a soup needs at least one ingredient")
    return soup.mean()


@dataclass
class GreedySoupResult:
    """The greedy soup and how it was made (indices refer to the ingredient sequence)."""

    state_dict: dict[str, Tensor]
    order: list[int]
    kept: list[int]
    val_accuracy: float
    steps: list[dict[str, Any]] = field(default_factory=list)


def greedy_soup(
    ingredients: Sequence[StateDict],
    val_accuracies: Sequence[float],
    evaluate: Callable[[dict[str, Tensor]], float],
) -> GreedySoupResult:
    """Greedy soup (Wortsman et al., ICML 2022, Algorithm 1).

    Ingredients are visited in decreasing order of their own held-out accuracy (``val_accuracies``,
    ties in sequence order); the soup starts as the best one, and each next ingredient is kept only
    if the soup with it scores at least as well under ``evaluate`` (held-out ID accuracy of a state
    dict). The soup therefore never scores below its best ingredient on held-out data. ``ingredients``
    may be a lazy sequence that loads each state dict when indexed; each index is read once.

    Raises:
        WeightSpaceError: no ingredients, or ingredients of different architectures.
    """
    if len(ingredients) == 0:
        raise WeightSpaceError("a soup needs at least one ingredient")
    if len(val_accuracies) != len(ingredients):
        raise ValueError(f"{len(val_accuracies)} accuracies for {len(ingredients)} ingredients")
    order = sorted(range(len(ingredients)), key=lambda i: (-val_accuracies[i], i))
    soup = SoupSum.of(ingredients[order[0]])
    best = float(val_accuracies[order[0]])
    kept = [order[0]]
    steps = [{"ingredient": order[0], "val_accuracy": best, "kept": True}]
    for i in order[1:]:
        candidate = soup.plus(ingredients[i], f"ingredient {i}")
        accuracy = float(evaluate(candidate.mean()))
        keep = accuracy >= best
        steps.append({"ingredient": i, "val_accuracy": accuracy, "kept": keep})
        if keep:
            soup, best = candidate, accuracy
            kept.append(i)
    return GreedySoupResult(soup.mean(), order, kept, best, steps)


# --------------------------------------------------------------------------------------- finished runs


def is_finished_run(path: Path) -> bool:
    return (path / RESULTS_FILE).is_file() and (path / FINAL_CHECKPOINT).is_file()


def final_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints/final.safetensors``, or a one-line error saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    path = run_dir / FINAL_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {run_dir} a finished run (robustft fit)?")
    return path


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config.yaml a run wrote, as a raw dict."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {run_dir} a robustft run directory?")
    return read_yaml_mapping(path, ConfigError)  # a python tag is refused as unsafe, a torn file named


# The model options that decide the initial weights; model_kwargs may carry training-only options
# (drop_path_rate), and architecture changes are caught by the shape check anyway.
_INIT_KEYS = ("source", "name", "checkpoint", "zero_shot_head", "templates", "prototype_scale")


def check_same_initialisation(run_dir: Path, model_spec: Mapping[str, Any], seed: int | None = None) -> None:
    """Refuse a run whose model section starts from other weights than this run's model.

    Weight-space averaging is only meaningful between models fine-tuned from one initialisation, and
    WiSE-FT's ``theta_0`` must be the fine-tuned run's starting point; two different checkpoints of
    the same architecture would pass every shape check and give a silently meaningless model. A timm
    or OpenCLIP model without a checkpoint is randomly initialised from the run's seed, so then the
    seeds must match too.
    """
    if not model_spec:
        return
    raw = read_run_config(run_dir)
    theirs = raw.get("model") or {}
    differences = [
        f"model.{key}: {theirs.get(key)!r} there, {model_spec.get(key)!r} here"
        for key in _INIT_KEYS
        if _normalised(key, theirs.get(key)) != _normalised(key, model_spec.get(key))
    ]
    if randomly_initialised(model_spec) and seed is not None and raw.get("seed") != seed:
        differences.append(f"seed of a randomly initialised model: {raw.get('seed')!r} there, {seed!r} here")
    if differences:
        raise ConfigError(
            f"{run_dir} starts from another model than this run ({'; '.join(differences)}); "
            "post-hoc methods combine runs from one initialisation"
        )


def randomly_initialised(model_spec: Mapping[str, Any]) -> bool:
    """A timm/OpenCLIP model with no checkpoint: its initial weights depend on the run's seed."""
    return model_spec.get("source") != "builtin" and model_spec.get("checkpoint") is None


def _normalised(key: str, value: Any) -> Any:
    if key == "checkpoint" and value is not None:
        return str(Path(value).expanduser().resolve())
    return value


def load_run_weights(model: nn.Module, run_dir: str | Path, ctx: RunContext) -> dict[str, Tensor]:
    """Load a finished run's final weights into ``model`` (checked strictly) and return them (on the CPU).

    Raises:
        ConfigError: the run is missing or starts from another initialisation than ``ctx``'s model.
        CheckpointError: the checkpoint is missing or its keys/shapes do not match ``model``
            (another architecture or head); one line naming the file.
    """
    from robustft.backbones.checkpoint_files import load_state_dict_strict
    from robustft.weight_references import load_final_state

    path = final_checkpoint(run_dir)
    check_same_initialisation(Path(run_dir), ctx.model_spec, ctx.seed)
    state = load_final_state(path, model)
    load_state_dict_strict(model, state, path, f"this run's model ({ctx.model_spec.get('name', 'model')})")
    return state


@dataclass(frozen=True)
class LoadedRun:
    """A finished run's predictor as its own method rebuilt it, and that method's name."""

    predictor: nn.Module
    method: str


def load_run_predictor(model: nn.Module, run_dir: str | Path, ctx: RunContext | None) -> LoadedRun:
    """A finished run's predictor, rebuilt by the run's own method from ``model`` (a fresh copy of this run's).

    This is what lets output-space post-hoc methods (OSE, VRF) sit on top of any trained method: a
    LoRA run is a plain model (its adapters are merged at ``finalize``), a mixture-of-adapters run keeps
    its routed adapters, and each method's ``load_predictor`` knows how to rebuild its own structure.
    ``ctx`` None skips the same-initialisation check (rebuilding a saved ensemble's structure).

    Raises:
        ConfigError: the run is missing, starts from another initialisation, or names an unknown method.
        CheckpointError: its checkpoint does not match the structure its method rebuilds.
    """
    from robustft.methods import build_method

    path = final_checkpoint(run_dir)
    if ctx is not None:
        check_same_initialisation(Path(run_dir), ctx.model_spec, ctx.seed)
    source = str(Path(run_dir) / "config.yaml")
    config = parse_config(read_run_config(Path(run_dir)), source=source)
    method = build_method(config, source)
    predictor = method.load_predictor(model, path, f"{config.method.name} run {run_dir}")
    return LoadedRun(predictor.eval(), config.method.name)


def finetuned_structure(model: nn.Module, run_dir: str | Path | None) -> nn.Module:
    """A module shaped like ``run_dir``'s predictor, for loading a saved ensemble that contains it.

    A plain copy of ``model`` when the run is gone or its method keeps the model's architecture; its
    weights are overwritten by the ensemble's own checkpoint either way.
    """
    if run_dir is None or not is_finished_run(Path(run_dir)):
        return copy.deepcopy(model)
    return load_run_predictor(copy.deepcopy(model), run_dir, None).predictor


def composed_name(posthoc_method: str, base_method: str) -> str:
    """The results name of a post-hoc method over a run: ``gmixout+vrf``; plain ``vrf`` over ``finetune``."""
    return posthoc_method if base_method == "finetune" else f"{base_method}+{posthoc_method}"


def find_runs(path: str | Path) -> list[Path]:
    """``path`` if it is a finished run, else its finished sub-directories that are not post-hoc runs.

    That makes a sweep directory (``robustft sweep``) a valid list of soup ingredients, even after
    soups were written into it.
    """
    from robustft.methods import get_method

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"directory not found: {path}")
    if is_finished_run(path):
        return [path]
    runs = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and is_finished_run(p)):
        method = (read_run_config(child).get("method") or {}).get("name", "")
        try:
            combines = combines_runs(get_method(method))
        except ConfigError:  # a method this installation does not know: not one of ours
            combines = False
        if not combines:
            runs.append(child)
    if not runs:
        raise ConfigError(
            f"{path}: no finished runs in it (a finished run has results.json and checkpoints/final.safetensors)"
        )
    return runs


def combines_runs(method_cls: type[Method]) -> bool:
    """Whether a method is post-hoc over other runs (it needs a fine-tuned run or soup ingredients)."""
    return issubclass(method_cls, PosthocMethod)


def posthoc_config(base_run: str | Path, method: dict[str, Any], output_dir: Path, name: str) -> RunConfig:
    """A post-hoc run's config: ``base_run``'s model, data and seed, with another ``method`` section."""
    base_run = Path(base_run)
    raw = read_run_config(base_run)
    raw.update(method=method, name=name, output_dir=str(output_dir))
    from robustft.methods import checked

    source = f"{base_run / 'config.yaml'} (method {method['name']})"
    return checked(parse_config(raw, source=source), source)


# ------------------------------------------------------------------------------------ the alpha sweep


class AlphaSweepConfig(OneRunInputs):
    """Options shared by WiSE-FT and output-space ensembles: the run they combine and the alpha sweep."""

    alphas: list[float] = Field(
        list(DEFAULT_ALPHAS), description="mixing coefficients evaluated; 0 is zero-shot, 1 the fine-tuned model"
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="use this alpha instead of the one with the best id_val accuracy"
    )

    @field_validator("alphas")
    @classmethod
    def _valid_alphas(cls, alphas: list[float]) -> list[float]:
        if not alphas:
            raise ValueError("give at least one alpha")
        outside = [a for a in alphas if not 0 <= a <= 1]
        if outside:
            raise ValueError(f"alphas must lie in [0, 1], got {outside}")
        return sorted(set(alphas))

    def sweep_alphas(self) -> list[float]:
        """The alphas evaluated: ``alphas`` plus a fixed ``alpha`` if it is not among them."""
        return sorted({*self.alphas, *([self.alpha] if self.alpha is not None else [])})

    def check_alpha_pick(self, splits: Mapping[str, Any], method: str) -> None:
        """Refuse, before any work, to choose alpha without an id_val split."""
        if self.alpha is None and "id_val" not in splits:
            raise ConfigError(
                f"method.alpha: there is no id_val split to choose alpha on; set method.alpha "
                f"(choosing it on test splits would overstate {method}'s accuracy)"
            )


@dataclass(frozen=True)
class CurvePoint:
    """Scores of one mixing coefficient: ``id`` is id_test accuracy, ``ood_avg`` the OOD mean."""

    alpha: float
    id: float
    ood_avg: float
    ood: dict[str, float]
    id_val: float | None = None


def curve_point(alpha: float, metrics: Mapping[str, Mapping[str, float]]) -> CurvePoint:
    """A curve point from per-split metrics (``evaluate_splits``' output)."""
    from robustft.evaluate import summarize

    entry = summarize(dict(metrics))
    return CurvePoint(alpha, entry["id"], entry["ood_avg"], entry["ood"], entry.get("id_val"))


def pick_alpha_on_id_val(curve: Sequence[CurvePoint]) -> float:
    """The honest pick: the alpha with the best ``id_val`` accuracy, ties to the smaller alpha.

    It reads only ``alpha`` and ``id_val``, never a test split, so its accuracy on the test splits is
    an unbiased estimate. Smaller alpha on ties means closer to the zero-shot model, the robust side.
    """
    scored = [point for point in curve if point.id_val is not None]
    if not scored:
        raise ConfigError("method.alpha: no id_val accuracy to choose alpha on; set method.alpha")
    return max(scored, key=lambda point: (point.id_val, -point.alpha)).alpha


def oracle_alpha(curve: Sequence[CurvePoint], metric: str) -> float:
    """The alpha with the best test score (``id`` or ``ood_avg``), ties to the smaller alpha.

    An oracle: it looks at test labels, so it bounds what a pick could reach and must not be reported
    as a method's accuracy.
    """
    return max(curve, key=lambda point: (getattr(point, metric), -point.alpha)).alpha


def choose_alpha(curve: Sequence[CurvePoint], fixed: float | None) -> tuple[float, str]:
    """(alpha, how it was chosen): the fixed alpha from the config, else the ``id_val`` pick."""
    if fixed is not None:
        return fixed, "config"
    return pick_alpha_on_id_val(curve), "id_val"


def record_sweep(ctx: RunContext, method: str, curve: Sequence[CurvePoint], alpha: float, chosen_by: str) -> None:
    """Put the sweep into the results entry (``ctx.extras``) and write ``<method>_curve.{json,png}``.

    The oracle alphas are labelled as such: they were chosen on test splits.
    """
    from robustft.report import plot_alpha_curve

    points = [asdict(point) for point in curve]
    extras = {
        "alpha": alpha,
        "alpha_chosen_on": chosen_by,
        "oracle_alpha_id": oracle_alpha(curve, "id"),
        "oracle_alpha_ood": oracle_alpha(curve, "ood_avg"),
        "curve": points,
    }
    ctx.extras.update(extras)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    (ctx.run_dir / f"{method}_curve.json").write_text(json.dumps({"method": method, **extras}, indent=2) + "\n")
    plot_alpha_curve(points, ctx.run_dir / f"{method}_curve.png", title=f"{method}: ID vs OOD over alpha", chosen=alpha)
    best = next(point for point in curve if point.alpha == alpha)
    ctx.log(
        f"{method}: alpha={alpha:g} (chosen on {chosen_by}): ID {best.id:.2f}, OOD avg {best.ood_avg:.2f}; "
        f"oracle alphas: best ID {extras['oracle_alpha_id']:g}, best OOD {extras['oracle_alpha_ood']:g}"
    )
