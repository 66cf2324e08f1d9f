"""One run, end to end: config -> model + data -> method hooks in the engine -> predictor -> results.

The CLI calls these functions; they know no command-line parsing.
"""

from __future__ import annotations

import copy
import json
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from robustft import distributed, progress
from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.backbones.classifier import ImageClassifier
from robustft.backbones.factory import build_classifier, load_backbone
from robustft.class_spaces import IDENTITY, ClassSpace, class_space_of, training_class_space
from robustft.config import RunConfig, load_config, write_resolved_config
from robustft.data import auto_num_workers, load_splits, sequential_loader
from robustft.engine import Engine, OutOfMemoryError, resolve_device, seed_everything
from robustft.errors import CheckpointError, ConfigError, RobustftError, RunDirectoryError, UnsupportedModelError
from robustft.evaluate import evaluate_splits, summarize
from robustft.files import atomic_write_json
from robustft.layout import FINAL_CHECKPOINT, METRICS_FILE, RESULTS_FILE
from robustft.logit_cache import LogitCache
from robustft.methods import build_method, method_options
from robustft.methods.base import Method, PosthocMethod, RunContext
from robustft.precision import autocast_context, autocast_dtype
from robustft.results_schema import declared_by, results_document
from robustft.run_directory import (
    RunLock,
    check_writable_location,
    config_differences,
    is_finished,
    make_run_directory,
    removed_on_failure,
)
from robustft.run_metadata import final_metadata
from robustft.safe_io import read_json_object, read_jsonl, read_yaml_mapping
from robustft.statistics import PREDICTIONS_FILE, accuracy_intervals, correctness, save_predictions, stack_seeds
from robustft.tracking import flat_params, log_evaluation
from robustft.weight_references import references_path, save_final_checkpoint

LAST_CHECKPOINT = "checkpoints/last.pt"


@dataclass
class Prepared:
    """Everything a run needs before its method is applied."""

    model: ImageClassifier
    ctx: RunContext
    benchmark: str


def benchmark_name(config: RunConfig) -> str:
    if config.data.protocol is not None:
        return config.data.protocol.name
    return config.data.benchmark or str(config.data.root or config.data.splits.get("train", "custom"))


