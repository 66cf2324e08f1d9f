"""The method interface and registry.

One engine owns the loop, optimiser, precision, checkpoints and evaluation (docs/architecture.md); a method
only fills hooks, each with a do-nothing default, and keeps its maths in pure functions that
tests call directly. ``@register_method`` adds a class to the registry under its ``name``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustft.backbones.checkpoint_files import load_state_dict_strict
from robustft.config import MethodConfig
from robustft.errors import ConfigError
from robustft.logit_cache import LogitCache
from robustft.methods.registry import register_method  # noqa: F401  (method files import it from here)
from robustft.weight_references import load_final_state

Batch = tuple[Tensor, Tensor]


@dataclass
class RunContext:
    """What a method may know about the run: data, device and where to write; never the CLI."""

    run_dir: Path
    device: torch.device
    seed: int
    splits: dict[str, Dataset]
    class_names: list[str]
    eval_batch_size: int = 256
    num_workers: int = 0
    log: Callable[[str], None] = print
    extras: dict[str, Any] = field(default_factory=dict)
    model_spec: dict[str, Any] = field(default_factory=dict)
    """The run's ``model:`` config section (JSON values); post-hoc methods check that the runs they
    combine start from the same model."""
    autocast_dtype: torch.dtype | None = None
    """The run's precision for forward passes (bf16 on a GPU under ``train.precision: auto``); None: fp32."""
    logit_cache: LogitCache | None = None
    """Logits already computed, shared by every run that reuses this context (``robustft.logit_cache``)."""

    def for_run(self, run_dir: Path, seed: int, log: Callable[[str], None]) -> RunContext:
        """The same data and device for another run (fresh ``extras``)."""
        return replace(self, run_dir=run_dir, seed=seed, log=log, extras={})

    def iterate(self, split: str, batch_size: int | None = None) -> Iterator[Batch]:
        """Batches of a split in a fixed order, on the run's device (for pre-passes and probes)."""
        from robustft.data import sequential_loader

        pin_memory = self.device.type == "cuda"
        loader = sequential_loader(self.splits[split], batch_size or self.eval_batch_size, self.num_workers, pin_memory)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class Method:
    """Base class: plain cross-entropy fine-tuning of every parameter that requires a gradient.

    Subclasses set ``name`` (lower snake case, the registry key) and ``config_cls`` (a
    ``MethodConfig`` whose fields all have defaults and descriptions) and override only the hooks
    they need. The docstring of a subclass cites its paper.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    trains: ClassVar[bool] = True
    needs_finetuned_run: ClassVar[bool] = False
    """Post-hoc over a finished fine-tuning run, named by the config option ``finetuned_run``."""
    needs_ingredients: ClassVar[bool] = False
    """Post-hoc over several finished runs, named by the config option ``ingredients``."""
    requires_text_tower: ClassVar[bool] = False
    """Needs a CLIP-style model with a text tower (``model.source: open_clip``); skipped by the demo."""
    report_sections: ClassVar[tuple[str, ...]] = ()
    """Extra report sections this method's results entry feeds, by name (``robustft.report.sections``)."""
    report_columns: ClassVar[tuple[str, ...]] = ()
    """Extra results-table columns, by name: each is also the results entry key holding the value."""
    seed_independent: ClassVar[bool] = False
    """Its result does not depend on the run's seed when the model and data do not (zero-shot, a linear probe
    fitted deterministically): ``robustft compare`` runs it once and reports it for every seed."""

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        self.result_name: str = self.name
        """The key of this run in results.json; a post-hoc method over another method's run names the pair
        (``gmixout+vrf``)."""

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """Why this method cannot work on ``model``, or None: asked before any run of a command starts.

        ``model`` is the loaded backbone with a plain head of the data's class count (``robustft.preflight``),
        ``model_spec`` the run's ``model:`` section. A method that needs something of the model (a text tower,
        layers its adapters target) says so here, so an incompatible run is skipped or refused up front, not
        after minutes of other runs. Must be cheap and leave ``model`` unchanged.
        """
        return None

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Change the model before training (freeze, add adapters); returns the model to train."""
        return model

    def setup(self, model: nn.Module, ctx: RunContext) -> None:
        """Pre-passes over data before the first step (probes, importance scores)."""

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser groups: decay matrices, not biases, norms or embeddings' position tables."""
        return default_parameter_groups(model, weight_decay)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the engine has built (and, on resume, restored) the optimiser, for methods that
        must edit optimiser state themselves (GMixout remaps Adam moments when it resamples its mask)."""

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        return F.cross_entropy(model(images), labels), {}

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Edit gradients before clipping and the optimiser step."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Update method state after the optimiser step."""

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Turn the trained model into the predictor that is evaluated and saved."""
        return model

    def load_predictor(self, model: nn.Module, checkpoint: Path, what: str) -> nn.Module:
        """Rebuild the predictor ``finalize`` returned from its saved ``checkpoint`` (``robustft evaluate``).

        ``model`` is a freshly prepared model of the run's config. A predictor that is not a plain
        model of that architecture (an ensemble) overrides this to rebuild its own structure first.
        """
        load_state_dict_strict(model, load_final_state(checkpoint, model), checkpoint, what)
        return model

    def state_dict(self) -> dict[str, Any]:
        """Method state that a checkpoint must carry to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def default_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.ndim >= 2 and not name.endswith(("pos_embed", "cls_token", "positional_embedding"))
        (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class OneRunInputs(MethodConfig):
    """The input of a post-hoc method over one finished run (WiSE-FT, output ensembles, VRF)."""

    finetuned_run: Path | None = Field(
        None, description="directory of a finished fine-tuning run from this model (required)"
    )


class SeveralRunsInputs(MethodConfig):
    """The inputs of a post-hoc method over several finished runs (Model Soups)."""

    ingredients: list[Path] = Field(
        [], description="finished fine-tuning runs from this model, or folders of them (a sweep)"
    )


class PosthocMethod(Method):
    """Base of the methods that train nothing and combine finished runs into a new predictor.

    A post-hoc method owns its inputs: ``several_runs`` says whether it takes one finished run (the
    ``finetuned_run`` option of :class:`OneRunInputs`) or several (``ingredients`` of
    :class:`SeveralRunsInputs`), :meth:`input_options` turns run directories into those options (what
    ``robustft posthoc`` and ``robustft compare`` use, instead of knowing option names), and
    :meth:`check_inputs` refuses missing or unfinished runs before any work. Subclasses add the splits
    they need by overriding :meth:`check_inputs` and do their work in ``finalize``.
    """

    trains = False
    several_runs: ClassVar[bool] = False
    """False: one finished run (``finetuned_run``); True: several (``ingredients``, folders expanded)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.needs_finetuned_run = not cls.several_runs
        cls.needs_ingredients = cls.several_runs

    @classmethod
    def input_option(cls) -> str:
        return "ingredients" if cls.several_runs else "finetuned_run"

    @classmethod
    def input_options(cls, runs: list[Path] | list[str]) -> dict[str, Any]:
        """The method options that name ``runs`` as its inputs."""
        if cls.several_runs:
            if not runs:
                raise ConfigError(f"{cls.name} combines finished runs; give at least one")
            return {"ingredients": [str(run) for run in runs]}
        if len(runs) != 1:
            raise ConfigError(f"{cls.name} combines one finished run; got {len(runs)}: {', '.join(map(str, runs))}")
        return {"finetuned_run": str(runs[0])}

    def input_runs(self) -> list[Path]:
        """The run directories this method combines (folders of runs expanded, each once), all finished.

        Raises:
            ConfigError: no input given, or a directory that is not a finished run.
        """
        from robustft.posthoc import final_checkpoint, find_runs

        if not self.several_runs:
            run = getattr(self.config, "finetuned_run", None)
            if run is None:
                raise ConfigError(f"method.finetuned_run: {self.name} needs the directory of a finished run")
            final_checkpoint(run)
            return [Path(run)]
        entries = getattr(self.config, "ingredients", None) or []
        if not entries:
            raise ConfigError(f"method.ingredients: {self.name} needs at least one finished fine-tuning run")
        runs: dict[Path, Path] = {}
        for entry in entries:
            for run in find_runs(entry):
                runs.setdefault(run.resolve(), run)
        return list(runs.values())

    def check_inputs(self, ctx: RunContext) -> list[Path]:
        """Check the inputs and the splits this method needs before any work; returns the input runs."""
        return self.input_runs()

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.check_inputs(ctx)
        record_preset(self.config, ctx)
        return model.requires_grad_(False)


def record_preset(config: MethodConfig, ctx: RunContext) -> None:
    """Put the preset and the effective values of the options it governs into the results entry."""
    if config.paper_preset:
        options = config.model_dump(mode="json", include=set(config.paper_preset))
        ctx.extras["preset"] = config.preset
        ctx.extras["preset_options"] = options
