"""One run, end to end: config -> model + data -> method hooks in the engine -> predictor -> results.

The CLI calls these functions; they know no command-line parsing.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.backbones.classifier import ImageClassifier
from robustft.backbones.factory import build_classifier, load_backbone
from robustft.config import RunConfig, load_config, write_resolved_config
from robustft.data import load_splits, sequential_loader
from robustft.engine import Engine, resolve_device, seed_everything
from robustft.evaluate import evaluate_splits, summarize
from robustft.methods import RunContext, get_method
from robustft.methods.base import Method

RESULTS_FILE = "results.json"
FINAL_CHECKPOINT = "checkpoints/final.safetensors"


@dataclass
class Prepared:
    """Everything a run needs before its method is applied."""

    model: ImageClassifier
    ctx: RunContext
    benchmark: str


def benchmark_name(config: RunConfig) -> str:
    return config.data.benchmark or str(config.data.root or config.data.splits.get("train", "custom"))


def prepare_run(config: RunConfig, log: Callable[[str], None] = print) -> Prepared:
    """Load backbone and data, build the zero-shot classifier and the run context."""
    seed_everything(config.seed)
    device = resolve_device(config.train.device)
    loaded = load_backbone(config.model)
    splits, class_names = load_splits(config.data, loaded.data_config)

    def embed_train(backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return _embed(backbone, splits["train"], device, config.data.eval_batch_size)

    model = build_classifier(config.model, loaded, class_names, embed_train).to(device)
    ctx = RunContext(
        run_dir=config.run_dir,
        device=device,
        seed=config.seed,
        splits=splits,
        class_names=class_names,
        eval_batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        log=log,
        model_spec=config.model.model_dump(mode="json"),
    )
    return Prepared(model, ctx, benchmark_name(config))


@torch.no_grad()
def _embed(backbone: nn.Module, split: Dataset, device: torch.device, batch_size: int):
    backbone.eval()
    embeddings, labels = [], []
    for images, batch_labels in sequential_loader(split, batch_size):
        embeddings.append(backbone(images.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(embeddings), torch.cat(labels)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit(
    config: RunConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Train (or apply) the configured method, evaluate every split, write the run directory.

    Returns the results.json content. ``prepared`` lets callers (the demo) reuse loaded data; its
    model is copied, never modified.
    """
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir / "config.yaml")
    if prepared is None:
        prepared = prepare_run(config, log)
        model = prepared.model
    else:
        seed_everything(config.seed)
        model = copy.deepcopy(prepared.model)
    ctx = prepared.ctx.for_run(run_dir, config.seed, log)
    method = get_method(config.method.name)(config.method_options())
    start = time.perf_counter()
    model = method.prepare(model, ctx)
    trainable = count_trainable(model)
    method.setup(model, ctx)
    engine = Engine(config.train, config.optim, config.data.batch_size)
    summary = engine.fit(method, model, ctx, resume=resume)
    predictor = method.finalize(model, ctx)
    train_seconds = time.perf_counter() - start
    if summary.stopped_early:
        log(f"stopped after step {summary.steps} (train.stop_after); continue with --resume")
        return {}
    save_state_dict_file(predictor.state_dict(), run_dir / FINAL_CHECKPOINT)
    entry = summarize(evaluate_splits(predictor, ctx.splits, ctx.device, ctx.eval_batch_size, ctx.num_workers))
    entry |= {"train_seconds": train_seconds, "trainable_params": trainable, "steps": summary.steps}
    entry |= {key: value for key, value in ctx.extras.items() if is_json_value(value)}
    results = {"benchmark": prepared.benchmark, "seed": config.seed, "methods": {method.result_name: entry}}
    (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results


def is_json_value(value: Any) -> bool:
    """Whether ``value`` is plain JSON (scalars, and lists / str-keyed dicts of them): what results.json takes."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_json_value(item) for key, item in value.items())
    return False


def evaluate_run(run_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-evaluate a finished run from its resolved config and final checkpoint."""
    config = load_config(run_dir / "config.yaml")
    config = config.model_copy(update={"output_dir": run_dir.parent, "name": run_dir.name})
    prepared = prepare_run(config, log)
    method: Method = get_method(config.method.name)(config.method_options())
    predictor = method.load_predictor(prepared.model, run_dir / FINAL_CHECKPOINT, config.model.name)
    ctx = prepared.ctx
    entry = summarize(evaluate_splits(predictor, ctx.splits, ctx.device, ctx.eval_batch_size))
    previous = run_dir / RESULTS_FILE
    name = method.result_name
    if previous.is_file():
        saved = json.loads(previous.read_text())["methods"]
        name = next(iter(saved)) if len(saved) == 1 else name  # keeps a composed run's "gmixout+vrf"
        entry = {**saved.get(name, {}), **entry}
    results = {"benchmark": prepared.benchmark, "seed": config.seed, "methods": {name: entry}}
    previous.write_text(json.dumps(results, indent=2))
    return results