def prepare_run(config: RunConfig, log: Callable[[str], None] = print) -> Prepared:
    """Load backbone and data, build the zero-shot classifier and the run context."""
    seed_everything(config.seed)
    device = resolve_device(config.train.device)
    try:
        loaded = load_backbone(config.model)
    except RobustftError as error:
        raise_with_data_problems(config, error)
        raise
    splits, class_names = load_splits(config.data, loaded.data_config)

    def embed_train(backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return _embed(backbone, splits["train"], device, config.data.eval_batch_size)

    model = build_classifier(config.model, loaded, class_names, embed_train).to(device)
    workers = config.data.num_workers
    ctx = RunContext(
        run_dir=config.run_dir,
        device=device,
        seed=config.seed,
        splits=splits,
        class_names=class_names,
        eval_batch_size=config.data.eval_batch_size,
        num_workers=auto_num_workers(splits) if workers == "auto" else workers,
        log=log,
        model_spec=config.model.model_dump(mode="json"),
        autocast_dtype=autocast_dtype(config.train.precision, device),
        logit_cache=LogitCache(),
    )
    return Prepared(model, ctx, benchmark_name(config))


def raise_with_data_problems(config: RunConfig, model_error: RobustftError) -> None:
    """A model that fails to load and data that fail to read are reported together (one line each)."""
    from robustft.preflight import PreflightError, check_runs

    found = check_runs([(config.name, config)], log=_quiet)
    if len(found.problems) > 1:
        raise PreflightError(found.problems) from model_error


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or apply) the configured method, evaluate every split, write the run directory.

    Returns the results.json content. ``prepared`` lets callers (the demo) reuse loaded data; its
    model is copied, never modified.

    Nothing is written before the whole config and the data have been validated (device, data,
    class count, method options and the method's own files): a bad input leaves the disk as it was.
    A finished run is never changed unless ``overwrite``: ``resume`` on it with the same config
    returns its results, with another config it is refused naming the keys that differ. The run
    directory is locked (robustft.run_directory.RunLock) while it is written.

    Under torchrun every rank runs this function (docs/distributed.md): all ranks prepare, train
    and score their shard of each split; rank 0 alone logs and writes the run directory.
    """
    distributed.init_from_env(resolve_device(config.train.device))
    main = distributed.is_main_process()
    log = log if main else _quiet
    method = build_method(config)
    run_dir = config.run_dir
    if main:
        check_writable_location(run_dir)
        finished = check_finished_run(config, resume, overwrite)
        if finished is not None:
            log(f"{run_dir}: finished before with this config; nothing to resume")
            return finished
        if resume:
            check_resumable(run_dir)
    pristine = prepared is not None  # the caller's model stays as prepared: its tensors are the initial weights
    if prepared is None:
        prepared = prepare_run(config, log)
        model = prepared.model
    else:
        seed_everything(config.seed)
        model = copy.deepcopy(prepared.model)
    ctx = prepared.ctx.for_run(run_dir, config.seed, log)
    check_class_count(model, ctx.class_names)
    initial = None
    if not method.trains:  # what a zero-shot or post-hoc predictor may reference instead of copying
        source = prepared.model.state_dict() if pristine else model.state_dict()
        initial = {key: value.detach() if pristine else value.detach().clone() for key, value in source.items()}
    incompatible = method.check_model(model, config.model.model_dump(mode="json"))
    if incompatible:
        raise UnsupportedModelError(incompatible)
    created = make_run_directory(run_dir) if main else None
    with RunLock(run_dir) if main else nullcontext():
        with removed_on_failure(created):
            if main:
                check_finished_run(config, resume, overwrite)  # again, now that no other writer can finish it
            start = time.perf_counter()
            with eval_memory_advice(config, ctx.device):
                model = method.prepare(model, ctx)
                trainable = count_trainable(model)
        with training_class_space(model, train_class_space(ctx, method)):
            with removed_on_failure(created):
                with eval_memory_advice(config, ctx.device), autocast_context(ctx.device, ctx.autocast_dtype):
                    method.setup(model, ctx)
                if main:
                    start_run_directory(config, resume, overwrite)
            engine = Engine(config.train, config.optim, config.data.batch_size)
            summary = engine.fit(method, model, ctx, resume=resume)
        shown = config.train.progress and main
        with (
            eval_memory_advice(config, ctx.device),
            progress.phase(f"{method.name}: post-hoc", None, shown and not method.trains),
        ):
            predictor = method.finalize(model, ctx)
        train_seconds = summary.previous_train_seconds + time.perf_counter() - start
        if summary.stopped_early:
            log(f"stopped after step {summary.steps} (train.stop_after); continue with --resume")
            return {}
        if main:
            metadata = final_metadata(predictor, ctx.model_spec, ctx.class_names, method.result_name)
            save_predictor(predictor, method, run_dir, initial, log, metadata)
        batches = progress.batch_count(ctx.splits, ctx.eval_batch_size)
        with (
            eval_memory_advice(config, ctx.device),
            progress.phase(f"{method.result_name}: evaluating", batches, shown),
        ):
            entry, predictions = scored_entry(predictor, ctx, config.evaluate.temperature_scaling, ctx.logit_cache)
        entry |= {"train_seconds": train_seconds, "trainable_params": trainable, "steps": summary.steps}
        entry |= {key: value for key, value in ctx.extras.items() if is_json_value(value)} | declared_by(method)
        results = results_document(prepared.benchmark, config.seed, {method.result_name: entry})
        if main:
            write_results(run_dir, results, log, predictions)
            params = flat_params(resolved_config(config))
            log_evaluation(config.train, run_dir, params, entry, method.result_name, summary.steps, log)
            if not config.train.keep_last_checkpoint:
                (run_dir / LAST_CHECKPOINT).unlink(missing_ok=True)  # optimiser state: only a resume needs it
            took = progress.format_seconds(time.perf_counter() - start)
            log(f"{run_dir}: {method.result_name} finished in {took}: {progress.results_summary(entry)}")
        distributed.barrier()  # the run directory is complete before any rank returns
    return results


def save_predictor(
    predictor: nn.Module,
    method: Method,
    run_dir: Path,
    initial: dict[str, torch.Tensor] | None,
    log: Callable[[str], None],
    metadata: dict[str, str] | None = None,
) -> None:
    """``final.safetensors``: all of a trained predictor; of a run that trains nothing (zero-shot, post-hoc),
    only what is new, the rest referenced to its model and input runs (``robustft.weight_references``)."""
    path = run_dir / FINAL_CHECKPOINT
    if initial is None:
        save_state_dict_file(predictor.state_dict(), path, metadata)
        return
    inputs = method.input_runs() if isinstance(method, PosthocMethod) else []
    sizes = save_final_checkpoint(predictor.state_dict(), path, initial, inputs, metadata)
    if sizes["referenced"]:
        log(f"{path}: {sizes['written'] / 2**20:.1f} MiB written, {sizes['referenced'] / 2**20:.1f} MiB referenced")


def write_results(
    run_dir: Path, results: dict[str, Any], log: Callable[[str], None], predictions: dict[str, Any] | None = None
) -> None:
    """Write the per-image ``predictions`` (``robustft.statistics``), then results.json, atomically; if either
    fails, the results go to the log first, so an evaluation is never lost."""
    try:
        if predictions is not None:
            save_predictions(run_dir / PREDICTIONS_FILE, predictions)
        atomic_write_json(run_dir / RESULTS_FILE, results)
    except RobustftError:
        log(f"not saved, the results were: {json.dumps(results)}")
        raise


def scored_entry(
    predictor: nn.Module, ctx: RunContext, temperature_scaling: bool, cache: LogitCache | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A predictor's results entry on every split of ``ctx`` (metrics, summary, 95% intervals) and the per-image
    predictions they come from."""
    predictions: dict[str, Any] = {}
    metrics = evaluate_splits(
        predictor,
        ctx.splits,
        ctx.device,
        ctx.eval_batch_size,
        ctx.num_workers,
        temperature_scaling=temperature_scaling,
        predictions=predictions,
        cache=cache,
        autocast_dtype=ctx.autocast_dtype,
    )
    return summarize(metrics) | confidence_intervals(predictions), predictions


def confidence_intervals(predictions: dict[str, Any]) -> dict[str, Any]:
    """The results entry's ``ci``: 95% bootstrap intervals of ID, each OOD split and the OOD average
    (``robustft.statistics.accuracy_intervals``), from the run's own predictions (one seed)."""
    runs = [correctness(predictions)]
    intervals = accuracy_intervals(stack_seeds(runs)) if predictions else {}
    return {"ci": intervals} if intervals else {}


def resolved_config(config: RunConfig) -> dict[str, Any]:
    """What config.yaml holds: the whole config, method options and defaults filled in, as plain JSON values."""
    data = config.model_dump(mode="json")
    data["method"] = {"name": config.method.name, **method_options(config).model_dump(mode="json")}
    return json.loads(json.dumps(data))


def check_finished_run(config: RunConfig, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Refuse to change a finished run; its results when ``resume`` finds it finished with this config."""
    run_dir = config.run_dir
    if overwrite or not is_finished(run_dir):
        return None
    if not resume:
        raise RunDirectoryError(
            f"{run_dir}: holds a finished run ({RESULTS_FILE}); refusing to overwrite it: use another name "
            "(--set name=...), or --overwrite to replace it"
        )
    saved = read_yaml_mapping(run_dir / "config.yaml")
    differences = config_differences(resolved_config(config), saved)
    if differences:
        raise RunDirectoryError(
            f"{run_dir}: --resume of a finished run with a different config ({'; '.join(differences)}); "
            "refusing to change it: use another name (--set name=...), or --overwrite to replace it"
        )
    return read_json_object(run_dir / RESULTS_FILE)


def check_resumable(run_dir: Path) -> None:
    """Name a torn checkpoint or a corrupt metrics.jsonl before anything is loaded or written."""
    checkpoint = run_dir / LAST_CHECKPOINT
    if checkpoint.is_file() and not zipfile.is_zipfile(checkpoint):  # torch.save writes a zip, its index last
        raise CheckpointError(f"{checkpoint}: corrupt or truncated checkpoint (no zip index: a torn write?)")
    if (run_dir / METRICS_FILE).is_file():
        read_jsonl(run_dir / METRICS_FILE)  # a torn last line is dropped on resume; a bad line before it is named


def start_run_directory(config: RunConfig, resume: bool, overwrite: bool = False) -> None:
    """Clear what an earlier run left (all of it unless resuming; its results when overwriting) and write
    config.yaml, atomically. results.json goes first: a run replaced half-way never looks finished."""
    run_dir = config.run_dir
    stale = (
        [RESULTS_FILE, FINAL_CHECKPOINT, str(references_path(Path(FINAL_CHECKPOINT)))]
        if overwrite or not resume
        else []
    )
    stale += [LAST_CHECKPOINT, METRICS_FILE] if not resume else []
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    write_resolved_config(config, run_dir / "config.yaml", method_options(config))


def train_class_space(ctx: RunContext, method: Method) -> ClassSpace:
    """The train split's declared class space (CoOp base-to-new: the base classes), which training is
    restricted to (robustft.class_spaces.training_class_space); label smoothing would put target mass on
    the masked ``-inf`` logits, so it is refused there."""
    space = class_space_of(ctx.splits["train"]) if "train" in ctx.splits else IDENTITY
    if space.kind != "identity" and getattr(method.config, "label_smoothing", 0):
        raise ConfigError("method.label_smoothing: must be 0 when the train split declares a class space (base_to_new)")
    return space


def _quiet(message: str) -> None:
    """The log of ranks other than 0: one line per run, not one per process."""


def check_class_count(model: nn.Module, class_names: list[str]) -> None:
    """A head with C outputs cannot score data with C' != C classes: a ConfigError naming both counts."""
    outputs = getattr(model, "num_classes", None)
    if outputs is not None and outputs != len(class_names):
        raise ConfigError(
            f"class count mismatch: the model's head has {outputs} classes but the data has {len(class_names)} "
            "(data.class_names / data.splits); use data with the classes the model was built for"
        )


def check_checkpoint_classes(path: Path, class_names: list[str]) -> None:
    """Read only the header of a safetensors checkpoint: does its ``head`` match the data's class count?"""
    if path.suffix != ".safetensors" or not path.is_file():
        return  # load_predictor names a missing or foreign file
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            if "head.weight" not in names:
                return
            outputs = handle.get_slice("head.weight").get_shape()[0]
    except Exception:  # a torn file: load_predictor names it
        return
    if outputs != len(class_names):
        raise ConfigError(
            f"class count mismatch: {path} has a head with {outputs} classes but the data has "
            f"{len(class_names)} (data.class_names / data.splits in the run's config.yaml)"
        )


@contextmanager
def eval_memory_advice(config: RunConfig, device: torch.device) -> Iterator[None]:
    """Turn a GPU out-of-memory error in inference (pre-passes, evaluation) into one line of advice."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        size = config.data.eval_batch_size
        raise OutOfMemoryError(
            f"out of GPU memory on {device} during inference at data.eval_batch_size={size}; "
            f"try data.eval_batch_size={max(1, size // 2)}"
        ) from None


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
    """Re-evaluate a finished run from its resolved config and final checkpoint.

    Every file is read and checked before the evaluation starts (a torn results.json is named at
    once, not after a long evaluation), and the new results.json is written atomically.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    config = config.model_copy(update={"output_dir": run_dir.parent, "name": run_dir.name})
    previous = run_dir / RESULTS_FILE
    saved = read_json_object(previous).get("methods") if previous.is_file() else None
    if saved is not None and not isinstance(saved, dict):
        raise RunDirectoryError(f"{previous}: corrupt: 'methods' is not a mapping of method names to results")
    check_writable_location(run_dir)
    distributed.init_from_env(resolve_device(config.train.device))
    main = distributed.is_main_process()
    with RunLock(run_dir) if main else nullcontext():
        results = _evaluate_locked(config, run_dir, saved, main, log)
    distributed.barrier()
    return results


def _evaluate_locked(
    config: RunConfig, run_dir: Path, saved: dict[str, Any] | None, main: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    prepared = prepare_run(config, log if main else _quiet)
    method: Method = build_method(config, str(run_dir / "config.yaml"))
    check_checkpoint_classes(run_dir / FINAL_CHECKPOINT, prepared.ctx.class_names)
    predictor = method.load_predictor(prepared.model, run_dir / FINAL_CHECKPOINT, config.model.name)
    ctx = prepared.ctx
    with eval_memory_advice(config, ctx.device):
        entry, predictions = scored_entry(predictor, ctx, config.evaluate.temperature_scaling, None)
    name = method.result_name
    if saved:
        name = next(iter(saved)) if len(saved) == 1 else name  # keeps a composed run's "gmixout+vrf"
        entry = {**saved.get(name, {}), **entry}
    results = results_document(prepared.benchmark, config.seed, {name: entry | declared_by(method)})
    if main:
        write_results(run_dir, results, log, predictions)
    return results
